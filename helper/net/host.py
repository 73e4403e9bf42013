"""The kiln network's I/O: bridge, taps, per-VM namespaces, NAT, port forwards, leases.

Every change goes through ``ip`` (``ip -n NS …`` when ``[net] namespace`` names one),
``iptables`` and ``sysctl`` (through ``ip netns exec NS`` there) via ``helper.base.run``, i.e.
the trusted config's tools. Decisions are ``helper.net.core``'s (pure); this module reads
the state, applies a plan, and rolls back what it made when a step fails.

Layout (see docs/net.md):

* the bridge ``[net] bridge`` with the gateway address, tagged with the alias ``kiln bridge``
  (a device of that name without the alias is someone else's: refused);
* never an untagged link under a kiln name: ``ip link add`` cannot set an alias (iproute2
  6.1 accepts ``alias`` there and drops it), so a bridge, tap or veth is made as ``kx-…``
  (``netcore.TMP``), tagged, then renamed. A crash in between leaves a ``kx-`` name nothing
  else uses: the next create of the same object removes it; a VM namespace (``ip netns
  add`` cannot be tagged at birth either) left untagged is adopted by its lease's owner's
  reconcile (``helper.net.reconcile``). The ops run with the caller's relayable signals held
  (``ops_net``), and every rollback runs on any exception, so only a crash gets here;
* isolation = none: ``kt-ID`` on the bridge, owned by the VM's uid/gid, the guest holds its
  leased address;
* isolation = netns: namespace ``kn-ID`` holding ``kt-ID`` (the link's first address) and
  ``kp-ID`` (the lease), peer of ``kv-ID`` on the bridge; DNAT lease → guest and SNAT
  guest → lease inside it, so every guest can have the same address;
* NAT: chains ``KILN-POSTROUTING`` (masquerade the subnet) and ``KILN-FORWARD`` (accept the
  bridge's traffic, for hosts whose FORWARD policy drops); forwards: ``KILN-DNAT`` from
  PREROUTING and OUTPUT, ``GATEWAY:HOST`` → the VM's reachable address.

Leases: ``helper.net.lease``; what exists and reclaiming what a gone VM left:
``helper.net.reconcile``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
from pathlib import Path
from typing import Any

from helper.base import run
from helper.base.errors import Conflict, KilnError, NotFound, UsageError
from helper.net import core as nc
from helper.net import guard as netguard
from helper.net import lease as netlease
from helper.net.config import NetSection

NETNS_DIR = Path("/run/netns")
BRIDGE_TAG = "kiln bridge"
_CLONE_NEWNET = 0x40000000

# -- running the tools ----------------------------------------------------------------------


def ip(ns: str, *args: str, ok_codes: tuple[int, ...] = (0,)) -> run.Result:
    return run.run("ip", [*(["-n", ns] if ns else []), *args], timeout=30, ok_codes=ok_codes)


def ip_json(ns: str, *args: str) -> list[dict[str, Any]]:
    out = ip(ns, "-j", *args).text.strip()
    data = json.loads(out) if out else []
    return [d for d in data if isinstance(d, dict)]


def in_ns(ns: str, tool: str, args: list[str], ok_codes: tuple[int, ...] = (0,)) -> run.Result:
    """``tool`` run inside namespace ``ns`` (``ip netns exec``), or here when ``ns`` is ""."""
    if not ns:
        return run.run(tool, args, timeout=30, ok_codes=ok_codes)
    return run.run("ip", ["netns", "exec", ns, run.which(tool), *args], timeout=30,
                   ok_codes=ok_codes)


def ipt(ns: str, args: list[str]) -> run.Result:
    return in_ns(ns, "iptables", ["-w", "10", *args])


def rules(ns: str, tables: tuple[str, ...] = ("nat", "filter")) -> dict[str, list[list[str]]]:
    return {t: nc.parse_rules(ipt(ns, ["-t", t, "-S"]).text) for t in tables}


def apply(ns: str, plan: list[list[str]]) -> None:
    for args in plan:
        ipt(ns, args)


def set_forwarding(ns: str) -> None:
    in_ns(ns, "sysctl", ["-q", "-w", "net.ipv4.ip_forward=1"])


def join_netns(name: str) -> None:
    """Move the calling thread into ``/run/netns/NAME`` (for a child before exec: QEMU must
    open its tap in the namespace the tap lives in). Root only."""
    if not name or "/" in name or name.startswith("."):
        raise UsageError(f"invalid network namespace name {name!r}", "")
    fd = os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


# -- observation ----------------------------------------------------------------------------


def where(sec: NetSection) -> str:
    return f"network namespace {sec.namespace}" if sec.namespace else "the host"


def check_namespace(sec: NetSection) -> None:
    if sec.namespace and not (NETNS_DIR / sec.namespace).exists():
        raise NotFound(f"network namespace {sec.namespace} does not exist",
                       f"create it (ip netns add {sec.namespace}) or clear [net] namespace")


def link(ns: str, name: str) -> dict[str, Any] | None:
    found = [d for d in ip_json(ns, "-d", "link", "show") if d.get("ifname") == name]
    return found[0] if found else None


def kind(d: dict[str, Any]) -> str:
    return str((d.get("linkinfo") or {}).get("info_kind") or "device")


def netns_names() -> list[str]:
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(nc.NETNS))
    except FileNotFoundError:
        return []


def netns_tag(name: str) -> nc.Tag | None:
    """A VM namespace's owner: the alias kiln puts on its ``lo`` first thing."""
    with contextlib.suppress(KilnError):
        for d in ip_json(name, "link", "show", "lo"):
            return nc.parse_tag(d.get("ifalias"))
    return None


