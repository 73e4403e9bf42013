"""Firecracker's half of warm start (docs/warm.md): save a booted guest through the snapshot
API, and what a restore needs; the driver (``runner.vmm.firecracker``) calls these.

* ``save``: wait for the guest's ``HEL1`` over vsock (``wait_hello``: kiln's init is up
  and waits for its settings), then ``save_paused``: ``PATCH /vm Paused``, ``PUT
  /snapshot/create`` (Firecracker, the VM's uid, writes ``vm.state`` and ``vm.mem`` into
  the chroot), and take both and the VM's disk out of the jail into the warm image's work
  directory through the helper (``jail-export``, ``jail-export-disk``: new files of the
  caller's, 0600, passed open). The disk comes from the jail, not from the snapshot it
  was staged from: a sudo caller's VM writes a private copy (``helper.ops.jaildisk``).
  ``save_paused`` is separate so that the mechanics run for real where no guest can boot
  (tests/runner/test_firecracker_warm.py, as root; tests/helper/
  test_firecracker_warm_sudo.py, as a sudo caller): nothing fakes a guest on this path.
* ``facts``: the key's VMM facts (the driver's ``warm_facts``): Firecracker's version from
  the binary, the accelerator (always KVM) and the device set — the rootfs, the vsock
  device (CID, socket name), no NIC.
* A restore is ``FirecrackerVM.restore(resume=True)`` on a plan with ``restore=(state,
  mem)`` and the same vsock device, then the run's ``SET1`` over vsock
  (``runner.guest_init.vsock.VsockSender``) like a cold run: the guest's listener survived
  the snapshot, the connection the hello went out on did not.

Failures raise ``WarmFailed`` (``runner.vmm.qemuwarm``'s: the lifecycle falls back to a
cold boot on it).
"""

from __future__ import annotations

import time
from pathlib import Path

from helper.base.errors import KilnError
from runner.guest_init import vsock
from runner.vm.spec import WarmPlan
from runner.vmm import fcapi as fc
from runner.vmm import fcsnapshot as fcs
from runner.vmm.qemuwarm import WarmFailed

DEVICES = f"fc:rootfs,vsock:{vsock.GUEST_CID}:{vsock.UDS}"  # a restore's device set
VSOCK = fc.VsockSpec(vsock.GUEST_CID, f"/{vsock.UDS}")


def wait_hello(vm: fc.FirecrackerVM, timeout: float) -> vsock.VsockSender:
    """Until the guest's agent greets the host over vsock; the connection is kept open
    (the guest stays mid-exchange until the snapshot). Firecracker must keep running."""
    if vm.vsock is None:
        raise WarmFailed("the VM has no vsock socket: it was configured without one")
    sender = vsock.VsockSender(vm.vsock, None)
    deadline = time.monotonic() + timeout
    while not sender.heard:
        sender.pump()
        if sender.failed:
            sender.close()
            raise WarmFailed(f"the guest's control channel: {sender.failed}")
        if not vm.running():
            sender.close()
            raise WarmFailed("Firecracker exited before the guest was ready")
        if time.monotonic() > deadline:
            sender.close()
            raise WarmFailed(f"the guest did not get ready in {timeout:.0f} s")
        time.sleep(0.01)
    return sender


def save_paused(vm: fc.FirecrackerVM, plan: WarmPlan) -> None:
    """Pause the running VM, snapshot it, take its files and its disk out of the jail."""
    if plan.mem is None:
        raise WarmFailed("internal error: a Firecracker save needs a memory file")
    try:
        vm.pause()  # the guest's writes are in the disk file already (cache "Unsafe": no
        vm.snapshot_create(f"/{fcs.STATE}", f"/{fcs.MEM}")  # flush is forwarded, none needed)
        vm.ops.jail_export_disk(vm.plan.vm_id, plan.disk)
        vm.ops.jail_export(vm.plan.vm_id, fcs.STATE, plan.state)
        vm.ops.jail_export(vm.plan.vm_id, fcs.MEM, plan.mem)
    except (KilnError, OSError) as e:
        raise WarmFailed(f"saving the VM failed: {getattr(e, 'message', e)}") from None


def save(vm: fc.FirecrackerVM, plan: WarmPlan, *, timeout: float = 300.0) -> None:
    """Boot → hello → paused state, memory and disk copy in ``plan``."""
    sender = wait_hello(vm, timeout)
    try:
        save_paused(vm, plan)
    finally:
        sender.close()


def facts(firecracker: Path) -> tuple[str, str, str, str, str]:
    """(vmm, version, accel, cpu model, devices) of the warm key (``firecracker
    --version``'s first line: "Firecracker v1.12.1")."""
    from builder import proc

    version = proc.version_of(str(firecracker))
    return "firecracker", version, "kvm", "host", DEVICES
