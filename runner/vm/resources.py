"""A VM's host resources beside its snapshot and files: its cgroups and its place on the
kiln network (``--net tap``) — named in the record first, made, and released on every end
path (the owner at exit, ``kiln stop``, ``kiln rm``, a failed setup, the reaper).

Network, in the order ``runner.vm.lifecycle.run`` calls it:

1. ``net_preflight`` before anything is recorded: ``bridge-ensure`` (the trusted config
   has ``[net]``, its namespace exists, the subnet overlaps none of its routes; the bridge
   exists) and the helper's VM uid range (the tap belongs to a VM uid the helper accepts:
   QEMU as root runs as it, a jailed Firecracker too, and for QEMU run by a user it owns
   a tap only the helper opens). A refusal here leaves no record, snapshot or device;
2. ``net_record``: the record's ``net`` document names the tap, the VM namespace and the
   forwards (step ``recorded``) in the same INSERT that creates the record;
3. ``net_attach`` (``runner.network.attach``), then the document holds the address (step
   ``attached``: ``kiln ps`` shows ``ip``). The helper refuses a VM uid another caller's
   VM holds (``UidInUse``: each kiln draws uids from the same range): ``retry_uid``
   records another one and asks again, up to ``UID_RETRIES`` times;
4. ``qemu_nic``: how QEMU gets the tap — as root by name, started inside the tap's
   namespace; as a user, an fd the helper attached (``tap-open``), so QEMU never needs the
   namespace or the tap's owner;
5. ``release``: cgroups removed, then ``net-reclaim`` of this VM alone (one helper call:
   forwards, tap or namespace with its veth, lease, then NAT if it was the last) and the
   document says ``released``. Idempotent; a failure leaves the record saying ``held``,
   so ``kiln rm`` refuses to forget it and the reaper tries again.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

from builder.root import Root
from helper.base.errors import KilnError, UidInUse
from runner.guest_init.channel import GuestNet
from runner.vm import cgroup as vmcgroup
from runner.vm.state import NET_ATTACHED, NET_RECORDED, NET_RELEASED, State, VMRecord, root_key
from runner.vmm import qemuargv

if TYPE_CHECKING:
    from runner import network

log = logging.getLogger("kiln.vm")
T = TypeVar("T")
UID_RETRIES = 8  # refusals in a row: the range is shared, not full (that is "no free VM uid")


@dataclass
class UidPicker:
    """The uids the helper refused for one VM, and where another one comes from."""

    uid_range: tuple[int, int]  # (first, count), as the record's first uid
    refused: set[int] = field(default_factory=set)

    def another(self, st: State, rec: VMRecord, refusal: UidInUse) -> VMRecord:
        """Record a uid free in this root and never refused before (or re-raise
        ``refusal`` after ``UID_RETRIES``); the record that has it."""
        if rec.uid is None or len(self.refused) >= UID_RETRIES:
            raise refusal
        self.refused.add(rec.uid)
        log.info("VM %s: uid %d is another caller's, taking another", rec.id, rec.uid)
        return st.reassign_uid(rec.id, self.uid_range, self.refused)


def retry_uid(st: State, rec: VMRecord, picker: UidPicker,
              act: Callable[[VMRecord], T]) -> tuple[T, VMRecord]:
    """``act(rec)``, again with another uid while the helper refuses the record's one
    (``UidPicker.another``). ``act`` must leave nothing behind when it raises. Returns its
    result and the record it ran with."""
    while True:
        try:
            return act(rec), rec
        except UidInUse as e:
            rec = picker.another(st, rec, e)


@dataclass(frozen=True)
class NetIntent:
    """What ``kiln run --net tap`` knows before the record exists."""

    bridge: dict[str, Any]  # bridge-ensure's answer (isolation, namespace, gateway, …)
    forwards: tuple[qemuargv.Forward, ...]
    uid_range: tuple[int, int]  # the helper's [jails] uid_gid_range: (first, count)


def net_call(root: Root) -> network.Call:
    """The helper's network ops for this root (in-process as root, else ``sudo``)."""
    from runner import network

    return network.helper_call(root.path)  # the area matters in-process only


