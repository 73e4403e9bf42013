"""The kiln network's pure logic (helper/net/core.py, helper/net/config.py): names, MACs, tags,
address leases, guest addressing, route overlap, iptables plans, reconcile decisions."""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from helper import config, configbase
from helper.base.errors import Conflict, KilnError, NotFound, UsageError
from helper.net import core as nc
from helper.net import tap
from helper.net.config import NetSection
from helper.ops import registry as ops

VM = st.text("abcdefghijklmnopqrstuvwxyz234567", min_size=1, max_size=32)
ROOT = st.text("abcdefghijklmnopqrstuvwxyz234567", min_size=8, max_size=8)


# -- names, MACs, tags ----------------------------------------------------------------------


@settings(max_examples=300)
@given(VM)
def test_names_fit_ifnamsiz_and_the_patterns(vm: str) -> None:
    n = nc.names(vm)
    for name in (n.tap, n.veth, n.peer, n.netns):
        assert len(name.encode()) <= 15
    assert re.fullmatch(tap.NAME_PATTERN, n.tap)
    assert re.fullmatch(nc.NETNS_PATTERN, n.netns)
    assert {n.tap[3:], n.veth[3:], n.peer[3:], n.netns[3:]} == {nc.short_id(vm)}
    assert n.tap == ("kt-" + vm if len(vm) <= 12 else n.tap)


@settings(max_examples=200)
@given(VM, VM)
def test_distinct_ids_get_distinct_names_and_macs(a: str, b: str) -> None:
    if a != b:
        assert nc.names(a).tap != nc.names(b).tap
        assert nc.mac_for(a) != nc.mac_for(b)


@given(VM)
def test_mac_is_stable_unicast_and_locally_administered(vm: str) -> None:
    mac = nc.mac_for(vm)
    assert re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", mac)
    assert mac == nc.mac_for(vm)
    assert int(mac[:2], 16) == 0x02  # bit 0 clear: unicast; bit 1 set: locally administered


@pytest.mark.parametrize("vm", ["", "ABC", "a-b", "a" * 33, "kt-x", "eth0", "a\n"])
def test_foreign_vm_ids_are_refused(vm: str) -> None:
    with pytest.raises(UsageError) as e:
        nc.names(vm)
    assert e.value.message == f"invalid VM id {vm!r}"


@given(VM, ROOT, st.integers(0, 2**32 - 1))
def test_tag_round_trip(vm: str, root: str, uid: int) -> None:
    t = nc.Tag(vm, root, uid)
    assert nc.parse_tag(t.text()) == t


@settings(max_examples=300)
@given(st.text(max_size=80))
def test_parse_tag_takes_only_the_exact_form(text: str) -> None:
    tag = nc.parse_tag(text)
    assert tag is None or tag.text() == text
    for junk in ("kiln bridge", "kiln vm=abc root=abcdefgh uid=0 ", "kiln vm=ABC root=abcdefgh "
                 "uid=0", "kiln vm=abc root=abcdefg uid=0", None, ""):
        assert nc.parse_tag(junk) is None


# -- the [net] section --------------------------------------------------------------------


@pytest.mark.parametrize(("toml", "message"), [
    ('bridge = "br0"', "config: net.bridge: String should match pattern "
                       "'^kiln[a-z0-9-]{1,11}$'"),
    ('bridge = "kilnabcdefghijkl"', "config: net.bridge: String should match pattern "
                                    "'^kiln[a-z0-9-]{1,11}$'"),  # 16 bytes
    ('gateway = "10.9.0.1"', "config: net: Value error, gateway 10.9.0.1 is not a host "
                             "address of subnet 10.213.0.0/24"),
    ('gateway = "10.213.0.255"', "config: net: Value error, gateway 10.213.0.255 is not a host "
                                 "address of subnet 10.213.0.0/24"),
    ('subnet = "10.213.0.1/24"', "config: net.subnet: Value error, subnet '10.213.0.1/24' is "
                                 "not an IPv4 network (a.b.c.d/N, host bits zero): "
                                 "10.213.0.1/24 has host bits set"),
    ('subnet = "10.213.0.0/30"\ngateway = "10.213.0.1"',
     "config: net.subnet: Value error, subnet '10.213.0.0/30' must have a prefix between /8 "
     "and /29"),
    ('netns_subnet = "10.213.0.0/30"', "config: net: Value error, netns_subnet 10.213.0.0/30 "
                                       "overlaps subnet 10.213.0.0/24"),
    ('isolation = "vlan"', "config: net.isolation: Input should be 'none' or 'netns'"),
    ('nat = "yes"', "config: net.nat: Input should be a valid boolean"),
    ('namespace = "../x"', "config: net.namespace: String should match pattern "
                           "'^(|[a-z0-9][a-z0-9_-]{0,63})$'"),
    ('dns = ["x"]', "config: net.dns: Value error, dns 'x' is not an IPv4 address"),
    ('interface = "eth0"', "config: net.interface: Extra inputs are not permitted"),
])
def test_net_section_refusals(toml: str, message: str) -> None:
    with pytest.raises(configbase.UntrustedConfig) as e:
        config.parse(f"[net]\n{toml}\n".encode())
    assert e.value.message == message


