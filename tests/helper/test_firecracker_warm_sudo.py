"""Firecracker warm start as a sudo caller (issue #14), through the installed helper and sudo.

An ordinary user (a sudoers rule for the helper alone) runs kiln's own driver functions
(``runner.vmm.firecracker.make_vm`` / ``ops_for`` / ``teardown``, ``runner.vmm.fcwarm.
save_paused``, ``builder.warm.publish``, ``builder.warm.clone_file``) in a Python process
of its own (``SAVE_RESTORE``): its jail is staged and launched with the vsock device, the
VM is paused and saved — ``snapshot/create`` in the jail, ``jail-export`` into the
user's warm work directory —, published as its warm image, then a fresh jail gets the
state and memory through ``jail-import`` and is loaded and resumed. No guest runs here
(paravirtual KVM), so the hello that precedes ``save_paused`` in ``fcwarm.save`` cannot
come; nothing fakes one. The test (root) looks from outside at each stop of the user's
process: owners and modes of the exported and imported files, the Firecracker process's
uid, and afterwards that no jail, cgroup, process, claim, mount or loop device is left.
The guest's writes to its disk are stood in for by root writing into the jail's private
copy of the disk before the save: the saved ``disk`` must be that copy, not the snapshot
it was staged from.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from helper import cgroup as cg
from tests.support.firecracker import helper_config, helper_kernel
from tests.support.oci import User
from tests.support.sudo import (
    BASE,
    _audit_len,
    _ops_ran,
    _write_config,
    cgroup_parent,
    loop_table,
)

pytestmark = [pytest.mark.root]
MEM_MIB = 128
MARK = b"written by the guest before the save"
MARK_AT = 20 << 20  # inside the 32M disk, past ext4's metadata


def _snapshot(area: Path, user: User) -> Path:
    """A snapshot shaped as the pool makes it: <area>/pool/fs/snapshots/<id>.ext4, the
    caller's, 0600, in root-owned 0711 directories."""
    snaps = area / "pool/fs/snapshots"
    snaps.mkdir(mode=0o711, parents=True, exist_ok=True)
    for d in (snaps, snaps.parent, snaps.parent.parent):
        d.chmod(0o711)
    area.chmod(0o755)
    snap = snaps / f"{''.join(secrets.choice('abcdefgh') for _ in range(10))}.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "fcwarm", str(snap), "32M"], check=True)
    os.chown(snap, user.uid, user.gid)
    snap.chmod(0o600)
    return snap


@pytest.fixture
def world(sudo_user: User) -> Iterator[dict[str, Any]]:
    """The helper's test config with Firecracker and a kernel source directory; the user's
    kiln root and two snapshots in its area (the save's disk, the restore's clone)."""
    src = BASE / "src"
    vmlinux = helper_kernel(src)
    initrd = src / "initrd.img"  # never read by a guest here: any world-readable file
    initrd.write_bytes(b"\0" * 4096)
    initrd.chmod(0o644)
    area = BASE / "users" / str(sudo_user.uid)
    snaps = (_snapshot(area, sudo_user), _snapshot(area, sudo_user))
    root = sudo_user.scratch / f"fcwarm-{secrets.token_hex(3)}"
    try:
        with cgroup_parent("kilnwtest") as parent:  # a failed test's cgroups: killed
            _write_config(helper_config(src, parent))
            yield {"root": str(root), "snaps": [str(s) for s in snaps],
                   "kernel": str(vmlinux), "initrd": str(initrd), "parent": parent,
                   "area": area}
    finally:
        for s in snaps:
            s.unlink(missing_ok=True)


