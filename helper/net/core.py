"""The kiln network's pure logic: names, MACs, ownership tags, address leases, guest
addressing, route overlap, iptables plans and reconcile decisions (no I/O; property-tested).

Names (≤ 15 bytes, IFNAMSIZ - 1) come from the VM id — the id itself when it has at most
12 characters (kiln's ids have exactly 12), else 12 base32 characters of its sha256:

* ``kt-ID`` the tap, ``kv-ID`` the veth end on the bridge, ``kp-ID`` its peer inside the VM's
  namespace, ``kn-ID`` that namespace (isolation = netns).

Ownership: every link kiln makes carries an interface alias ``kiln vm=ID root=KEY uid=N``
(the VM, the kiln root's key, the caller's uid); a port forward carries the same text as its
iptables comment, a lease the same three fields. A caller acts only on objects whose tag has
its uid, and a reconcile only on those of the root it names — another user's, another
root's, and untagged objects are never touched.

Leases: one book per kiln network (namespace + bridge). ``allocate`` hands out the next free
host address after the last one handed out (round robin, not the lowest free: a released
address comes back only when the cursor has gone round to it, so stale ARP entries and
conntrack state rarely meet a new VM), never the network, broadcast or gateway address,
never one that is leased.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from helper.base.errors import Conflict, KilnError, NotFound, UsageError
from helper.net.config import NetSection

SHORT = 12
TAP, VETH, PEER, NETNS = "kt-", "kv-", "kp-", "kn-"
TMP = "kx-"  # a link's name while kiln creates and tags it (renamed once tagged)
VM_PATTERN = r"^[a-z2-7]{1,32}$"
ROOT_PATTERN = r"^[a-z2-7]{8}$"
SHORT_PATTERN = r"[a-z2-7]{1,12}"
NETNS_PATTERN = rf"^{NETNS}{SHORT_PATTERN}$"
_VM_RE = re.compile(VM_PATTERN)
_TAG_RE = re.compile(r"^kiln vm=([a-z2-7]{1,32}) root=([a-z2-7]{8}) uid=([0-9]{1,10})$")

# -- names, MACs, tags ----------------------------------------------------------------------


def short_id(vm: str) -> str:
    if not _VM_RE.fullmatch(vm):
        raise UsageError(f"invalid VM id {vm!r}", "VM ids are 1-32 characters of a-z and 2-7")
    if len(vm) <= SHORT:
        return vm
    return base64.b32encode(hashlib.sha256(vm.encode()).digest()).decode().lower()[:SHORT]


@dataclass(frozen=True)
class Names:
    tap: str
    veth: str  # on the bridge, in the kiln namespace
    peer: str  # inside the VM's namespace
    netns: str
    tmp: str  # the tap's (isolation none) or the veth's name until it is tagged


def names(vm: str) -> Names:
    s = short_id(vm)
    return Names(TAP + s, VETH + s, PEER + s, NETNS + s, TMP + s)


def bridge_tmp(bridge: str) -> str:
    """The bridge's name until it is tagged (``kilnXYZ`` → ``kx-XYZ``; injective)."""
    return TMP + bridge[4:]


def mac_for(vm: str) -> str:
    """A stable, locally administered unicast MAC for the VM (02:… + 40 bits of a hash)."""
    short_id(vm)  # validates
    h = hashlib.sha256(b"kiln-mac\0" + vm.encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *h[:5]))


@dataclass(frozen=True)
class Tag:
    """Who an object belongs to."""

    vm: str
    root: str
    uid: int

    def text(self) -> str:
        return f"kiln vm={self.vm} root={self.root} uid={self.uid}"


def parse_tag(text: str | None) -> Tag | None:
    m = _TAG_RE.fullmatch(text or "")
    return Tag(m.group(1), m.group(2), int(m.group(3))) if m else None


# -- leases -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lease:
    vm: str
    root: str
    uid: int
    ip: str

    @property
    def tag(self) -> Tag:
        return Tag(self.vm, self.root, self.uid)


