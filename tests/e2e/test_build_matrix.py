"""Reproducibility and fidelity of whole builds: the same image built as root and rootless,
with its root on ext4, btrfs and tmpfs, gives the same bytes; special files survive; hostile
layers never reach the host; registry auth and faults give clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder.demoimage import push
from builder.localregistry import LocalRegistry
from tests.support import oci
from tests.support.cli import KILN, kiln
from tests.support.images import push_busybox
from tests.support.oci import User, give_to, run_as
from tests.support.registry import AuthRegistry, FaultProxy

CAP = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_raw+ep


def special_layers() -> list[list[oci.Member]]:
    """Everything a rootless unpack loses, plus odd names and a second layer's whiteout."""
    return [
        [
            oci.mkdir("bin"), oci.mkdir("dev"), oci.mkdir("etc"), oci.mkdir("home"),
            oci.mkdir("home/user", mode=0o700, uid=1000, gid=1000),
            oci.reg("bin/ping", b"\x7fELF fake ping", mode=0o4755,
                    xattrs={"security.capability": CAP}),
            oci.hardlink("bin/ping6", "bin/ping"),
            oci.reg("bin/tool", b"tool", mode=0o2711, uid=0, gid=50),
            oci.device("dev/null", "chr", 1, 3, mode=0o666),
            oci.device("dev/loop0", "blk", 7, 0),
            oci.fifo("dev/initctl", mode=0o600),
            oci.symlink("etc/mtab", "../proc/self/mounts"),
            oci.reg("home/user/.profile", b"export A=1\n", mode=0o600, uid=1000, gid=1000),
            oci.reg("home/user/big-uid", b"x", uid=200000, gid=200000),
            oci.reg("etc/line\nbreak \u00e9", b"odd name"),
            oci.reg("etc/attrs", b"a", xattrs={"user.origin": b"kiln", "trusted.t": b"\x00\x01"}),
            oci.reg("etc/gone", b"removed by layer 2"),
        ],
        [oci.whiteout("etc/gone"), oci.reg("etc/added", b"layer 2")],
    ]


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    d = tmp_path_factory.mktemp("matrix")
    with LocalRegistry(data_dir=d / "data") as r:
        layout = oci.make_layout(d / "special", special_layers(), tag="1")
        push(layout.path, "1", f"docker://{r.address}/test/special:1")
        yield r


def _debugfs(img: str, cmd: str) -> str:
    return subprocess.run(["debugfs", "-R", cmd, img], capture_output=True, text=True,
                          check=True).stdout


@pytest.mark.root
def test_special_files_survive_into_the_volume(reg: LocalRegistry, tmp_path: Path) -> None:
    ref = f"docker://{reg.address}/test/special:1"
    out = json.loads(kiln(tmp_path, "build", ref, "--tls-verify=false", "--json").stdout)
    img = out["path"]
    ping = _debugfs(img, "stat /bin/ping")
    assert "Mode:  04755" in ping
    assert "Links: 2" in ping
    assert "security.capability (20) = 01 00 00 02 00 20" in _debugfs(img, "ea_list /bin/ping")
    assert "user.origin (4) = \"kiln\"" in _debugfs(img, "ea_list /etc/attrs")
    assert "Device major/minor number: 01:03" in _debugfs(img, "stat /dev/null")
    assert "Type: block special" in _debugfs(img, "stat /dev/loop0")
    assert "Type: FIFO" in _debugfs(img, "stat /dev/initctl")
    assert "User: 200000   Group: 200000" in _debugfs(img, "stat /home/user/big-uid")
    assert 'Fast link dest: "../proc/self/mounts"' in _debugfs(img, "stat /etc/mtab")
    ls = _debugfs(img, "ls -p /etc")
    assert "/gone/" not in ls
    assert "/added/" in ls
    assert "rootlesscontainers" not in _debugfs(img, "ea_list /home/user/.profile")


@pytest.mark.slow
@pytest.mark.root
def test_root_rootless_and_staging_filesystems_give_identical_bytes(
        reg: LocalRegistry, tmp_path: Path, unprivileged_user: User) -> None:
    ref = f"docker://{reg.address}/test/special:1"
    ids: dict[str, str] = {}
    ids["root-ext4"] = json.loads(
        kiln(tmp_path / "ext4", "build", ref, "--tls-verify=false", "--json").stdout)["id"]
    mounts: list[Path] = []
    btrfs = unprivileged_user.scratch / f"btrfs-{tmp_path.name}"
    try:
        tmpfs = tmp_path / "tmpfs"
        tmpfs.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256M", "tmpfs", str(tmpfs)],
                       check=True)
        mounts.append(tmpfs)
        ids["root-tmpfs"] = json.loads(
            kiln(tmpfs / "r", "build", ref, "--tls-verify=false", "--json").stdout)["id"]
        # Under the user's scratch: pytest's tmp_path is not searchable by other users.
        btrfs.mkdir()
        img = tmp_path / "btrfs.img"
        with open(img, "wb") as f:
            f.truncate(512 << 20)
        subprocess.run(["mkfs.btrfs", "-q", str(img)], check=True)
        subprocess.run(["mount", "-o", "loop", str(img), str(btrfs)], check=True)
        mounts.append(btrfs)
        ids["root-btrfs"] = json.loads(
            kiln(btrfs / "r", "build", ref, "--tls-verify=false", "--json").stdout)["id"]
        # Rootless: an ordinary user, its own root and a strict umask, on the btrfs staging.
        user_root = btrfs / "user"
        user_root.mkdir()
        give_to(unprivileged_user, user_root)
        code = ("import os, runpy, sys; os.umask(0o077); sys.argv[0] = 'kiln'; "
                "runpy.run_module('runner', run_name='__main__')")
        res = run_as(unprivileged_user, [sys.executable, "-c", code, "--root",
                                         f"{user_root}/r", "build", ref, "--tls-verify=false",
                                         "--json"], cwd=Path("/"), timeout=300)
        rootless = json.loads(res.stdout)
        ids["rootless-btrfs"] = rootless["id"]
        assert os.stat(rootless["path"]).st_uid == unprivileged_user.uid
    finally:
        for m in reversed(mounts):
            subprocess.run(["umount", str(m)], check=False)
        if btrfs.exists():
            btrfs.rmdir()
    assert len(set(ids.values())) == 1, ids


