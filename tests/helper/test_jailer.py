"""helper/jail/jailer.py without the real binaries: staging (hard link, copy, chown rules),
API-socket hand-over, removal, and hostile inputs refused with the host unchanged."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helper.base.errors import Conflict, NotFound, UidInUse, UsageError
from helper.cgroup import CgroupConfig
from helper.jail import jailer as jail
from helper.jail import stage as jailstage

UID = 900_123


@pytest.fixture
def cfg(tmp_path: Path) -> jail.JailConfig:
    bins = tmp_path / "bin"
    bins.mkdir()
    for name in ("jailer", "firecracker"):
        shutil.copy("/bin/true", bins / name)
        os.chmod(bins / name, 0o755)
    for d in ("pool", "kernels", "jails"):
        (tmp_path / d).mkdir()
    (tmp_path / "kernels/vmlinux").write_bytes(b"\x7fELF kernel")
    (tmp_path / "kernels/vmlinux").chmod(0o644)
    (tmp_path / "pool/snap.ext4").write_bytes(b"rootfs" * 100)
    (tmp_path / "pool/snap.ext4").chmod(0o600)
    return jail.JailConfig(jailer=bins / "jailer", firecracker=bins / "firecracker",
                           chroot_base=tmp_path / "jails", uid_first=900_000, uid_count=1000,
                           sources=(tmp_path / "pool", tmp_path / "kernels"),
                           cgroup=CgroupConfig(parent="kilntest"))


def items(cfg: jail.JailConfig) -> list[jail.StageItem]:
    pool, kernels = cfg.sources
    return [jail.StageItem("vmlinux", kernels / "vmlinux"),
            jail.StageItem("rootfs.ext4", pool / "snap.ext4", writable=True)]


def snapshot(base: Path) -> list[tuple[str, int, int, int]]:
    out = []
    for p in base.rglob("*"):
        st = os.lstat(p)
        out.append((str(p), st.st_mode, st.st_uid, st.st_nlink))
    return sorted(out)


@pytest.mark.root
def test_stage_hard_links_and_owners(cfg: jail.JailConfig) -> None:
    staged = jailstage.jail_stage(cfg, "abc", UID, UID, items(cfg), caller_uid=0,
                             logs=["firecracker.log"])
    root = cfg.chroot_base / "firecracker/abc/root"
    assert staged == jail.Staged(root, [])
    k, r = os.stat(root / "vmlinux"), os.stat(root / "rootfs.ext4")
    assert k.st_ino == os.stat(cfg.sources[1] / "vmlinux").st_ino  # a hard link, not a copy
    assert (k.st_uid, stat.S_IMODE(k.st_mode)) == (0, 0o644)  # shared: never chowned
    assert r.st_ino == os.stat(cfg.sources[0] / "snap.ext4").st_ino
    assert (r.st_uid, r.st_gid, stat.S_IMODE(r.st_mode)) == (UID, UID, 0o600)
    log = os.stat(root / "firecracker.log")
    assert (log.st_uid, log.st_size, stat.S_IMODE(log.st_mode)) == (UID, 0, 0o600)
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    assert (root.parent / "console.log").is_file()
    with pytest.raises(Conflict) as e:
        jailstage.jail_stage(cfg, "abc", UID, UID, [], caller_uid=0)
    assert e.value.message == f"jail {root.parent} already exists"
    jail.jail_remove(cfg, "abc")
    assert not root.parent.exists()
    assert os.stat(cfg.sources[0] / "snap.ext4").st_nlink == 1  # the source survives
    with pytest.raises(NotFound) as e2:
        jail.jail_remove(cfg, "abc")
    assert e2.value.message == "jail abc does not exist"


@pytest.mark.root
def test_stage_copies_across_filesystems_and_private_files(cfg: jail.JailConfig) -> None:
    shm = Path(f"/dev/shm/kiln-fctest-{secrets.token_hex(4)}")
    shm.mkdir()
    try:
        (shm / "initrd").write_bytes(b"initrd")
        (shm / "initrd").chmod(0o644)
        (cfg.sources[1] / "secret").write_bytes(b"s")
        (cfg.sources[1] / "secret").chmod(0o600)
        c2 = jail.JailConfig(**{**cfg.__dict__, "sources": (*cfg.sources, shm)})
        staged = jailstage.jail_stage(c2, "abd", UID, UID, [
            jail.StageItem("initrd.img", shm / "initrd"),
            jail.StageItem("secret", cfg.sources[1] / "secret")], caller_uid=0)
        assert staged.warnings == [
            f"{shm}/initrd is on another filesystem than {cfg.chroot_base}: copied it "
            "(slow, uses space); put the jail base on the pool's filesystem",
            f"{cfg.sources[1]}/secret is not world-readable: staged a private copy"]
        for name, data in (("initrd.img", b"initrd"), ("secret", b"s")):
            st = os.stat(staged.root / name)  # root's copy, the VM's group reads it
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_nlink) == \
                (0, UID, 0o440, 1)
            assert (staged.root / name).read_bytes() == data
        jail.jail_remove(c2, "abd")
    finally:
        shutil.rmtree(shm)


@pytest.mark.root
@pytest.mark.parametrize(("make", "message"), [
    (lambda p: (p / "x/../snap.ext4", None), "refusing source path '{p}/x/../snap.ext4'"),
    (lambda p: (p / "-snap", None), "refusing source path '{p}/-snap'"),
    (lambda p: (Path("/etc/shadow"), None),
     "/etc/shadow is outside kiln's pool and kernel directories"),
    (lambda p: (p / "link", (p / "link").symlink_to("/etc/shadow")),
     "{p}/link is or passes through a symlink"),
    (lambda p: (p / "dir/snap.ext4", (p / "dir").symlink_to(p)),
     "{p}/dir/snap.ext4 is or passes through a symlink"),
    (lambda p: (Path("/dev/sda"), None), "refusing block device /dev/sda"),
    (lambda p: (Path("/dev/mapper/control"), None),
     "refusing block device /dev/mapper/control: not a kiln device-mapper name"),
    (lambda p: (Path("/dev/mapper/kiln../x"), None),
     "refusing block device /dev/mapper/kiln../x"),
])
def test_hostile_sources_refused(cfg: jail.JailConfig, make: object, message: str) -> None:
    pool = cfg.sources[0]
    src, _ = make(pool)  # type: ignore[operator]
    before = snapshot(cfg.chroot_base)
    with pytest.raises(UsageError) as e:
        jailstage.jail_stage(cfg, "abe", UID, UID, [jail.StageItem("rootfs", src, writable=True)],
                        caller_uid=0)
    assert e.value.message == message.format(p=pool)
    assert snapshot(cfg.chroot_base) == before == []


@pytest.mark.root
def test_hard_link_planted_as_writable_disk_is_refused(cfg: jail.JailConfig) -> None:
    pool = cfg.sources[0]
    os.link(pool / "snap.ext4", pool / "planted")
    with pytest.raises(Conflict) as e:
        jailstage.jail_stage(cfg, "abf", UID, UID, [jail.StageItem("r", pool / "planted", True)],
                        caller_uid=0)
    assert e.value.message == (f"{pool}/planted has 2 links; a VM's writable disk must have "
                               "exactly one")
    assert os.stat(pool / "snap.ext4").st_uid == 0  # never chowned
    assert list(cfg.chroot_base.iterdir()) == []  # refused before the first mkdir


RESERVED = ("staged names must be unique and none may be dev, run, firecracker or "
            "firecracker.pid")


@pytest.mark.parametrize(("kw", "message"), [
    ({"uid": 0}, "uid 0 is outside the VM range 900000-900999"),
    ({"gid": 0}, "gid 0 is outside the VM range 900000-900999"),
    ({"uid": 900_500, "caller_uid": 900_500}, "uid 900500 is the caller's own"),
    ({"jail_id": "a" * 33}, f"invalid VM id '{'a' * 33}'"),
    ({"jail_id": ".."}, "invalid VM id '..'"),
    ({"items": [jail.StageItem("../x", Path("/x"))]}, "invalid file name '../x'"),
    ({"items": [jail.StageItem("-x", Path("/x"))]}, "invalid file name '-x'"),
    ({"items": [jail.StageItem(".x", Path("/x"))]}, "invalid file name '.x'"),
    ({"logs": ["dev"]}, RESERVED),
    ({"logs": ["firecracker.pid"]}, RESERVED),
])
def test_hostile_stage_arguments(cfg: jail.JailConfig, kw: dict[str, object],
                                 message: str) -> None:
    args: dict[str, object] = {"jail_id": "abg", "uid": UID, "gid": UID, "items": [],
                               "caller_uid": 0}
    args.update(kw)
    with pytest.raises(UsageError) as e:
        jailstage.jail_stage(cfg, args.pop("jail_id"), args.pop("uid"), args.pop("gid"),  # type: ignore[arg-type]
                        args.pop("items"), **args)  # type: ignore[arg-type]
    assert e.value.message == message
    assert list(cfg.chroot_base.iterdir()) == []


@pytest.mark.root
def test_untrusted_tools_refused(cfg: jail.JailConfig, tmp_path: Path) -> None:
    os.chmod(cfg.jailer, 0o775)
    with pytest.raises(UsageError) as e:
        jail.check_config(cfg)
    assert e.value.message == (f"refusing tool {cfg.jailer}: not a root-owned regular file "
                               "writable only by root")
    os.chmod(cfg.jailer, 0o755)
    os.chown(cfg.firecracker, 1000, 1000)
    with pytest.raises(UsageError):
        jail.check_config(cfg)
    os.chown(cfg.firecracker, 0, 0)
    (tmp_path / "bin/fc").symlink_to(cfg.firecracker)
    with pytest.raises(UsageError) as e:
        jail.check_tool(tmp_path / "bin/fc")
    assert e.value.message.startswith(f"refusing tool {tmp_path}/bin/fc: not a root-owned")
    shutil.copy(cfg.firecracker, tmp_path / "bin/vmm")
    with pytest.raises(UsageError) as e:
        jail.check_tool(tmp_path / "bin/vmm", "firecracker")
    assert e.value.message == (f"refusing tool {tmp_path}/bin/vmm: its name must contain "
                               "'firecracker'")


@pytest.mark.root
def test_symlinked_chroot_base_refused(cfg: jail.JailConfig, tmp_path: Path) -> None:
    (tmp_path / "jlink").symlink_to(cfg.chroot_base)
    c2 = jail.JailConfig(**{**cfg.__dict__, "chroot_base": tmp_path / "jlink"})
    with pytest.raises(UsageError) as e:
        jailstage.jail_stage(c2, "abh", UID, UID, [], caller_uid=0)
    assert e.value.message == (f"{tmp_path}/jlink has a symlink or non-directory component")


@pytest.mark.root
def test_grant_api_links_socket_for_the_caller(cfg: jail.JailConfig) -> None:
    staged = jailstage.jail_stage(cfg, "abi", UID, UID, [], caller_uid=0)
    os.chown(staged.root, UID, UID)  # what the jailer does
    (staged.root / "run").mkdir()
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(staged.root / "run/api.sock"))
    os.chown(staged.root / "run/api.sock", UID, UID)
    try:
        path = jail.jail_grant_api(cfg, "abi", 900_999, 900_998, timeout=1)
        assert path == staged.root.parent / "api.sock"
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode)
        # the caller's uid alone (its primary group may be shared)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (900_999, 0, 0o600)
        d = os.stat(path.parent)
        assert (d.st_uid, d.st_gid, stat.S_IMODE(d.st_mode)) == (0, 0, 0o711)
        c = os.stat(path.parent / "console.log")
        assert (c.st_uid, stat.S_IMODE(c.st_mode)) == (900_999, 0o400)
        assert stat.S_IMODE(os.stat(staged.root).st_mode) == 0o700  # chroot stays private
        assert jail.jail_grant_api(cfg, "abi", 900_999, 900_998) == path  # idempotent
        with pytest.raises(UsageError) as e:
            jail.jail_grant_api(cfg, "abi", UID, UID)
        assert e.value.message == "the caller is the VM's own uid"
    finally:
        s.close()
    jail.jail_remove(cfg, "abi")


@pytest.mark.root
def test_grant_api_refuses_a_non_socket(cfg: jail.JailConfig) -> None:
    staged = jailstage.jail_stage(cfg, "abj", UID, UID, [], caller_uid=0)
    os.chown(staged.root, UID, UID)
    (staged.root / "run").mkdir()
    (staged.root / "run/api.sock").symlink_to("/etc/shadow")
    with pytest.raises(Conflict) as e:
        jail.jail_grant_api(cfg, "abj", 1000, 1000, timeout=0.2)
    assert e.value.message == "the API socket of jail abj is not the VM's socket"
    assert not (staged.root.parent / "api.sock").exists()
    jail.jail_remove(cfg, "abj")


@pytest.fixture
def tmpfs_in_jail(cfg: jail.JailConfig) -> Iterator[Path]:
    staged = jailstage.jail_stage(cfg, "abk", UID, UID, [], caller_uid=0)
    mnt = staged.root / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "kilnfctest", str(mnt)],
                   check=True)
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.root
def test_remove_refuses_a_jail_with_mounts(cfg: jail.JailConfig, tmpfs_in_jail: Path) -> None:
    (tmpfs_in_jail / "keep").write_text("x")
    with pytest.raises(Conflict) as e:
        jail.jail_remove(cfg, "abk")
    assert e.value.message == f"jail abk still has mounts: {tmpfs_in_jail}"
    assert (tmpfs_in_jail / "keep").read_text() == "x"
    subprocess.run(["umount", str(tmpfs_in_jail)], check=True)
    jail.jail_remove(cfg, "abk")
    assert not tmpfs_in_jail.parent.parent.exists()


# -- security review: whose devices, jails and namespaces a sudo caller may use ----------------

ME, OTHER = 61_245, 61_246  # sudo callers (no account needed)


def test_only_the_callers_own_snapshot_devices_may_be_staged(tmp_path: Path) -> None:
    """Another area's snapshot, the area's own pool (its I/O reaches every volume), a base
    and a non-kiln name are refused; only the area's own snapshots pass (pure)."""
    from helper.storage.dmthin_core import root_key

    mine, theirs = root_key(str(tmp_path / "a")), root_key(str(tmp_path / "b"))
    area = tmp_path / "a"
    assert jailstage.mapper_problem(f"kiln-{mine}-snap-abc", area) is None
    cases = {
        f"kiln-{theirs}-snap-abc": "it belongs to another kiln area",
        f"kiln-{mine}-pool": "it is the thin pool; only snapshot devices are staged",
        f"kiln-{mine}-vol-{'ab' * 32}": "it is a base volume; only snapshot devices are staged",
        "kilnfoo": "not a kiln device-mapper name",
        "vg0-root": "not a kiln device-mapper name",
    }
    for name, why in cases.items():
        assert jailstage.mapper_problem(name, area) == \
            f"refusing block device /dev/mapper/{name}: {why}"
    assert jailstage.mapper_problem(f"kiln-{mine}-snap-abc", None) == \
        f"refusing block device /dev/mapper/kiln-{mine}-snap-abc: not a kiln device-mapper name"