def _adoptable(name: str, tag: nc.Tag, uid: int) -> bool:
    """An untagged kiln-named object is ``tag``'s when ``tag`` is a lease of ``uid`` whose
    VM's names include ``name`` (kiln makes these names only for that VM)."""
    n = nc.names(tag.vm)
    return tag.uid == uid and name in (n.tap, n.veth, n.netns, n.tmp)


# -- the bridge -----------------------------------------------------------------------------


def check_routes(sec: NetSection) -> None:
    routes = ip_json(sec.namespace, "-4", "route", "show", "table", "all")
    clash = nc.overlapping_routes(sec.network, routes, sec.bridge)
    if clash:
        raise Conflict(f"subnet {sec.subnet} overlaps the route {clash[0]} of {where(sec)}",
                       "choose another [net] subnet in /etc/kiln/config.toml")


def own_bridge(sec: NetSection) -> dict[str, Any] | None:
    """The bridge if it exists and is kiln's; None if absent; refuses anyone else's."""
    d = link(sec.namespace, sec.bridge)
    if d is None:
        return None
    if kind(d) != "bridge":
        raise UsageError(f"refusing {sec.bridge}: it is a {kind(d)} device, not a bridge",
                         "rename it, or set another [net] bridge")
    if d.get("ifalias") != BRIDGE_TAG:
        raise UsageError(f"refusing bridge {sec.bridge}: it exists but kiln did not create it",
                         "kiln only uses a bridge it made; set another [net] bridge")
    return d


def bridge_ensure(sec: NetSection) -> dict[str, Any]:
    """Create the bridge with its address, or check and complete the existing one."""
    check_namespace(sec)
    check_routes(sec)
    ns, br = sec.namespace, sec.bridge
    with netlease.lease_book(sec):  # the network's lock: two first VMs make one bridge
        if own_bridge(sec) is None:
            tmp = nc.bridge_tmp(br)
            _drop_leftover(ns, tmp, "bridge")
            ip(ns, "link", "add", tmp, "type", "bridge")
            try:
                ip(ns, "link", "set", tmp, "alias", BRIDGE_TAG)
                ip(ns, "link", "set", tmp, "name", br)  # appears tagged, or not at all
            except BaseException:
                ip(ns, "link", "del", tmp, ok_codes=(0, 1, 2))
                raise
        ip(ns, "addr", "replace", f"{sec.gateway}/{sec.network.prefixlen}", "dev", br)
        ip(ns, "link", "set", br, "up")
    return {"bridge": br, "namespace": ns, "gateway": sec.gateway, "subnet": sec.subnet,
            "isolation": sec.isolation, "nat": sec.nat}