@pytest.mark.root
def test_hostile_layer_never_touches_the_host(tmp_path: Path) -> None:
    canary = Path("/tmp") / f"kiln-canary-{os.getpid()}"
    canary.write_text("host secret\n")
    try:
        stack = [[
            oci.mkdir("etc"),
            oci.symlink("escape", "../../../../tmp"),
            oci.reg(f"escape/{canary.name}", b"overwritten by the image"),
            oci.reg(f"../../../../tmp/{canary.name}", b"dotdot"),
            oci.hardlink("stolen", f"/tmp/{canary.name}"),
        ]]
        with LocalRegistry(data_dir=tmp_path / "data") as r:
            layout = oci.make_layout(tmp_path / "hostile", stack, tag="1")
            push(layout.path, "1", f"docker://{r.address}/test/hostile:1")
            res = kiln(tmp_path / "root", "build", f"docker://{r.address}/test/hostile:1",
                       "--tls-verify=false", "--json", check=False)
        assert canary.read_text() == "host secret\n"
        if res.returncode == 0:
            img = json.loads(res.stdout)["path"]
            dump = subprocess.run(["debugfs", "-R", f"cat /tmp/{canary.name}", img],
                                  capture_output=True, text=True, check=True).stdout
            assert "host secret" not in dump
        else:
            assert res.returncode == 1
            assert res.stderr.startswith("error: ")
            assert "Traceback" not in res.stderr
    finally:
        canary.unlink()


def test_auth_registry_needs_the_authfile(auth_registry: AuthRegistry, tmp_path: Path) -> None:
    ref = push_busybox(auth_registry.address, "private/busybox", "1",
                       authfile=auth_registry.authfile)
    denied = kiln(tmp_path, "build", ref, "--tls-verify=false", check=False)
    assert denied.returncode == 1
    assert "authentication failed" in denied.stderr
    ok = kiln(tmp_path, "build", ref, "--tls-verify=false", "--authfile",
              str(auth_registry.authfile), "--json")
    assert json.loads(ok.stdout)["id"].startswith("sha256:")


@pytest.mark.parametrize(("fault", "match", "message"), [
    ("corrupt", "/blobs/", "error: "),
    ("404", "/manifests/", "image not found"),
])
def test_registry_faults_are_clear_errors(registry: LocalRegistry, fault_proxy: FaultProxy,
                                          tmp_path: Path, fault: str, match: str,
                                          message: str) -> None:
    push_busybox(registry.address, "faulty/busybox", "1")
    fault_proxy.set_fault(fault, match=match)
    res = kiln(tmp_path, "build", f"docker://{fault_proxy.address}/faulty/busybox:1",
               "--tls-verify=false", check=False)
    assert res.returncode == 1
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    assert json.loads(kiln(tmp_path, "volume", "ls", "--json").stdout) == []
    assert os.listdir(tmp_path / "tmp") == []


def test_special_layout_is_what_the_test_claims(tmp_path: Path) -> None:
    """Guard for the tests above: the hand-made layers really carry the special entries."""
    layout = oci.make_layout(tmp_path / "l", special_layers(), tag="1")
    blob, _ = layout.layers[0]
    import gzip

    with tarfile.open(fileobj=gzip.open(blob)) as tf:
        ping = tf.getmember("bin/ping")
        assert ping.mode == 0o4755
        assert "SCHILY.xattr.security.capability" in ping.pax_headers \
            or "LIBARCHIVE.xattr.security.capability" in ping.pax_headers


@pytest.mark.root
@pytest.mark.slow
def test_debian_minbase_root_and_rootless_identical(registry: LocalRegistry, tmp_path: Path,
                                                    unprivileged_user: User) -> None:
    from tests.support.images import push_debian

    ref = push_debian(registry.address)
    as_root = json.loads(kiln(tmp_path, "build", ref, "--tls-verify=false", "--json").stdout)
    osrel = _debugfs(as_root["path"], "cat /usr/lib/os-release")
    assert 'VERSION_CODENAME=bookworm' in osrel
    user_root = unprivileged_user.scratch / f"debian-{tmp_path.name}"
    res = run_as(unprivileged_user, [*KILN, "--root", str(user_root), "build", ref,
                                     "--tls-verify=false", "--json"], cwd=Path("/"),
                 timeout=600)
    rootless = json.loads(res.stdout)
    assert rootless["id"] == as_root["id"]
    # Real-world metadata made it through the rootless path too.
    assert "Mode:  04755" in _debugfs(rootless["path"], "stat /usr/bin/su")
    null = _debugfs(rootless["path"], "stat /dev/null")
    assert "Type: character special" in null
    assert "Device major/minor number: 01:03" in null
    mail = _debugfs(rootless["path"], "stat /var/mail")
    assert "Mode:  02775" in mail
    assert "Group:     8" in mail
