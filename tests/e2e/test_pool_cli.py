"""`kiln pool …` and `kiln snapshot …` through the real command (a subprocess running the
venv's code): the JSON contract, idempotent init, exact error texts, SIGKILL at each named
step of snapshot creation, destroy leaving no mount or loop device, and one real build."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder.pool.base import FAULT_STEPS
from tests.support.pool import force_cleanup, leftovers, make_volume, sha

pytestmark = [pytest.mark.root, pytest.mark.loop]

KILN = [sys.executable, "-c",
        "from runner.cli import cli; "
        "cli(prog_name='kiln')"]


def kiln(root: Path, *args: str, env: dict[str, str] | None = None,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([*KILN, "--root", str(root), *args], capture_output=True, text=True,
                         check=False, env={**os.environ, **(env or {})}, timeout=300)
    if check and res.returncode != 0:
        raise AssertionError(f"kiln {' '.join(args)} exited {res.returncode}: {res.stderr}")
    return res


@pytest.fixture
def kroot(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "root"
    for d in ("locks", "volumes", "tmp", "keys", "blobs/sha256"):
        (root / d).mkdir(parents=True)
    yield root
    kiln(root, "pool", "destroy", "--force", check=False)
    force_cleanup(root)


@pytest.mark.slow
def test_no_pool_errors_then_init_twice_status_and_snapshots(kroot: Path) -> None:
    vid, _ = make_volume(kroot)
    res = kiln(kroot, "snapshot", "create", vid[7:15], check=False)
    assert res.returncode == 1
    assert res.stderr.splitlines()[0] == "error: no pool: run `kiln pool init`"
    assert json.loads(kiln(kroot, "snapshot", "ls", "--json").stdout) == []

    first = json.loads(kiln(kroot, "pool", "init", "--fs", "btrfs", "--size", "512M",
                            "--json").stdout)
    assert first["backend"] == "reflink"
    assert first["thin"] is True
    assert first["created"] is True
    assert first["imported"] == 1
    assert first["volumes"] == 1
    assert "loop-mounted btrfs image" in first["reason"]
    again = kiln(kroot, "pool", "init")
    assert again.returncode == 0
    assert "pool exists: reflink" in again.stdout
    clash = kiln(kroot, "pool", "init", "--backend", "copy", check=False)
    assert clash.returncode == 1
    assert clash.stderr.splitlines()[0] == "error: this root already has a reflink pool"

    st = json.loads(kiln(kroot, "pool", "status", "--json").stdout)
    assert {k: st[k] for k in ("backend", "thin", "volumes", "snapshots")} == \
        {"backend": "reflink", "thin": True, "volumes": 1, "snapshots": 0}
    assert st["capacity"] == 512 << 20
    assert 0 < st["used"] < st["capacity"]

    snap = json.loads(kiln(kroot, "snapshot", "create", vid[7:15], "--size", "128M",
                           "--json").stdout)
    assert set(snap) >= {"id", "volume", "path", "size", "thin"}
    assert snap["volume"] == vid
    assert snap["size"] == 128 << 20
    assert snap["thin"] is True
    assert len(snap["id"]) == 16
    assert set(snap["id"]) <= set("abcdefghijklmnopqrstuvwxyz234567")
    subprocess.run(["e2fsck", "-fn", snap["path"]], check=True, capture_output=True)
    listed = json.loads(kiln(kroot, "snapshot", "ls", "--json").stdout)
    assert [s["id"] for s in listed] == [snap["id"]]
    assert json.loads(kiln(kroot, "pool", "status", "--json").stdout)["snapshots"] == 1

    refuse = kiln(kroot, "pool", "destroy", check=False)
    assert refuse.returncode == 1
    assert refuse.stderr.splitlines()[0] == "error: the pool still holds 1 snapshot(s)"
    assert kiln(kroot, "snapshot", "rm", snap["id"]).stdout.strip() == snap["id"]
    assert kiln(kroot, "pool", "destroy").returncode == 0
    assert leftovers(kroot) == ([], [])
    assert not (kroot / "pool").exists()
    assert sha(kroot / "volumes" / vid[7:] / "volume.ext4") == vid[7:]  # the store is intact


@pytest.mark.parametrize(("args", "message"), [
    (("snapshot", "rm", "zzzz"), "error: no snapshot zzzz"),
    (("snapshot", "rm", "../x"), "error: invalid snapshot id '../x'"),
    (("snapshot", "rm", "a/b"), "error: invalid snapshot id 'a/b'"),
    (("snapshot", "create", "../etc"), "error: invalid volume id '../etc'"),
    (("snapshot", "create", "dead"), "error: no volume matches 'dead'"),
    (("snapshot", "create", "VOL", "--size", "1M"), "error: snapshot size 1048576 is smaller "
                                                    "than its base (67108864)"),
    (("snapshot", "create", "VOL", "--size", "lots"), "error: invalid --size 'lots'"),
])
def test_bad_input_is_a_clear_error_and_makes_nothing(kroot: Path, args: tuple[str, ...],
                                                      message: str) -> None:
    vid, _ = make_volume(kroot)
    kiln(kroot, "pool", "init", "--fs", "btrfs", "--size", "512M")
    res = kiln(kroot, *[vid[7:15] if a == "VOL" else a for a in args], check=False)
    assert res.returncode == 1, res.stderr
    assert res.stderr.splitlines()[0] == message
    assert res.stderr.splitlines()[1].startswith("hint: ")
    assert os.listdir(kroot / "pool" / "snapshots") == []
    assert os.listdir(kroot / "pool" / "fs" / "snapshots") == []


def test_pool_init_rejects_bad_options(kroot: Path) -> None:
    res = kiln(kroot, "pool", "init", "--backend", "copy", "--fs", "xfs", check=False)
    assert res.returncode == 1
    assert res.stderr.splitlines()[0] == "error: --fs applies to the reflink backend, not copy"
    res = kiln(kroot, "pool", "init", "--backend", "dm-thin", check=False)
    assert res.returncode == 1
    assert res.stderr.splitlines()[0].startswith("error: dm-thin is not available here")
    res = kiln(kroot, "pool", "init", "--size", "1M", check=False)
    assert res.stderr.splitlines()[0] == "error: pool size 1048576 is too small"
    assert not (kroot / "pool").exists()
    assert leftovers(kroot) == ([], [])


@pytest.mark.parametrize("step", FAULT_STEPS)
def test_sigkill_at_each_snapshot_step_is_reclaimed(kroot: Path, step: str) -> None:
    vid, _ = make_volume(kroot)
    kiln(kroot, "pool", "init", "--fs", "btrfs", "--size", "512M")
    res = kiln(kroot, "snapshot", "create", vid[7:15], "--size", "128M",
               env={"KILN_FAULT_KILL_AT": step}, check=False)
    assert res.returncode == -signal.SIGKILL
    # The killed command left its record (or more) behind ...
    assert os.listdir(kroot / "pool" / "snapshots") != []
    # ... and the next command reclaims all of it.
    assert json.loads(kiln(kroot, "snapshot", "ls", "--json").stdout) == []
    assert os.listdir(kroot / "pool" / "snapshots") == []
    assert os.listdir(kroot / "pool" / "fs" / "snapshots") == []
    mounts, loops = leftovers(kroot)
    assert len(mounts) == 1
    assert len(loops) == 1
    # And the pool still works.
    snap = json.loads(kiln(kroot, "snapshot", "create", vid[7:15], "--json").stdout)
    assert sha(snap["path"]) == vid[7:]


def test_copy_backend_cli_says_not_thin(kroot: Path) -> None:
    vid, _ = make_volume(kroot)
    out = kiln(kroot, "pool", "init", "--backend", "copy").stdout
    assert "copy (not thin)" in out
    snap = json.loads(kiln(kroot, "snapshot", "create", vid[7:15], "--json").stdout)
    assert snap["thin"] is False
    assert "not thin" in kiln(kroot, "pool", "status").stdout


@pytest.mark.slow
def test_real_build_imports_on_demand(kroot: Path, busybox_image: str) -> None:
    built = json.loads(kiln(kroot, "build", busybox_image, "--tls-verify=false",
                            "--json").stdout)
    kiln(kroot, "pool", "init", "--backend", "reflink", "--fs", "xfs", "--size", "512M")
    snap = json.loads(kiln(kroot, "snapshot", "create", built["id"][7:19], "--json").stdout)
    assert snap["volume"] == built["id"]
    assert sha(snap["path"]) == built["id"][7:]
    ls = subprocess.run(["debugfs", "-R", "ls -p /bin", snap["path"]], capture_output=True,
                        text=True, check=True)
    assert "busybox" in ls.stdout
