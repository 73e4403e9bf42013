"""`kiln run` for real: QEMU microvm boots (TCG here) of the busybox image through the
real command (a subprocess running the venv's code), checked from the outside: stdout
bytes, exit codes, the snapshots with debugfs, /proc for leftover VMMs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder.localregistry import free_port
from builder.root import Root
from builder.source import RegistryOptions
from runner.vm.state import State, host_name, root_key, vm_of_host
from tests.support.images import busybox_layout
from tests.support.oci import make_layout, mkdir, reg
from tests.support.run import KILN, forwarded_reply
from tests.support.timing import limit

VM_ID = re.compile(r"^[a-z2-7]{12}$")


def kiln(root: Path, *args: str, timeout: float = 120,
         stdin: int | None = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KILN, "--root", str(root), *args], capture_output=True,
                          text=True, check=False, timeout=timeout, stdin=stdin)


def vmm_pids(root: Path) -> dict[str, int]:
    """VM id → pid of the VMMs of ``root``'s VMs (those tagged with its root key)."""
    from runner.vm.reaper import scan_vmms

    key = root_key(root)
    return {vm: pid for name, pid in scan_vmms().items()
            if (vm := vm_of_host(name, key)) is not None}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str, str]]:
    """(root with a copy pool, busybox volume id, distroless volume id)."""
    from builder.pipeline import build
    from builder.pool import init_pool

    base = tmp_path_factory.mktemp("run")
    root = base / "root"
    init_pool(Root(root).ensure().path, backend="copy")
    busybox = build(Root(root), f"oci:{busybox_layout()}:1", RegistryOptions()).volume
    layout = make_layout(base / "distroless", [[
        mkdir("bin"),
        reg("bin/busybox", Path("/bin/busybox").read_bytes(), mode=0o755),
    ]], tag="1")
    distroless = build(Root(root), f"oci:{layout.path}:1", RegistryOptions()).volume
    yield root, busybox.id[7:19], distroless.id[7:19]
    ids = {r.id for r in State(root).all()}
    for vm_id, pid in vmm_pids(root).items():
        if vm_id in ids:
            os.kill(pid, 9)


@pytest.mark.slow
def test_echo_prints_exactly_hi(world: tuple[Path, str, str]) -> None:
    root, busybox, _ = world
    res = kiln(root, "run", "--rm", busybox, "--", "echo", "hi")
    assert (res.returncode, res.stdout) == (0, "hi\n"), res.stderr


@pytest.mark.slow
def test_guest_kernel_command_line_follows_the_accelerator(
        world: tuple[Path, str, str]) -> None:
    """Under TCG the guest boots with the TSC hint and without the crypto self-tests;
    under KVM with neither (what the guest's own /proc/cmdline says)."""
    from runner.vmm.qemuargv import kvm_verdict

    root, busybox, _ = world
    res = kiln(root, "run", "--rm", busybox, "--", "cat", "/proc/cmdline")
    assert res.returncode == 0, res.stderr
    words = res.stdout.split()
    tcg = not kvm_verdict(Root(root))[0]
    assert ("cryptomgr.notests" in words, any(w.startswith("tsc_early_khz=") for w in words),
            "init=/.kiln/init" in words) == (tcg, tcg, True), words


@pytest.mark.slow
def test_exit_code_env_workdir_user_and_stderr(world: tuple[Path, str, str]) -> None:
    root, busybox, _ = world
    res = kiln(root, "run", "--rm", "-e", "FOO=bar baz", "--workdir", "/srv/app",
               "--user", "1000:1000", busybox, "--", "sh", "-c",
               'echo "$FOO"; pwd; id -u; id -g; echo "$HOSTNAME" >&2; echo oops >&2; exit 7')
    assert res.returncode == 7, res.stderr
    assert res.stdout == "bar baz\n/srv/app\n1000\n1000\n"
    assert res.stderr.splitlines()[-1] == "oops"  # the workload's stderr, not stdout


@pytest.mark.slow
def test_a_workloads_kill_minus_one_does_not_end_the_run(world: tuple[Path, str, str]) -> None:
    """``kill -1`` reaches every process but the sender and PID 1: the agent that runs the
    workload holds it (a TERM or HUP killed the agent, and the run, with 143 or 129)."""
    root, busybox, _ = world
    res = kiln(root, "run", "--rm", busybox, "--", "sh", "-c",
               "sleep 30 & kill -TERM -1; kill -HUP -1; wait; echo survived")
    assert (res.returncode, res.stdout) == (0, "survived\n"), res.stderr


