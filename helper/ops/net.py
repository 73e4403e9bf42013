"""Network ops: the kiln bridge, address leases, taps on the bridge, per-VM namespaces, NAT,
port forwards, and the listing / reclaim a reconcile needs (issue #7; design in docs/net.md).

Where the network lives, its bridge, subnet, isolation and NAT come only from the trusted
config (``[net]``, helper/net/config.py); no request names a bridge, an address or a
namespace other than a VM's own ``kn-ID``. Device names derive from the VM id
(``helper.net.core.names``); every object is tagged with (VM, root key, caller uid) and an op
acts only on the caller's own. VM uids/gids come from ``[jails] uid_gid_range``, never 0 or
the caller's, nor one another caller's jail or tap holds (``helper.vmuids``). Order for a
VM (what ``runner/network.py`` does):

  bridge-ensure → nat-ensure (if nat) → net-lease → tap-attach | netns-create → forward-add…
  [tap-open: a VMM the caller runs gets the tap as an fd]
  forward-remove → tap-detach | netns-delete → net-release → nat-remove (acts on the last)

Without ``[net]`` settings in the trusted config every op that would create something
refuses (``_sec``); listing and reclaiming then find nothing.

Every op runs with the signals a sudo caller can have relayed to us held
(``cgattach.uninterrupted``; delivered when the op is done): a caller interrupting an op
between two steps must not leave a half-made object no later run can clean.

Per-caller caps: a sudo caller's uid holds at most ``[net] max_leases_per_user`` leases and
``max_forwards_per_user`` forwards; an in-process root caller (``ctx.trusted``, root
running kiln itself) is not capped — it could as well edit the config.
"""

from __future__ import annotations

import os
import socket
import stat
from typing import Annotated, Any

from pydantic import Field

from helper import vmuids
from helper.base.errors import Conflict, KilnError, UsageError
from helper.cgattach import held
from helper.net import core as nc
from helper.net import host as net
from helper.net import lease as netlease
from helper.net import reconcile
from helper.net import tapfd as nettap
from helper.net.config import NetSection
from helper.net.tap import NAME_PATTERN as TAP_PATTERN
from helper.ops.base import Ctx, KilnId, Op, Req, Uid, check_vm_uid, passed_fd

RootKey = Annotated[str, Field(pattern=nc.ROOT_PATTERN,
                               description="the kiln root's key (8 characters of a-z, 2-7)")]
Port = Annotated[int, Field(ge=1, le=65535, description="a TCP port")]


def configured(ctx: Ctx) -> NetSection | None:
    """The ``[net]`` section when an administrator wrote one (an empty ``[net]`` takes
    the defaults); None when the trusted config has none."""
    return ctx.cfg.net_section


def _sec(ctx: Ctx) -> NetSection:
    """The ``[net]`` section; an op that would create something refuses without one: the
    built-in defaults (a bridge and 10.213.0.0/24 in the host's namespace) are for an
    administrator to choose, not for the first caller of ``--net tap``."""
    sec = configured(ctx)
    if sec is None:
        raise UsageError("networking is not configured: the trusted config has no [net] "
                         "settings", "an administrator sets [net] in /etc/kiln/config.toml "
                         "(docs/net.md)")
    return sec


def _tag(ctx: Ctx, vm: str, root: str) -> nc.Tag:
    return nc.Tag(vm, root, ctx.caller_uid)


def _claim_uid(ctx: Ctx, uid: int, gid: int) -> None:
    """Refuse a VM uid/gid another caller's jail or tap holds (``helper.vmuids``; the
    caller holds ``vmuids.locked`` until its tap exists)."""
    from helper.ops.jail import jail_config

    try:
        jail_cfg = jail_config(ctx)
    except KilnError:  # no jail tools configured: no jails either
        jail_cfg = None
    vmuids.check_free(ctx, uid, gid, jail_cfg)


