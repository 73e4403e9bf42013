"""Starting, watching and stopping a VMM process; per-VM cgroups.

The VMM is a long-lived child that kiln supervises, not a tool run to completion, so it
does not go through ``builder.proc.run``: ``spawn`` forks and execs it directly (resolved
with ``proc.which`` on the fixed search path, with ``proc.tool_env``'s allowlisted
environment). The child joins the VM's cgroups (itself as root; not root: it waits until
kiln-helper has moved it, ``runner.vm.cgroup``) and its own session (Ctrl-C reaches kiln,
which stops the VM gracefully, not the VMM) and asks for SIGKILL when kiln dies; an exec
failure comes back through a close-on-exec pipe as an error, not a silent exit.

Cgroups (root's; ``runner.vm.cgroup`` chooses between these and kiln-helper's):
``cgroup_plan`` is pure — from the mount table (and the v2 root's controllers) to
the directories and limit files to write. v2 when the unified tree has the cpu and memory
controllers; else the v1 ``cpu`` and ``memory`` hierarchies (these machines). Limits are
best effort: a host that refuses them gets a warning, the VM still runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder import proc
from helper.base.errors import KilnError

CGROUP_PARENT = "kiln"
MEMORY_OVERHEAD = 320 << 20  # QEMU itself + the TCG code cache (tb-size=128) + slack
_PR_SET_PDEATHSIG = 1


# -- cgroups --------------------------------------------------------------------------------

@dataclass(frozen=True)
class CgroupPlan:
    version: int  # 1 | 2 | 0 (none usable)
    dirs: tuple[str, ...]  # created in order, removed in reverse
    writes: tuple[tuple[str, str], ...]  # (file path, value)
    parents: tuple[str, ...] = ()  # created if missing, never removed


def parse_cgroup_mounts(mounts: str) -> tuple[dict[str, str], str | None]:
    """(/proc/self/mounts) → ({v1 controller: mount point}, v2 mount point or None)."""
    v1: dict[str, str] = {}
    v2: str | None = None
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        _, mnt, fstype, opts = parts[:4]
        if fstype == "cgroup2" and v2 is None:
            v2 = mnt
        elif fstype == "cgroup":
            for opt in opts.split(","):
                if opt in ("cpu", "memory", "pids"):
                    v1[opt] = mnt
    return v1, v2


def cgroup_plan(mounts: str, v2_controllers: str, leaf: str, cpus: int,
                memory: int) -> CgroupPlan:
    """The cgroup directories and limits of one VM (pure): ``kiln/<leaf>`` in each
    hierarchy, ``leaf`` being the VM's host name (``runner.vm.state.host_name``)."""
    v1, v2 = parse_cgroup_mounts(mounts)
    ctrls = set(v2_controllers.split())
    quota = cpus * 100_000 + 50_000  # the VMM's own threads (I/O, TCG) beside the vCPUs
    if v2 is not None and {"cpu", "memory"} <= ctrls:
        parent = f"{v2}/{CGROUP_PARENT}"
        d = f"{parent}/{leaf}"
        return CgroupPlan(2, (d,), (
            (f"{d}/cpu.max", f"{quota} 100000"),
            (f"{d}/memory.max", str(memory)),
            (f"{d}/memory.swap.max", "0"),
        ), parents=(parent,))
    if "cpu" in v1 and "memory" in v1:
        cpu_dir = f"{v1['cpu']}/{CGROUP_PARENT}/{leaf}"
        mem_dir = f"{v1['memory']}/{CGROUP_PARENT}/{leaf}"
        dirs = [cpu_dir] if v1["cpu"] == v1["memory"] else [cpu_dir, mem_dir]
        parents = tuple(sorted({f"{v1[c]}/{CGROUP_PARENT}" for c in ("cpu", "memory")}))
        return CgroupPlan(1, tuple(dirs), (
            (f"{cpu_dir}/cpu.cfs_period_us", "100000"),
            (f"{cpu_dir}/cpu.cfs_quota_us", str(quota)),
            (f"{mem_dir}/memory.limit_in_bytes", str(memory)),
        ), parents=parents)
    return CgroupPlan(0, (), ())


def host_cgroup_plan(leaf: str, cpus: int, memory: int) -> CgroupPlan:
    mounts = Path("/proc/self/mounts").read_text()
    _, v2 = parse_cgroup_mounts(mounts)
    ctrls = ""
    if v2 is not None:
        with contextlib.suppress(OSError):
            ctrls = Path(v2, "cgroup.subtree_control").read_text()
    return cgroup_plan(mounts, ctrls, leaf, cpus, memory)


def apply_cgroups(plan: CgroupPlan) -> list[str]:
    """Create the directories and write the limits; return warnings (best effort)."""
    warnings: list[str] = []
    for p in plan.parents:
        try:
            os.makedirs(p, exist_ok=True)
            if plan.version == 2:
                Path(p, "cgroup.subtree_control").write_text("+cpu +memory")
        except OSError as e:
            warnings.append(f"cgroup {p}: {e.strerror}")
    for d in plan.dirs:
        try:
            os.mkdir(d)
        except FileExistsError:
            pass
        except OSError as e:
            warnings.append(f"cgroup {d}: {e.strerror}")
    for path, value in plan.writes:
        try:
            Path(path).write_text(value)
        except OSError as e:
            warnings.append(f"cgroup limit {path}={value}: {e.strerror}")
    return warnings