def net_preflight(root: Root, forwards: tuple[qemuargv.Forward, ...]) -> NetIntent:
    from helper import config
    from runner import network

    bridge = network.preflight(net_call(root))
    try:
        cfg = config.load()
    except (KilnError, OSError) as e:  # the helper read it; a user may not
        raise KilnError(f"cannot read the trusted config for the VM uid range: {e}",
                        "make /etc/kiln/config.toml readable (0644)") from None
    return NetIntent(bridge, forwards, (cfg.uid_first, cfg.uid_count))


def net_record(vm_id: str, intent: NetIntent) -> dict[str, Any]:
    """The record's ``net`` document before any object exists."""
    from helper.net import core as netcore

    n = netcore.names(vm_id)
    iso = intent.bridge["isolation"] == "netns"
    return {"step": NET_RECORDED, "ip": None, "tap": n.tap, "netns": n.netns if iso else None,
            "veth": n.veth if iso else None, "namespace": intent.bridge["namespace"],
            "forwards": [f"{f.host}:{f.guest}" for f in intent.forwards]}


def net_attach(root: Root, st: State, rec: VMRecord, intent: NetIntent,
               picker: UidPicker) -> tuple[network.VmNet, VMRecord]:
    """The VM on the kiln network, and its record (with another uid when the helper
    refused the first: see ``retry_uid``)."""
    from runner import network

    def attach(r: VMRecord) -> network.VmNet:
        if r.uid is None:
            raise KilnError(f"VM {r.id} has no uid", "internal error: --net tap records one")
        return network.attach(net_call(root), r.id, root_key(root.path), r.uid, r.uid,
                              forwards=intent.forwards, bridge=intent.bridge)

    vmnet, rec = retry_uid(st, rec, picker, attach)
    st.update(rec.id, net=json.dumps({**vmnet.doc(), "step": NET_ATTACHED}))
    return vmnet, rec


@dataclass(frozen=True)
class QemuNic:
    """How QEMU gets its tap: argv part, the namespace to start in, fds to inherit; and
    eth0 as the guest is told to configure it (the lease's fields)."""

    tap: qemuargv.TapNic
    netns: str | None
    keep_fds: tuple[int, ...]
    guest: GuestNet


def qemu_nic(root: Root, vmnet: network.VmNet) -> QemuNic:
    if os.geteuid() == 0:
        return QemuNic(vmnet.qemu_tap(), vmnet.spawn_netns, (), vmnet.guest())
    from runner import network

    fd = network.open_tap(vmnet.vm_id, root.path)
    return QemuNic(replace(vmnet.qemu_tap(), fd=fd), None, (fd,), vmnet.guest())


def release_net(root: Root, st: State, vm_id: str, *, found: bool = False) -> None:
    """Take the VM off the network if its record says it may be on it, or ``found``
    (the reaper saw its objects); raises KilnError when the helper refuses (the record
    then still says what is held)."""
    cur = st.get(vm_id)
    if not found and (cur is None or not cur.net_held):
        return
    from runner import network

    network.reconcile(net_call(root), root_key(root.path), keep=[], vm_ids=[vm_id])
    if cur is not None and cur.net_held:
        st.update(vm_id, net=json.dumps({**cur.net_doc, "step": NET_RELEASED}))


def release(root: Root, st: State, rec: VMRecord) -> None:
    """The VM has ended: its cgroups and network go. Never raises (logged; the record keeps
    what is still held for ``kiln rm`` and the reaper)."""
    vmcgroup.remove(rec.cgroup_dirs)
    try:
        release_net(root, st, rec.id)
    except (KilnError, OSError) as e:
        log.warning("VM %s: the network was not released: %s", rec.id, e)
