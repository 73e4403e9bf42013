"""Security review, issue 11 (jails, cgroups, VM uids): each attack run for real by an
unprivileged user through ``sudo kiln-helper`` against another user (the victim), with the
installed helper and the real jailer. Every test failed on the code before the fix.

(3) jail-launch wrote limits into the victim's cgroup; (4) jail-stage handed root-owned
files (the pool image, the helper's claims) to the VM uid; (6) no cap on jails, and a
relayed SIGTERM (or a SIGKILL) mid jail-stage left a root-owned copy nobody could remove;
plus the API socket granted to a shared group and cgroup-attach seizing a foreign pid.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import secrets
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helper import cgroup as cg
from tests.support.firecracker import BIN_DIR
from tests.support.oci import User
from tests.support.sudo import BASE, GOOD_CONFIG, HELPER, _write_config, cgroup_parent, helper_as
from tests.support.timing import limit

JAILS = BASE / "jails"
VMUID = 900_400  # the attacker's VM uid (the [jails] range default starts at 900000)
pytestmark = [pytest.mark.firecracker, pytest.mark.root]


@pytest.fixture(scope="module")
def parent(installed: str) -> Iterator[str]:
    """The test config: the fetched jailer and firecracker, a cgroup parent of our own."""
    with cgroup_parent("kilnatk") as top:
        yield top


@pytest.fixture(autouse=True)
def config(parent: str) -> None:
    """Written for every test: other suites sharing this host rewrite the test config."""
    write_config(parent)


def write_config(parent: str) -> None:
    _write_config(GOOD_CONFIG + f'cgroup_parent = "{parent}"\n\n[tools]\n'
                  f'firecracker = "{BIN_DIR}/firecracker"\njailer = "{BIN_DIR}/jailer"\n')


def ok(user: User | None, op: str, req: dict[str, Any]) -> dict[str, Any]:
    res = helper_as(user, op, req)
    assert res.returncode == 0, (op, res.stderr)
    return dict(json.loads(res.stdout))


def refused(user: User, op: str, req: dict[str, Any]) -> str:
    res = helper_as(user, op, req)
    assert res.returncode in (1, 2), (op, res.stdout)
    return res.stderr


def vm_id() -> str:
    return "t" + "".join(random.choice("abcdefghijklmnopqrstuvwxyz234567") for _ in range(9))


def area(user: User) -> Path:
    return BASE / "users" / str(user.uid)


def snapshot(user: User, sid: str, size: int = 1 << 20, data: bool = False) -> Path:
    """A snapshot as the pool makes one: ``<area>/pool/fs/snapshots/<id>.ext4``, the
    caller's, 0600, one link, in root-owned 0711 directories."""
    ok(user, "area", {})
    d = area(user) / "pool/fs/snapshots"
    d.mkdir(mode=0o711, parents=True, exist_ok=True)
    for p in (d, d.parent, d.parent.parent):
        p.chmod(0o711)
    snap = d / f"{sid}.ext4"
    with open(snap, "wb") as f:
        if data:
            chunk = os.urandom(1 << 20)
            for _ in range(size >> 20):
                f.write(chunk)
        f.truncate(size)
    os.chown(snap, user.uid, user.gid)
    snap.chmod(0o600)
    return snap


def stage(user: User, vm: str, items: list[dict[str, Any]], uid: int = VMUID) -> Any:
    return helper_as(user, "jail-stage", {"vm": vm, "uid": uid, "gid": uid, "items": items})


def jail_leftovers(vm: str = "*") -> list[str]:
    """Jails (and half-made ones) of ``vm`` — other suites may stage their own meanwhile."""
    return sorted(str(p.relative_to(JAILS)) for pat in (f"*/{vm}", f".staging/{vm}.*")
                  for p in JAILS.glob(pat))


# -- (3) jail-launch writes limits into another user's cgroup ---------------------------------


def _cgfile(top: str, controller: str, vm: str, name: str) -> str:
    lay = cg.layout(cg.CgroupConfig(parent=top))
    return (lay.v1[controller] / top / vm / name).read_text().strip()