def _guest(ctx: Ctx, got: nc.Lease) -> dict[str, Any]:
    g = nc.guest_net(ctx.cfg.net, got)
    names = nc.names(got.vm)
    return {"vm": got.vm, "ip": got.ip, "guest_ip": g.ip, "prefix": g.prefix,
            "gateway": g.gateway, "mac": g.mac, "dns": list(g.dns),
            "isolation": ctx.cfg.net.isolation,
            "tap": names.tap,
            "netns": names.netns if ctx.cfg.net.isolation == "netns" else None}


class BridgeEnsure(Req):
    """Create the kiln bridge with its address (idempotent; refuses a foreign device)."""


def bridge_ensure(ctx: Ctx, req: BridgeEnsure) -> dict[str, Any]:
    del req
    return net.bridge_ensure(_sec(ctx))


class BridgeRemove(Req):
    """Delete the kiln bridge once no VM uses it."""


def bridge_remove(ctx: Ctx, req: BridgeRemove) -> dict[str, Any]:
    del req
    net.bridge_remove(ctx.cfg.net)
    return {}


class NetLease(Req):
    """Allocate the VM's address (or return its existing lease) and say how the guest is
    configured (its address, prefix, gateway, MAC and name servers; tap and namespace
    names)."""

    vm: KilnId = Field(description="the VM id")
    root: RootKey


def net_lease(ctx: Ctx, req: NetLease) -> dict[str, Any]:
    net.check_namespace(_sec(ctx))
    return _guest(ctx, netlease.lease(ctx.cfg.net, _tag(ctx, req.vm, req.root),
                                      capped=not ctx.trusted))


class NetRelease(Req):
    """Release the VM's address lease."""

    vm: KilnId = Field(description="the VM id")


def net_release(ctx: Ctx, req: NetRelease) -> dict[str, Any]:
    """The address goes back only with nothing left that leads to it or holds it: the
    VM's forwards are removed in the same step (under the lease lock), and its tap or
    namespace must be gone. Otherwise the next holder of the address — another user's VM —
    would inherit a forward its owner chose, or meet the old link on the bridge."""
    sec = ctx.cfg.net
    n = nc.names(req.vm)
    with netlease.lease_book(sec) as box:  # tap-attach and netns-create need the lease
        box[0], gone = nc.release(box[0], req.vm, ctx.caller_uid)  # the owner's only
        if net.link(sec.namespace, n.tap) is not None or net.link(
                sec.namespace, n.veth) is not None or n.netns in net.netns_names():
            raise Conflict(f"VM {req.vm} still has its tap or namespace",
                           "remove them first (tap-detach, netns-delete)")
        net.drop_forwards(sec, [f for f in net.forwards(sec) if f.tag.vm == req.vm])
    return {"ip": gone.ip}


class TapAttach(Req):
    """Create the VM's tap kt-ID, owned by the VM's uid/gid, on the kiln bridge."""

    vm: KilnId = Field(description="the VM id (it must hold a lease)")
    uid: Uid = Field(description="the VM's uid, from the configured range")
    gid: Uid = Field(description="the VM's gid, from the configured range")


def _check_isolation(ctx: Ctx, want: str, op: str) -> None:
    # The lease's guest addressing (net-lease) follows the config: the layout must too.
    if ctx.cfg.net.isolation != want:
        other = "netns-create" if want == "none" else "tap-attach"
        raise UsageError(f"{op} does not fit [net] isolation = {ctx.cfg.net.isolation!r}",
                         f"use {other}")


def tap_attach(ctx: Ctx, req: TapAttach) -> dict[str, Any]:
    _sec(ctx)
    _check_isolation(ctx, "none", "tap-attach")
    check_vm_uid(ctx, req.uid, req.gid)
    got = netlease.owned_lease(ctx.cfg.net, req.vm, ctx.caller_uid)
    with vmuids.locked(ctx):
        _claim_uid(ctx, req.uid, req.gid)
        return {"tap": net.tap_attach(ctx.cfg.net, got, req.uid, req.gid)}