# The user's side: kiln's driver functions, a line of JSON at each stop, then it waits for
# a line on stdin (the test looks from outside meanwhile).
SAVE_RESTORE = r"""
import json, sys
from pathlib import Path
from builder import warm
from builder.root import Root
from runner import guest_init
from runner.vm import cgroup as vmcgroup
from runner.vm.spec import WarmPlan
from runner.vm.state import VMRecord, host_name, root_key
from runner.vmm import fcapi as fc, fcwarm, firecracker as fcd

a = json.loads(sys.argv[1])
root = Root(Path(a["root"]))
root.ensure()
cfg = fc.jail_config(root.path)
ops = fcd.ops_for(root.path)

def stop(**doc):
    print(json.dumps(doc), flush=True)
    assert sys.stdin.readline() == "go\n"

def make(vm_id, uid, rootfs, plan):
    host = host_name(root_key(root.path), vm_id)
    vcg = vmcgroup.firecracker_plan(cfg.cgroup, host, 1, a["mem_mib"] << 20)
    doc = fcd.jail_doc(cfg, host, vcg)
    rec = VMRecord(vm_id, None, "created", None, "", "firecracker", "v", "s", "/",
                   "[]", uid, None, None, None, None, 1, "{}", json.dumps(doc), 0.0, None,
                   None)
    w = fcd._warm_launch(plan)
    vm = fcd.make_vm(cfg, ops, rec, vmlinux=Path(a["kernel"]), initrd=Path(a["initrd"]),
                     rootfs=rootfs, cpus=1, memory=a["mem_mib"] << 20,
                     init=guest_init.INIT_PATH, kernel_args=w["args"], vsock=w["vsock"],
                     restore=w["restore"])
    return vm, doc

image = "ab" * 32
with root.workdir("warm") as work:
    plan = WarmPlan("save", work / warm.STATE, work / warm.DISK, work / warm.MEM)
    vm, doc = make(a["ids"][0], a["uids"][0], Path(a["snaps"][0]), plan)
    try:
        vm.start()
        stop(phase="started", jail=doc["jail"], pid=vm.pid, vsock=str(vm.vsock))
        fcwarm.save_paused(vm, plan)
        stop(phase="saved", work=str(work), state=vm.client().get("/")["state"])
    finally:
        fcd.teardown(root.path, doc["host"], doc["cgroup_version"], doc["jail"])
    rec = warm.publish(root, work, image, "v", "firecracker", a["mem_mib"], 1)
d = warm.image_dir(root, rec.id)
clone = Path(a["snaps"][1])
warm.clone_file(d / warm.DISK, clone)  # as runner.vm.lifecycle._make_disk does
plan = WarmPlan("restore", d / warm.STATE, d / warm.DISK, d / warm.MEM)
vm, doc = make(a["ids"][1], a["uids"][1], clone, plan)
try:
    info = vm.restore(resume=True)
    stop(phase="running", image=str(d), jail=doc["jail"], pid=vm.pid, info=info,
         vsock=str(vm.vsock), again=vm.client().get("/")["state"])
finally:
    fcd.teardown(root.path, doc["host"], doc["cgroup_version"], doc["jail"])
print(json.dumps({"phase": "done"}), flush=True)
"""


def _popen_as(user: User, argv: list[str]) -> subprocess.Popen[str]:
    env = {"HOME": str(user.home), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
           "LC_ALL": "C.UTF-8", "USER": user.name}
    return subprocess.Popen(
        ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups", "--",
         *argv], cwd="/", env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


def _next(p: subprocess.Popen[str], phase: str) -> dict[str, Any]:
    out: IO[str] | None = p.stdout
    assert out is not None
    line = out.readline()
    if not line:
        assert p.stderr is not None
        raise AssertionError(f"the user's process ended before {phase}: {p.stderr.read()}")
    doc: dict[str, Any] = json.loads(line)
    assert doc["phase"] == phase, doc
    return doc


def _go(p: subprocess.Popen[str]) -> None:
    assert p.stdin is not None
    p.stdin.write("go\n")
    p.stdin.flush()


def _uids(pid: int) -> list[int]:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines()
                if x.startswith("Uid:"))
    return [int(x) for x in line.split()[1:]]


def _owner_mode(p: Path | str) -> tuple[int, int, int]:
    st = os.stat(p)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def _mounts() -> list[str]:
    return sorted(line.split()[4] for line in
                  Path("/proc/self/mountinfo").read_text().splitlines()
                  if not line.split()[4].startswith("/tmp/"))


@pytest.mark.firecracker
@pytest.mark.slow
def test_warm_save_and_restore_as_a_sudo_caller(sudo_user: User,
                                                world: dict[str, Any]) -> None:
    user = sudo_user
    ids = ["w" + "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz234567") for _ in range(9))
           for _ in "ab"]
    uids = [900_400 + secrets.randbelow(400) * 2, 0]
    uids[1] = uids[0] + 1
    before, start = (_mounts(), loop_table()), _audit_len()
    p = _popen_as(user, [sys.executable, "-c", SAVE_RESTORE, json.dumps(
        {**{k: v for k, v in world.items() if k != "area"}, "ids": ids, "uids": uids,
         "mem_mib": MEM_MIB})])
    try:
        got = _started_saved_running(p, user, uids, world)
        _go(p)
        assert _next(p, "done") == {"phase": "done"}
        assert p.wait(60) == 0, p.stderr.read() if p.stderr else ""
    finally:
        if p.poll() is None:  # a failed check: its stdin closes, so it tears its VM down
            assert p.stdin is not None
            p.stdin.close()
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    for pid, jail in got:  # nothing of either VM is left
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/stat").read_text().split()[2] in ("Z", "X")
        assert not Path(jail).exists()
    for vm_host in (Path(j).name for _, j in got):
        for v in (1, 2):
            assert not cg.cgroup_exists(cg.CgroupConfig(parent=world["parent"]), vm_host, v)
    assert (_mounts(), loop_table()) == before
    assert os.listdir(world["area"] / "jails") == []  # no claim left
    ran = [op for op, outcome in _ops_ran(user.uid, start) if outcome == "ok"]
    assert [op for op in ran if op.startswith(("jail-export", "jail-import"))] == [
        "jail-export-disk", "jail-export", "jail-export", "jail-import", "jail-import"]