def bridge_remove(sec: NetSection) -> None:
    """Delete kiln's bridge once nothing uses it (no lease, no port)."""
    check_namespace(sec)
    if own_bridge(sec) is None:
        raise NotFound(f"bridge {sec.bridge} does not exist in {where(sec)}", "")
    with netlease.lease_book(sec) as box:  # no VM can lease and attach meanwhile
        ports = [str(d.get("ifname")) for d in ip_json(sec.namespace, "link", "show")
                 if d.get("master") == sec.bridge]
        if box[0].leases or ports:
            raise Conflict(f"bridge {sec.bridge} is in use ({len(box[0].leases)} leases, "
                           f"ports: {', '.join(ports) or 'none'})", "stop the VMs first")
        ip(sec.namespace, "link", "del", sec.bridge)


# -- taps and VM namespaces -----------------------------------------------------------------


def _drop_leftover(ns: str, tmp: str, want_kind: str) -> None:
    """Remove a ``kx-`` link of ``want_kind`` a crashed create of the same object left (only
    kiln makes ``kx-`` names, and this one derives from the object about to be made)."""
    d = link(ns, tmp)
    if d is not None and kind(d) == want_kind:
        ip(ns, "link", "del", tmp, ok_codes=(0, 1, 2))


def _new_tap(ns: str, n: nc.Names, tag: nc.Tag, uid: int, gid: int) -> None:
    """``n.tap``, tagged from the moment it has that name (made as ``n.tmp``)."""
    _drop_leftover(ns, n.tmp, "tun")
    ip(ns, "tuntap", "add", "dev", n.tmp, "mode", "tap", "user", str(uid), "group", str(gid),
       "vnet_hdr")  # vnet_hdr: virtio-net offloads (QEMU and Firecracker use them)
    try:
        ip(ns, "link", "set", n.tmp, "alias", tag.text())
        ip(ns, "link", "set", n.tmp, "name", n.tap)
    except BaseException:
        ip(ns, "link", "del", n.tmp, ok_codes=(0, 1, 2))
        raise


def _check_owner(what: str, name: str, tag: nc.Tag | None, uid: int,
                 adopt: nc.Tag | None = None) -> None:
    """``adopt``: the tag an untagged object is taken to have (``observe``'s adoption,
    checked again here at the moment of deletion)."""
    if tag is None and adopt is not None and _adoptable(name, adopt, uid):
        return
    if tag is None:
        raise UsageError(f"refusing {what} {name}: kiln did not create it",
                         "kiln only removes devices it tagged")
    if tag.uid != uid:
        raise UsageError(f"refusing {what} {name}: it belongs to uid {tag.uid}",
                         "only its owner removes it")


def tap_attach(sec: NetSection, got: nc.Lease, uid: int, gid: int) -> str:
    """``kt-ID`` owned by ``uid``/``gid`` on the bridge (isolation = none), guarded before
    it joins the bridge: it speaks only as the VM's MAC and leased address (netguard)."""
    bridge_ensure(sec)
    n = nc.names(got.tag.vm)
    name = n.tap
    if link(sec.namespace, name) is not None:
        raise Conflict(f"network device {name} already exists", "remove it first (tap-detach)")
    _new_tap(sec.namespace, n, got.tag, uid, gid)
    try:
        guard(sec.namespace, name, nc.mac_for(got.tag.vm), got.ip)
        ip(sec.namespace, "link", "set", name, "master", sec.bridge)
        ip(sec.namespace, "link", "set", name, "up")
    except BaseException:
        ip(sec.namespace, "link", "del", name, ok_codes=(0, 1, 2))
        unguard(sec.namespace, name)
        raise
    return name


def guard(ns: str, tap: str, mac: str, addr: str) -> None:
    """The tap's anti-spoofing chain (``helper.net.guard``), a leftover replaced."""
    unguard(ns, tap)
    for args in netguard.plan(tap, mac, addr):
        in_ns(ns, "ebtables", args)


def unguard(ns: str, tap: str) -> None:
    for args in netguard.unplan(tap):
        in_ns(ns, "ebtables", args, ok_codes=(0, 1, 2))  # 1, 2: already gone


def tap_detach(sec: NetSection, name: str, uid: int, adopt: nc.Tag | None = None) -> None:
    _delete_link(sec, name, uid, adopt, what="tap", link_kind="tun", kind_name="tun/tap")
    unguard(sec.namespace, name)