@dataclass(frozen=True)
class Book:
    """Every address of one kiln network that is handed out, and the last one handed out."""

    leases: tuple[Lease, ...] = ()
    cursor: str | None = None

    def get(self, vm: str) -> Lease | None:
        return next((lease for lease in self.leases if lease.vm == vm), None)

    def dumps(self) -> str:
        return json.dumps({"cursor": self.cursor, "leases": [
            {"vm": x.vm, "root": x.root, "uid": x.uid, "ip": x.ip} for x in self.leases]},
            sort_keys=True)


def load_book(text: str) -> Book:
    """A book from its file; anything malformed is an error (never guessed around)."""
    if not text.strip():
        return Book()
    try:
        doc = json.loads(text)
        leases = tuple(Lease(str(x["vm"]), str(x["root"]), int(x["uid"]), str(x["ip"]))
                       for x in doc["leases"])
        cursor = doc.get("cursor")
        for x in leases:
            ipaddress.IPv4Address(x.ip)
    except (ValueError, KeyError, TypeError) as e:
        raise KilnError(f"the address lease file is corrupt: {e}",
                        "stop kiln's VMs and remove it (it lives under /run/kiln/net)") from None
    return Book(leases, str(cursor) if cursor else None)


def allocate(sec: NetSection, book: Book, tag: Tag, capped: bool = True) -> tuple[Book, Lease]:
    """The VM's lease (its existing one for the same owner) and the new book (pure).
    ``capped``: the owner may hold at most ``[net] max_leases_per_user`` leases (one caller
    cannot take the whole subnet); in-process root callers are not capped."""
    old = book.get(tag.vm)
    if old is not None:
        if old.tag != tag:
            raise Conflict(f"VM {tag.vm} already has an address lease of another owner",
                           "VM ids are unique per root: is another kiln using this id?")
        return book, old
    held = sum(1 for x in book.leases if x.uid == tag.uid)
    if capped and held >= sec.max_leases_per_user:
        raise Conflict(f"uid {tag.uid} already holds {held} address leases (the most "
                       "[net] max_leases_per_user allows)", "stop some of its VMs first")
    net = sec.network
    reserved = {net.network_address, net.broadcast_address, ipaddress.IPv4Address(sec.gateway)}
    taken = {ipaddress.IPv4Address(x.ip) for x in book.leases} | reserved
    first, last = int(net.network_address) + 1, int(net.broadcast_address) - 1
    size = last - first + 1
    start = first
    if book.cursor is not None:
        cur = ipaddress.IPv4Address(book.cursor)
        if cur in net:
            start = int(cur) + 1
    for i in range(size):
        cand = ipaddress.IPv4Address(first + (start - first + i) % size)
        if cand not in taken:
            lease = Lease(tag.vm, tag.root, tag.uid, str(cand))
            return Book((*book.leases, lease), str(cand)), lease
    raise Conflict(f"no free address left in {sec.subnet} ({len(book.leases)} leased)",
                   "stop some VMs, or give [net] subnet more room")


def release(book: Book, vm: str, uid: int) -> tuple[Book, Lease]:
    lease = book.get(vm)
    if lease is None:
        raise NotFound(f"VM {vm} has no address lease", "")
    if lease.uid != uid:
        raise UsageError(f"the address lease of VM {vm} belongs to uid {lease.uid}",
                         "only its owner releases it")
    return replace(book, leases=tuple(x for x in book.leases if x.vm != vm)), lease


# -- guest addressing -----------------------------------------------------------------------


@dataclass(frozen=True)
class GuestNet:
    """What the guest configures on eth0 (the ``net-lease`` answer's fields)."""

    ip: str  # the guest's own address
    prefix: int
    gateway: str
    mac: str
    dns: tuple[str, ...] = ()


def guest_net(sec: NetSection, lease: Lease) -> GuestNet:
    mac = mac_for(lease.vm)
    if sec.isolation == "netns":
        link = sec.link
        hosts = list(link.hosts())[:2]
        return GuestNet(str(hosts[1]), link.prefixlen, str(hosts[0]), mac, sec.dns)
    return GuestNet(lease.ip, sec.network.prefixlen, sec.gateway, mac, sec.dns)


def netns_link_addresses(sec: NetSection) -> tuple[str, str]:
    """(tap address/prefix, guest address) inside a VM namespace."""
    hosts = list(sec.link.hosts())[:2]
    return f"{hosts[0]}/{sec.link.prefixlen}", str(hosts[1])


# -- host routes ----------------------------------------------------------------------------