@pytest.mark.slow
@pytest.mark.parametrize("files", [
    ["pids.max=2", "memory.limit_in_bytes=16777216"],
    ["freezer.state=FROZEN"],
    ["cgroup.procs=1"],
])
def test_jail_launch_never_writes_into_another_users_cgroup(
        sudo_user: User, victim_user: User, parent: str, files: list[str]) -> None:
    victim = vm_id()
    ok(victim_user, "cgroup-create", {"vm": victim, "version": 1, "limits": {
        "memory_bytes": 256 << 20, "pids": 100}})
    sleeper = subprocess.Popen(["setpriv", f"--reuid={victim_user.uid}",
                                f"--regid={victim_user.gid}", "--clear-groups", "--",
                                "/bin/sleep", "60"])
    try:
        time.sleep(0.2)
        ok(victim_user, "cgroup-attach", {"vm": victim, "version": 1, "pid": sleeper.pid})
        assert stage(sudo_user, victim, []).returncode == 0  # jails are the attacker's
        err = refused(sudo_user, "jail-launch", {
            "vm": victim, "uid": VMUID, "gid": VMUID, "cgroup_version": 1,
            "cgroups": files, "parent_cgroup": parent})
        assert "refusing" in err or "malformed" in err, err
        assert _cgfile(parent, "pids", victim, "pids.max") == "100"
        assert _cgfile(parent, "memory", victim, "memory.limit_in_bytes") == str(256 << 20)
        assert _cgfile(parent, "freezer", victim, "freezer.state") == "THAWED"
        assert str(sleeper.pid) in _cgfile(parent, "pids", victim, "cgroup.procs")
    finally:
        sleeper.kill()
        sleeper.wait()
        helper_as(sudo_user, "jail-remove", {"vm": victim})
        ok(victim_user, "cgroup-kill", {"vm": victim, "version": 1})


@pytest.mark.slow
def test_jail_launch_cgroups_are_made_recorded_and_removed_by_the_helper(
        sudo_user: User, parent: str) -> None:
    """The attacker's own launch with no VM cgroup: the helper makes P/<vm> itself (claimed
    in the jail's record) and jail-remove takes it away again; a launch without memory and
    pids limits, or as another uid than staged, is refused."""
    vm = vm_id()
    assert stage(sudo_user, vm, []).returncode == 0
    base = {"vm": vm, "uid": VMUID, "gid": VMUID, "cgroup_version": 1, "parent_cgroup": parent}
    assert "no memory.limit_in_bytes" in refused(sudo_user, "jail-launch",
                                                 {**base, "cgroups": ["pids.max=50"]})
    assert "it was staged for uid" in refused(sudo_user, "jail-launch", {
        **base, "uid": VMUID + 1, "gid": VMUID + 1,
        "cgroups": ["pids.max=50", "memory.limit_in_bytes=268435456"]})
    pid = ok(sudo_user, "jail-launch", {**base, "cgroups": [
        "pids.max=50", "memory.limit_in_bytes=268435456"]})["pid"]
    lay = cg.layout(cg.CgroupConfig(parent=parent))
    dirs = [lay.v1[c] / parent / vm for c in ("pids", "memory")]
    assert all(d.is_dir() for d in dirs)
    claim = json.loads((area(sudo_user) / "jails" / vm).read_text())
    assert sorted(claim["cgroups"]) == sorted(str(d) for d in dirs)
    ok(sudo_user, "cgroup-kill", {"vm": vm, "version": 1})  # its own (jail-made) cgroups
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    ok(sudo_user, "jail-remove", {"vm": vm})
    assert not any(d.exists() for d in dirs)


# -- (4) jail-stage hands root-owned files to the VM uid ---------------------------------------


def test_jail_stage_never_hands_helper_records_to_the_vm(
        sudo_user: User, parent: str) -> None:
    vm = vm_id()
    ok(sudo_user, "cgroup-create", {"vm": vm, "version": 1,
                                    "limits": {"memory_bytes": 256 << 20}})
    a = area(sudo_user)
    (a / "pool").mkdir(exist_ok=True)
    pool_img = a / "pool/pool.img"  # the shape of the helper's pool image: root, 0600
    pool_img.write_bytes(b"pool" * 1024)
    pool_img.chmod(0o600)
    records = [pool_img, a / "cgroups" / vm]
    try:
        for rec in records:
            before = os.stat(rec)
            for writable in (True, False):
                other = vm_id()
                res = stage(sudo_user, other, [{"name": "rootfs", "source": str(rec),
                                                "writable": writable}])
                assert res.returncode == 1, res.stdout
                assert "refusing" in res.stderr
                st = os.stat(rec)
                assert (st.st_uid, st.st_gid, st.st_mode, st.st_nlink) == \
                    (before.st_uid, before.st_gid, before.st_mode, 1)
                assert jail_leftovers(other) == []  # refused: nothing made
    finally:
        pool_img.unlink()
        ok(sudo_user, "cgroup-kill", {"vm": vm, "version": 1})


