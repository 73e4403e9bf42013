"""One VM's place on the kiln network, through the helper: what ``kiln run --net tap`` calls.

``attach`` runs the helper's network ops in order — ``bridge-ensure``, ``nat-ensure`` (when
the trusted config turns NAT on), ``net-lease``, then ``tap-attach`` (isolation = none) or
``netns-create`` (isolation = netns), then one ``forward-add`` per ``-p`` — and undoes what
it made if a step fails. The ``VmNet`` it returns is everything the VMM side needs:

* the guest's addressing as the helper's ``net-lease`` answers it, field by field
  (``guest_ip``, ``prefix``, ``gateway``, ``mac``, ``dns``): ``guest()`` is eth0 in the
  settings the guest is given (docs/run.md, "The control channel");
* ``qemu_tap()`` → ``runner.vmm.qemuargv.TapNic``; ``firecracker_nic()`` → ``NetSpec`` (eth0);
* ``spawn_netns``: the namespace the VMM must start in (QEMU: ``helper.net.host.join_netns`` in
  the child before exec, as root; Firecracker: the jailer's ``--netns``) — the VM's own
  ``kn-ID``, the configured ``[net] namespace``, or None for the host's;
* ``ip``: the address the VM is reached at (``kiln ps``), ``forwards``.

``detach`` undoes it all in reverse, idempotently (what is already gone is skipped), and
``nat-remove`` then drops the NAT rules if this was the last VM. ``reconcile`` is
``net-reclaim`` of this root's objects whose VM is not in ``keep`` — with ``vm_ids``, of just
those VMs (one helper call: what ``kiln run`` and the reaper use to take a VM off the
network, and the only safe form while other VMs of the root may be being born);
``vms_on_network`` lists the VMs of this root and caller that hold objects (the reaper's
orphan sweep). ``preflight`` is ``bridge-ensure`` alone: ``kiln run`` calls it before it
records anything, so a missing ``[net]`` or an overlapping subnet leaves nothing behind.

``open_tap`` is for a VMM the caller runs itself (QEMU under an ordinary user): the helper
attaches the tap as root, in its namespace, and sends the fd back over a socket pair.

``call`` defaults to ``builder.helperclient.call`` (in-process as root, ``sudo kiln-helper``
otherwise); tests pass one that runs the same ops with a config naming their namespace.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from helper.base.errors import KilnError, NotFound
from runner.guest_init.channel import GuestNet
from runner.vmm import qemuargv

if TYPE_CHECKING:
    from runner.vmm import fcapi as firecracker

Call = Callable[[str, dict[str, Any]], dict[str, Any]]


def helper_call(area: Path) -> Call:
    from builder import helperclient as client

    return lambda op, req: client.call(op, req, area=area)


@dataclass(frozen=True)
class VmNet:
    vm_id: str
    ip: str  # where the VM is reached (its lease)
    guest_ip: str  # what the guest holds (== ip unless isolation = netns)
    prefix: int
    gateway: str
    mac: str
    tap: str
    netns: str | None  # the VM's own namespace (isolation = netns)
    namespace: str  # the kiln network's namespace ("" = the host's)
    dns: tuple[str, ...] = ()  # the guest's name servers ([net] dns)
    forwards: tuple[qemuargv.Forward, ...] = ()

    @property
    def spawn_netns(self) -> str | None:
        return self.netns or self.namespace or None

    def guest(self) -> GuestNet:
        """eth0 as the guest configures it."""
        return GuestNet(self.mac, f"{self.guest_ip}/{self.prefix}", self.gateway, self.dns)

    def qemu_tap(self) -> qemuargv.TapNic:
        return qemuargv.TapNic(self.tap, self.mac)

    def firecracker_nic(self) -> firecracker.NetSpec:
        from runner.vmm import fcapi  # Firecracker's module: not on a QEMU run's path

        return fcapi.NetSpec("eth0", self.tap, self.mac)

    def doc(self) -> dict[str, Any]:
        """What the VM's record keeps (and ``kiln ps --json`` shows as ``ip``)."""
        return {"ip": self.ip, "guest_ip": self.guest_ip, "mac": self.mac, "tap": self.tap,
                "netns": self.netns, "namespace": self.namespace,
                "forwards": [f"{f.host}:{f.guest}" for f in self.forwards]}