def _sudo_ctx(cfg: jail.JailConfig, area: Path, uid: int) -> Any:
    from dataclasses import replace

    from helper import config
    from helper.ops import registry as ops

    c = replace(config.parse(b""), tools={"jailer": cfg.jailer, "firecracker": cfg.firecracker},
                chroot_base=cfg.chroot_base, uid_first=cfg.uid_first, uid_count=cfg.uid_count,
                sources=(cfg.sources[1],), pool_dir=cfg.chroot_base.parent)
    area.mkdir(exist_ok=True)
    return ops.Ctx(cfg=c, area=area, caller_uid=uid, caller_gid=uid)


def _op(ctx: Any, op: str, req: dict[str, Any]) -> dict[str, Any]:
    import json

    from helper.ops import registry as ops

    return ops.run_op(ctx, op, ops.parse(op, json.dumps(req)))


@pytest.mark.root
def test_jail_stage_op_refuses_foreign_devices_before_touching_any(
        cfg: jail.JailConfig, tmp_path: Path) -> None:
    from helper.storage.dmthin_core import root_key

    area = tmp_path / "users" / str(ME)
    ctx = _sudo_ctx(cfg, area.parent, ME)
    ctx = type(ctx)(cfg=ctx.cfg, area=area, caller_uid=ME, caller_gid=ME)
    area.mkdir()
    mine, theirs = root_key(str(area)), root_key(str(tmp_path / "users" / str(OTHER)))
    before = snapshot(cfg.chroot_base)
    for name, why in [(f"kiln-{theirs}-snap-abc", "it belongs to another kiln area"),
                      (f"kiln-{mine}-pool", "it is the thin pool; only snapshot devices "
                       "are staged"),
                      (f"kiln-{mine}-vol-{'cd' * 32}", "it is a base volume; only snapshot "
                       "devices are staged"),
                      ("kilnx", "not a kiln device-mapper name")]:
        with pytest.raises(UsageError) as e:
            _op(ctx, "jail-stage", {"vm": "abz", "uid": UID, "gid": UID, "items": [
                {"name": "rootfs", "source": f"/dev/mapper/{name}", "writable": True}]})
        assert e.value.message == f"refusing block device /dev/mapper/{name}: {why}"
    assert snapshot(cfg.chroot_base) == before