def overlapping_routes(net: ipaddress.IPv4Network, routes: Iterable[Mapping[str, Any]],
                       bridge: str) -> list[str]:
    """Routes (``ip -j -4 route show table all`` entries) that overlap ``net``, except the
    default route and the kiln bridge's own."""
    out: list[str] = []
    for r in routes:
        dst = str(r.get("dst", ""))
        if dst in ("", "default") or r.get("dev") == bridge:
            continue
        try:
            rnet = ipaddress.IPv4Network(dst, strict=False)
        except ValueError:
            continue
        if rnet.prefixlen == 0:
            continue
        if rnet.overlaps(net):
            out.append(f"{dst} dev {r.get('dev', '?')}")
    return out


# -- iptables -------------------------------------------------------------------------------

JUMP_COMMENT = "kiln"
MASQ_CHAIN, FWD_CHAIN, DNAT_CHAIN = "KILN-POSTROUTING", "KILN-FORWARD", "KILN-DNAT"
# (table, kiln chain) -> the built-in chains that jump to it
JUMPS: dict[tuple[str, str], tuple[str, ...]] = {
    ("nat", MASQ_CHAIN): ("POSTROUTING",),
    ("filter", FWD_CHAIN): ("FORWARD",),
    ("nat", DNAT_CHAIN): ("PREROUTING", "OUTPUT"),
}


def parse_rules(text: str) -> list[list[str]]:
    """``iptables -S`` output → rules as argument lists (``-N``/``-A``/``-P`` lines)."""
    return [shlex.split(line) for line in text.splitlines() if line.strip()]


def chain_rules(rules: Sequence[Sequence[str]], chain: str) -> list[list[str]]:
    """The ``-A CHAIN …`` rules of ``chain``, without the ``-A CHAIN``."""
    return [list(r[2:]) for r in rules if len(r) >= 2 and r[0] == "-A" and r[1] == chain]


def has_chain(rules: Sequence[Sequence[str]], chain: str) -> bool:
    return any(len(r) >= 2 and r[0] == "-N" and r[1] == chain for r in rules)


def jump_rule(chain: str) -> list[str]:
    return ["-m", "comment", "--comment", JUMP_COMMENT, "-j", chain]


def jump_rules(sec: NetSection, table: str, chain: str) -> dict[str, list[str]]:
    """Each built-in parent's jump to ``chain``, exactly as ``iptables -S`` prints it.
    PREROUTING → KILN-DNAT skips packets from the bridge: a forward is for the host side,
    and matching the VMs' own packets to GATEWAY:PORT would hand one user's VM the
    connections other users' VMs make to the gateway. OUTPUT (the kiln namespace's own
    processes) keeps the plain jump (``-i`` is meaningless there, and they must reach it)."""
    plain = jump_rule(chain)
    return {p: (["!", "-i", sec.bridge, *plain] if (table, chain, p) == ("nat", DNAT_CHAIN,
                                                                        "PREROUTING")
                else plain) for p in JUMPS[(table, chain)]}


def masq_rules(sec: NetSection) -> list[list[str]]:
    return [["-s", sec.subnet, "!", "-o", sec.bridge, "-j", "MASQUERADE"]]


def forward_accept_rules(sec: NetSection) -> list[list[str]]:
    return [["-i", sec.bridge, "-j", "ACCEPT"],
            ["-o", sec.bridge, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED",
             "-j", "ACCEPT"]]


def ensure_chain_plan(current: Mapping[str, Sequence[Sequence[str]]], table: str, chain: str,
                      want: Sequence[Sequence[str]],
                      jumps: Mapping[str, Sequence[str]] | None = None) -> list[list[str]]:
    """iptables argument lists that make ``chain`` of ``table`` hold exactly ``want`` and be
    jumped to from its built-in chains by exactly ``jumps`` (parent → rule; default: the
    plain ``jump_rule``); any other jump to it there goes (an older, wider form) (pure;
    nothing when it already is so)."""
    rules = current.get(table, [])
    plan: list[list[str]] = []
    if not has_chain(rules, chain):
        plan.append(["-t", table, "-N", chain])
    if chain_rules(rules, chain) != [list(w) for w in want]:
        if has_chain(rules, chain):
            plan.append(["-t", table, "-F", chain])
        plan += [["-t", table, "-A", chain, *w] for w in want]
    for parent in JUMPS[(table, chain)]:
        jump = list(jumps[parent]) if jumps is not None else jump_rule(chain)
        have = chain_rules(rules, parent)
        if jump not in have:
            plan.append(["-t", table, "-I", parent, "1", *jump])
        plan += [["-t", table, "-D", parent, *r] for r in have
                 if r[-2:] == ["-j", chain] and r != jump]
    return plan


