"""The build stage end to end, through the real `kiln` command: a real registry on loopback,
a real busybox image made with umoci, real skopeo/umoci/mke2fs, checked with the tools'
own inspectors (sha256sum, dumpe2fs, debugfs, e2fsck)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder.demoimage import make_busybox_image, push
from builder.localregistry import LocalRegistry
from tests.support.cli import KILN, kiln


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    d = tmp_path_factory.mktemp("reg")
    with LocalRegistry(data_dir=d / "data") as r:
        make_busybox_image(d / "layout", "1")
        push(d / "layout", "1", f"docker://{r.address}/demo/busybox:1")
        make_busybox_image(d / "layout", "2", extra_files={"/etc/motd": b"hello\n"})
        push(d / "layout", "2", f"docker://{r.address}/demo/busybox:2")
        yield r


def blob_gets(r: LocalRegistry) -> int:
    return sum(1 for a in r.access_log() if a.method == "GET" and "/blobs/" in a.path)


@pytest.mark.slow
def test_build_json_contract_and_cache_hit(reg: LocalRegistry, tmp_path: Path) -> None:
    ref = f"docker://{reg.address}/demo/busybox:1"
    out = json.loads(kiln(tmp_path, "build", ref, "--tls-verify=false", "--json").stdout)
    assert set(out) >= {"id", "source", "source_digest", "path", "size", "cached", "build_key"}
    assert out["cached"] is False
    assert out["source"] == ref
    assert out["source_digest"].startswith("sha256:")
    assert len(out["source_digest"]) == 71
    assert isinstance(out["size"], int)
    assert out["size"] == os.path.getsize(out["path"])
    sha = subprocess.run(["sha256sum", out["path"]], capture_output=True, text=True,
                         check=True).stdout.split()[0]
    assert out["id"] == "sha256:" + sha
    # Inspect the volume with e2fsprogs' own tools.
    subprocess.run(["e2fsck", "-fn", out["path"]], check=True, capture_output=True)
    hdr = subprocess.run(["dumpe2fs", "-h", out["path"]], capture_output=True, text=True,
                         check=True).stdout
    assert "Filesystem volume name:   kiln" in hdr
    st = subprocess.run(["debugfs", "-R", "stat /bin/busybox", out["path"]],
                        capture_output=True, text=True, check=True).stdout
    assert "Type: regular" in st
    assert "Mode:  0755" in st
    # The same source again: cached, no blob fetched.
    before = blob_gets(reg)
    again = json.loads(kiln(tmp_path, "build", ref, "--no-tls-verify", "--json").stdout)
    assert again["cached"] is True
    assert again["id"] == out["id"]
    assert again["build_key"] == out["build_key"]
    assert blob_gets(reg) == before
    assert os.listdir(tmp_path / "tmp") == []


@pytest.mark.slow
def test_same_image_same_bytes_across_roots_and_umask(reg: LocalRegistry, tmp_path: Path) -> None:
    ref = f"docker://{reg.address}/demo/busybox:2"
    a = json.loads(kiln(tmp_path / "a", "build", ref, "--tls-verify=false", "--json").stdout)
    env = {"TZ": "Pacific/Kiritimati", "SOURCE_DATE_EPOCH": "12345"}
    old = os.umask(0o077)
    try:
        b = json.loads(kiln(tmp_path / "deeper" / "b", "build", ref, "--tls-verify=false",
                            "--json", env=env).stdout)
    finally:
        os.umask(old)
    assert a["id"] == b["id"]
    assert Path(a["path"]).read_bytes() == Path(b["path"]).read_bytes()


@pytest.mark.slow
def test_volume_commands(reg: LocalRegistry, tmp_path: Path) -> None:
    ref = f"docker://{reg.address}/demo/busybox:1"
    vid = json.loads(kiln(tmp_path, "build", ref, "--tls-verify=false", "--json").stdout)["id"]
    listed = json.loads(kiln(tmp_path, "volume", "ls", "--json").stdout)
    assert [v["id"] for v in listed] == [vid]
    assert {"id", "source", "size", "created"} <= set(listed[0])
    meta = json.loads(kiln(tmp_path, "volume", "inspect", vid[7:11]).stdout)
    assert meta["id"] == vid
    assert meta["config"]["Cmd"] == ["/bin/sh"]
    assert kiln(tmp_path, "volume", "verify", vid).stdout.startswith(f"ok {vid}")
    bad = kiln(tmp_path, "volume", "inspect", "zz", check=False)
    assert bad.returncode == 1
    assert "error: invalid volume id 'zz'" in bad.stderr
    assert "Traceback" not in bad.stderr
    kiln(tmp_path, "volume", "rm", vid[7:15])
    assert json.loads(kiln(tmp_path, "volume", "ls", "--json").stdout) == []
    gone = kiln(tmp_path, "volume", "inspect", vid, check=False)
    assert gone.returncode == 1
    assert "no volume matches" in gone.stderr
    # gc now removes every cached blob: no volume needs them.
    report = json.loads(kiln(tmp_path, "gc", "--json").stdout)
    assert len(report["removed_blobs"]) >= 3
    assert os.listdir(tmp_path / "blobs" / "sha256") == []


def test_usage_errors_exit_2_and_failures_exit_1(reg: LocalRegistry, tmp_path: Path) -> None:
    parser = kiln(tmp_path, "build", check=False)
    assert parser.returncode == 2
    missing = kiln(tmp_path, "build", f"docker://{reg.address}/demo/nope:1",
                   "--tls-verify=false", check=False)
    assert missing.returncode == 1
    lines = missing.stderr.strip().splitlines()
    assert lines[0].startswith("error: ")
    assert lines[1].startswith("hint: ")
    assert "Traceback" not in missing.stderr


def test_concurrent_builds_of_one_source_make_one_volume(reg: LocalRegistry,
                                                         tmp_path: Path) -> None:
    ref = f"docker://{reg.address}/demo/busybox:2"
    procs = [subprocess.Popen([*KILN, "--root", str(tmp_path), "build", ref,
                               "--tls-verify=false", "--json"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e for _, e in outs]
    ids = {json.loads(o)["id"] for o, _ in outs}
    assert len(ids) == 1
    assert sorted(json.loads(o)["cached"] for o, _ in outs) == [False, True, True]
    assert len(json.loads(kiln(tmp_path, "volume", "ls", "--json").stdout)) == 1


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pull", "unpack", "mkfs", "verify", "hash", "commit",
                                   "pull:0.3", "mkfs:0.05"])
def test_sigkill_at_each_step_leaves_nothing_visible(reg: LocalRegistry, tmp_path: Path,
                                                     stage: str) -> None:
    ref = f"docker://{reg.address}/demo/busybox:2"
    crashed = kiln(tmp_path, "build", ref, "--tls-verify=false", "--json",
                   env={"KILN_FAULT_KILL_AT": stage}, check=False)
    if crashed.returncode == 0:
        # A delayed kill may land after a fast step finished; the build must then be whole.
        assert json.loads(crashed.stdout)["cached"] is False
        return
    assert crashed.returncode == -signal.SIGKILL
    assert json.loads(kiln(tmp_path, "volume", "ls", "--json").stdout) == []
    # `volume ls` is a kiln command: it must have removed the crashed build's work.
    kiln(tmp_path, "gc", "--json")
    assert os.listdir(tmp_path / "tmp") == []
    assert os.listdir(tmp_path / "volumes") == []
    for name in os.listdir(tmp_path / "blobs" / "sha256"):
        assert len(name) == 64
    # And the next build succeeds and is correct.
    out = json.loads(kiln(tmp_path, "build", ref, "--tls-verify=false", "--json").stdout)
    data = Path(out["path"]).read_bytes()
    assert out["id"] == "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.mark.root
def test_full_disk_is_a_clear_error_and_leaves_nothing(reg: LocalRegistry,
                                                       tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(small)], check=True)
    try:
        ref = f"docker://{reg.address}/demo/busybox:2"
        res = kiln(small, "build", ref, "--tls-verify=false", check=False)
        assert res.returncode == 1
        assert res.stderr.startswith("error: ")
        assert "Traceback" not in res.stderr
        assert os.listdir(small / "volumes") == []
        assert os.listdir(small / "tmp") == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.loop
def test_demo_builds_the_demo_recipe_and_boots_it(tmp_path: Path) -> None:
    try:
        out = json.loads(kiln(tmp_path, "demo", "--json").stdout)
        assert out["id"].startswith("sha256:")
        assert "/demo/busybox:1" in out["source"]
        ls = subprocess.run(["debugfs", "-R", "ls -p /usr/local/bin", out["path"]],
                            capture_output=True, text=True, check=True).stdout
        assert "/hello/" in ls
        assert out["pool"]["backend"] in {"reflink", "dm-thin"}
        # The README's first command: build (cached now) and boot; the guest's workload
        # (the recipe's entrypoint + cmd, env GREETING) prints the motd and the greeting.
        booted = kiln(tmp_path, "demo")
        motd = (Path(__file__).parents[2] / "recipes" / "demo" / "motd").read_text()
        assert motd in booted.stdout
        assert "hello from kiln\n" in booted.stdout
        assert "the VM exited with 0" in booted.stdout
        assert json.loads(kiln(tmp_path, "ps", "--all", "--json").stdout) == []
    finally:
        kiln(tmp_path, "pool", "destroy", "--force", check=False)