def _started_saved_running(p: subprocess.Popen[str], user: User, uids: list[int],
                           world: dict[str, Any]) -> list[tuple[int, str]]:
    """The three stops of the user's process, checked from outside; (pid, jail) of each VM."""
    s = _next(p, "started")
    assert _uids(s["pid"]) == [uids[0]] * 4  # Firecracker runs as the VM's uid
    assert _owner_mode(s["vsock"])[0] == user.uid  # granted to the caller (jail-grant-vsock)
    disk = Path(s["jail"]) / "root" / "rootfs.ext4"
    assert _owner_mode(disk)[0] == uids[0]  # the VM's private copy of the caller's snapshot
    with open(disk, "r+b") as f:  # a guest's write, before its hello
        f.seek(MARK_AT)
        f.write(MARK)
    _go(p)
    saved = _next(p, "saved")
    assert saved["state"] == "Paused"
    work = Path(saved["work"])
    assert _owner_mode(work) == (user.uid, user.gid, 0o700)
    for name in ("state", "mem", "disk"):
        st = os.stat(work / name)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_nlink) == \
            (user.uid, user.gid, 0o600, 1), name
    assert os.path.getsize(work / "mem") == MEM_MIB << 20
    assert 0 < os.path.getsize(work / "state") < 1 << 20
    with open(work / "disk", "rb") as f:  # the VM's disk as it was, not the snapshot
        f.seek(MARK_AT)
        assert f.read(len(MARK)) == MARK
    _go(p)
    r = _next(p, "running")
    assert (r["info"]["state"], r["again"]) == ("Running", "Running")
    assert _uids(r["pid"]) == [uids[1]] * 4
    image = Path(r["image"])
    assert _owner_mode(image) == (user.uid, user.gid, 0o700)
    assert sorted(os.listdir(image)) == ["disk", "mem", "state", "warm.json"]
    for name in os.listdir(image):
        assert _owner_mode(image / name) == (user.uid, user.gid, 0o600), name
    chroot = Path(r["jail"]) / "root"
    for name in ("vm.state", "vm.mem"):  # jail-import's copies: root's, the VM's gid, 0440
        st = os.stat(chroot / name)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_nlink) == \
            (0, uids[1], 0o440, 1), name
    assert (chroot / "vm.mem").read_bytes() == (image / "mem").read_bytes()
    assert _owner_mode(r["vsock"])[0] == user.uid
    return [(s["pid"], s["jail"]), (r["pid"], r["jail"])]


# -- jail-export-disk's refusals (helper.ops.jaildisk), in-process ----------------------------

VM_UID = 900_123


def _jail(tmp_path: Path) -> tuple[Any, Path]:
    from helper.jail import jailer as jail

    cfg = jail.JailConfig(jailer=Path("/x/jailer"), firecracker=Path("/x/firecracker"),
                          chroot_base=tmp_path / "jails")
    root = jail.chroot(cfg, "wdisk")
    root.mkdir(parents=True)
    return cfg, root


@pytest.mark.parametrize("kind", ["ok", "symlink", "hardlink", "owner", "fifo", "cap"])
def test_export_disk_takes_only_the_vms_own_single_link_file(tmp_path: Path,
                                                            kind: str) -> None:
    from helper.base.errors import UsageError
    from helper.ops import jaildisk

    cfg, root = _jail(tmp_path)
    disk = root / jaildisk.DISK
    secret = tmp_path / "secret"
    secret.write_bytes(b"root's")
    os.chown(secret, VM_UID, VM_UID)
    if kind == "symlink":
        disk.symlink_to(secret)
    elif kind == "hardlink":
        os.link(secret, disk)
    elif kind == "fifo":
        os.mkfifo(disk)
        os.chown(disk, VM_UID, VM_UID)
    else:
        with open(disk, "wb") as f:
            f.write(MARK)
            f.truncate(8 << 20)  # a hole after the data
        os.chown(disk, 0 if kind == "owner" else VM_UID, VM_UID)
    out = tmp_path / "out"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        if kind == "ok":
            assert jaildisk.export_disk(cfg, "wdisk", VM_UID, fd, single_link=True,
                                        cap=8 << 20) == 8 << 20
        else:
            with pytest.raises((UsageError, OSError)):
                jaildisk.export_disk(cfg, "wdisk", VM_UID, fd, single_link=True,
                                     cap=(1 << 20) if kind == "cap" else None)
    finally:
        os.close(fd)
    if kind == "ok":
        assert out.read_bytes() == MARK + bytes((8 << 20) - len(MARK))
        assert os.stat(out).st_blocks * 512 < 1 << 20  # the hole stayed one
    else:
        assert out.read_bytes() == b""  # refused before the first byte