def _delete_link(sec: NetSection, name: str, uid: int, adopt: nc.Tag | None, *, what: str,
                 link_kind: str, kind_name: str) -> None:
    """Delete the caller's tagged link ``name`` of ``link_kind`` (else NotFound/refused)."""
    d = link(sec.namespace, name)
    if d is None:
        raise NotFound(f"{what} {name} does not exist in {where(sec)}", "")
    if kind(d) != link_kind:
        raise UsageError(f"{name} is not a {kind_name} device",
                         f"kiln only deletes its own {what}s")
    _check_owner(what, name, nc.parse_tag(d.get("ifalias")), uid, adopt)
    ip(sec.namespace, "link", "del", name)


def netns_create(sec: NetSection, got: nc.Lease, uid: int, gid: int) -> nc.Names:
    """The VM's namespace: veth pair to the bridge holding the lease, tap holding the link's
    first address, NAT between lease and guest (isolation = netns)."""
    bridge_ensure(sec)
    n, tag, ns = nc.names(got.vm), got.tag, sec.namespace
    if (NETNS_DIR / n.netns).exists() or link(ns, n.veth) is not None:
        raise Conflict(f"network namespace {n.netns} already exists",
                       "remove it first (netns-delete)")
    tap_addr, guest = nc.netns_link_addresses(sec)
    _drop_leftover(ns, n.tmp, "veth")
    ip("", "netns", "add", n.netns)  # untagged for a moment: see observe's adoption
    try:
        ip(n.netns, "link", "set", "lo", "alias", tag.text())  # the owner, first thing
        ip(n.netns, "link", "set", "lo", "up")
        ip(ns, "link", "add", n.tmp, "type", "veth", "peer", "name", n.peer, "netns", n.netns)
        ip(ns, "link", "set", n.tmp, "alias", tag.text())
        ip(ns, "link", "set", n.tmp, "name", n.veth)
        ip(ns, "link", "set", n.veth, "master", sec.bridge)
        ip(ns, "link", "set", n.veth, "up")
        ip(n.netns, "addr", "add", f"{got.ip}/{sec.network.prefixlen}", "dev", n.peer)
        ip(n.netns, "link", "set", n.peer, "up")
        ip(n.netns, "route", "add", "default", "via", sec.gateway)
        _new_tap(n.netns, n, tag, uid, gid)
        ip(n.netns, "addr", "add", tap_addr, "dev", n.tap)
        ip(n.netns, "link", "set", n.tap, "up")
        set_forwarding(n.netns)
        apply(n.netns, [
            ["-t", "nat", "-A", "PREROUTING", "-i", n.peer, "-d", f"{got.ip}/32",
             "-j", "DNAT", "--to-destination", guest],
            ["-t", "nat", "-A", "POSTROUTING", "-o", n.peer, "-s", f"{guest}/32",
             "-j", "SNAT", "--to-source", got.ip],
        ])
    except BaseException:
        _drop_netns(ns, n)
        raise
    return n


def _drop_netns(ns: str, n: nc.Names) -> None:
    # The veth first: deleting a namespace frees its devices asynchronously, and the kiln
    # end on the bridge would linger for a moment.
    ip(ns, "link", "del", n.veth, ok_codes=(0, 1, 2))
    ip(ns, "link", "del", n.tmp, ok_codes=(0, 1, 2))  # (a create cut short)
    ip("", "netns", "del", n.netns, ok_codes=(0, 1, 2))


def netns_delete(sec: NetSection, name: str, uid: int, adopt: nc.Tag | None = None) -> None:
    if not (NETNS_DIR / name).exists():
        raise NotFound(f"network namespace {name} does not exist", "")
    _check_owner("network namespace", name, netns_tag(name), uid, adopt)
    s = name[3:]
    _drop_netns(sec.namespace, nc.Names(nc.TAP + s, nc.VETH + s, nc.PEER + s, name,
                                        nc.TMP + s))


def veth_delete(sec: NetSection, name: str, uid: int, adopt: nc.Tag | None = None) -> None:
    _delete_link(sec, name, uid, adopt, what="veth", link_kind="veth", kind_name="veth")


# -- NAT and forwards -----------------------------------------------------------------------