def preflight(call: Call) -> dict[str, Any]:
    """``bridge-ensure``: the network is configured, its namespace exists, the subnet
    overlaps no route; the bridge exists. Returns what ``attach`` takes as ``bridge``."""
    return call("bridge-ensure", {})


def attach(call: Call, vm_id: str, root_key: str, uid: int, gid: int,
           forwards: Sequence[qemuargv.Forward] = (),
           bridge: dict[str, Any] | None = None) -> VmNet:
    """Put VM ``vm_id`` (of the root with ``root_key``) on the kiln network; its tap belongs to
    ``uid``/``gid`` (the VM's, from the helper's range). ``bridge``: ``preflight``'s answer
    (saves a second ``bridge-ensure``)."""
    bridge = bridge if bridge is not None else preflight(call)
    if bridge["nat"]:
        call("nat-ensure", {})
    lease = call("net-lease", {"vm": vm_id, "root": root_key})
    done: list[qemuargv.Forward] = []
    try:
        if lease["isolation"] == "netns":
            call("netns-create", {"vm": vm_id, "uid": uid, "gid": gid})
        else:
            call("tap-attach", {"vm": vm_id, "uid": uid, "gid": gid})
        for f in forwards:
            call("forward-add", {"vm": vm_id, "host_port": f.host, "guest_port": f.guest})
            done.append(f)
    except BaseException:
        with contextlib.suppress(KilnError):
            detach(call, vm_id)
        raise
    return VmNet(vm_id=vm_id, ip=lease["ip"], guest_ip=lease["guest_ip"], prefix=lease["prefix"],
                 gateway=lease["gateway"], mac=lease["mac"], tap=lease["tap"],
                 netns=lease["netns"], namespace=bridge["namespace"],
                 dns=tuple(lease["dns"]), forwards=tuple(done))


def detach(call: Call, vm_id: str) -> list[str]:
    """Remove the VM's forwards, tap or namespace and lease (whatever exists), then the NAT
    rules if no VM is left. Returns what went."""
    from helper.net import core as netcore

    names = netcore.names(vm_id)
    gone: list[str] = []
    for op, req in (("forward-remove", {"vm": vm_id}), ("netns-delete", {"name": names.netns}),
                    ("tap-detach", {"name": names.tap}), ("net-release", {"vm": vm_id})):
        with contextlib.suppress(NotFound):
            call(op, req)
            gone.append(op)
    call("nat-remove", {})
    return gone


def reconcile(call: Call, root_key: str, keep: Sequence[str],
              vm_ids: Sequence[str] | None = None) -> list[str]:
    """Remove this root's network objects of VMs not in ``keep`` (with ``vm_ids``: of those
    VMs alone), then NAT if no lease is left."""
    req: dict[str, Any] = {"root": root_key, "keep": list(keep)}
    if vm_ids is not None:
        req["only"] = list(vm_ids)
    return [str(x) for x in call("net-reclaim", req)["removed"]]


def vms_on_network(call: Call, root_key: str, uid: int) -> set[str]:
    """VM ids of this root and caller that hold network objects (``net-list``)."""
    return {str(o["vm"]) for o in call("net-list", {})["objects"]
            if o["root"] == root_key and o["uid"] == uid and o["vm"]}


def open_tap(vm_id: str, area: Path) -> int:
    """An fd on VM ``vm_id``'s tap, attached by the helper (``tap-open``), inheritable by the
    VMM the caller spawns. The socket end the helper writes to is passed to it open."""
    import socket

    from builder import helperclient as client

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.call("tap-open", {"vm": vm_id, "fd": theirs.fileno()}, area=area,
                    pass_fd=theirs.fileno())
        theirs.close()
        ours.settimeout(10)
        _, fds, _, _ = socket.recv_fds(ours, 16, 1)
    finally:
        theirs.close()
        ours.close()
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise KilnError(f"kiln-helper sent no tap for VM {vm_id}",
                        "see the helper's audit log")
    return fds[0]