def remove_chain_plan(current: Mapping[str, Sequence[Sequence[str]]], table: str,
                      chain: str) -> list[list[str]]:
    """Delete every jump to ``chain``, flush it, delete it (pure; nothing if absent)."""
    rules = current.get(table, [])
    plan = [["-t", table, "-D", parent, *r] for parent in JUMPS[(table, chain)]
            for r in chain_rules(rules, parent) if r[-2:] == ["-j", chain]]
    if has_chain(rules, chain):
        plan += [["-t", table, "-F", chain], ["-t", table, "-X", chain]]
    return plan


@dataclass(frozen=True)
class Forward:
    """A TCP port forward: the kiln namespace's GATEWAY:HOST → the VM's HOST:GUEST."""

    tag: Tag
    host_port: int
    guest_port: int
    dest: str  # the VM's reachable address


def forward_rule(sec: NetSection, f: Forward) -> list[str]:
    """The rule, in the exact form ``iptables -S`` prints it back."""
    return ["-d", f"{sec.gateway}/32", "-p", "tcp", "-m", "tcp", "--dport", str(f.host_port),
            "-m", "comment", "--comment", f.tag.text(),
            "-j", "DNAT", "--to-destination", f"{f.dest}:{f.guest_port}"]


def parse_forward(rule: Sequence[str]) -> Forward | None:
    """A rule of ``KILN-DNAT`` (as ``chain_rules`` gives it) → Forward, or None."""
    r = list(rule)

    def after(flag: str) -> str | None:
        return r[r.index(flag) + 1] if flag in r and r.index(flag) + 1 < len(r) else None

    tag = parse_tag(after("--comment"))
    dport, dest = after("--dport"), after("--to-destination")
    if tag is None or dport is None or dest is None or not dport.isdigit() or ":" not in dest:
        return None
    ip, _, port = dest.rpartition(":")
    if not port.isdigit():
        return None
    return Forward(tag, int(dport), int(port), ip)


# -- reconcile ------------------------------------------------------------------------------

KINDS = ("forward", "tap", "netns", "veth", "lease")  # removal order


@dataclass(frozen=True)
class Obj:
    """One kiln network object as observed: its kind, name (iface / netns / host port /
    VM id for a lease) and tag (None: not kiln-tagged, never touched)."""

    kind: str
    name: str
    tag: Tag | None
    adopted: bool = False  # untagged, kiln-named after a lease of ``tag``'s owner (a crash
    # between creating and tagging): that owner's reconcile removes it


def mine(o: Obj, root: str | None, uid: int) -> bool:
    return o.tag is not None and o.tag.uid == uid and (root is None or o.tag.root == root)


def reclaim_plan(objs: Iterable[Obj], root: str, keep: Iterable[str], uid: int,
                 only: Iterable[str] | None = None) -> list[Obj]:
    """What a reconcile of ``root`` by ``uid`` removes: that root's objects of that uid
    whose VM is not in ``keep`` (and, with ``only``, is in it), forwards first and leases
    last (pure). A VM namespace takes its veth pair and tap with it, so those are not
    listed twice. ``only`` lets a caller name the VMs it knows are gone: a VM born after
    the caller looked is then never in reach (``keep`` alone cannot promise that)."""
    kept = set(keep)
    chosen = None if only is None else set(only)
    doomed = [o for o in objs if mine(o, root, uid) and o.tag is not None
              and o.tag.vm not in kept and (chosen is None or o.tag.vm in chosen)]
    in_netns = {o.tag.vm for o in doomed if o.kind == "netns" and o.tag is not None}
    doomed = [o for o in doomed if not (o.kind == "veth" and o.tag is not None
                                        and o.tag.vm in in_netns)]
    return sorted(doomed, key=lambda o: (KINDS.index(o.kind), o.name))