@pytest.mark.slow
@pytest.mark.parametrize(("user", "message"), [
    ("4294967296", "kiln: invalid uid 4294967296: not a number below 4294967295"),
    ("1000:4294967296", "kiln: invalid gid 4294967296: not a number below 4294967295"),
])
def test_ids_out_of_range_are_refused_not_wrapped_to_root(
        world: tuple[Path, str, str], user: str, message: str) -> None:
    root, busybox, _ = world
    res = kiln(root, "run", "--rm", "--user", user, busybox, "--", "id")
    assert (res.returncode, res.stdout) == (126, ""), res.stderr
    assert res.stderr.splitlines()[-1] == message


@pytest.mark.slow
def test_missing_command_exits_127(world: tuple[Path, str, str]) -> None:
    root, busybox, _ = world
    res = kiln(root, "run", "--rm", busybox, "--", "no-such-command")
    assert res.returncode == 127
    assert res.stdout == ""
    assert "kiln: no-such-command: executable file not found in $PATH" in res.stderr


@pytest.mark.slow
def test_distroless_image_runs(world: tuple[Path, str, str]) -> None:
    root, _, distroless = world
    res = kiln(root, "run", "--rm", distroless, "--", "/bin/busybox", "echo", "no shell here")
    assert (res.returncode, res.stdout) == (0, "no shell here\n"), res.stderr


@pytest.mark.slow
def test_timeout_exits_124_and_rm_leaves_nothing(world: tuple[Path, str, str]) -> None:
    root, busybox, _ = world
    before_dirs = set(os.listdir(root / "vms"))
    before_snaps = set(os.listdir(root / "pool" / "fs" / "snapshots"))
    t0 = time.monotonic()
    res = kiln(root, "run", "--rm", "--timeout", "2", busybox, "--", "sleep", "100")
    assert res.returncode == 124, res.stderr
    assert time.monotonic() - t0 < limit(20)
    assert set(os.listdir(root / "vms")) == before_dirs
    assert set(os.listdir(root / "pool" / "fs" / "snapshots")) == before_snaps
    ps = json.loads(kiln(root, "ps", "--all", "--json").stdout)
    assert all(r["state"] != "running" for r in ps)
    assert not set(vmm_pids(root)) & {r["id"] for r in ps}
    assert not [p for p in [*Path("/sys/fs/cgroup/cpu/kiln").glob(root_key(root) + "*"),
                            *Path("/sys/fs/cgroup/memory/kiln").glob(root_key(root) + "*")]
                if p.is_dir()]  # no cgroup of this root's VMs is left


def _debugfs_cat(image: str, path: str) -> str:
    res = subprocess.run(["debugfs", "-R", f"cat {path}", image], capture_output=True,
                         text=True, check=True)
    return res.stdout


@pytest.mark.slow
def test_two_vms_from_one_base_write_independently(world: tuple[Path, str, str]) -> None:
    root, busybox, _ = world
    cmd = 'cat /data 2>/dev/null || echo none; echo "$0" > /data; cat /data'
    procs = [subprocess.Popen([*KILN, "--root", str(root), "run", "--name", f"w-{tag}",
                               busybox, "--", "sh", "-c", cmd, tag],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              stdin=subprocess.DEVNULL)
             for tag in ("one", "two")]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [o for o, _ in outs] == ["none\none\n", "none\ntwo\n"]
    ps = {r["name"]: r for r in json.loads(kiln(root, "ps", "--all", "--json").stdout)}
    snaps = root / "pool" / "fs" / "snapshots"
    for tag in ("one", "two"):
        rec = ps[f"w-{tag}"]
        assert (rec["state"], rec["exit_code"]) == ("exited", 0)
        assert _debugfs_cat(str(snaps / f"{rec['snapshot']}.ext4"), "/data") == f"{tag}\n"
    base = next((root / "pool" / "fs" / "volumes").glob(f"{busybox}*.ext4"))
    assert _debugfs_cat(str(base), "/data") == ""  # the base is untouched
    res = kiln(root, "rm", "w-one", "w-two")
    assert res.returncode == 0, res.stderr
    assert not (snaps / f"{ps['w-one']['snapshot']}.ext4").exists()


