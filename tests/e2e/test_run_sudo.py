"""`kiln run` as an ordinary user: every privileged step through `sudo kiln-helper`.

The user (created by the tests, with a sudoers rule for the installed helper only) builds
the busybox image, makes a reflink pool and a snapshot, then boots VMs under QEMU TCG. Its
QEMU runs as the user itself (no -runas) inside a cgroup with cpu and memory limits that
only the helper could make (``cgroup-create``), join (``cgroup-attach``, before QEMU
execs) and remove (``cgroup-kill``). Checked from outside: stdout bytes, exit codes, the
QEMU process (uid, argv, cgroup membership, limits), the helper's audit log (which ops
ran, in which order), and afterwards no process, cgroup, mount or loop device of a VM.
A SIGKILLed `kiln run` is reported failed by the next command, which cleans up through
the helper; the reaper removes the user's orphaned cgroups and never another user's.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder.demoimage import make_busybox_image
from helper import cgroup as cg
from runner.vm import cgroup as vmcgroup
from runner.vm.reaper import scan_cgroups
from runner.vm.state import host_name, root_key, vm_of_host
from tests.support.cli import wait_for
from tests.support.oci import User, give_to
from tests.support.run import vmms
from tests.support.sudo import BASE, _audit_len, _ops_ran, helper_as, kiln_as, loop_table
from tests.support.timing import limit

pytestmark = [pytest.mark.root, pytest.mark.loop, pytest.mark.slow]
VM_ID = re.compile(r"^[a-z2-7]{12}$")
MEM = (512 << 20) + (320 << 20)  # kiln run's default --memory + QEMU's allowance


KILN = ("import runpy, sys; sys.argv[0] = 'kiln'; "
        "runpy.run_module('runner', run_name='__main__')")


def kiln_popen(user: User, root: Path, *args: str) -> subprocess.Popen[str]:
    env = {"HOME": str(user.home), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
           "LC_ALL": "C.UTF-8", "USER": user.name}
    return subprocess.Popen(
        ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups", "--",
         sys.executable, "-c", KILN, "--root", str(root), *args],
        cwd="/", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def cgroups_of(root: Path) -> dict[str, tuple[str, ...]]:
    """VM id → cgroup directories of ``root``'s VMs (kiln's parent, every hierarchy)."""
    key = root_key(root)
    return {vm: dirs for name, dirs in scan_cgroups().items()
            if (vm := vm_of_host(name, key)) is not None}


def mounts() -> list[str]:
    return sorted(line.split()[4] for line in
                  Path("/proc/self/mountinfo").read_text().splitlines()
                  if not line.split()[4].startswith("/tmp/"))


@pytest.fixture(scope="module")
def flow(sudo_user: User) -> Iterator[tuple[User, Path, str]]:
    """(user, its kiln root, the busybox volume id): build → reflink pool → snapshot."""
    user = sudo_user
    layout = user.scratch / "layout"
    if not layout.exists():
        make_busybox_image(layout, "1")
        give_to(user, layout)
    root = user.scratch / "runroot"
    vol = json.loads(kiln_as(user, root, "build", f"oci:{layout}:1", "--json").stdout)["id"]
    st = json.loads(kiln_as(user, root, "pool", "init", "--backend", "reflink", "--size",
                            "1G", "--json").stdout)
    assert (st["backend"], st["volumes"]) == ("reflink", 1)
    snap = json.loads(kiln_as(user, root, "snapshot", "create", vol, "--json").stdout)
    assert os.stat(snap["path"]).st_uid == user.uid
    kiln_as(user, root, "snapshot", "rm", snap["id"])
    try:
        yield user, root, vol
    finally:
        for pid in vmms(root).values():
            os.kill(pid, signal.SIGKILL)
        kiln_as(user, root, "pool", "destroy", check=False)


def _vm_ops(ran: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(op, outcome) for op, outcome in ran if op.startswith("cgroup-")]


def test_run_as_an_ordinary_user_through_the_helper(flow: tuple[User, Path, str]) -> None:
    user, root, vol = flow
    before = (mounts(), loop_table())
    start = _audit_len()

    res = kiln_as(user, root, "run", "--rm", vol, "--", "echo", "hi", check=False)
    assert (res.returncode, res.stdout) == (0, "hi\n"), res.stderr
    assert "limits not applied" not in res.stderr
    res = kiln_as(user, root, "run", "--name", "seven", vol, "--", "sh", "-c", "exit 7",
                  check=False)
    assert res.returncode == 7, res.stderr
    ps = json.loads(kiln_as(user, root, "ps", "--all", "--json").stdout)
    assert [(r["name"], r["state"], r["exit_code"]) for r in ps] == [("seven", "exited", 7)]
    kiln_as(user, root, "rm", "seven")

    res = kiln_as(user, root, "run", "--detach", vol, "--", "sh", "-c",
                  "echo started; sleep 120", check=False)
    assert res.returncode == 0, res.stderr
    vm_id = res.stdout.strip()
    assert VM_ID.fullmatch(vm_id)
    pid = wait_for("the QEMU process", lambda: vmms(root).get(vm_id))
    status = Path(f"/proc/{pid}/status").read_text()
    assert re.search(rf"^Uid:\s+{user.uid}\s+{user.uid}\s+{user.uid}\s+{user.uid}$",
                     status, re.M)  # QEMU runs as the caller itself
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"-runas" not in argv
    assert argv[argv.index(b"-sandbox") + 1].startswith(b"on,")
    dirs = cgroups_of(root)[vm_id]
    host = host_name(root_key(root), vm_id)
    lay = cg.layout(cg.CgroupConfig())
    if lay.v2 is not None and {"cpu", "memory"} <= set(
            (lay.v2 / "cgroup.controllers").read_text().split()):
        (d,) = dirs
        assert Path(d, "cpu.max").read_text().split() == ["150000", "100000"]
        assert Path(d, "memory.max").read_text().strip() == str(MEM)
        assert Path(d, "pids.max").read_text().strip() == str(vmcgroup.QEMU_PIDS)
    else:  # v1 (these machines): cpu, memory, freezer and (with a pids limit) pids
        assert sorted(dirs) == sorted(f"{lay.v1[c]}/kiln/{host}"
                                      for c in ("cpu", "memory", "freezer", "pids"))
        assert Path(lay.v1["pids"], "kiln", host, "pids.max").read_text() == \
            f"{vmcgroup.QEMU_PIDS}\n"
        assert Path(lay.v1["cpu"], "kiln", host, "cpu.cfs_quota_us").read_text() == \
            "150000\n"
        assert Path(lay.v1["memory"], "kiln", host, "memory.limit_in_bytes").read_text() \
            == f"{MEM}\n"
    for d in dirs:  # QEMU is inside from its first instruction (moved before exec)
        assert pid in cg._pids(Path(d))
    logs = wait_for("the workload's output", lambda: (
        r := kiln_as(user, root, "logs", vm_id)).stdout.endswith("started\n") and r)
    assert "started\n" in logs.stdout
    assert kiln_as(user, root, "stop", "--timeout", "3", vm_id).stdout.strip() == vm_id
    ps = json.loads(kiln_as(user, root, "ps", "--all", "--json").stdout)
    assert [(r["id"], r["state"]) for r in ps] == [(vm_id, "exited")]
    assert not Path(f"/proc/{pid}").exists()
    kiln_as(user, root, "rm", vm_id)

    # Nothing of any VM is left: no QEMU, no cgroup, no mount, no loop device, no claim.
    assert vmms(root) == {}
    assert cgroups_of(root) == {}
    assert (mounts(), loop_table()) == before
    assert os.listdir(BASE / "users" / str(user.uid) / "cgroups") == []
    assert json.loads(kiln_as(user, root, "ps", "--all", "--json").stdout) == []
    ran = _vm_ops(_ops_ran(user.uid, start))
    assert ran == [("cgroup-create", "ok"), ("cgroup-attach", "ok"),
                   ("cgroup-kill", "ok")] * 3, ran


def test_sigkill_of_kiln_run_is_failed_and_cleaned_up_by_the_next_command(
        flow: tuple[User, Path, str]) -> None:
    user, root, vol = flow
    start = _audit_len()
    run = kiln_popen(user, root, "run", "--name", "killed", vol, "--", "sleep", "120")
    try:
        vm_id, pid = wait_for("the QEMU process", lambda: next(iter(vmms(root).items()), None))
        dirs = cgroups_of(root)[vm_id]
        wait_for("QEMU in its cgroup", lambda: all(pid in cg._pids(Path(d)) for d in dirs))
        # and recorded as running: a SIGKILL between QEMU's exec and that update is one
        # "while creating the VM" (another test's case), not this one
        wait_for("the VM recorded running", lambda: [r["state"] for r in json.loads(
            kiln_as(user, root, "ps", "--json").stdout)] == ["running"])
        run.send_signal(signal.SIGKILL)
        run.wait(10)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    wait_for("QEMU to die with its owner", lambda: not Path(f"/proc/{pid}").exists(), limit(10))
    assert all(Path(d).is_dir() for d in dirs)  # the orphaned cgroup, until the next command
    ps = json.loads(kiln_as(user, root, "ps", "--all", "--json").stdout)
    assert [(r["id"], r["name"], r["state"], r["reason"]) for r in ps] == [
        (vm_id, "killed", "failed", "kiln run (the VM's owner) died")]
    assert not any(Path(d).exists() for d in dirs)
    assert _vm_ops(_ops_ran(user.uid, start)) == [
        ("cgroup-create", "ok"), ("cgroup-attach", "ok"), ("cgroup-kill", "ok")]
    kiln_as(user, root, "rm", vm_id)
    assert cgroups_of(root) == {}


def test_the_reaper_removes_the_users_orphaned_cgroups_only(
        flow: tuple[User, Path, str]) -> None:
    """Two cgroups carrying the user's root key and no record: one the user made through
    the helper (an orphan: reaped on the second pass, through cgroup-kill) and one made
    by root (another user's, as far as the helper knows: refused, left alone)."""
    user, root, _ = flow
    key = root_key(root)
    mine, foreign = host_name(key, "a" * 12), host_name(key, "b" * 12)
    version = 1 if {"cpu", "memory", "freezer"} <= set(cg.layout(cg.CgroupConfig()).v1) else 2
    made = helper_as(user, "cgroup-create", {"vm": mine, "version": version,
                                             "limits": {"memory_bytes": 64 << 20}})
    assert made.returncode == 0, made.stderr
    ccfg = cg.CgroupConfig(parent="kiln")
    foreign_dirs = cg.cgroup_create(ccfg, foreign, version)
    try:
        start = _audit_len()
        kiln_as(user, root, "ps")  # first sight: orphans are only noted
        assert set(cgroups_of(root)) == {"a" * 12, "b" * 12}
        kiln_as(user, root, "ps")  # seen twice: reaped, through the helper
        assert set(cgroups_of(root)) == {"b" * 12}
        assert all(d.is_dir() for d in foreign_dirs)
        ran = _vm_ops(_ops_ran(user.uid, start))
        assert ("cgroup-kill", "ok") in ran
        assert ("cgroup-kill", "failed") in ran  # the foreign one: refused by the helper
    finally:
        cg.cgroup_kill(ccfg, foreign, version)
        helper_as(user, "cgroup-kill", {"vm": mine, "version": version})


def test_warm_start_as_an_ordinary_user(flow: tuple[User, Path, str]) -> None:
    """`kiln warm create` and `kiln run --warm` as the sudo caller (issue #14): the image
    and its state are the caller's, 0600 in a 0700 directory; nothing is left running."""
    user, root, vol = flow
    before = (mounts(), loop_table())
    res = kiln_as(user, root, "warm", "create", vol, "--json", check=False)
    assert res.returncode == 0, res.stderr
    image = json.loads(res.stdout)
    res = kiln_as(user, root, "run", "--warm", "--rm", vol, "--", "echo", "X", check=False)
    assert (res.returncode, res.stdout) == (0, "X\n"), res.stderr
    assert "making one" not in res.stderr
    assert "booting cold" not in res.stderr  # a restore, not a fallback
    d = root / "warm" / image["id"]
    st = d.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (user.uid, user.gid, 0o700)
    for name in ("mem", "state", "disk", "warm.json"):  # mem: the guest's memory (QEMU 8.2)
        st = (d / name).stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (user.uid, user.gid, 0o600), name
    assert sorted(os.listdir(d)) == ["disk", "mem", "state", "warm.json"]
    # Nothing of either VM is left: no QEMU, no cgroup, no mount, no loop device, no record.
    assert vmms(root) == {}
    assert cgroups_of(root) == {}
    assert (mounts(), loop_table()) == before
    assert os.listdir(BASE / "users" / str(user.uid) / "cgroups") == []
    assert json.loads(kiln_as(user, root, "ps", "--all", "--json").stdout) == []
    assert os.listdir(root / "tmp") == []
    kiln_as(user, root, "warm", "rm", image["id"])
    assert json.loads(kiln_as(user, root, "warm", "ls", "--json").stdout) == []