def test_the_callers_snapshot_never_changes_owner(sudo_user: User, parent: str) -> None:
    """Staging a writable snapshot gives the VM a private copy: the caller's file keeps its
    owner and its single link (the old code linked it into the jail and chowned it)."""
    vm = vm_id()
    snap = snapshot(sudo_user, vm)
    res = stage(sudo_user, vm, [{"name": "rootfs.ext4", "source": str(snap),
                                 "writable": True}])
    assert res.returncode == 0, res.stderr
    st = os.stat(snap)
    assert (st.st_uid, stat.S_IMODE(st.st_mode), st.st_nlink) == (sudo_user.uid, 0o600, 1)
    inner = os.stat(JAILS / "firecracker" / vm / "root/rootfs.ext4")
    assert (inner.st_uid, inner.st_nlink) == (VMUID, 1)
    assert inner.st_ino != st.st_ino
    ok(sudo_user, "jail-remove", {"vm": vm})
    snap.unlink()


# -- (6) caps and interrupted stages ---------------------------------------------------------------


@pytest.mark.slow
def test_jails_per_caller_are_capped(sudo_user: User, victim_user: User, parent: str) -> None:
    vms = [vm_id() for _ in range(17)]
    try:
        for i, vm in enumerate(vms[:16]):
            assert stage(sudo_user, vm, [], VMUID + 10 + i).returncode == 0
        res = stage(sudo_user, vms[16], [], VMUID + 40)
        assert res.returncode == 1
        assert "already holds 16 jails (at most 16)" in res.stderr
        assert not (JAILS / "firecracker" / vms[16]).exists()
        assert stage(victim_user, vms[16], [], VMUID + 41).returncode == 0  # others unharmed
        ok(victim_user, "jail-remove", {"vm": vms[16]})
    finally:
        for vm in vms[:16]:
            helper_as(sudo_user, "jail-remove", {"vm": vm})


def _helper_child(sudo: subprocess.Popen[str]) -> int | None:
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{sudo.pid}/task").iterdir():
            kids = (task / "children").read_text().split()
            if kids:
                return int(kids[0])
    return None


def _stage_interrupted(user: User, snap: Path, vm: str, sig: int, delay: float | None) -> None:
    """jail-stage of a big snapshot; ``sig`` (to sudo, which relays it; SIGKILL: to the helper
    itself) once the staging directory exists (``delay`` None) or after ``delay`` s."""
    req = json.dumps({"vm": vm, "uid": VMUID, "gid": VMUID, "items": [
        {"name": "rootfs.ext4", "source": str(snap), "writable": True}]})
    sudo = subprocess.Popen(["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}",
                             "--clear-groups", "--", "/usr/bin/sudo", "-n", HELPER,
                             "jail-stage"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, text=True, cwd="/",
                            env={"PATH": "/usr/bin:/bin", "HOME": str(user.home)})
    assert sudo.stdin is not None
    sudo.stdin.write(req)
    sudo.stdin.close()
    deadline = time.monotonic() + 60
    if delay is None:  # wait for the real event: the copy has begun
        while not list(JAILS.glob(f".staging/{vm}.*/root")) and sudo.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.005)
    else:
        time.sleep(delay)
    target = _helper_child(sudo) if sig == signal.SIGKILL else sudo.pid
    if target is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, sig)
    sudo.wait(timeout=120)


def _nothing_left_after_remove(user: User, vm: str) -> None:
    res = helper_as(user, "jail-remove", {"vm": vm})  # a half-made jail included
    assert jail_leftovers(vm) == [], f"a staged copy outlived jail-remove: {res.stderr}"
    assert not (area(user) / "jails" / vm).exists()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_an_interrupted_jail_stage_leaves_nothing_its_caller_cannot_remove(
        sudo_user: User, parent: str, sig: int) -> None:
    snap = snapshot(sudo_user, "big", 256 << 20, data=True)
    try:
        vm = vm_id()
        _stage_interrupted(sudo_user, snap, vm, sig, None)
        _nothing_left_after_remove(sudo_user, vm)
    finally:
        snap.unlink()


@pytest.mark.slow
def test_sigterm_at_random_points_of_jail_stage_never_leaks(sudo_user: User,
                                                            parent: str) -> None:
    snap = snapshot(sudo_user, "bigr", 64 << 20, data=True)
    start, points = time.monotonic(), 30
    try:
        # one random point in each of 30 equal slices of the stage's first 0.4 s (the
        # request's parse, the staging directory, the copy, the rename): every step is hit,
        # in half the time uniform draws took to cover them
        for i in range(points):
            if time.monotonic() - start > 30:
                break
            vm = vm_id()
            write_config(parent)  # again: a long test, and other suites share the host
            delay = 0.4 * (i + random.random()) / points
            _stage_interrupted(sudo_user, snap, vm, signal.SIGTERM, delay)
            _nothing_left_after_remove(sudo_user, vm)
    finally:
        snap.unlink()