TapName = Annotated[str, Field(pattern=TAP_PATTERN, max_length=15,
                               description="kiln tap name: kt- + [a-z2-7]{1,12}")]


class TapDetach(Req):
    """Delete a tap kiln tagged as the caller's from the kiln network."""

    name: TapName


def tap_detach(ctx: Ctx, req: TapDetach) -> dict[str, Any]:
    net.tap_detach(ctx.cfg.net, req.name, ctx.caller_uid)
    return {}


class NetnsCreate(Req):
    """Create the VM's namespace kn-ID: veth to the bridge, tap kt-ID inside owned by the
    VM's uid/gid, NAT between the lease and the guest's address."""

    vm: KilnId = Field(description="the VM id (it must hold a lease)")
    uid: Uid = Field(description="the VM's uid, from the configured range")
    gid: Uid = Field(description="the VM's gid, from the configured range")


def netns_create(ctx: Ctx, req: NetnsCreate) -> dict[str, Any]:
    _sec(ctx)
    _check_isolation(ctx, "netns", "netns-create")
    check_vm_uid(ctx, req.uid, req.gid)
    got = netlease.owned_lease(ctx.cfg.net, req.vm, ctx.caller_uid)
    with vmuids.locked(ctx):
        _claim_uid(ctx, req.uid, req.gid)
        n = net.netns_create(ctx.cfg.net, got, req.uid, req.gid)
    return {"netns": n.netns, "tap": n.tap, "veth": n.veth}


NetnsName = Annotated[str, Field(pattern=nc.NETNS_PATTERN, max_length=15,
                                 description="a VM namespace: kn- + [a-z2-7]{1,12}")]


class NetnsDelete(Req):
    """Delete a VM namespace of the caller's (its veth pair and tap go with it)."""

    name: NetnsName


def netns_delete(ctx: Ctx, req: NetnsDelete) -> dict[str, Any]:
    net.netns_delete(ctx.cfg.net, req.name, ctx.caller_uid)
    return {}


class NatEnsure(Req):
    """Install kiln's outbound NAT for the subnet (only with [net] nat = true)."""


def nat_ensure(ctx: Ctx, req: NatEnsure) -> dict[str, Any]:
    del req
    return {"changed": net.nat_ensure(_sec(ctx))}


class NatRemove(Req):
    """Remove kiln's NAT rules if no VM holds a lease any more (else do nothing)."""


def nat_remove(ctx: Ctx, req: NatRemove) -> dict[str, Any]:
    del req
    return net.nat_remove(ctx.cfg.net)


class ForwardAdd(Req):
    """Forward TCP GATEWAY:HOST_PORT of the kiln namespace to the VM's GUEST_PORT."""

    vm: KilnId = Field(description="the VM id (it must hold a lease)")
    host_port: Port
    guest_port: Port


def forward_add(ctx: Ctx, req: ForwardAdd) -> dict[str, Any]:
    _sec(ctx)
    if req.host_port < 1024 and not ctx.trusted:
        raise UsageError(f"host port {req.host_port} is privileged",
                         "forward a port of 1024 or above (or run kiln as root)")
    got = netlease.owned_lease(ctx.cfg.net, req.vm, ctx.caller_uid)
    f = net.forward_add(ctx.cfg.net, got, req.host_port, req.guest_port,
                        capped=not ctx.trusted)
    return {"address": ctx.cfg.net.gateway, "host_port": f.host_port,
            "dest": f"{f.dest}:{f.guest_port}"}


class ForwardRemove(Req):
    """Remove the VM's port forwards (one host port, or all of them)."""

    vm: KilnId = Field(description="the VM id")
    host_port: Port | None = Field(default=None, description="only this host port")


def forward_remove(ctx: Ctx, req: ForwardRemove) -> dict[str, Any]:
    return {"removed": net.forward_remove(ctx.cfg.net, req.vm, ctx.caller_uid, req.host_port)}