def test_net_section_defaults_and_tools() -> None:
    cfg = config.parse(b"")
    assert cfg.net == NetSection()
    assert (cfg.net.bridge, cfg.net.subnet, cfg.net.gateway, cfg.net.isolation, cfg.net.nat,
            cfg.net.namespace) == ("kilnbr0", "10.213.0.0/24", "10.213.0.1", "none", False, "")
    assert configbase.DEFAULT_TOOLS["iptables"] == "/usr/sbin/iptables"
    assert configbase.DEFAULT_TOOLS["sysctl"] == "/usr/sbin/sysctl"
    for field, info in NetSection.model_fields.items():
        assert info.description, field


# -- leases -----------------------------------------------------------------------------------

SMALL = NetSection(subnet="10.9.0.0/29", gateway="10.9.0.1")  # hosts .1-.6, gateway .1


def tag(vm: str, root: str = "rootkeya", uid: int = 0) -> nc.Tag:
    return nc.Tag(vm, root, uid)


def test_allocation_order_reuse_and_exhaustion() -> None:
    book = nc.Book()
    got = []
    for vm in "abcde":
        book, lease = nc.allocate(SMALL, book, tag(vm))
        got.append(lease.ip)
    assert got == ["10.9.0.2", "10.9.0.3", "10.9.0.4", "10.9.0.5", "10.9.0.6"]
    assert nc.allocate(SMALL, book, tag("c"))[1].ip == "10.9.0.4"  # idempotent for its owner
    with pytest.raises(Conflict) as e:
        nc.allocate(SMALL, book, tag("f"))
    assert e.value.message == "no free address left in 10.9.0.0/29 (5 leased)"
    with pytest.raises(Conflict) as e:
        nc.allocate(SMALL, book, tag("c", root="rootkeyb"))
    assert e.value.message == "VM c already has an address lease of another owner"
    book, gone = nc.release(book, "b", 0)
    assert gone.ip == "10.9.0.3"
    book, lease = nc.allocate(SMALL, book, tag("g"))
    assert lease.ip == "10.9.0.3"  # the only free one
    book, _ = nc.release(book, "d", 0)  # .5
    book, _ = nc.release(book, "a", 0)  # .2
    # Round robin from the last one handed out (.3): .4 is c's, .5 is free again.
    assert [nc.allocate(SMALL, book, tag("h"))[1].ip] == ["10.9.0.5"]
    book, _ = nc.allocate(SMALL, book, tag("h"))
    assert nc.allocate(SMALL, book, tag("i"))[1].ip == "10.9.0.2"  # .6 e, .1 gateway, .2


def test_release_refusals() -> None:
    book, _ = nc.allocate(SMALL, nc.Book(), tag("a", uid=1000))
    with pytest.raises(NotFound) as e:
        nc.release(book, "b", 1000)
    assert e.value.message == "VM b has no address lease"
    with pytest.raises(UsageError) as e2:
        nc.release(book, "a", 1001)
    assert e2.value.message == "the address lease of VM a belongs to uid 1000"


OPS = st.lists(st.tuples(st.sampled_from(["lease", "release"]),
                         st.sampled_from(list("abcdefghij"))), max_size=60)


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_leases_are_never_handed_out_twice(ops: list[tuple[str, str]]) -> None:
    book = nc.Book()
    net = SMALL.network
    for op, vm in ops:
        before = book
        if op == "lease":
            try:
                book, lease = nc.allocate(SMALL, book, tag(vm))
            except Conflict:
                assert len(book.leases) == 5
                assert book.get(vm) is None
                continue
            addr = ipaddress.IPv4Address(lease.ip)
            assert addr in net
            assert addr not in (net.network_address, net.broadcast_address,
                                                ipaddress.IPv4Address(SMALL.gateway))
            old = before.get(vm)
            assert old is None or old == lease  # a VM keeps its address
            assert old is not None or lease.ip not in {x.ip for x in before.leases}
        else:
            try:
                book, _ = nc.release(book, vm, 0)
            except NotFound:
                assert before.get(vm) is None
        ips = [x.ip for x in book.leases]
        assert len(ips) == len(set(ips))
        assert len({x.vm for x in book.leases}) == len(book.leases)
        assert nc.load_book(book.dumps()) == book  # the file round-trips


