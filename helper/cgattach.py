"""Moving a caller's process into that caller's VM cgroup (op ``cgroup-attach``).

Privileged (root inside kiln-helper), stdlib only. The process is a sudo caller's QEMU
child, before it execs. The pid is a number: a pidfd, then ``/proc/PID`` opened as a
directory, then the pidfd confirmed alive (so that directory is the same process); the
uids (real, effective, saved, fs) read through it must all be the owner's — checked
before the process is pinned (seizing another user's process would already act on it)
and again once pinned. After the write the pidfd must still be alive — a pid is not
reused while its process exists, so the write hit that process — and still the owner's
(no setuid exec meanwhile). Otherwise whatever now holds that pid in the VM's cgroup goes
back (to the place it was in, when it is the checked process; else to the hierarchy root)
and the attach is refused. Stop and termination signals are held during these steps
(``uninterrupted``): sudo relays the caller's signals to us, and they must neither stretch
the window nor cut a step in half.

A pidfd alone does not keep the number: once the process is reaped its pid may be reused
and the write would move the newcomer. So the process is also pinned with ptrace
(``pinned``): ``PTRACE_SEIZE`` (root may; nothing is stopped), and a seized process that
exits stays a zombie — its pid taken — until its tracer waits for it. The check, the
write and the verification all happen while pinned; then ``PTRACE_INTERRUPT``, a wait for
that stop (or for the exit), and ``PTRACE_DETACH`` re-injecting any signal caught meanwhile.

Whose cgroup it is (the claim) is checked by the op (``helper.ops.vm``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from helper import procstatus
from helper.base.errors import Conflict, NotFound, UsageError
from helper.cgroup import CgroupConfig, Layout, _pids, _write, layout, vm_dirs

# What sudo relays from its caller (and a terminal could send): held for a critical step
# (``uninterrupted``), or a whole op of a sudo caller (``helper.main.hold_signals``).
# SIGPIPE needs no holding: Python ignores it (a closed stdout is an EPIPE error); tools
# get it back at its default (subprocess's restore_signals).
HELD = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
                  signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1,
                  signal.SIGUSR2, signal.SIGALRM})


def held(op: Callable[[Any, Any], dict[str, Any]]) -> Callable[[Any, Any], dict[str, Any]]:
    """``op`` run whole with the relayed signals held (``uninterrupted``): a caller's SIGTERM
    through sudo can no longer cut a half-made jail or device loose from its record."""
    @functools.wraps(op)
    def run(ctx: Any, req: Any) -> dict[str, Any]:
        with uninterrupted():
            return op(ctx, req)
    return run


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold (block) the signals a caller can have sudo relay to us, for one critical step;
    they are delivered afterwards."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


_PTRACE_SEIZE, _PTRACE_INTERRUPT, _PTRACE_DETACH = 0x4206, 0x4207, 0x11
_WALL = 0x40000000  # wait for any child kind, tracees included
_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_libc.ptrace.restype = ctypes.c_long


def _ptrace(request: int, pid: int, data: int = 0) -> int:
    """0, or the errno of a failed ``ptrace(request, pid, 0, data)``."""
    ctypes.set_errno(0)
    if _libc.ptrace(request, pid, None, ctypes.c_void_p(data)) == -1:
        return ctypes.get_errno()
    return 0


@contextlib.contextmanager
def pinned(pid: int, pidfd: int | None = None) -> Iterator[None]:
    """Hold ``pid``'s number: the process is ptrace-seized, so even if it exits it stays a
    zombie (nobody can reap it, the number cannot be reused) until this context ends.

    ``pidfd``: the process meant. If it is gone once seized, the number may already be
    someone else's process: that one is never stopped (no ``PTRACE_INTERRUPT``); the kernel
    detaches it, unstopped, when the helper exits moments later."""
    err = _ptrace(_PTRACE_SEIZE, pid)
    if err == errno.ESRCH:
        raise NotFound(f"no process {pid}", "")
    if err == errno.EPERM:
        raise Conflict(f"cannot pin process {pid}: it is exiting, already traced, or may "
                       "not be traced", "stop any debugger attached to it and start it again")
    if err:
        raise OSError(err, f"ptrace seize {pid}: {os.strerror(err)}")
    try:
        yield
    finally:
        if pidfd is None or _alive(pidfd):
            _release(pid)


def _release(pid: int) -> None:
    """Stop the seized ``pid`` (a tracee is detached only when stopped), wait for that stop
    or its exit, then detach, re-injecting a signal it was stopped for."""
    _ptrace(_PTRACE_INTERRUPT, pid)  # ESRCH: it exited; the wait below collects that
    while True:
        try:
            _, status = os.waitpid(pid, _WALL)
        except ChildProcessError:
            return  # not ours any more
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            return  # collected: its parent can reap it now
        if os.WIFSTOPPED(status):
            sig = os.WSTOPSIG(status)
            event = status >> 16
            # An event stop (our interrupt, a group stop) carries no signal to pass on.
            _ptrace(_PTRACE_DETACH, pid, 0 if event else sig)
            return


def _proc_read(procfd: int, name: str) -> str:
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=procfd)
    try:
        return os.read(fd, 1 << 16).decode("utf-8", "replace")
    finally:
        os.close(fd)


def _uids(procfd: int) -> tuple[int, ...]:
    """Real, effective, saved and fs uid of the process behind ``procfd``."""
    return procstatus.parse(_proc_read(procfd, "status")).uids


def _alive(pidfd: int) -> bool:
    try:
        signal.pidfd_send_signal(pidfd, 0)
    except ProcessLookupError:
        return False
    return True


def _membership(procfd: int) -> dict[str, str]:
    """/proc/PID/cgroup → {hierarchy key: path}; key "" for v2, else the controller list."""
    out: dict[str, str] = {}
    for line in _proc_read(procfd, "cgroup").splitlines():
        _, ctrls, path = line.split(":", 2)
        out[ctrls] = path
    return out


def _hierarchy_of(lay: Layout, d: Path, version: int) -> tuple[Path, str | None]:
    """(mount point, controller) of a VM directory."""
    if version == 2:
        assert lay.v2 is not None
        return lay.v2, None
    for c, mnt in lay.v1.items():
        if d.is_relative_to(mnt):
            return mnt, c
    raise NotFound(f"{d} is in no mounted cgroup hierarchy", "")


def _go_back(lay: Layout, dirs: list[Path], version: int, pid: int,
             before: dict[str, str] | None) -> None:
    """Move ``pid`` out of ``dirs`` again: to where it was (``before``), else to the root."""
    for d in dirs:
        if pid not in _pids(d):
            continue
        mnt, ctrl = _hierarchy_of(lay, d, version)
        dest = mnt
        for key, path in (before or {}).items():
            if (version == 2 and key == "") or (ctrl is not None and ctrl in key.split(",")):
                dest = mnt / path.lstrip("/")
        with contextlib.suppress(OSError):
            _write(dest / "cgroup.procs", str(pid))


def cgroup_attach(cfg: CgroupConfig, vm_id: str, version: int, pid: int,
                  owner_uid: int) -> list[Path]:
    """Move process ``pid`` — which must be ``owner_uid``'s — into the VM's cgroup(s).

    See the module docstring for why this cannot move another process than the one
    checked. Returns the directories it joined."""
    dirs = [d for d in vm_dirs(cfg, vm_id, version) if d.is_dir()]
    if not dirs:
        raise NotFound(f"VM {vm_id} has no cgroup", "create it first (cgroup-create)")
    if pid < 2:
        raise UsageError(f"refusing pid {pid}", "give the pid of one of your processes")
    lay = layout(cfg)
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise NotFound(f"no process {pid}", "") from None
    except OSError as e:
        # A thread id (ENOENT since Linux 6.9, EINVAL before): cgroup.procs would move
        # its whole process, whose uids were never checked.
        if e.errno in (errno.ENOENT, errno.EINVAL):
            raise UsageError(f"{pid} is not a process id", "give a process (not thread) "
                             "id") from None
        raise
    try:
        # Whose it is, before anything touches it: seizing (ptrace) another user's process
        # would already act on it. Checked again once pinned (a setuid exec in between).
        _check_owner(pid, pidfd, owner_uid)
        with pinned(pid, pidfd):
            _attach_pinned(lay, dirs, version, pid, pidfd, owner_uid)
    finally:
        os.close(pidfd)
    return dirs


def _check_owner(pid: int, pidfd: int, owner_uid: int) -> None:
    """Refuse unless the process behind ``pidfd`` is alive and all its uids are the owner's."""
    try:
        procfd = os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"no process {pid}", "") from None
    try:
        if not _alive(pidfd):  # /proc/PID may already be a newer process
            raise NotFound(f"no process {pid}", "")
        if any(u != owner_uid for u in _uids(procfd)):
            raise UsageError(f"refusing process {pid}: it is not uid {owner_uid}'s",
                             "only your own processes can join your VM's cgroup")
    finally:
        os.close(procfd)


def _attach_pinned(lay: Layout, dirs: list[Path], version: int, pid: int, pidfd: int,
                   owner_uid: int) -> None:
    """The check, the write and the verification, while ``pid`` is pinned."""
    try:
        procfd = os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"no process {pid}", "") from None
    try:
        _check_owner(pid, pidfd, owner_uid)  # again: it may have exec'd a setuid program
        before = _membership(procfd)
        try:
            for d in dirs:
                _write(d / "cgroup.procs", str(pid))
        except OSError:  # half moved (one v1 hierarchy refused): undo the others
            _go_back(lay, dirs, version, pid, before if _alive(pidfd) else None)
            raise
        still = _alive(pidfd)
        mine = still and all(u == owner_uid for u in _uids(procfd))
        if not mine:
            _go_back(lay, dirs, version, pid, before if still else None)
            raise Conflict(f"process {pid} {'changed owner' if still else 'exited'} "
                           "while joining the cgroup", "start it again")
    finally:
        os.close(procfd)