@pytest.mark.root
def test_pool_files_are_never_staged_and_copies_keep_holes(cfg: jail.JailConfig) -> None:
    pool = cfg.sources[0]
    (pool / "pool/thin").mkdir(parents=True)
    with open(pool / "pool/thin/data.img", "wb") as f:
        f.truncate(256 << 20)
    with pytest.raises(UsageError) as e:
        jailstage.jail_stage(cfg, "abp", UID, UID,
                             [jail.StageItem("disk", pool / "pool/thin/data.img")], caller_uid=0)
    assert e.value.message == (f"refusing {pool}/pool/thin/data.img: the pool's own backing "
                               "files are never staged")
    # A private (non-world-readable) sparse file is copied: its holes stay holes.
    with open(pool / "sparse.img", "wb") as f:
        f.truncate(64 << 20)
        f.seek(32 << 20)
        f.write(b"data" * 1024)
    (pool / "sparse.img").chmod(0o600)
    staged = jailstage.jail_stage(cfg, "abq", UID, UID,
                                  [jail.StageItem("disk", pool / "sparse.img")], caller_uid=0)
    assert staged.warnings == [f"{pool}/sparse.img is not world-readable: staged a private copy"]
    copy = staged.root / "disk"
    assert copy.read_bytes() == (pool / "sparse.img").read_bytes()
    assert os.stat(copy).st_blocks * 512 < 1 << 20  # not 64 MiB
    jail.jail_remove(cfg, "abq")