# -- the API socket, cgroup-attach's pin, dm nodes in jails --------------------------------------


def test_the_api_socket_is_the_callers_uid_alone(sudo_user: User, parent: str) -> None:
    vm = vm_id()
    assert stage(sudo_user, vm, []).returncode == 0
    jd = JAILS / "firecracker" / vm
    os.chown(jd / "root", VMUID, VMUID)  # what the jailer does; then Firecracker binds
    (jd / "root/run").mkdir()
    os.chown(jd / "root/run", VMUID, VMUID)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(jd / "root/run/api.sock"))
    os.chown(jd / "root/run/api.sock", VMUID, VMUID)
    try:
        sock = Path(ok(sudo_user, "jail-grant-api", {"vm": vm})["socket"])
        st, d = os.lstat(sock), os.stat(jd)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (sudo_user.uid, 0o600)
        assert st.st_gid != sudo_user.gid  # never the caller's (possibly shared) group
        assert (d.st_uid, d.st_mode & 0o077) == (0, 0o011)  # others: traverse, no listing
        log = os.stat(jd / "console.log")
        assert (log.st_uid, stat.S_IMODE(log.st_mode)) == (sudo_user.uid, 0o400)
    finally:
        s.close()
        ok(sudo_user, "jail-remove", {"vm": vm})


_libc = ctypes.CDLL(None, use_errno=True)


def test_cgroup_attach_checks_the_owner_before_it_seizes(
        sudo_user: User, victim_user: User, parent: str) -> None:
    """The victim's process, already traced by another tracer: the old helper tried to
    seize it first ("cannot pin process"); now it is refused for being the victim's
    without ptrace ever touching it."""
    vm = vm_id()
    ok(sudo_user, "cgroup-create", {"vm": vm, "version": 1,
                                    "limits": {"memory_bytes": 256 << 20}})
    victim = subprocess.Popen(["setpriv", f"--reuid={victim_user.uid}",
                               f"--regid={victim_user.gid}", "--clear-groups", "--",
                               "/bin/sleep", "60"])
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{victim.pid}/comm").read_text() != "sleep\n":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert _libc.ptrace(0x4206, victim.pid, None, None) == 0  # PTRACE_SEIZE: we trace it
        err = refused(sudo_user, "cgroup-attach", {"vm": vm, "version": 1, "pid": victim.pid})
        assert f"refusing process {victim.pid}: it is not uid {sudo_user.uid}'s" in err, err
    finally:
        victim.kill()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(victim.pid, 0x40000000)
        victim.wait()
        ok(sudo_user, "cgroup-kill", {"vm": vm, "version": 1})


def test_a_device_node_in_a_jail_is_found(tmp_path: Path) -> None:
    """dm-remove/reclaim/thin-clear refuse or keep a device some jail still holds a node of
    (minors are reused): ``jails_holding`` finds such a node in any jail (pure scan)."""
    from helper.jail import jailer as jail

    root = tmp_path / "firecracker" / "abc" / "root"
    root.mkdir(parents=True)
    os.mknod(root / "rootfs", stat.S_IFBLK | 0o600, os.makedev(7, 200))
    assert jail.jails_holding(tmp_path, os.makedev(7, 200)) == ["abc"]
    assert jail.jails_holding(tmp_path, os.makedev(7, 201)) == []


# -- the adversarial review's findings -----------------------------------------------------


def test_jail_copies_are_capped_and_counted(sudo_user: User, parent: str) -> None:
    """Review F1: jail-stage copied the caller's snapshot once per item (16 items, 16
    jails) onto the host filesystem, counted nowhere. Now each source is staged once per
    jail, and the copies of all of a caller's jails share ``[limits] jail_bytes``."""
    _write_config(GOOD_CONFIG + f'cgroup_parent = "{parent}"\n\n[tools]\n'
                  f'firecracker = "{BIN_DIR}/firecracker"\njailer = "{BIN_DIR}/jailer"\n'
                  "\n[limits]\njail_bytes = 12582912\n")  # 12 MiB
    snap = snapshot(sudo_user, "fill", 8 << 20, data=True)
    twice = [{"name": f"d{i}", "source": str(snap), "writable": True} for i in range(2)]
    assert "a source may be staged once per jail" in refused(sudo_user, "jail-stage", {
        "vm": vm_id(), "uid": VMUID, "gid": VMUID, "items": twice})
    first, second = vm_id(), vm_id()
    ok(sudo_user, "jail-stage", {"vm": first, "uid": VMUID, "gid": VMUID,
                                 "items": twice[:1]})
    try:
        err = refused(sudo_user, "jail-stage", {"vm": second, "uid": VMUID + 1,
                                                "gid": VMUID + 1, "items": twice[:1]})
        assert "refusing to copy" in err
        assert jail_leftovers(second) == []
    finally:
        ok(sudo_user, "jail-remove", {"vm": first})