class NetList(Req):
    """List the kiln network's objects (leases, taps, veths, VM namespaces, forwards)."""


def net_list(ctx: Ctx, req: NetList) -> dict[str, Any]:
    del req
    if configured(ctx) is None:  # nothing can have been made (creation refuses)
        return {"objects": [], "leases": {}, "bridge": False}
    sec = ctx.cfg.net
    net.check_namespace(sec)
    objs = [{"kind": o.kind, "name": o.name,
             "vm": o.tag.vm if o.tag else None, "root": o.tag.root if o.tag else None,
             "uid": o.tag.uid if o.tag else None} for o in reconcile.observe(sec)]
    book = netlease.read_book(sec)
    return {"objects": objs, "leases": {x.vm: x.ip for x in book.leases},
            "bridge": net.own_bridge(sec) is not None}


class NetReclaim(Req):
    """Remove the root's network objects (the caller's) whose VM is not in keep."""

    root: RootKey
    keep: tuple[KilnId, ...] = Field(default=(), max_length=100_000,
                                     description="VM ids whose objects stay")
    only: tuple[KilnId, ...] | None = Field(
        default=None, max_length=100_000,
        description="only these VMs' objects go (the ones the caller knows are gone); "
        "absent: every VM not in keep")


def net_reclaim(ctx: Ctx, req: NetReclaim) -> dict[str, Any]:
    if configured(ctx) is None or req.only == ():
        return {"removed": []}
    return {"removed": reconcile.reclaim(ctx.cfg.net, req.root, list(req.keep),
                                         ctx.caller_uid,
                                         None if req.only is None else list(req.only))}


class TapOpen(Req):
    """Send the caller an fd on its VM's tap (attached as root in the tap's namespace) over
    a Unix socket it passed open: for a VMM the caller runs (``-netdev tap,fd=N``)."""

    vm: KilnId = Field(description="the VM id (its lease and tap are the caller's)")
    fd: int = Field(ge=3, le=255, description="an open Unix socket the tap fd is sent over")


def tap_open(ctx: Ctx, req: TapOpen) -> dict[str, Any]:
    sec = _sec(ctx)
    st = passed_fd(req.fd, "pass a Unix socket")
    if not stat.S_ISSOCK(st.st_mode):
        raise UsageError(f"file descriptor {req.fd} is not a socket", "pass a Unix socket")
    sock = socket.socket(fileno=os.dup(req.fd))
    try:
        if sock.family != socket.AF_UNIX:
            raise UsageError(f"file descriptor {req.fd} is not a Unix socket", "")
        netlease.owned_lease(sec, req.vm, ctx.caller_uid)
        fd = nettap.tap_open(sec, req.vm, ctx.caller_uid)
        try:
            socket.send_fds(sock, [b"tap"], [fd])
        finally:
            os.close(fd)
    finally:
        sock.close()
    return {"tap": nc.names(req.vm).tap}


_OPS: dict[str, tuple[type[Req], Op]] = {
    "bridge-ensure": (BridgeEnsure, bridge_ensure),
    "bridge-remove": (BridgeRemove, bridge_remove),
    "net-lease": (NetLease, net_lease),
    "net-release": (NetRelease, net_release),
    "tap-attach": (TapAttach, tap_attach),
    "tap-detach": (TapDetach, tap_detach),
    "tap-open": (TapOpen, tap_open),
    "netns-create": (NetnsCreate, netns_create),
    "netns-delete": (NetnsDelete, netns_delete),
    "nat-ensure": (NatEnsure, nat_ensure),
    "nat-remove": (NatRemove, nat_remove),
    "forward-add": (ForwardAdd, forward_add),
    "forward-remove": (ForwardRemove, forward_remove),
    "net-list": (NetList, net_list),
    "net-reclaim": (NetReclaim, net_reclaim),
}
OPS: dict[str, tuple[type[Req], Op]] = {k: (r, held(f)) for k, (r, f) in _OPS.items()}