@pytest.mark.root
def test_another_users_jail_is_refused_to_every_jail_op(cfg: jail.JailConfig,
                                                        tmp_path: Path) -> None:
    """B stages a jail; A (another sudo caller) can neither launch it, take its API
    socket, nor remove it; B removes it and the claim goes with it."""
    users = tmp_path / "users"
    users.mkdir()
    a = _sudo_ctx(cfg, users / str(ME), ME)
    b = _sudo_ctx(cfg, users / str(OTHER), OTHER)
    _stage(b, "bjail", UID)
    assert (users / str(OTHER) / "jails/bjail").stat().st_uid == 0
    refused = f"refusing jail bjail: uid {ME} did not stage it"
    for op, req in [("jail-grant-api", {"vm": "bjail"}), ("jail-remove", {"vm": "bjail"}),
                    ("jail-launch", {"vm": "bjail", "uid": UID, "gid": UID})]:
        with pytest.raises(UsageError) as e:
            _op(a, op, req)
        assert e.value.message == refused, op
    assert jail.jail_dir(cfg, "bjail").is_dir()
    # B's own launch into a VM cgroup it never created: the cgroup claim is required.
    with pytest.raises(UsageError) as e:
        _op(b, "jail-launch", {"vm": "bjail", "uid": UID, "gid": UID, "cgroup_version": 2,
                               "parent_cgroup": "kiln/bjail"})
    assert e.value.message == f"refusing cgroup bjail: uid {OTHER} did not create it"
    # Network namespaces: only the caller's own kn-… one.
    for ns, why in [("kiln", "not a kiln VM namespace"), ("kn-nosuchns", "kiln did not tag it")]:
        with pytest.raises(UsageError) as e:
            _op(b, "jail-launch", {"vm": "bjail", "uid": UID, "gid": UID, "netns": ns})
        assert e.value.message == f"refusing network namespace {ns}: {why}"
    _op(b, "jail-remove", {"vm": "bjail"})
    assert not jail.jail_dir(cfg, "bjail").exists()
    assert not (users / str(OTHER) / "jails/bjail").exists()


