"""What a sudo caller hands the helper's process besides its request: resource limits and
a cgroup. Stdlib only; run first thing in ``helper.main``.

sudo passes the caller's rlimits on (soft and hard), and the helper, root but without
``CAP_SYS_RESOURCE`` in many containers, cannot always raise a hard one back. A caller
could then stop the audit log (``RLIMIT_FSIZE``: EFBIG, swallowed), or make an op die of
``RLIMIT_AS`` at a point it chooses. ``check_rlimits`` raises each soft limit to what the
helper needs where the hard one allows, and otherwise refuses to run at all (nothing
done, a clear message): failing closed.

The helper also starts in the caller's cgroup, which the caller may limit (memory, pids)
or kill (``cgroup-kill`` of its own VM cgroup) at a moment it picks. ``leave_cgroups``
moves the process to the root of every hierarchy the helper's VM cgroups live in, before
it reads the request; its tools inherit that.
"""

from __future__ import annotations

import contextlib
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
    def __init__(self, what: str, have: int, need: int) -> None:
        self.message = (f"refusing to run: the caller's {what} limit ({_show(have)}) is below "
                        f"what kiln-helper needs ({_show(need)})")
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
