"""kiln refresh against a real registry whose tags the tests move: exactly the changed
recipes rebuild, a registry that is down fails only its recipes, one refresh per root."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder import proc, refresh
from builder.demoimage import push
from builder.localregistry import LocalRegistry
from builder.root import Root
from builder.source import RegistryOptions
from builder.store import Store, Volume
from helper.base.errors import Conflict, UsageError
from tests.support.images import busybox_layout
from tests.support.timing import limit

PLAIN = RegistryOptions(tls_verify=False)
KILN_DIST = [sys.executable, "-c",
             "from runner.cli import cli; cli(prog_name='kiln')"]


def kiln(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KILN_DIST, "--root", str(root), *args], capture_output=True,
                          text=True, timeout=120, check=False)


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[LocalRegistry]:
    """A registry of the test's own holding up/a:1 and up/b:1 (busybox)."""
    with LocalRegistry(data_dir=tmp_path / "regdata") as reg:
        for name in ("a", "b"):
            push(busybox_layout(), "1", f"docker://{reg.address}/up/{name}:1")
        yield reg


def recipe(d: Path, name: str, source: str, *, label: bool = True) -> Path:
    """A recipe; with ``label`` its content differs from every other name's (one image with
    the same content is one volume, whatever the source says)."""
    d.mkdir(exist_ok=True)
    p = d / f"{name}.toml"
    extra = f'labels = {{ recipe = "{name}" }}\n' if label else ""
    p.write_text(f'source = "{source}"\nplatform = "linux/amd64"\n{extra}')
    return p


@pytest.fixture
def recipes(upstream: LocalRegistry, tmp_path: Path) -> list[Path]:
    return [recipe(tmp_path / "recipes", n, f"docker://{upstream.address}/up/{n}:1")
            for n in ("a", "b")]


def blob_gets(reg: LocalRegistry) -> int:
    return sum(1 for a in reg.access_log() if a.method == "GET" and "/blobs/" in a.path)


# -- pure ------------------------------------------------------------------------------------


def test_expand_and_errors(tmp_path: Path) -> None:
    a = recipe(tmp_path / "r", "a", "docker://x.example/a:1")
    b = recipe(tmp_path / "r", "b", "docker://x.example/b:1")
    assert refresh.expand([tmp_path / "r", a]) == [a, b]  # a directory's *.toml, no duplicates
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"/empty holds no \*\.toml recipe$"):
        refresh.expand([tmp_path / "empty"])
    with pytest.raises(UsageError, match=r"^nope.toml: no such recipe file or directory$"):
        refresh.expand(["nope.toml"])
    root = Root(tmp_path / "root")
    with pytest.raises(UsageError) as e:
        refresh.refresh(root, [], PLAIN)
    assert e.value.message == f"no recipe was built under {root.path} yet"
    with pytest.raises(UsageError, match=r"^--jobs must be at least 1, not 0$"):
        refresh.refresh(root, [a], PLAIN, jobs=0)


def test_latest_by_recipe_and_push_tag(tmp_path: Path) -> None:
    def vol(n: str, rec: str | None, created: str) -> Volume:
        return Volume(f"sha256:{n * 64}", tmp_path, {"recipe": rec, "created": created})

    got = refresh.latest_by_recipe([vol("1", "/r/a.toml", "2026-01-01T00:00:00Z"),
                                    vol("2", "/r/a.toml", "2026-02-01T00:00:00Z"),
                                    vol("3", None, "2026-03-01T00:00:00Z"),
                                    vol("4", "/r/b.toml", "2025-01-01T00:00:00Z")])
    assert {str(k): v.id[7:8] for k, v in got.items()} == {"/r/a.toml": "2", "/r/b.toml": "4"}
    assert refresh.push_tag("sha256:0123456789abcdef" + "0" * 48) == "0123456789ab"


# -- real registry -----------------------------------------------------------------------------


def test_moved_tag_rebuilds_exactly_that_recipe(upstream: LocalRegistry, recipes: list[Path],
                                                tmp_path: Path) -> None:
    root = Root(tmp_path / "root")
    first = refresh.refresh(root, recipes, PLAIN, jobs=2)
    assert [r.action for r in first] == ["rebuilt", "rebuilt"], [r.error for r in first]
    assert all(r.old_digest is None and r.new_digest for r in first)

    gets = blob_gets(upstream)
    t0 = time.monotonic()
    again = refresh.refresh(root, [], PLAIN)  # no arguments: every recipe built before
    assert [(Path(r.recipe).name, r.action) for r in again] == [("a.toml", "unchanged"),
                                                                 ("b.toml", "unchanged")]
    assert blob_gets(upstream) == gets  # resolving only: no pull
    assert time.monotonic() - t0 < limit(5)

    push(busybox_layout(), "2", f"docker://{upstream.address}/up/a:1")  # upstream moves a:1
    moved = refresh.refresh(root, [], PLAIN)
    a, b = moved
    assert (a.action, b.action) == ("rebuilt", "unchanged")
    assert a.old_digest == first[0].new_digest
    assert a.new_digest != a.old_digest
    assert a.volume_id != first[0].volume_id
    assert b.volume_id == first[1].volume_id
    assert len(Store(root).list()) == 3


