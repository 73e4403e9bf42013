"""Attacks on the warm-start ops ``jail-export``, ``jail-import`` and ``jail-grant-vsock``,
run for real: an unprivileged member of the helper's group (the attacker) calls ``sudo
kiln-helper`` with fds it opened itself (``sudo -C``) against its own jail, a victim's
jail and the host; a compromised Firecracker is played by the jail's VM uid planting
files in its chroot (a launched jail's chroot is the VM uid's: the test hands it over as
the jailer does). Each refusal is checked by its message and by the host left unchanged.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.firecracker import BIN_DIR
from tests.support.oci import User
from tests.support.sudo import (
    BASE,
    GOOD_CONFIG,
    HELPER,
    _tree,
    _write_config,
    cgroup_parent,
    helper_as,
    host_state,
)

JAILS = BASE / "jails"
VMUID = 900_500  # the attacker's VM uid
VICTIM_VMUID = 900_501
MEM = 64 << 20  # the attacker's VM cgroup memory limit
pytestmark = [pytest.mark.root]


@pytest.fixture(scope="module")
def parent(installed: str) -> Iterator[str]:
    with cgroup_parent("kilnjf") as top:
        yield top


def write_config(parent: str, extra: str = "") -> None:
    _write_config(GOOD_CONFIG + f'cgroup_parent = "{parent}"\n\n[tools]\n'
                  f'firecracker = "{BIN_DIR}/firecracker"\njailer = "{BIN_DIR}/jailer"\n'
                  + extra)


@pytest.fixture(autouse=True)
def config(parent: str) -> None:
    write_config(parent)


def ok(user: User | None, op: str, req: dict[str, Any]) -> dict[str, Any]:
    res = helper_as(user, op, req)
    assert res.returncode == 0, (op, res.stderr)
    return dict(json.loads(res.stdout))


def vm_id() -> str:
    return "j" + secrets.token_hex(5).translate(str.maketrans("0189", "wxyz"))


# The attacker opens the file itself (as its uid) and passes it with sudo -C.
_PASS = textwrap.dedent("""
    import json, os, socket, subprocess, sys
    path, flags, op, req = sys.argv[1], int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
    if path == "pipe:":
        fd, _w = os.pipe()
    elif path == "socket:":
        fd = socket.socketpair()[0].detach()
    else:
        fd = os.open(path, flags, 0o600)
    req["fd"] = fd
    r = subprocess.run(["/usr/bin/sudo", "-n", "-C", str(fd + 1), sys.argv[5], op],
                       input=json.dumps(req), pass_fds=(fd,), capture_output=True, text=True)
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)
    sys.exit(r.returncode)
""")


def with_fd(user: User, op: str, req: dict[str, Any], path: str | Path,
            flags: int = os.O_RDONLY) -> subprocess.CompletedProcess[str]:
    argv = ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups", "--",
            "/usr/bin/python3", "-I", "-c", _PASS, str(path), str(flags), op,
            json.dumps(req), HELPER]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd="/",
                          env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8",
                               "HOME": str(user.home)}, check=False)


def refused_fd(user: User, op: str, req: dict[str, Any], path: str | Path,
               flags: int = os.O_RDONLY) -> str:
    before = seen(user, req["vm"])
    res = with_fd(user, op, req, path, flags)
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert seen(user, req["vm"]) == before
    return str(json.loads(res.stdout)["error"]["message"])


def seen(user: User, vm: str) -> dict[str, Any]:
    """What a refusal must leave as it was: the jail, the caller's area, mounts and loop
    devices (other suites share BASE and the cgroup tree meanwhile: not compared)."""
    host = host_state()
    return {"jail": _tree(JAILS / "firecracker" / vm), "area": _tree(BASE / "users" /
            str(user.uid)), "mounts": host["mounts"], "loops": host["loops"]}


def as_vm(uid: int, script: str) -> None:
    """Run ``sh -c script`` as the jail's VM uid (a compromised Firecracker)."""
    subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--",
                    "/bin/sh", "-c", script], check=True, capture_output=True, timeout=30)


def staged(user: User, vm: str, uid: int = VMUID, memory: int = MEM) -> Path:
    """The user's jail ``vm`` and its VM cgroup (memory limit ``memory``): the chroot."""
    ok(user, "cgroup-create", {"vm": vm, "version": 1,
                               "limits": {"memory_bytes": memory, "pids": 64}})
    ok(user, "jail-stage", {"vm": vm, "uid": uid, "gid": uid, "items": []})
    root = JAILS / "firecracker" / vm / "root"
    assert root.is_dir()
    return root