@pytest.mark.parametrize("text", ['{"leases": [{"vm": "a"}]}', "[1]", '{"leases": '
                                  '[{"vm": "a", "root": "r", "uid": 0, "ip": "x"}]}', "{"])
def test_corrupt_lease_file_is_an_error(text: str) -> None:
    with pytest.raises(KilnError) as e:
        nc.load_book(text)
    assert e.value.message.startswith("the address lease file is corrupt: ")


# -- guest addressing -----------------------------------------------------------------------


def test_guest_net() -> None:
    lease = nc.Lease("abcdefghijkl", "rootkeya", 0, "10.213.0.7")
    plain = nc.guest_net(NetSection(dns=("192.0.2.53",)), lease)
    assert plain == nc.GuestNet("10.213.0.7", 24, "10.213.0.1", nc.mac_for("abcdefghijkl"),
                                ("192.0.2.53",))
    iso = nc.guest_net(NetSection(isolation="netns"), lease)
    assert (iso.ip, iso.prefix, iso.gateway) == ("172.16.0.2", 30, "172.16.0.1")
    assert nc.netns_link_addresses(NetSection()) == ("172.16.0.1/30", "172.16.0.2")


def test_overlapping_routes() -> None:
    routes: list[dict[str, Any]] = [
        {"dst": "default", "gateway": "192.0.2.1", "dev": "eth0"},
        {"dst": "0.0.0.0/0", "dev": "wg0"},
        {"dst": "10.213.0.0/24", "dev": "kilnbr0"},  # kiln's own
        {"dst": "10.0.0.0/8", "dev": "eth1"},
        {"dst": "10.213.0.9", "dev": "tun0", "type": "local"},
        {"dst": "192.168.1.0/24", "dev": "eth0"},
        {"dst": "ff00::/8", "dev": "eth0"},
    ]
    assert nc.overlapping_routes(ipaddress.IPv4Network("10.213.0.0/24"), routes, "kilnbr0") == [
        "10.0.0.0/8 dev eth1", "10.213.0.9 dev tun0"]
    assert nc.overlapping_routes(ipaddress.IPv4Network("172.20.0.0/16"), routes, "kilnbr0") == []


# -- iptables plans -------------------------------------------------------------------------


def simulate(current: dict[str, list[list[str]]], plan: list[list[str]]
             ) -> dict[str, list[list[str]]]:
    """Apply a plan to an ``iptables -S``-shaped model (what the kernel would hold)."""
    out = {t: [list(r) for r in rs] for t, rs in current.items()}
    for step in plan:
        assert step[0] == "-t"
        table, verb, chain, rest = step[1], step[2], step[3], step[4:]
        rules = out.setdefault(table, [])
        if verb == "-N":
            rules.append(["-N", chain])
        elif verb == "-X":
            rules.remove(["-N", chain])
        elif verb == "-F":
            out[table] = [r for r in rules if not (r[0] == "-A" and r[1] == chain)]
        elif verb == "-A":
            rules.append(["-A", chain, *rest])
        elif verb == "-I":
            rules.insert(0, ["-A", chain, *rest[1:]])
        elif verb == "-D":
            rules.remove(["-A", chain, *rest])
    return out


