"""QEMU's half of warm start (docs/warm.md): save a booted guest, restore one, over QMP.

Kiln's ``-sandbox spawn=deny`` kills ``exec:`` and QEMU 7.2 has no ``file:`` migration
transport, so both directions pass an fd (``getfd`` over QMP, SCM_RIGHTS) and migrate
over ``fd:warm``:

* ``save``: wait for the guest's ``HEL1`` (kiln's init is ready and waits for its
  settings: nothing of a run is in the guest yet), ``stop`` (QEMU drains and flushes the
  disk), copy the disk (``builder.warm.clone_file``: reflink or sparse copy), raise the
  migration bandwidth (the default 32 MiB/s would take seconds), ``migrate fd:warm`` into
  the state file, wait for ``completed``, ``quit``.
* ``restore`` (QEMU started with ``-incoming defer``): ``migrate-set-capabilities
  events``, ``getfd``, ``migrate-incoming fd:warm``, wait for the MIGRATION event
  ``completed``, ``cont`` (the state was saved paused). The driver then sends ``SET1`` at
  once: the guest said ``HEL1`` before the save.

From QEMU 8.2 the guest's memory is a file (``plan.mem``, ``qemuargv.RAM_FILE``). The
saving QEMU maps a memfd kiln made (``MemoryFd``) shared and the migration skips it
(``x-ignore-shared``, on both ends: the stream is then ~0.1 MB of device state); kiln
then writes its non-zero blocks into the image's ``mem`` (``write_memory``: the caller's,
0600, sparse). A restoring QEMU maps ``mem`` read-only and private: nothing is copied,
each clone's page faults map the one page cache and its writes are its own copies.

Either raises ``WarmFailed`` (a ``KilnError``) with QEMU's reason; the driver kills QEMU.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

from builder.warm import clone_file
from helper.base.errors import KilnError
from runner.guest_init.sender import HelloListener
from runner.vm.spec import WarmPlan
from runner.vmm.qmp import Qmp, QmpError

BANDWIDTH = 64 << 30  # bytes/s: no throttle (the guest is paused)
_FD = "warm"


class WarmFailed(KilnError):
    def __init__(self, message: str) -> None:
        super().__init__(message, "see the VM's vmm.log; `kiln warm rm ID` drops a bad image")


def _exited(pid: int) -> bool:
    """Whether QEMU ``pid`` has exited, without reaping it (WNOWAIT): the caller kills
    and waits for it on failure, and a reaped pid may be another process's already."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def wait_hello(pid: int, control: Path, timeout: float) -> None:
    """Until the guest's init says ``HEL1`` (QEMU ``pid`` must stay alive)."""
    hello = HelloListener(control)
    deadline = time.monotonic() + timeout
    try:
        while not hello.poll():
            if _exited(pid):
                raise WarmFailed("QEMU exited before the guest was ready")
            if time.monotonic() > deadline:
                raise WarmFailed(f"the guest did not get ready in {timeout:.0f} s")
            time.sleep(0.01)
    except OSError as e:
        raise WarmFailed(f"the guest's control channel: {e}") from None
    finally:
        hello.close()


class MemoryFd:
    """A save's guest memory: a memfd of ``size`` bytes that QEMU maps shared (as
    ``/proc/self/fd/N``) — the guest boots ~0.1-0.2 s faster on it than on a file of the
    image's filesystem (every first write there is a page_mkwrite and a delayed block
    allocation), its pages are charged to the VM's memory cgroup (QEMU touches them), and
    it has no name anyone could replace. ``close`` may be called more than once: the save
    closes it as soon as the memory is written (a detached owner forked later must not
    hold it), the driver on every other path."""

    def __init__(self, size: int) -> None:
        self.fd: int | None = os.memfd_create("kiln-warm-memory", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


def write_memory(fd: int, dst: Path) -> None:
    """The saved memory into the image's file: sparse, only its non-zero blocks
    (``builder.warm.write_sparse``); the memfd is closed by the driver."""
    from builder.warm import write_sparse

    try:
        write_sparse(fd, dst)
    except OSError as e:
        raise WarmFailed(f"cannot write the saved memory: {e}") from None


def _ignore_shared(q: Qmp) -> None:
    q.execute("migrate-set-capabilities",
              {"capabilities": [{"capability": "x-ignore-shared", "state": True}]})


def _migration_done(q: Qmp, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        st = q.execute("query-migrate").get("status", "")
        if st == "completed":
            return
        if st in ("failed", "cancelled"):
            why = q.execute("query-migrate").get("error-desc", st)
            raise WarmFailed(f"QEMU could not save the VM: {why}")
        if time.monotonic() > deadline:
            raise WarmFailed(f"saving the VM took over {timeout:.0f} s")
        time.sleep(0.005)


def save(pid: int, qmp: Path, control: Path, disk: Path, plan: WarmPlan, *,
         timeout: float = 300.0) -> None:
    """Boot → hello → paused state in ``plan.state``, disk copy in ``plan.disk``; QEMU
    quits."""
    wait_hello(pid, control, timeout)
    try:
        with Qmp(qmp) as q:
            q.execute("stop")
            clone_file(disk, plan.disk)
            if plan.mem is not None:
                _ignore_shared(q)
            q.execute("migrate-set-parameters", {"max-bandwidth": BANDWIDTH})
            fd = os.open(plan.state, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                         0o600)
            try:
                q.execute("getfd", {"fdname": _FD}, fd=fd)
            finally:
                os.close(fd)
            q.execute("migrate", {"uri": f"fd:{_FD}"})
            _migration_done(q, timeout)
            q.execute("quit")
    except (QmpError, OSError) as e:
        raise WarmFailed(f"saving the VM failed: {e}") from None


def restore(pid: int, qmp: Path, plan: WarmPlan, *, timeout: float = 60.0,
            before_cont: Callable[[], None] | None = None) -> None:
    """QEMU ``pid``, started with ``-incoming defer``, loads ``plan.state``, then (the guest
    still paused) ``before_cont`` runs, and the guest runs. A QEMU that exits before its
    monitor answers (a memory file it could not open) fails at once, not at ``timeout``."""
    try:
        with Qmp(qmp, timeout=timeout, alive=lambda: not _exited(pid)) as q:
            if plan.mem is not None:
                _ignore_shared(q)
            q.execute("migrate-set-capabilities",
                      {"capabilities": [{"capability": "events", "state": True}]})
            fd = os.open(plan.state, os.O_RDONLY | os.O_CLOEXEC)
            try:
                q.execute("getfd", {"fdname": _FD}, fd=fd)
            finally:
                os.close(fd)
            q.execute("migrate-incoming", {"uri": f"fd:{_FD}"})
            deadline = time.monotonic() + timeout
            while True:
                ev = q.wait_event("MIGRATION", timeout=max(0.1, deadline - time.monotonic()))
                status = ev.get("data", {}).get("status")
                if status == "completed":
                    break
                if status in ("failed", "cancelled"):
                    raise WarmFailed("QEMU could not load the warm image's state")
            if before_cont is not None:
                before_cont()
            q.execute("cont")
    except (QmpError, OSError) as e:
        raise WarmFailed(f"restoring the VM failed: {e}") from None