def launched(root: Path, uid: int = VMUID) -> None:
    """The chroot as a launched jail's: the VM uid's (what the jailer does)."""
    os.chown(root, uid, uid)


def removed(user: User, vm: str) -> None:
    helper_as(user, "jail-remove", {"vm": vm})
    helper_as(user, "cgroup-kill", {"vm": vm, "version": 1})


@pytest.fixture
def jail(sudo_user: User) -> Iterator[tuple[str, Path]]:
    ok(sudo_user, "area", {})  # its area exists before the host is compared
    vm = vm_id()
    root = staged(sudo_user, vm)
    try:
        yield vm, root
    finally:
        removed(sudo_user, vm)


def user_file(user: User, name: str, data: bytes = b"", *, size: int | None = None) -> Path:
    p = user.scratch / name
    with open(p, "wb") as f:
        f.write(data)
        if size is not None:
            f.truncate(size)
    os.chown(p, user.uid, user.gid)
    p.chmod(0o600)
    return p


# -- whose jail ----------------------------------------------------------------------------


@pytest.mark.slow
def test_export_and_import_refuse_the_victims_jail(sudo_user: User, victim_user: User) -> None:
    ok(sudo_user, "area", {})
    vm = vm_id()
    root = staged(victim_user, vm, uid=VICTIM_VMUID)
    try:
        src = user_file(sudo_user, "state", b"S" * 100)
        msg = refused_fd(sudo_user, "jail-import", {"vm": vm, "name": "vm.state"}, src)
        assert f"uid {sudo_user.uid} did not stage it" in msg
        assert not (root / "vm.state").exists()
        launched(root, VICTIM_VMUID)
        as_vm(VICTIM_VMUID, f"printf secret > {root}/vm.state")
        dst = user_file(sudo_user, "out")
        msg = refused_fd(sudo_user, "jail-export", {"vm": vm, "name": "vm.state"}, dst,
                         os.O_WRONLY)
        assert f"uid {sudo_user.uid} did not stage it" in msg
        assert dst.read_bytes() == b""
        res = helper_as(sudo_user, "jail-grant-vsock", {"vm": vm})
        assert res.returncode == 1
        assert "did not stage it" in res.stderr
    finally:
        removed(victim_user, vm)


# -- the fds an attacker passes --------------------------------------------------------------


@pytest.mark.slow
def test_export_refuses_a_destination_that_is_not_the_callers_empty_file(
        sudo_user: User, victim_user: User, jail: tuple[str, Path]) -> None:
    vm, root = jail
    launched(root)
    as_vm(VMUID, f"printf state > {root}/vm.state")
    req = {"vm": vm, "name": "vm.state"}
    # A world-writable file of the victim's, opened for writing by the attacker.
    theirs = user_file(victim_user, "shared", b"")
    theirs.chmod(0o666)
    victim_user.scratch.chmod(0o755)
    msg = refused_fd(sudo_user, "jail-export", req, theirs, os.O_WRONLY)
    assert f"is not a file of uid {sudo_user.uid}" in msg
    assert theirs.read_bytes() == b""
    # Root's file the attacker may read: not open for writing.
    assert "not open for writing" in refused_fd(sudo_user, "jail-export", req, "/etc/passwd")
    assert "not open for writing" in refused_fd(sudo_user, "jail-export", req, "/etc/shadow",
                                                os.O_PATH)
    for special in ("pipe:", "socket:", "/dev/null"):
        flags = os.O_WRONLY if special == "/dev/null" else os.O_RDONLY
        msg = refused_fd(sudo_user, "jail-export", req, special, flags)
        assert "not open for writing" in msg or "not a regular file" in msg, (special, msg)
    full = user_file(sudo_user, "full", b"mine")
    assert "not an empty file" in refused_fd(sudo_user, "jail-export", req, full, os.O_WRONLY)
    assert full.read_bytes() == b"mine"


@pytest.mark.slow
@pytest.mark.parametrize(("path", "flags", "why"), [
    ("/etc/shadow", os.O_PATH, "not open for reading"),  # an fd that cannot read
    ("pipe:", os.O_RDONLY, "not a regular file"),
    ("socket:", os.O_RDONLY, "not a regular file"),
    ("/dev/zero", os.O_RDONLY, "not a regular file"),
])
def test_import_refuses_a_source_it_cannot_read_as_a_file(
        sudo_user: User, jail: tuple[str, Path], path: str, flags: int, why: str) -> None:
    """An O_PATH fd (which the caller may open on a file it cannot read) passed the
    read-access check before: the copy then failed half-way and left an empty root-owned
    vm.state in the jail."""
    vm, root = jail
    msg = refused_fd(sudo_user, "jail-import", {"vm": vm, "name": "vm.state"}, path, flags)
    assert why in msg
    assert not (root / "vm.state").exists()