def test_nat_plan_is_exact_idempotent_and_reversible() -> None:
    sec = NetSection(nat=True)
    empty: dict[str, list[list[str]]] = {"nat": nc.parse_rules("-P POSTROUTING ACCEPT\n"),
                                         "filter": []}
    plan = (nc.ensure_chain_plan(empty, "nat", nc.MASQ_CHAIN, nc.masq_rules(sec))
            + nc.ensure_chain_plan(empty, "filter", nc.FWD_CHAIN, nc.forward_accept_rules(sec)))
    assert plan == [
        ["-t", "nat", "-N", "KILN-POSTROUTING"],
        ["-t", "nat", "-A", "KILN-POSTROUTING", "-s", "10.213.0.0/24", "!", "-o", "kilnbr0",
         "-j", "MASQUERADE"],
        ["-t", "nat", "-I", "POSTROUTING", "1", "-m", "comment", "--comment", "kiln",
         "-j", "KILN-POSTROUTING"],
        ["-t", "filter", "-N", "KILN-FORWARD"],
        ["-t", "filter", "-A", "KILN-FORWARD", "-i", "kilnbr0", "-j", "ACCEPT"],
        ["-t", "filter", "-A", "KILN-FORWARD", "-o", "kilnbr0", "-m", "conntrack",
         "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"],
        ["-t", "filter", "-I", "FORWARD", "1", "-m", "comment", "--comment", "kiln",
         "-j", "KILN-FORWARD"],
    ]
    after = simulate(empty, plan)
    assert nc.ensure_chain_plan(after, "nat", nc.MASQ_CHAIN, nc.masq_rules(sec)) == []
    # A tampered chain is flushed and refilled, not appended to.
    tampered = simulate(after, [["-t", "nat", "-A", "KILN-POSTROUTING", "-j", "ACCEPT"]])
    fix = nc.ensure_chain_plan(tampered, "nat", nc.MASQ_CHAIN, nc.masq_rules(sec))
    assert fix[0] == ["-t", "nat", "-F", "KILN-POSTROUTING"]
    assert simulate(tampered, fix) == after
    gone = simulate(after, nc.remove_chain_plan(after, "nat", nc.MASQ_CHAIN)
                    + nc.remove_chain_plan(after, "filter", nc.FWD_CHAIN))
    assert gone == empty
    assert nc.remove_chain_plan(empty, "nat", nc.MASQ_CHAIN) == []


@given(VM, ROOT, st.integers(0, 2**32 - 1), st.integers(1, 65535), st.integers(1, 65535),
       st.ip_addresses(v=4))
def test_forward_rule_round_trips(vm: str, root: str, uid: int, hp: int, gp: int,
                                  dest: ipaddress.IPv4Address) -> None:
    f = nc.Forward(nc.Tag(vm, root, uid), hp, gp, str(dest))
    rule = nc.forward_rule(NetSection(), f)
    assert nc.parse_forward(rule) == f
    assert nc.parse_forward(rule[:-1]) is None


# -- reconcile ------------------------------------------------------------------------------

OBJ = st.builds(
    nc.Obj, st.sampled_from(nc.KINDS), st.text("abc23", min_size=1, max_size=5),
    st.one_of(st.none(), st.builds(nc.Tag, st.sampled_from(["v1", "v2", "v3"]),
                                   st.sampled_from(["rootkeya", "rootkeyb"]),
                                   st.sampled_from([0, 1000]))))


@settings(max_examples=300)
@given(st.lists(OBJ, max_size=30), st.sets(st.sampled_from(["v1", "v2", "v3"])),
       st.sampled_from([0, 1000]))
def test_reclaim_touches_only_the_roots_own_dead_objects(objs: list[nc.Obj], keep: set[str],
                                                         uid: int) -> None:
    plan = nc.reclaim_plan(objs, "rootkeya", keep, uid)
    for o in plan:
        assert o.tag is not None
        assert o.tag.root == "rootkeya"
        assert o.tag.uid == uid
        assert o.tag.vm not in keep
    doomed_ns = {o.tag.vm for o in plan if o.kind == "netns" and o.tag}
    for o in objs:
        if (o.tag and o.tag.root == "rootkeya" and o.tag.uid == uid and o.tag.vm not in keep
                and not (o.kind == "veth" and o.tag.vm in doomed_ns)):
            assert o in plan  # nothing of the root's dead VMs is left behind
    kinds = [nc.KINDS.index(o.kind) for o in plan]
    assert kinds == sorted(kinds)  # forwards first, leases last


# -- hostile requests (validation) --------------------------

