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
* ``devices``: the key's device set (the driver's ``warm_facts``): the rootfs, the vsock
  device (CID, socket name) and, for ``--net tap``, the NIC eth0. Images are per network
  mode: Firecracker opens a saved NIC's tap at ``snapshot/load`` (a load without one, or
  whose tap is gone, is refused — tests/runner/test_firecracker_warm_net.py), so a NIC
  cannot be restored "without a backend" as QEMU's is, and a ``--net none`` run has no
  tap to give it. A ``--net tap`` image is saved by a VM on the kiln network
  (``WarmFacts.save_net``: its own lease and tap, released at its end, like any run's; no
  ``[net]`` in the helper's config refuses it as a cold ``--net tap`` run is refused); a
  ``--net none`` image has no NIC and keeps the key it had before NICs were saved.
* A restore is ``FirecrackerVM.restore(resume=True)`` on a plan with ``restore=(state,
  mem)``, the same vsock device and — ``--net tap`` — eth0 on the clone's own tap (made by
  the ordinary ``--net tap`` path, in the namespace the jailer joins), which the load
  takes as ``network_overrides``; then the run's ``SET1`` over vsock
  (``runner.guest_init.vsock.VsockSender``) like a cold run: the guest's listener survived
  the snapshot, the connection the hello went out on did not. ``settings`` carry eth0's
  MAC, address, gateway and name servers (the clone's lease): the saved NIC still has the
  save VM's MAC, and kiln's init sets the clone's before it brings eth0 up, as under QEMU.

Failures raise ``WarmFailed`` (``runner.vmm.qemuwarm``'s: the lifecycle falls back to a
cold boot on it).
"""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING

from helper.base.errors import KilnError, UsageError
from runner.guest_init import Workload, channel, vsock
from runner.vm.spec import WarmPlan
from runner.vmm import fcapi as fc
from runner.vmm import fcsnapshot as fcs
from runner.vmm.qemuwarm import WarmFailed

if TYPE_CHECKING:
    from runner.network import VmNet

DEVICES = f"fc:rootfs,vsock:{vsock.GUEST_CID}:{vsock.UDS}"  # --net none: no NIC
DEVICES_NET = f"fc:rootfs,net:eth0,vsock:{vsock.GUEST_CID}:{vsock.UDS}"  # --net tap
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


def devices(net: str) -> str:
    """The device set of a warm image for ``--net`` ``net`` (a key's ``devices``): with the
    NIC for ``tap``, without for ``none``; anything else is refused (pure)."""
    if net == "tap":
        return DEVICES_NET
    if net == "none":
        return DEVICES
    raise UsageError(f"Firecracker warm runs have no --net {net}",
                     "use --net tap or --net none, or --vmm qemu")


def settings(warm: WarmPlan | None, work: Workload | None, vn: VmNet | None
             ) -> channel.Settings | None:
    """A run's settings for the guest: the workload, a fresh machine id and — ``--net
    tap`` — eth0 from the VM's lease (``VmNet.guest``). A restore's go over vsock, a cold
    run's onto its disk (``disk_frame``); None for a save (it sends none) and ``--init
    image``."""
    if (warm is not None and warm.mode != "restore") or work is None:
        return None
    s = channel.Settings(work, secrets.token_hex(16), vn.guest() if vn else None, None)
    try:  # refused now, before the restore, rather than when the guest asks
        channel.encode_settings(s, time_ns=time.time_ns(), seed=bytes(channel.SEED_BYTES))
    except channel.FrameError as e:
        hint = ("shorten the command and environment: together they must fit in 64 KiB"
                if "exceeds the limit" in str(e) else
                "the helper's lease must hold addresses only: see docs/net.md")
        raise UsageError(f"the run's settings cannot be sent to the guest: {e}", hint
                         ) from None
    return s


def disk_frame(s: channel.Settings) -> bytes:
    """A cold run's ``SET1`` frame for its disk: a fresh seed, no time (the guest's clock
    is right on KVM, and a time stamped before the boot would set it back)."""
    return channel.encode_settings(s, time_ns=None, seed=secrets.token_bytes(channel.SEED_BYTES))
