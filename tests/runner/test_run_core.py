"""Run-stage cores: root's cgroup plan (v1 and v2), a VM's outcome, the VMM
spawner (exec failure, session, inherited fds, network namespace) and QEMU's tap-by-fd
argv; real cgroups and namespaces where this host has them."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from helper.base.errors import KilnError, UsageError
from runner.vm import cgroup as vmcgroup
from runner.vm import spec as vmspec
from runner.vm.spec import Outcome, outcome
from runner.vmm import process as supervise
from runner.vmm import qemuargv
from tests.support.timing import limit

V1 = """cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/cpuacct cgroup rw,relatime,cpuacct 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""
V2 = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n"


def test_cgroup_plan_v1_when_unified_has_no_controllers() -> None:
    p = vmcgroup.root_plan(V1, "", "abcdefghijkl", 2, 1 << 30)
    assert p == vmcgroup.CgroupPlan(
        1, ("/sys/fs/cgroup/cpu/kiln/abcdefghijkl", "/sys/fs/cgroup/memory/kiln/abcdefghijkl"),
        (("/sys/fs/cgroup/cpu/kiln/abcdefghijkl/cpu.cfs_period_us", "100000"),
         ("/sys/fs/cgroup/cpu/kiln/abcdefghijkl/cpu.cfs_quota_us", "250000"),
         ("/sys/fs/cgroup/memory/kiln/abcdefghijkl/memory.limit_in_bytes", str(1 << 30))),
        parents=("/sys/fs/cgroup/cpu/kiln", "/sys/fs/cgroup/memory/kiln"))


def test_cgroup_plan_v2() -> None:
    p = vmcgroup.root_plan(V2, "cpuset cpu io memory pids\n", "abcdefghijkl", 1, 512)
    assert p == vmcgroup.CgroupPlan(
        2, ("/sys/fs/cgroup/kiln/abcdefghijkl",),
        (("/sys/fs/cgroup/kiln/abcdefghijkl/cpu.max", "150000 100000"),
         ("/sys/fs/cgroup/kiln/abcdefghijkl/memory.max", "512"),
         ("/sys/fs/cgroup/kiln/abcdefghijkl/memory.swap.max", "0")),
        parents=("/sys/fs/cgroup/kiln",))


def test_cgroup_plan_none() -> None:
    assert vmcgroup.root_plan(V2, "io pids", "x", 1, 1).version == 0
    assert vmcgroup.root_plan("", "", "x", 1, 1) == vmcgroup.CgroupPlan(0, (), ())


@pytest.mark.root
def test_real_cgroup_limits_and_removal() -> None:
    plan = vmcgroup.host_root_plan("testtesttest", 1, 300 << 20)
    if plan.version == 0:
        pytest.skip("no usable cgroup controllers here")
    try:
        assert vmcgroup.apply_root_plan(plan) == []
        for path, value in plan.writes:
            got = Path(path).read_text().strip()
            assert got == value or (path.endswith("cpu.max") and got.startswith(
                value.split()[0]))
    finally:
        vmcgroup.remove_as_root(plan.dirs)
    assert not any(Path(d).exists() for d in plan.dirs)


@pytest.mark.root
def test_spawn_joins_the_cgroups_before_exec_and_threads_follow(tmp_path: Path) -> None:
    """The VMM's child joins root's cgroups itself before its exec (v1: through ``tasks``,
    one thread — it is single-threaded then); every thread the VMM starts afterwards is
    inside, as QEMU's vCPU and I/O threads must be for the limits to hold."""
    plan = vmcgroup.host_root_plan("spawnjointst", 1, 300 << 20)
    if plan.version == 0:
        pytest.skip("no usable cgroup controllers here")
    code = ("import threading, time\n"
            "t = threading.Thread(target=time.sleep, args=(30,), daemon=True); t.start()\n"
            "print(t.native_id, flush=True); time.sleep(30)\n")
    try:
        assert vmcgroup.apply_root_plan(plan) == []
        pid = supervise.spawn([sys.executable, "-c", code], log_path=tmp_path / "log",
                              cgroup_dirs=plan.dirs)
        try:
            deadline = time.monotonic() + limit(30)
            while not (tmp_path / "log").read_text().strip() and time.monotonic() < deadline:
                time.sleep(0.05)
            tid = int((tmp_path / "log").read_text())
            for d in plan.dirs:  # the process, and its thread started after the exec
                assert str(pid) in Path(d, "cgroup.procs").read_text().split(), d
                if plan.version == 1:
                    assert {str(pid), str(tid)} <= set(Path(d, "tasks").read_text().split())
            own = Path(f"/proc/{pid}/task/{tid}/cgroup").read_text()
            assert all(f"/{Path(d).parent.name}/{Path(d).name}\n" in own
                       for d in plan.dirs), own
        finally:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
    finally:
        vmcgroup.remove_as_root(plan.dirs)


def test_spawn_reports_exec_failure(tmp_path: Path) -> None:
    bad = tmp_path / "vmm"
    bad.write_bytes(b"\0\0\0\0not an executable")
    bad.chmod(0o755)
    with pytest.raises(KilnError) as e:
        supervise.spawn([str(bad)], log_path=tmp_path / "log")
    assert e.value.message == "cannot start vmm: Exec format error"