@pytest.mark.slow
def test_import_of_an_O_PATH_fd_to_a_readable_file_is_refused(
        sudo_user: User, jail: tuple[str, Path]) -> None:
    vm, root = jail
    src = user_file(sudo_user, "state", b"S" * 4096)
    msg = refused_fd(sudo_user, "jail-import", {"vm": vm, "name": "vm.state"}, src, os.O_PATH)
    assert "not open for reading" in msg
    assert not (root / "vm.state").exists()


@pytest.mark.slow
def test_import_is_capped_and_never_replaces(sudo_user: User, jail: tuple[str, Path]) -> None:
    vm, root = jail
    huge = user_file(sudo_user, "huge", size=MEM + 1)  # sparse: the apparent size counts
    msg = refused_fd(sudo_user, "jail-import", {"vm": vm, "name": "vm.mem"}, huge)
    assert f"the VM's limit is {MEM}" in msg
    big_state = user_file(sudo_user, "bigstate", size=(64 << 20) + 1)
    msg = refused_fd(sudo_user, "jail-import", {"vm": vm, "name": "vm.state"}, big_state)
    assert "the VM's limit is" in msg
    good = user_file(sudo_user, "state", b"first")
    assert with_fd(sudo_user, "jail-import", {"vm": vm, "name": "vm.state"}, good).returncode == 0
    st = os.stat(root / "vm.state")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, VMUID, 0o440)
    other = user_file(sudo_user, "state2", b"second")
    msg = refused_fd(sudo_user, "jail-import", {"vm": vm, "name": "vm.state"}, other)
    assert "vm.state is already there" in msg
    assert (root / "vm.state").read_bytes() == b"first"
    res = with_fd(sudo_user, "jail-import", {"vm": vm, "name": "../vm.state"}, good)
    assert res.returncode == 2
    assert "vm.state" in res.stdout


@pytest.mark.slow
def test_import_after_launch_is_refused(sudo_user: User, jail: tuple[str, Path]) -> None:
    vm, root = jail
    launched(root)
    as_vm(VMUID, f"ln -s /etc/shadow {root}/vm.mem")
    src = user_file(sudo_user, "mem", b"M" * 4096)
    for name in ("vm.state", "vm.mem"):
        msg = refused_fd(sudo_user, "jail-import", {"vm": vm, "name": name}, src)
        assert "is launched" in msg
    assert os.readlink(root / "vm.mem") == "/etc/shadow"
    assert not (root / "vm.state").exists()


@pytest.mark.slow
def test_import_is_charged_to_jail_bytes(sudo_user: User, parent: str,
                                         jail: tuple[str, Path]) -> None:
    vm, root = jail
    write_config(parent, "\n[limits]\njail_bytes = 1048576\n")
    src = user_file(sudo_user, "mem", size=(1 << 20) + 4096)  # sparse: its size is charged
    msg = refused_fd(sudo_user, "jail-import", {"vm": vm, "name": "vm.mem"}, src)
    assert "vm.mem" in msg, msg
    assert not (root / "vm.mem").exists()


# -- what a compromised Firecracker plants in its chroot --------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("plant", "why"), [
    ("ln -s /etc/shadow {r}/vm.mem", "symlink|not a regular file"),  # never followed
    ("ln {r}/other {r}/vm.mem", "2 hard links"),
    ("mkfifo {r}/vm.mem", "not a regular file"),
    ("mkdir {r}/vm.mem", "not a regular file"),
    ("truncate -s {big} {r}/vm.mem", "over the VM's limit"),
])
def test_export_refuses_what_the_vm_uid_plants(sudo_user: User, jail: tuple[str, Path],
                                               plant: str, why: str) -> None:
    vm, root = jail
    launched(root)
    as_vm(VMUID, f"printf x > {root}/other; " + plant.format(r=root, big=MEM + 1))
    dst = user_file(sudo_user, "out")
    msg = refused_fd(sudo_user, "jail-export", {"vm": vm, "name": "vm.mem"}, dst, os.O_WRONLY)
    assert any(w in msg for w in why.split("|")), msg
    assert dst.read_bytes() == b""