def nat_ensure(sec: NetSection) -> bool:
    """Masquerade the subnet and accept the bridge's forwarded traffic; whether it changed."""
    if not sec.nat:
        raise UsageError("NAT is off in the trusted config ([net] nat = false)",
                         "an administrator sets [net] nat = true in /etc/kiln/config.toml")
    check_namespace(sec)
    with netlease.lease_book(sec):  # read-plan-apply under the network's lock
        cur = rules(sec.namespace)
        plan = (nc.ensure_chain_plan(cur, "nat", nc.MASQ_CHAIN, nc.masq_rules(sec))
                + nc.ensure_chain_plan(cur, "filter", nc.FWD_CHAIN,
                                       nc.forward_accept_rules(sec)))
        set_forwarding(sec.namespace)  # left on afterwards: others may rely on it by then
        apply(sec.namespace, plan)
    return bool(plan)


def nat_remove(sec: NetSection) -> dict[str, Any]:
    """Remove kiln's NAT rules, unless a VM still holds a lease."""
    check_namespace(sec)
    with netlease.lease_book(sec) as box:  # no lease can appear meanwhile
        leases = len(box[0].leases)
        if leases:
            return {"removed": False, "leases": leases}
        cur = rules(sec.namespace)
        plan = (nc.remove_chain_plan(cur, "nat", nc.MASQ_CHAIN)
                + nc.remove_chain_plan(cur, "filter", nc.FWD_CHAIN))
        apply(sec.namespace, plan)
    return {"removed": bool(plan), "leases": 0}


def forwards(sec: NetSection) -> list[nc.Forward]:
    rs = nc.chain_rules(rules(sec.namespace, ("nat",))["nat"], nc.DNAT_CHAIN)
    return [f for r in rs if (f := nc.parse_forward(r)) is not None]


def forward_add(sec: NetSection, got: nc.Lease, host_port: int, guest_port: int,
                capped: bool = True) -> nc.Forward:
    """``capped``: the lease's uid may hold at most ``[net] max_forwards_per_user``."""
    check_namespace(sec)
    fwd = nc.Forward(got.tag, host_port, guest_port, got.ip)
    with netlease.lease_book(sec):  # the port check, the cap and the rule: one step
        existing = forwards(sec)
        for f in existing:
            if f.host_port == host_port:
                raise Conflict(f"port {host_port} is already forwarded (to VM {f.tag.vm})",
                               "choose another host port")
        held = sum(1 for f in existing if f.tag.uid == got.uid)
        if capped and held >= sec.max_forwards_per_user:
            raise Conflict(f"uid {got.uid} already holds {held} port forwards (the most "
                           "[net] max_forwards_per_user allows)", "remove some first")
        cur = rules(sec.namespace, ("nat",))
        have = nc.chain_rules(cur["nat"], nc.DNAT_CHAIN)
        apply(sec.namespace, nc.ensure_chain_plan(cur, "nat", nc.DNAT_CHAIN, have,
                                                  nc.jump_rules(sec, "nat", nc.DNAT_CHAIN)))
        ipt(sec.namespace, ["-t", "nat", "-A", nc.DNAT_CHAIN, *nc.forward_rule(sec, fwd)])
    return fwd


def forward_remove(sec: NetSection, vm: str, uid: int, host_port: int | None) -> list[int]:
    """Remove the VM's forwards (one port, or all); the chain goes with the last one."""
    check_namespace(sec)
    with netlease.lease_book(sec):
        doomed = [f for f in forwards(sec) if f.tag.vm == vm
                  and (host_port is None or f.host_port == host_port)]
        if not doomed:
            what = f"port {host_port}" if host_port is not None else "any port"
            raise NotFound(f"VM {vm} has no forward of {what}", "")
        for f in doomed:
            if f.tag.uid != uid:
                raise UsageError(f"refusing the forward of port {f.host_port}: it belongs to "
                                 f"uid {f.tag.uid}", "only its owner removes it")
        drop_forwards(sec, doomed)
    return [f.host_port for f in doomed]


def drop_forwards(sec: NetSection, doomed: list[nc.Forward]) -> None:
    """Delete these forwards' rules; the chain goes with the last (lease lock held)."""
    for f in doomed:
        ipt(sec.namespace, ["-t", "nat", "-D", nc.DNAT_CHAIN, *nc.forward_rule(sec, f)])
    if doomed:
        cur = rules(sec.namespace, ("nat",))
        if not nc.chain_rules(cur["nat"], nc.DNAT_CHAIN):
            apply(sec.namespace, nc.remove_chain_plan(cur, "nat", nc.DNAT_CHAIN))