def test_the_jailers_names_cannot_be_staged(sudo_user: User) -> None:
    """Review F2: an item named ``firecracker.pid`` stood in for the jailer's pid file, so
    a Firecracker outlived its jail and its VM uid was handed out again."""
    snap = snapshot(sudo_user, "pidf")
    for name in ("firecracker.pid", "firecracker", "dev", "run"):
        err = refused(sudo_user, "jail-stage", {
            "vm": vm_id(), "uid": VMUID, "gid": VMUID,
            "items": [{"name": name, "source": str(snap)}]})
        assert "staged names must be unique" in err, name


def test_a_vm_uid_is_not_released_while_it_runs(sudo_user: User) -> None:
    """Review F2, the mechanism: whatever pid file says, jail-remove keeps the jail (and
    its VM uid) while any process runs as that uid."""
    vm = vm_id()
    ok(sudo_user, "jail-stage", {"vm": vm, "uid": VMUID, "gid": VMUID, "items": []})
    squatter = subprocess.Popen(["setpriv", f"--reuid={VMUID}", f"--regid={VMUID}",
                                 "--clear-groups", "sleep", "300"])
    try:
        err = refused(sudo_user, "jail-remove", {"vm": vm})
        assert f"processes of the jail's VM uid {VMUID} still run" in err
    finally:
        squatter.kill()
        squatter.wait()
    ok(sudo_user, "jail-remove", {"vm": vm})
    assert jail_leftovers(vm) == []


def test_the_callers_rlimits_and_cgroup_do_not_reach_the_helper(sudo_user: User) -> None:
    """Review F3: ``ulimit -f 1`` kept ops out of the audit log (EFBIG swallowed); a caller
    could also limit or kill the helper through its own cgroup. Now a too-low hard limit
    is refused before anything runs, and the helper leaves the caller's cgroups."""
    script = ("ulimit -f 1; echo '{}' | /usr/bin/sudo -n " + HELPER + " area; echo rc=$?")
    res = subprocess.run(["setpriv", f"--reuid={sudo_user.uid}", f"--regid={sudo_user.gid}",
                          "--clear-groups", "/bin/sh", "-c", script], capture_output=True,
                         text=True, timeout=60, check=False)
    assert "rc=1" in res.stdout, res.stdout
    assert "file size limit (512) is below what kiln-helper needs" in res.stderr  # 1 block
    # The caller's process sits in a cgroup of its own (as in its VM cgroup); the helper
    # must have left it before it reads the request.
    lay = cg.layout(cg.CgroupConfig(parent="kiln"))
    mnt = lay.v1.get("pids") or lay.v2
    if mnt is None:
        pytest.skip("no pids or cgroup2 hierarchy")
    box = mnt / f"kilnprobe{secrets.token_hex(3)}"
    box.mkdir()
    try:
        # ... and slows itself down as far as it can: SCHED_IDLE, nice 19, one CPU.
        p = subprocess.Popen(
            ["/bin/sh", "-c", f'echo $$ > {box}/cgroup.procs; exec taskset -c 0 chrt -i 0 '
             f'nice -n 19 setpriv --reuid={sudo_user.uid} --regid={sudo_user.gid} '
             f'--clear-groups /usr/bin/sudo -n {HELPER} usage'],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            deadline, where, sched = time.monotonic() + limit(60), "not started", None
            want = (os.SCHED_OTHER, 0, os.sched_getaffinity(1))
            while time.monotonic() < deadline:
                kids = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
                if kids:
                    helper = int(kids[0])
                    where = Path(f"/proc/{helper}/cgroup").read_text()
                    sched = (os.sched_getscheduler(helper),
                             os.getpriority(os.PRIO_PROCESS, helper),
                             os.sched_getaffinity(helper))
                    if box.name not in where and sched == want:
                        break
                time.sleep(0.05)
            assert kids, "the helper never started"
            assert box.name not in where, where
            assert sched == want, sched
        finally:
            p.communicate("{}", timeout=limit(60))
        assert p.returncode == 0
    finally:
        box.rmdir()