def test_recipes_sharing_a_volume_are_all_refreshed(upstream: LocalRegistry,
                                                    tmp_path: Path) -> None:
    """a and b: the same image from two repositories, the same content: one volume, and
    both recipes are remembered for a refresh without arguments."""
    paths = [recipe(tmp_path / "same", n, f"docker://{upstream.address}/up/{n}:1", label=False)
             for n in ("a", "b")]
    root = Root(tmp_path / "root")
    first = refresh.refresh(root, paths, PLAIN, jobs=1)
    assert [r.action for r in first] == ["rebuilt", "unchanged"], [r.error for r in first]
    assert first[0].volume_id == first[1].volume_id
    again = refresh.refresh(root, [], PLAIN)
    assert [(Path(r.recipe).name, r.action) for r in again] == [("a.toml", "unchanged"),
                                                                 ("b.toml", "unchanged")]
    push(busybox_layout(), "2", f"docker://{upstream.address}/up/b:1")  # upstream moves b:1
    moved = refresh.refresh(root, [], PLAIN)
    assert [(Path(r.recipe).name, r.action) for r in moved] == [("a.toml", "unchanged"),
                                                                 ("b.toml", "rebuilt")]
    assert moved[0].volume_id == first[0].volume_id != moved[1].volume_id
    assert len(Store(root).list()) == 2


@pytest.mark.slow
def test_registry_down_fails_only_its_recipes(upstream: LocalRegistry, recipes: list[Path],
                                             closed_address: str, tmp_path: Path) -> None:
    down = recipe(tmp_path / "recipes", "c", f"docker://{closed_address}/up/c:1")
    root = tmp_path / "root"
    res = kiln(root, "refresh", str(tmp_path / "recipes"), "--tls-verify=false", "--json")
    assert res.returncode == 1, res.stderr
    rows = {Path(r["recipe"]).name: r for r in json.loads(res.stdout)}
    assert [rows[n]["action"] for n in ("a.toml", "b.toml", "c.toml")] == [
        "rebuilt", "rebuilt", "failed"]
    assert rows["c.toml"]["error"].startswith(f"cannot connect to registry {closed_address}")
    assert rows["c.toml"]["volume_id"] is None
    assert rows["a.toml"]["volume_id"].startswith("sha")
    assert set(rows["a.toml"]) == {"recipe", "old_source_digest", "new_source_digest",
                                   "volume_id", "action", "seconds", "pushed", "error"}
    del down
    res = kiln(root, "refresh", *map(str, recipes), "--tls-verify=false")  # the table
    assert res.returncode == 0, res.stderr
    assert "a.toml" in res.stdout
    assert "unchanged" in res.stdout


@pytest.mark.slow
def test_second_refresh_exits_unless_wait(recipes: list[Path], tmp_path: Path) -> None:
    root = Root(tmp_path / "root")
    with refresh.refresh_lock(root, wait=False):
        with pytest.raises(Conflict) as e:
            with refresh.refresh_lock(root, wait=False):
                pass
        assert e.value.message == f"refresh already running (pid {os.getpid()})"
        res = kiln(root.path, "refresh", str(recipes[0]), "--tls-verify=false")
        assert res.returncode == 1
        assert f"error: refresh already running (pid {os.getpid()})" in res.stderr
        waiting = subprocess.Popen([*KILN_DIST, "--root", str(root.path), "refresh",
                                    str(recipes[0]), "--tls-verify=false", "--wait", "--json"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        assert waiting.poll() is None  # queued behind us
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, err
    assert [r["action"] for r in json.loads(out)] == ["rebuilt"]


def test_push_prefix_tags_key_and_latest(upstream: LocalRegistry, recipes: list[Path],
                                         tmp_path: Path) -> None:
    root = Root(tmp_path / "root")
    prefix = f"{upstream.address}/published"
    rows = refresh.refresh(root, recipes[:1], PLAIN, push_prefix=prefix)
    assert rows[0].action == "rebuilt", rows[0].error
    key = Store(root).get(str(rows[0].volume_id)).meta["build_key"]
    assert rows[0].pushed == f"{prefix}/a:{key[7:19]}"

    def digest(tag: str) -> str:
        raw = proc.run("skopeo", ["inspect", "--raw", "--tls-verify=false",
                                  f"docker://{prefix}/a:{tag}"]).stdout
        return "sha256:" + hashlib.sha256(raw).hexdigest()

    assert digest(key[7:19]) == digest("latest")
    n = len(upstream.access_log())
    rows = refresh.refresh(root, recipes[:1], PLAIN, push_prefix=prefix)
    assert rows[0].action == "unchanged"
    later = [a for a in upstream.access_log()[n:] if "/published/" in a.path]
    assert {a.method for a in later} == {"HEAD"}  # tags current: nothing pushed again
    with pytest.raises(UsageError, match="invalid registry reference"):
        refresh.refresh(root, recipes, PLAIN, push_prefix="no host")