@pytest.mark.slow
def test_export_of_a_file_of_another_uid_in_the_chroot_is_refused(
        sudo_user: User, jail: tuple[str, Path]) -> None:
    vm, root = jail
    launched(root)
    (root / "vm.state").write_bytes(b"root's")  # not the VM's: e.g. a staged copy
    dst = user_file(sudo_user, "out")
    msg = refused_fd(sudo_user, "jail-export", {"vm": vm, "name": "vm.state"}, dst,
                     os.O_WRONLY)
    assert f"not owned by uid {VMUID}" in msg


@pytest.mark.slow
def test_export_copies_the_vms_file_sparse(sudo_user: User, jail: tuple[str, Path]) -> None:
    vm, root = jail
    launched(root)
    as_vm(VMUID, f"truncate -s {MEM} {root}/vm.mem; printf data > {root}/vm.state")
    dst = user_file(sudo_user, "out")
    res = with_fd(sudo_user, "jail-export", {"vm": vm, "name": "vm.mem"}, dst, os.O_WRONLY)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"bytes": MEM}
    st = os.stat(dst)
    assert (st.st_size, st.st_blocks, st.st_uid) == (MEM, 0, sudo_user.uid)


# -- jail-export-disk: the same export code, for the jail's disk ------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("plant", "why"), [
    ("ln -s /etc/shadow {r}/rootfs.ext4", "symlink|not a regular file"),
    ("ln {r}/other {r}/rootfs.ext4", "2 hard links"),
    ("mkfifo {r}/rootfs.ext4", "not a regular file"),
    ("mkdir {r}/rootfs.ext4", "not a regular file"),
])
def test_export_disk_refuses_what_the_vm_uid_plants(sudo_user: User, jail: tuple[str, Path],
                                                    plant: str, why: str) -> None:
    vm, root = jail
    launched(root)
    as_vm(VMUID, f"printf x > {root}/other; " + plant.format(r=root))
    dst = user_file(sudo_user, "out")
    msg = refused_fd(sudo_user, "jail-export-disk", {"vm": vm}, dst, os.O_WRONLY)
    assert any(w in msg for w in why.split("|")), msg
    assert dst.read_bytes() == b""


@pytest.mark.slow
def test_export_disk_refuses_the_victims_jail_and_roots_rights(
        sudo_user: User, victim_user: User, jail: tuple[str, Path], small_fs: Path) -> None:
    """Another user's jail: refused by its claim; the caller's own, into a destination
    whose free space is root's reserve: the copy runs as the caller and fails as it."""
    vm = vm_id()
    theirs = staged(victim_user, vm, uid=VICTIM_VMUID)
    try:
        launched(theirs, VICTIM_VMUID)
        as_vm(VICTIM_VMUID, f"printf secret > {theirs}/rootfs.ext4")
        dst = user_file(sudo_user, "out")
        msg = refused_fd(sudo_user, "jail-export-disk", {"vm": vm}, dst, os.O_WRONLY)
        assert f"uid {sudo_user.uid} did not stage it" in msg
        assert dst.read_bytes() == b""
    finally:
        removed(victim_user, vm)
    mine, root = jail
    launched(root)
    as_vm(VMUID, f"head -c {24 << 20} /dev/urandom > {root}/rootfs.ext4")
    out = small_fs / "disk"
    out.touch(mode=0o600)
    os.chown(out, sudo_user.uid, sudo_user.gid)
    msg = refused_fd(sudo_user, "jail-export-disk", {"vm": mine}, out, os.O_WRONLY)
    assert "No space left" in msg
    assert (os.stat(out).st_size, os.stat(out).st_blocks) == (0, 0)


# -- jail-grant-vsock --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("plant", ["ln -s /run/dbus/system_bus_socket {r}/v.sock",
                                   "printf x > {r}/v.sock", "mkfifo {r}/v.sock"])
def test_grant_vsock_refuses_what_is_not_the_vms_socket(
        sudo_user: User, jail: tuple[str, Path], plant: str) -> None:
    vm, root = jail
    launched(root)
    as_vm(VMUID, plant.format(r=root))
    before = seen(sudo_user, vm)
    res = helper_as(sudo_user, "jail-grant-vsock", {"vm": vm})
    assert res.returncode == 1, res.stdout
    assert "is not the VM's socket" in res.stderr or "symlink" in res.stderr, res.stderr
    assert not (root.parent / "vsock.sock").exists()
    assert seen(sudo_user, vm) == before


# -- the jail is the one the claim names, when the bytes move --------------------------------