@pytest.mark.slow
def test_detach_logs_stop(world: tuple[Path, str, str]) -> None:
    root, busybox, _ = world
    res = kiln(root, "run", "--detach", "--name", "bg", busybox, "--", "sh", "-c",
               "echo started; exec sleep 1000")
    assert res.returncode == 0, res.stderr
    vm_id = res.stdout.strip()
    assert res.stdout == vm_id + "\n"
    assert VM_ID.fullmatch(vm_id)
    deadline = time.monotonic() + limit(60)
    logs = ""
    while time.monotonic() < deadline and "started" not in logs:
        logs = kiln(root, "logs", vm_id).stdout
        time.sleep(0.3)
    assert "started\n" in logs
    assert "kiln-init: starting /bin/sh" in logs  # the console is in the logs too
    ps = json.loads(kiln(root, "ps", "--json").stdout)
    assert [(r["id"], r["state"], r["vmm"]) for r in ps if r["name"] == "bg"] == \
        [(vm_id, "running", "qemu")]
    assert vm_id in vmm_pids(root)
    res = kiln(root, "stop", "bg")
    assert (res.returncode, res.stdout) == (0, vm_id + "\n"), res.stderr
    rec = next(r for r in json.loads(kiln(root, "ps", "--all", "--json").stdout)
               if r["id"] == vm_id)
    assert (rec["state"], rec["exit_code"]) == ("exited", 143)  # SIGTERM to the workload
    assert vm_id not in vmm_pids(root)
    assert kiln(root, "rm", vm_id).returncode == 0
    assert not (root / "vms" / vm_id).exists()


@pytest.mark.slow
def test_errors(world: tuple[Path, str, str], tmp_path: Path) -> None:
    root, busybox, _ = world  # (--net tap's refusals: tests/e2e/test_net_run.py)
    res = kiln(root, "run", "--vmm", "firecracker", busybox)
    assert res.returncode == 125
    assert "error: firecracker is not configured: firecracker not found at " in res.stderr
    res = kiln(root, "run", "-p", "80", "--net", "user", busybox)
    assert res.returncode == 125
    assert "error: invalid port forward '80'" in res.stderr
    empty = tmp_path / "nopool"
    layout = busybox_layout()
    from builder.pipeline import build

    build(Root(empty), f"oci:{layout}:1", RegistryOptions())
    res = kiln(empty, "run", f"oci:{layout}:1", "--", "true")
    assert res.returncode == 125
    assert "error: no pool: run `kiln pool init`" in res.stderr


@pytest.mark.slow
def test_interactive_stdin_reaches_the_workload(world: tuple[Path, str, str]) -> None:
    root, busybox, _ = world
    res = subprocess.run([*KILN, "--root", str(root), "run", "--rm", "-i", busybox, "--",
                          "sh", "-c", 'read x; echo "got $x"; cat'],
                         input="line one\nline two\n", capture_output=True, text=True,
                         timeout=120, check=False)
    assert (res.returncode, res.stdout) == (0, "got line one\nline two\n"), res.stderr