def cgroup_pids(dirs: Sequence[str]) -> set[int]:
    pids: set[int] = set()
    for d in dirs:
        with contextlib.suppress(OSError):
            pids |= {int(x) for x in Path(d, "cgroup.procs").read_text().split()}
    return pids


def remove_cgroups(dirs: Sequence[str]) -> None:
    """Kill whatever is left in the VM's cgroups, then remove them."""
    for pid in cgroup_pids(dirs):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for d in reversed(dirs):
        for _ in range(50):
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != errno.EBUSY:
                    break
                time.sleep(0.02)


# -- the VMM process ---------------------------------------------------------------------

def _child(argv: Sequence[str], env: dict[str, str], cgroup_dirs: Sequence[str],
           stdin: int | None, log_fd: int, errw: int, go: int,
           enter: Callable[[], None] | None, keep_fds: Sequence[int]) -> None:
    """In the forked child: never returns."""
    try:
        os.setsid()
        for d in cgroup_dirs:
            with contextlib.suppress(OSError):
                Path(d, "cgroup.procs").write_text("0")
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if go >= 0 and os.read(go, 1) != b"g":  # the parent could not attach us: no exec
            os._exit(127)
        if enter is not None:
            enter()  # e.g. the network namespace QEMU's tap lives in (as root)
        for fd in keep_fds:  # e.g. a tap fd the helper opened (-netdev tap,fd=N)
            os.set_inheritable(fd, True)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(stdin if stdin is not None else devnull, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.execve(argv[0], list(argv), env)  # noqa: S606 - argv[0] resolved by proc.which
    except OSError as e:
        os.write(errw, f"{e.errno}:{e.strerror}".encode())
    finally:
        os._exit(127)


def spawn(argv: Sequence[str], *, log_path: Path, cgroup_dirs: Sequence[str] = (),
          stdin: int | None = None, attach: Callable[[int], None] | None = None,
          netns: str | None = None, keep_fds: Sequence[int] = ()) -> int:
    """Fork and exec the VMM (``argv[0]`` is resolved here); return its pid.

    The child joins ``cgroup_dirs`` itself (root); with ``attach`` it instead waits until
    ``attach(its pid)`` returned in the parent (kiln-helper moving it), then execs.
    ``netns``: the child enters ``/run/netns/NAME`` before exec (root only); ``keep_fds``
    stay open, under the same numbers, in the VMM."""
    enter: Callable[[], None] | None = None
    if netns is not None:
        from helper.net.host import join_netns  # imported here: only --net tap needs it

        def enter() -> None:
            join_netns(netns)
    exe = proc.which(argv[0])
    full = [exe, *argv[1:]]
    env = proc.tool_env()
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    errr, errw = os.pipe2(os.O_CLOEXEC)
    gor, gow = os.pipe2(os.O_CLOEXEC) if attach is not None else (-1, -1)
    try:
        pid = os.fork()
        if pid == 0:
            os.close(errr)
            if gow >= 0:
                os.close(gow)
            _child(full, env, cgroup_dirs if attach is None else (), stdin, log_fd, errw, gor,
                   enter, keep_fds)
        os.close(errw)
        errw = -1
        if attach is not None:
            os.close(gor)
            gor = -1
            try:
                attach(pid)
            except BaseException:
                kill_vmm(pid)
                os.waitpid(pid, 0)
                raise
            os.write(gow, b"g")
        msg = b""
        while chunk := os.read(errr, 256):
            msg += chunk
    finally:
        for fd in (errr, errw, gor, gow):
            if fd >= 0:
                os.close(fd)
        os.close(log_fd)
    if msg:
        os.waitpid(pid, 0)
        text = msg.decode("utf-8", "replace").partition(":")[2]
        raise KilnError(f"cannot start {Path(exe).name}: {text}",
                        "check the binary (kiln doctor)")
    return pid


def kill_vmm(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def request_stop(control: Path, grace: float) -> bool:
    """Ask the guest init to stop the workload: SIGTERM, SIGKILL after ``grace`` s."""
    try:
        fd = os.open(f"{control}.in", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False  # no VMM holds the FIFO: nothing to stop gracefully
    try:
        os.write(fd, f"stop {max(0, round(grace))}\n".encode())
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


class Relay:
    """Copies what the guest wrote to a file onto one of kiln's descriptors."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd, self.pos = path, fd, 0

    def pump(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return
        if data:
            self.pos += len(data)
            view = memoryview(data)
            with contextlib.suppress(BrokenPipeError):
                while view:
                    view = view[os.write(self.fd, view):]


class StopSignals:
    """SIGINT/SIGTERM → a flag the supervision loop acts on (graceful, then forced)."""

    def __init__(self) -> None:
        self.count = 0
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._old[s] = signal.signal(s, self._on)
        return self

    def _on(self, signum: int, frame: object) -> None:
        del signum, frame
        self.count += 1

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