def test_netns_problem_refuses_another_users_namespace() -> None:
    from helper.net.core import Tag
    from helper.ops import jail as ops_jail

    assert ops_jail.netns_problem("kn-abc", Tag("abc", "aaaaaaaa", ME), ME) is None
    assert ops_jail.netns_problem("kn-abc", Tag("abc", "aaaaaaaa", OTHER), ME) == \
        f"refusing network namespace kn-abc: it belongs to uid {OTHER}"


def snapshot_of(ctx: Any, sid: str) -> Path:
    """A snapshot as the pool makes one for a sudo caller: ``pool/fs/snapshots/ID.ext4``,
    the caller's, 0600, one link, in root-owned 0711 directories."""
    d = ctx.area / "pool/fs/snapshots"
    d.mkdir(mode=0o711, parents=True, exist_ok=True)
    snap = d / f"{sid}.ext4"
    snap.write_bytes(b"rootfs")
    os.chown(snap, ctx.caller_uid, ctx.caller_uid)
    snap.chmod(0o600)
    return snap


def _stage(ctx: Any, vm: str, uid: int) -> dict[str, Any]:
    snap = snapshot_of(ctx, vm)
    return _op(ctx, "jail-stage", {"vm": vm, "uid": uid, "gid": uid, "items": [
        {"name": "rootfs", "source": str(snap), "writable": True}]})