def test_spawn_passes_kept_fds_under_their_numbers(tmp_path: Path) -> None:
    """``keep_fds``: how a user's QEMU inherits the tap fd the helper sent (``fd=N``);
    every other fd of kiln stays closed in the VMM."""
    r, w = os.pipe()
    other_r, other_w = os.pipe()
    try:
        code = f"import os; os.write({w}, b'kept'); os.write({other_w}, b'leaked')"
        pid = supervise.spawn([sys.executable, "-c", code], log_path=tmp_path / "log",
                              keep_fds=(w,))
        os.close(w)
        os.close(other_w)
        _, status = os.waitpid(pid, 0)
        assert os.read(r, 100) == b"kept"
        assert os.read(other_r, 100) == b""
        assert "OSError: [Errno 9] Bad file descriptor" in (tmp_path / "log").read_text()
        assert os.waitstatus_to_exitcode(status) == 1
    finally:
        os.close(r)
        os.close(other_r)


@pytest.mark.root
def test_spawn_enters_a_network_namespace(tmp_path: Path) -> None:
    """``netns``: QEMU as root starts inside the namespace its tap lives in."""
    import secrets
    import subprocess

    name = f"kilnt{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        pid = supervise.spawn(["sh", "-c", f"readlink /proc/self/ns/net > {tmp_path}/ns"],
                              log_path=tmp_path / "log", netns=name)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        want = os.stat(f"/run/netns/{name}").st_ino
        assert (tmp_path / "ns").read_text().strip() == f"net:[{want}]"
        assert os.readlink("/proc/self/ns/net") != f"net:[{want}]"  # kiln stays out
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_qemu_takes_a_user_tap_by_fd_and_forwards_once_per_port() -> None:
    tap = qemuargv.TapNic("kt-abcdefghijkl", "02:1f:2e:3d:4c:5b", fd=7)
    base = dict(name="kiln-x", kernel=Path("/k"), initrd=Path("/i"), disk=Path("/d"),
                cpus=1, memory_mib=256, accel="tcg", tsc_khz=None, console_log=Path("/c"),
                stdout=Path("/o"), stderr=Path("/e"), status=Path("/s"), control=Path("/ctl"),
                init="/.kiln/init", net="tap", version=(10, 0))
    a = qemuargv.argv(qemuargv.QemuSpec(**base, tap=tap))  # type: ignore[arg-type]
    assert a[a.index("-netdev") + 1:a.index("-netdev") + 4] == [
        "tap,id=net0,fd=7", "-device", "virtio-net-device,netdev=net0,mac=02:1f:2e:3d:4c:5b"]
    assert a[-2:] == ["-sandbox", qemuargv.SANDBOX_USER]
    with pytest.raises(UsageError, match=r"^invalid tap fd 2$"):
        qemuargv.argv(qemuargv.QemuSpec(**base, tap=replace(tap, fd=2)))  # type: ignore[arg-type]
    assert qemuargv.forwards_of(["8080:80", "8081:80"]) == (qemuargv.Forward(8080, 80),
                                                       qemuargv.Forward(8081, 80))
    with pytest.raises(UsageError) as e:
        qemuargv.forwards_of(["8080:80", "9090:90", "8080:81"])
    assert (e.value.message, e.value.hint) == ("host port 8080 is forwarded twice",
                                               "give each -p its own HOST port")


def test_spawn_runs_in_its_own_session(tmp_path: Path) -> None:
    pid = supervise.spawn(["sh", "-c", "ps -o sid= -p $$ > " + str(tmp_path / "sid")],
                          log_path=tmp_path / "log")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert int((tmp_path / "sid").read_text()) == pid


@pytest.mark.parametrize(("args", "want"), [
    (("exit 7\n", 0), Outcome("exited", 7, "", 7)),
    (("exit 143\n", 0, True, False), Outcome("exited", 143, "timed out (--timeout)", 124)),
    (("", None, True, False), Outcome("exited", None, "timed out (--timeout)", 124)),
    (("exit 143\n", 0, False, True), Outcome("exited", 143, "stopped", 143)),
    (("", -9, False, True), Outcome("exited", 137, "stopped (forced)", 137)),
    (("", 0, False, False, True), Outcome("exited", 0, "the guest powered off", 0)),
])
def test_outcome(args: tuple[object, ...], want: Outcome) -> None:
    status, code, *rest = args
    flags = dict(zip(("timed_out", "stopped", "own_init"), rest, strict=False))
    kw = {"timed_out": False, "stopped": False, "own_init": False, **flags}
    assert outcome(str(status), code, **kw) == want  # type: ignore[arg-type]


def test_outcome_failures_say_why() -> None:
    got = outcome("", 0, timed_out=False, stopped=False, own_init=False,
                  console_tail="[ 1.0] x\nkiln-initrd: no root device /dev/vda\n")
    assert got == Outcome("failed", None, "the guest stopped without reporting an exit status: "
                          "kiln-initrd: no root device /dev/vda", 125)
    got = outcome("", 1, timed_out=False, stopped=False, own_init=False,
                  vmm_tail="qemu-system-x86_64: -drive x: Could not open 'y'\n")
    assert got.reason == "the VMM ended (exit 1): qemu-system-x86_64: -drive x: Could not open 'y'"
    assert got.kiln_exit == 125


def test_outcome_image_init_panic_is_a_failure() -> None:
    """panic=-1 + -no-reboot: QEMU exits 0 on a panic; an image's init exiting is a failure."""
    tail = "[    1.2] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000300\n"
    got = outcome("", 0, timed_out=False, stopped=False, own_init=True, console_tail=tail)
    assert got.state == "failed"
    assert got.kiln_exit == vmspec.EXIT_KILN
    assert got.reason.startswith("the guest kernel panicked: ")
    clean = outcome("", 0, timed_out=False, stopped=False, own_init=True, console_tail="bye\n")
    assert clean == Outcome("exited", 0, "the guest powered off", 0)
