"""Starting, watching and stopping a VMM process.

The VMM is a long-lived child that kiln supervises, not a tool run to completion:
``spawn`` starts it with ``builder.proc.spawn`` (resolved on the fixed search path, the
allowlisted environment, an exec failure raised as an error). The child joins the VM's
cgroups (itself as root; not root: it waits until kiln-helper has moved it,
``runner.vm.cgroup``) and its own session (Ctrl-C reaches kiln, which stops the VM
gracefully, not the VMM) and is SIGKILLed when kiln dies.

Which cgroups and limits: ``runner.vm.cgroup``. ``Relay`` copies what the guest wrote to a
file onto kiln's stdout/stderr; ``StopSignals`` turns Ctrl-C/SIGTERM into a count the
supervision loops act on.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from builder import proc

# -- the VMM process ---------------------------------------------------------------------


def _join(cgroup_dir: str) -> None:
    """Move this (single-threaded, just forked) process into ``cgroup_dir``. A v1 hierarchy
    takes it through ``tasks``, which moves one thread without ``cgroup.procs``'s
    whole-process lock: that lock waits for an RCU grace period, ~5-15 ms per hierarchy
    here, paid by every VM's start. v2 has only ``cgroup.procs`` for a domain cgroup."""
    try:
        fd = os.open(os.path.join(cgroup_dir, "tasks"), os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = os.open(os.path.join(cgroup_dir, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, b"0")
    finally:
        os.close(fd)


def spawn(argv: Sequence[str], *, log_path: Path, cgroup_dirs: Sequence[str] = (),
          stdin: int | None = None, attach: Callable[[int], None] | None = None,
          netns: str | None = None, keep_fds: Sequence[int] = ()) -> int:
    """Start the VMM (``argv[0]`` is resolved by ``proc.spawn``); return its pid, which the
    caller reaps. stdout and stderr go to ``log_path``.

    The child joins ``cgroup_dirs`` itself (root); with ``attach`` it instead waits until
    ``attach(its pid)`` returned in the parent (kiln-helper moving it), then execs.
    ``netns``: the child enters ``/run/netns/NAME`` before exec (root only); ``keep_fds``
    stay open, under the same numbers, in the VMM (a tap fd the helper opened)."""
    join_netns: Callable[[str], None] | None = None
    if netns is not None:
        from helper.net import host  # imported here: only --net tap needs it

        join_netns = host.join_netns
    dirs = tuple(cgroup_dirs) if attach is None else ()

    def enter() -> None:  # in the child, just before exec
        for d in dirs:
            with contextlib.suppress(OSError):
                _join(d)
        if join_netns is not None and netns is not None:
            join_netns(netns)  # the namespace QEMU's tap lives in (as root)

    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    try:
        return proc.spawn(argv[0], argv[1:], stdin=stdin, stdout=log_fd, stderr=log_fd,
                          pass_fds=keep_fds, preexec=enter, before_exec=attach,
                          hint="check the binary (kiln doctor)").pid
    finally:
        os.close(log_fd)


def kill_vmm(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


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


FAST_TICK, TICK, FAST_FOR = 0.005, 0.02, 3.0  # seconds


def tick(running: float) -> float:
    """How long a supervision loop sleeps, ``running`` s after the VM started: 5 ms at
    first (a short workload's output, or a restored VM's within ~0.2 s, is relayed without
    waiting out a 20 ms tick: ~10 ms of a ~0.4 s warm run), then 20 ms."""
    return FAST_TICK if running < FAST_FOR else TICK


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