@pytest.mark.root
def test_another_users_vm_uid_is_refused_until_its_jail_goes(cfg: jail.JailConfig,
                                                             tmp_path: Path) -> None:
    """The attack: A stages a jail with B's VM uid (so A's Firecracker could open B's tap
    and signal B's VMM). Refused; U+1 works; once B's jail is removed, U is A's to take.
    Root in-process is one more caller: refused too."""
    from helper.ops import registry as ops

    users = tmp_path / "users"
    users.mkdir()
    a = _sudo_ctx(cfg, users / str(ME), ME)
    b = _sudo_ctx(cfg, users / str(OTHER), OTHER)
    (tmp_path / "rootkiln").mkdir()
    _stage(b, "bjail", UID)
    assert json.loads((users / str(OTHER) / "jails/bjail").read_text())["uid"] == UID
    for ctx in (a, ops.Ctx(cfg=a.cfg, area=tmp_path / "rootkiln", caller_uid=0,
                           caller_gid=0, trusted=True)):
        with pytest.raises(UidInUse) as e:  # the type kiln retries on
            _stage(ctx, "ajail", UID)
        assert (e.value.message, e.value.hint) == (
            f"uid {UID} is in use by another user's VM",
            "pick another VM uid/gid from [jails] uid_gid_range (kiln retries with another "
            "free one)")
        assert not jail.jail_dir(cfg, "ajail").exists()
    with pytest.raises(Conflict) as e:  # B's gid alone is refused too (a tap's group)
        _op(a, "jail-stage", {"vm": "ajail", "uid": UID + 1, "gid": UID, "items": []})
    assert e.value.message == f"gid {UID} is in use by another user's VM"
    _stage(a, "ajail", UID + 1)
    _stage(b, "bjail2", UID)  # B may use its own uid again
    _op(a, "jail-remove", {"vm": "ajail"})
    _op(b, "jail-remove", {"vm": "bjail"})
    with pytest.raises(Conflict):  # bjail2 still holds it
        _stage(a, "ajail", UID)
    _op(b, "jail-remove", {"vm": "bjail2"})
    _stage(a, "ajail", UID)
    _op(a, "jail-remove", {"vm": "ajail"})
    assert sorted(p.name for p in (cfg.chroot_base.parent / "vm-uids").iterdir()) == []


@pytest.mark.root
def test_two_callers_racing_for_one_vm_uid_one_wins(cfg: jail.JailConfig,
                                                     tmp_path: Path) -> None:
    import threading

    users = tmp_path / "users"
    users.mkdir()
    ctxs = [_sudo_ctx(cfg, users / str(u), u) for u in (ME, OTHER)]
    for i in range(5):
        start = threading.Barrier(2)
        results: list[str] = []

        def go(ctx: Any, vm: str, uid: int, start: threading.Barrier,
               results: list[str]) -> None:
            start.wait()
            try:
                _stage(ctx, vm, uid)
                results.append("ok")
            except Conflict as e:
                results.append(e.message)

        vms = [f"race{'abcde'[i]}a", f"race{'abcde'[i]}b"]
        threads = [threading.Thread(target=go, args=(c, v, UID + i, start, results))
                   for c, v in zip(ctxs, vms, strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == ["ok", f"uid {UID + i} is in use by another user's VM"]
        assert sum(jail.jail_dir(cfg, v).exists() for v in vms) == 1