HOSTILE: list[tuple[str, dict[str, Any]]] = [
    ("tap-detach", {"name": "eth0"}),
    ("tap-detach", {"name": "kt-abcdefghijklm"}),  # 16 bytes
    ("tap-detach", {"name": "kt-ABC"}),
    ("tap-detach", {"name": "kt-abc\n"}),
    ("tap-detach", {"name": "kt-аbc"}),  # Cyrillic a
    ("netns-delete", {"name": "kilnt0"}),
    ("netns-delete", {"name": "kn-../../proc/1/ns/net"}),
    ("netns-delete", {"name": "kn-abcdefghijklm"}),
    ("net-lease", {"vm": "-rf", "root": "netroota"}),
    ("net-lease", {"vm": "abc", "root": "ROOTKEYA"}),
    ("net-lease", {"vm": "abc", "root": "short"}),
    ("net-lease", {"vm": "abc", "root": "netroota", "ip": "10.0.0.5"}),
    ("bridge-ensure", {"bridge": "docker0"}),
    ("bridge-ensure", {"namespace": "other"}),
    ("tap-attach", {"vm": "abc", "uid": 0, "gid": 900000}),
    ("tap-attach", {"vm": "abc", "uid": "900000", "gid": 900000}),
    ("tap-attach", {"vm": "abc", "uid": 900000, "gid": 900000, "bridge": "br0"}),
    ("netns-create", {"vm": "a" * 33, "uid": 900000, "gid": 900000}),
    ("forward-add", {"vm": "abc", "host_port": 0, "guest_port": 80}),
    ("forward-add", {"vm": "abc", "host_port": 70000, "guest_port": 80}),
    ("forward-add", {"vm": "abc", "host_port": "8080", "guest_port": 80}),
    ("forward-remove", {"vm": "abc", "host_port": -1}),
    ("net-reclaim", {"root": "netroota", "keep": ["../x"]}),
    ("net-release", {"vm": ""}),
]


@pytest.mark.parametrize(("op", "request_"), HOSTILE,
                         ids=[f"{o}-{i}" for i, (o, _) in enumerate(HOSTILE)])
def test_hostile_requests_are_malformed(op: str, request_: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ops.parse(op, json.dumps(request_))


@settings(max_examples=500)
@given(st.text(max_size=24))
def test_accepted_device_names_are_always_kiln_prefixed_and_fit(text: str) -> None:
    for op, prefix in (("tap-detach", "kt-"), ("netns-delete", "kn-")):
        try:
            req = ops.parse(op, json.dumps({"name": text}))
        except ValidationError:
            continue
        name = req.name  # type: ignore[attr-defined]
        assert name.startswith(prefix)
        assert len(name.encode()) <= 15
        assert set(name[3:]) <= set("abcdefghijklmnopqrstuvwxyz234567")


def test_dnat_jumps_skip_the_bridge_in_prerouting_only_and_replace_a_wider_one() -> None:
    sec = NetSection(bridge="kilnbr9")
    jumps = nc.jump_rules(sec, "nat", nc.DNAT_CHAIN)
    assert jumps == {
        "PREROUTING": ["!", "-i", "kilnbr9", "-m", "comment", "--comment", "kiln",
                       "-j", "KILN-DNAT"],
        "OUTPUT": ["-m", "comment", "--comment", "kiln", "-j", "KILN-DNAT"]}
    assert nc.jump_rules(sec, "nat", nc.MASQ_CHAIN) == {"POSTROUTING": nc.jump_rule(
        nc.MASQ_CHAIN)}
    old = {"nat": nc.parse_rules("-N KILN-DNAT\n"
                                 "-A PREROUTING -m comment --comment kiln -j KILN-DNAT\n"
                                 "-A OUTPUT -m comment --comment kiln -j KILN-DNAT\n")}
    assert nc.ensure_chain_plan(old, "nat", nc.DNAT_CHAIN, [], jumps) == [
        ["-t", "nat", "-I", "PREROUTING", "1", "!", "-i", "kilnbr9", "-m", "comment",
         "--comment", "kiln", "-j", "KILN-DNAT"],
        ["-t", "nat", "-D", "PREROUTING", "-m", "comment", "--comment", "kiln",
         "-j", "KILN-DNAT"]]


def test_lease_cap_per_uid_and_the_uncapped_root() -> None:
    sec = NetSection(max_leases_per_user=2)
    book = nc.Book()
    for vm in ("aa", "bb"):
        book, _ = nc.allocate(sec, book, nc.Tag(vm, "abcdefgh", 1000))
    with pytest.raises(Conflict) as e:
        nc.allocate(sec, book, nc.Tag("cc", "abcdefgh", 1000))
    assert e.value.message == ("uid 1000 already holds 2 address leases (the most [net] "
                               "max_leases_per_user allows)")
    assert nc.allocate(sec, book, nc.Tag("aa", "abcdefgh", 1000))[0] == book  # its own again
    nc.allocate(sec, book, nc.Tag("cc", "abcdefgh", 2000))
    nc.allocate(sec, book, nc.Tag("cc", "abcdefgh", 1000), capped=False)