@pytest.mark.slow
def test_net_user_forwards_a_port(world: tuple[Path, str, str]) -> None:

    root, busybox, _ = world
    port = free_port()
    p = subprocess.Popen([*KILN, "--root", str(root), "run", "--rm", "--net", "user", "-p",
                          f"{port}:8080", "--timeout", str(int(limit(60))), busybox, "--",
                          "sh", "-c", "echo hello-net | nc -l -p 8080"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         stdin=subprocess.DEVNULL)
    got = forwarded_reply(port, p, b"hello-net")
    _out, err = p.communicate(timeout=limit(60))
    assert got == b"hello-net\n"
    assert p.returncode == 0, err


def _wait_running(root: Path, name: str) -> dict[str, object]:
    deadline = time.monotonic() + limit(60)
    while time.monotonic() < deadline:
        for r in json.loads(kiln(root, "ps", "--json").stdout):
            if r["name"] == name and r["state"] == "running":
                return dict(r)
        time.sleep(0.2)
    raise AssertionError(f"{name} never ran")


@pytest.mark.slow
def test_sigterm_stops_the_vm_gracefully(world: tuple[Path, str, str]) -> None:
    root, busybox, _ = world
    p = subprocess.Popen([*KILN, "--root", str(root), "run", "--rm", "--name", "term",
                          busybox, "--", "sh", "-c",
                          "trap 'echo bye; exit 3' TERM; echo up; while :; do sleep 1; done"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         stdin=subprocess.DEVNULL)
    rec = _wait_running(root, "term")
    assert p.stdout is not None
    assert p.stdout.readline() == "up\n"  # the workload runs (its trap is set)
    p.terminate()
    out, err = p.communicate(timeout=limit(60))
    assert (p.returncode, out) == (3, "bye\n"), err
    assert str(rec["id"]) not in vmm_pids(root)


@pytest.mark.slow
def test_sigint_to_init_stops_the_workload_gracefully(world: tuple[Path, str, str]) -> None:
    """Firecracker's stop is Ctrl-Alt-Del, which the kernel turns into SIGINT for PID 1 once
    kiln-init set kernel.ctrl-alt-del=0. QEMU's microvm has no keyboard to press it on,
    so the workload sends that SIGINT itself: init must SIGTERM the workload and report
    the status the workload exits with (not the 130 of its own interrupted wait)."""
    root, busybox, _ = world
    res = kiln(root, "run", "--rm", "--timeout", str(int(limit(60))), busybox, "--", "sh", "-c",
               "trap 'echo bye; exit 3' TERM; cat /proc/sys/kernel/ctrl-alt-del; "
               "kill -INT 1; while :; do sleep 1; done")
    assert (res.returncode, res.stdout) == (3, "0\nbye\n"), res.stderr


def test_sigkill_of_kiln_run_is_reconciled(world: tuple[Path, str, str]) -> None:
    root, busybox, _ = world
    p = subprocess.Popen([*KILN, "--root", str(root), "run", "--name", "killed", busybox,
                          "--", "sleep", "1000"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    rec = _wait_running(root, "killed")
    assert str(rec["id"]) in vmm_pids(root)
    p.kill()
    p.wait()
    after = next(r for r in json.loads(kiln(root, "ps", "--all", "--json").stdout)
                 if r["id"] == rec["id"])
    assert (after["state"], after["reason"]) == ("failed", "kiln run (the VM's owner) died")
    deadline = time.monotonic() + limit(10)
    while str(rec["id"]) in vmm_pids(root) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert str(rec["id"]) not in vmm_pids(root)  # the reaper killed the orphaned VMM
    assert kiln(root, "rm", "killed").returncode == 0
    assert not (root / "vms" / str(rec["id"])).exists()


@pytest.mark.slow
def test_another_roots_reaper_leaves_a_live_vm_alone(world: tuple[Path, str, str],
                                                    tmp_path: Path) -> None:
    """Root B runs a detached VM; `kiln ps` twice in root A (its reaper's orphans are
    those seen twice) must not touch it; B then stops and removes it normally."""
    root, busybox, _ = world
    other = tmp_path / "root-a"
    res = kiln(root, "run", "--detach", "--name", "other-root", busybox, "--", "sh", "-c",
               "echo up; exec sleep 1000")
    assert res.returncode == 0, res.stderr
    vm_id = res.stdout.strip()
    rec = State(root).get(vm_id)
    assert rec is not None
    name = host_name(root_key(root), vm_id)
    assert rec.pid is not None
    argv = Path(f"/proc/{rec.pid}/cmdline").read_bytes().split(b"\0")
    assert f"kiln-{name},process=kiln-{name}".encode() in argv  # tagged with B's key
    assert bool(rec.cgroup_dirs) == (os.geteuid() == 0)  # as root: per-VM cgroups
    assert all(Path(d).name == name and Path(d).is_dir() for d in rec.cgroup_dirs)
    for _ in range(2):
        ps = kiln(other, "ps", "--all", "--json")
        assert (ps.returncode, json.loads(ps.stdout)) == (0, []), ps.stderr
    assert vmm_pids(root).get(vm_id) == rec.pid  # the same VMM, still there
    assert all(Path(d).is_dir() for d in rec.cgroup_dirs)
    row = next(r for r in json.loads(kiln(root, "ps", "--json").stdout) if r["id"] == vm_id)
    assert row["state"] == "running"
    res = kiln(root, "stop", vm_id)
    assert (res.returncode, res.stdout) == (0, vm_id + "\n"), res.stderr
    assert vm_id not in vmm_pids(root)
    assert not [d for d in rec.cgroup_dirs if Path(d).exists()]
    assert kiln(root, "rm", vm_id).returncode == 0
    assert not (root / "vms" / vm_id).exists()
