"""One interface per VMM (as hypeman's ``lib/hypervisor``): what ``runner.vm.lifecycle``
asks of QEMU (``runner.vmm.qemu``) and of Firecracker (``runner.vmm.firecracker``), so the
lifecycle never asks which one it has. ``runner.vmm.choice`` picks the VMM and gives its
driver (``driver_for``), for a new run or for a record.

A run, in the lifecycle's order (``L`` is the driver's own launch type):

1. ``check(opts)``: refuse what this VMM cannot do, before anything is recorded;
2. ``reserve(host, opts, intent)`` → ``Reservation``: what the record names before
   anything exists — the cgroups, where the VM's uid comes from, the VMM's own document
   (Firecracker's jail, API socket, cgroup version);
3. ``prepare(st, rec, boot, reserved)`` → ``L``, once the record, the VM directory and
   the snapshot exist: the VMM's own files, the cgroups, the VM on the kiln network (which
   may record another uid), how the VMM starts. It raises after undoing what it half-made
   (the lifecycle then abandons the VM);
4. ``own(st, launch, relay=, ready=)`` → ``Ended``: launch, record the pid and state
   ``running``, call ``ready``, supervise (``--timeout``, Ctrl-C/SIGTERM, ``kiln stop``),
   stop, tear down what only the VMM holds. It raises (after that teardown) when the VM did
   not start. The lifecycle turns ``Ended`` into the record's outcome
   (``runner.vm.spec.outcome``) and releases the cgroups and the network;
5. ``close(launch)``: what a ``--detach`` parent drops once the owner holds its copy.

From a record, anywhere: ``stop(st, rec, timeout)`` is the VMM's way to end a live VM (the
lifecycle then waits for the owner to record the outcome, or records it); ``teardown(rec)``
removes what the VMM holds beyond the record's cgroups and network (Firecracker's jail,
which links the snapshot) — on a failed setup, ``kiln rm`` and the reaper's removal.

Warm start (issue #14, docs/warm.md) rides on the same steps: ``Boot.warm`` (a
``WarmPlan``) tells ``prepare`` to give the VMM the warm device set, and ``own`` to either
save (boot to the guest's hello, save its state beside a copy of its disk, end) or restore
(start from the saved state instead of booting, then run as usual); the run, the outcome
and every end path stay as they are. ``warm_facts(opts)`` gives the warm key what it takes
from the VMM (name, binary, accelerator, CPU model, device set) and refuses what that
VMM's warm runs cannot do. QEMU: ``runner.vmm.qemuwarm``; Firecracker:
``runner.vmm.fcwarm`` (snapshot API, settings over vsock).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from runner.guest_init import Workload
from runner.vm.cgroup import VMCgroups
from runner.vm.resources import NetIntent, UidPicker
from runner.vm.spec import RunOptions, VMFiles, WarmFacts, WarmPlan
from runner.vm.state import State, VMRecord
from runner.vmm.qemuargv import Forward

L = TypeVar("L")


@dataclass(frozen=True)
class Reservation:
    """What a VM's record names before anything exists (``State.create``)."""

    cgroups: VMCgroups
    uid_range: tuple[int, int]  # (first, count): where the VM's uid comes from
    want_uid: bool
    doc: dict[str, Any] | None = None  # the VMM's own document (the record's ``fc``)


@dataclass(frozen=True)
class Boot:
    """What one ``kiln run`` boots, once its record, directory and snapshot exist."""

    host: str  # the VM's host name (``runner.vm.state.host_name``)
    files: VMFiles
    kernel: Path  # as ``runner.kernel.boot_files`` gave it
    initrd: Path
    disk: Path  # the VM's snapshot
    init: str  # /.kiln/init, or the image's /sbin/init
    opts: RunOptions
    forwards: tuple[Forward, ...]  # -p
    intent: NetIntent | None  # --net tap
    picker: UidPicker  # where another uid comes from when the helper refuses one
    workload: Workload | None = None  # kiln's init: what the guest is sent to run
    warm: WarmPlan | None = None  # warm start: save to / restore from (docs/warm.md)


@dataclass(frozen=True)
class Ended:
    """How the VM ended, as the VMM saw it (``runner.vm.spec.outcome`` decides the rest)."""

    status_text: str  # the guest's report ("exit N"), "" when it gave none
    vmm_code: int | None
    timed_out: bool
    stopped: bool
    console_tail: str
    vmm_tail: str


class Driver(Protocol[L]):
    """One VMM. See the module docstring for when each step runs."""

    def check(self, opts: RunOptions) -> None: ...

    def warm_facts(self, opts: RunOptions) -> WarmFacts: ...

    def reserve(self, host: str, opts: RunOptions, intent: NetIntent | None
                ) -> Reservation: ...

    def prepare(self, st: State, rec: VMRecord, boot: Boot, reserved: Reservation) -> L: ...

    def own(self, st: State, launch: L, *, relay: bool, ready: Callable[[], None]
            ) -> Ended: ...

    def close(self, launch: L) -> None: ...

    def stop(self, st: State, rec: VMRecord, timeout: float) -> None: ...

    def teardown(self, rec: VMRecord) -> None: ...