@pytest.mark.slow
def test_import_never_writes_into_a_jail_that_replaced_the_claimed_one(
        sudo_user: User, jail: tuple[str, Path]) -> None:
    """The claim is checked, then the import waits for the host-wide promise lock; meanwhile
    the attacker's jail goes and another one of that name appears (a victim re-staging the
    id). Before the fix the import opened the jail directory by name again and wrote its
    file into the new jail."""
    vm, root = jail
    jd = root.parent
    aside = jd.with_name(vm + "x")
    src = user_file(sudo_user, "state", b"attacker's state")
    lock = os.open(BASE / "users", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        argv = ["setpriv", f"--reuid={sudo_user.uid}", f"--regid={sudo_user.gid}",
                "--clear-groups", "--", "/usr/bin/python3", "-I", "-c", _PASS, str(src),
                str(os.O_RDONLY), "jail-import", json.dumps({"vm": vm, "name": "vm.state"}),
                HELPER]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd="/")
        time.sleep(1.5)  # past the claim check, waiting for the lock
        os.rename(jd, aside)
        (jd / "root").mkdir(mode=0o700, parents=True)  # the victim's fresh jail
        fcntl.flock(lock, fcntl.LOCK_UN)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 1, (out, err)
        assert "changed since" in json.loads(out)["error"]["message"]
        assert os.listdir(jd / "root") == []
    finally:
        os.close(lock)
        if aside.exists():
            shutil.rmtree(jd, ignore_errors=True)
            os.rename(aside, jd)


# -- root's rights never reach the caller's file -----------------------------------------------


@pytest.fixture
def small_fs(sudo_user: User, tmp_path: Path) -> Iterator[Path]:
    """An 32 MiB ext4 of the attacker's with half its blocks reserved for root."""
    img, mnt = tmp_path / "small.img", sudo_user.scratch / "small"
    with open(img, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-m", "50", str(img)], check=True, capture_output=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
    try:
        os.chown(mnt, sudo_user.uid, sudo_user.gid)
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
        mnt.rmdir()


@pytest.mark.slow
def test_export_never_writes_with_roots_rights(sudo_user: User, jail: tuple[str, Path],
                                               small_fs: Path) -> None:
    """The attacker's destination is on a filesystem whose free space is root's reserve:
    the caller itself gets ENOSPC, root did not (nor a quota, nor CAP_FSETID, nor a
    capability a /proc or cgroup file checks when written). Before the fix the export wrote
    24 MiB into root's reserve."""
    vm, root = jail
    launched(root)
    as_vm(VMUID, f"head -c {24 << 20} /dev/urandom > {root}/vm.mem")
    probe = subprocess.run(["setpriv", f"--reuid={sudo_user.uid}", f"--regid={sudo_user.gid}",
                            "--clear-groups", "--", "/bin/sh", "-c",
                            f"head -c {24 << 20} /dev/zero > {small_fs}/probe"],
                           capture_output=True, text=True, check=False)
    assert probe.returncode != 0
    assert "No space left" in probe.stderr
    (small_fs / "probe").unlink()
    dst = small_fs / "out"
    dst.touch(mode=0o600)
    os.chown(dst, sudo_user.uid, sudo_user.gid)
    msg = refused_fd(sudo_user, "jail-export", {"vm": vm, "name": "vm.mem"}, dst, os.O_WRONLY)
    assert "No space left" in msg
    assert os.stat(dst).st_size == 0
    assert os.stat(dst).st_blocks == 0


@pytest.mark.slow
def test_a_source_grown_after_its_check_is_copied_only_as_far_as_checked(
        sudo_user: User, jail: tuple[str, Path]) -> None:
    """The attacker's source passes the size check at 4 KiB, then grows by 8 MiB while the
    import waits for the promise lock: the copy (and the jail_bytes charge) stay 4 KiB."""
    vm, root = jail
    src = user_file(sudo_user, "grows", b"A" * 4096)
    lock = os.open(BASE / "users", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        argv = ["setpriv", f"--reuid={sudo_user.uid}", f"--regid={sudo_user.gid}",
                "--clear-groups", "--", "/usr/bin/python3", "-I", "-c", _PASS, str(src),
                str(os.O_RDONLY), "jail-import", json.dumps({"vm": vm, "name": "vm.mem"}),
                HELPER]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd="/")
        time.sleep(1.5)  # checked, waiting for the lock
        with open(src, "ab") as f:
            f.write(os.urandom(8 << 20))
        fcntl.flock(lock, fcntl.LOCK_UN)
        out, err = proc.communicate(timeout=60)
    finally:
        os.close(lock)
    assert proc.returncode == 0, err
    assert json.loads(out) == {"bytes": 4096}
    assert (root / "vm.mem").read_bytes() == b"A" * 4096
