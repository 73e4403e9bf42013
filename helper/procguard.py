"""What a sudo caller hands the helper's process besides its request: resource limits and
a cgroup. Stdlib only; run first thing in ``helper.main``.

sudo passes the caller's rlimits on (soft and hard), and the helper, root but without
``CAP_SYS_RESOURCE`` in many containers, cannot always raise a hard one back. A caller
could then stop the audit log (``RLIMIT_FSIZE``: EFBIG, swallowed), or make an op die of
``RLIMIT_AS`` at a point it chooses. ``check_rlimits`` raises each soft limit to what the
helper needs where the hard one allows, and otherwise refuses to run at all (nothing
done, a clear message): failing closed.

Its scheduling (policy, nice, CPU affinity, I/O class) comes along as well and would let
a caller slow an op enough to widen any race window: ``reset_scheduling`` restores the
defaults. The helper also starts in the caller's cgroup, which the caller may limit (memory, pids)
or kill (``cgroup-kill`` of its own VM cgroup) at a moment it picks. ``leave_cgroups``
moves the process to the root of every hierarchy the helper's VM cgroups live in, before
it reads the request; its tools inherit that.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
from pathlib import Path

INF = resource.RLIM_INFINITY
GIB = 1 << 30

# limit -> (what it is, the least the helper needs; INF: no limit at all)
NEEDED: dict[int, tuple[str, int]] = {
    resource.RLIMIT_FSIZE: ("file size", INF),  # audit log, images, copies
    resource.RLIMIT_AS: ("address space", 4 * GIB),
    resource.RLIMIT_DATA: ("data size", 4 * GIB),
    resource.RLIMIT_STACK: ("stack size", 8 << 20),
    resource.RLIMIT_NOFILE: ("open files", 1024),
}


class LimitTooLow(Exception):
    def __init__(self, what: str, have: int, need: int, detail: str = "") -> None:
        self.message = (f"refusing to run: cannot reset the caller's {what} ({detail})"
                        if detail else f"refusing to run: the caller's {what} limit "
                        f"({_show(have)}) is below what kiln-helper needs ({_show(need)})")
        self.hint = "run kiln with the system's default resource limits (ulimit -a shows them)"
        super().__init__(self.message)


def _show(n: int) -> str:
    return "unlimited" if n == INF else str(n)


def _enough(have: int, need: int) -> bool:
    return have == INF or (need != INF and have >= need)


def check_rlimits(cpu_seconds: int | None = None) -> None:
    """Raise soft limits to ``NEEDED`` (and CPU to ``cpu_seconds``) within the hard ones;
    ``LimitTooLow`` when a hard one is below it."""
    needed = dict(NEEDED)
    if cpu_seconds is not None:
        needed[resource.RLIMIT_CPU] = ("CPU time", cpu_seconds)
    for res, (what, need) in needed.items():
        soft, hard = resource.getrlimit(res)
        if not _enough(hard, need):
            raise LimitTooLow(what, hard, need)
        if not _enough(soft, need):
            resource.setrlimit(res, (hard if need == INF else need, hard))


def leave_cgroups(roots: list[Path]) -> None:
    """Move this process to each hierarchy's root (``roots``: the mount points)."""
    pid = str(os.getpid()).encode()
    for root in dict.fromkeys(roots):
        # One we cannot write (a delegated or read-only hierarchy) holds no VM cgroup of
        # the helper's either: staying there gives the caller nothing to kill us with.
        with contextlib.suppress(OSError):
            fd = os.open(root / "cgroup.procs", os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)


_IOPRIO_SET = {"x86_64": 251, "aarch64": 30}
_IOPRIO_DEFAULT = (2 << 13) | 4  # best effort, level 4: what a process gets by default
_PR_SET_TIMERSLACK = 29


def reset_scheduling() -> None:
    """The caller's scheduling passes through sudo too: SCHED_IDLE, nice 19, one busy CPU
    of affinity or the idle I/O class would stretch every window between an op's check and
    its act to seconds. Back to the defaults (policy, nice, init's CPU set, I/O class, timer
    slack); ``LimitTooLow`` when one cannot be restored."""
    try:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        os.setpriority(os.PRIO_PROCESS, 0, 0)
        os.sched_setaffinity(0, os.sched_getaffinity(1))
    except OSError as e:
        raise LimitTooLow("scheduling", 0, 0, detail=e.strerror or str(e)) from None
    libc = ctypes.CDLL(None, use_errno=True)
    nr = _IOPRIO_SET.get(os.uname().machine)
    if nr is not None and libc.syscall(nr, 1, 0, _IOPRIO_DEFAULT) != 0:  # IOPRIO_WHO_PROCESS
        raise LimitTooLow("I/O priority", 0, 0, detail=os.strerror(ctypes.get_errno()))
    libc.prctl(_PR_SET_TIMERSLACK, 0, 0, 0, 0)  # 0: back to the default slack
