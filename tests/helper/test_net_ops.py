"""The helper's network ops for real, inside network namespaces the tests create.

Every test points ``[net] namespace`` at a fresh namespace, so the bridge, taps, veths,
addresses and iptables rules exist only there (VM namespaces ``kn-…`` are their own
namespaces); traffic runs only between test-made namespaces. Each test ends by checking the
host's own namespace holds none of its names or addresses. Ops run in-process through
``ops.parse`` + ``ops.run_op`` (the same validation and functions ``kiln-helper`` runs);
exit codes of the real program are checked for requests refused before any op runs.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from helper import config
from helper.base.errors import Conflict, NotFound, UidInUse, UsageError
from helper.net import core as nc
from helper.net import host as net
from helper.net import lease as netlease
from tests.support.net import (
    GATEWAY,
    ROOT_A,
    ROOT_B,
    SUBNET,
    UID,
    ask,
    assert_host_clean,
    call,
    cfg,
    link_of,
    ns,
    refused,
    server,
    sh,
    snapshot,
    vm_id,
)
from tests.support.sudo import helper_as
from tests.support.timing import limit

pytestmark = pytest.mark.root
__all__ = ["ns"]  # the fixture, from tests.support.net


# -- lifecycle ------------------------------------------------------------------------------


@pytest.mark.slow
def test_bridge_taps_and_vm_namespaces_come_and_go_leaving_nothing(ns: str) -> None:
    plain, iso = cfg(ns, nat=True), cfg(ns, nat=True, isolation="netns")
    before = snapshot(ns)
    a, b = vm_id(), vm_id()
    na, nb = nc.names(a), nc.names(b)

    assert call(plain, "bridge-ensure", {}) == {
        "bridge": "kilnbrt", "namespace": ns, "gateway": GATEWAY, "subnet": SUBNET,
        "isolation": "none", "nat": True}
    call(plain, "bridge-ensure", {})  # idempotent
    br = link_of(ns, "kilnbrt")
    assert (br["linkinfo"]["info_kind"], br["ifalias"]) == ("bridge", "kiln bridge")
    assert call(plain, "nat-ensure", {}) == {"changed": True}
    assert call(plain, "nat-ensure", {}) == {"changed": False}

    la = call(plain, "net-lease", {"vm": a, "root": ROOT_A})
    assert la == {"vm": a, "ip": "10.231.7.2", "guest_ip": "10.231.7.2", "prefix": 24,
                  "gateway": GATEWAY, "mac": nc.mac_for(a), "dns": [],
                  "isolation": "none", "tap": na.tap, "netns": None}
    assert call(plain, "net-lease", {"vm": a, "root": ROOT_A}) == la  # its lease again
    assert call(plain, "tap-attach", {"vm": a, "uid": UID, "gid": UID + 1}) == {"tap": na.tap}
    t = link_of(ns, na.tap)
    assert t["linkinfo"]["info_data"]["user"] == UID
    assert t["linkinfo"]["info_data"]["group"] == UID + 1
    assert (t["master"], t["ifalias"]) == ("kilnbrt", f"kiln vm={a} root={ROOT_A} uid=0")

    lb = call(iso, "net-lease", {"vm": b, "root": ROOT_A})
    assert (lb["ip"], lb["guest_ip"], lb["prefix"], lb["gateway"], lb["netns"]) == (
        "10.231.7.3", "172.16.0.2", 30, "172.16.0.1", nb.netns)
    assert call(iso, "netns-create", {"vm": b, "uid": UID, "gid": UID}) == {
        "netns": nb.netns, "tap": nb.tap, "veth": nb.veth}
    assert link_of(ns, nb.veth)["master"] == "kilnbrt"
    inner = json.loads(sh("ip", "-n", nb.netns, "-j", "-d", "addr", "show"))
    assert sorted((d["ifname"], a2["local"]) for d in inner for a2 in d["addr_info"]
                  if a2["family"] == "inet") == [
        ("kp-" + nb.tap[3:], "10.231.7.3"), (nb.tap, "172.16.0.1"), ("lo", "127.0.0.1")]
    assert link_of(nb.netns, nb.tap)["linkinfo"]["info_data"]["user"] == UID
    assert call(plain, "forward-add", {"vm": a, "host_port": 8080, "guest_port": 80}) == {
        "address": GATEWAY, "host_port": 8080, "dest": "10.231.7.2:80"}

    listing = call(plain, "net-list", {})
    assert sorted((o["kind"], o["name"], o["vm"]) for o in listing["objects"]
                  if o["root"] == ROOT_A) == sorted([
        ("lease", a, a), ("lease", b, b), ("tap", na.tap, a), ("veth", nb.veth, b),
        ("netns", nb.netns, b), ("forward", "8080", a)])
    assert listing["leases"] == {a: "10.231.7.2", b: "10.231.7.3"}
    assert call(plain, "nat-remove", {}) == {"removed": False, "leases": 2}
    e = refused(plain, "bridge-remove", {})
    assert e.message == f"bridge kilnbrt is in use (2 leases, ports: {na.tap}, {nb.veth})"

    # Teardown in phase 2's order.
    assert call(plain, "forward-remove", {"vm": a}) == {"removed": [8080]}
    call(plain, "tap-detach", {"name": na.tap})
    call(iso, "netns-delete", {"name": nb.netns})
    assert call(plain, "net-release", {"vm": a}) == {"ip": "10.231.7.2"}
    assert call(plain, "net-release", {"vm": b}) == {"ip": "10.231.7.3"}
    assert call(plain, "nat-remove", {}) == {"removed": True, "leases": 0}
    call(plain, "bridge-remove", {})
    assert snapshot(ns) == before
    assert_host_clean(na.tap, nb.veth)


# -- real traffic between test namespaces: NAT and port forwards ----------------------------


@pytest.mark.slow
def test_nat_and_forwards_carry_real_traffic(ns: str) -> None:
    c = cfg(ns, nat=True)
    call(c, "bridge-ensure", {})
    g = vm_id()
    lease = call(c, "net-lease", {"vm": g, "root": ROOT_A})
    # A stand-in guest: a namespace on the bridge through a test-made veth, holding the lease.
    guest, outside = f"{ns}g", f"{ns}o"
    for n in (guest, outside):
        sh("ip", "netns", "add", n)
        sh("ip", "-n", n, "link", "set", "lo", "up")
    sh("ip", "-n", ns, "link", "add", "tguest", "type", "veth", "peer", "name", "eth0",
       "netns", guest)
    sh("ip", "-n", ns, "link", "set", "tguest", "master", "kilnbrt", "up")
    sh("ip", "-n", guest, "addr", "add", f"{lease['ip']}/24", "dev", "eth0")
    sh("ip", "-n", guest, "link", "set", "eth0", "up")
    sh("ip", "-n", guest, "route", "add", "default", "via", GATEWAY)
    # "The internet": another namespace behind the kiln namespace (TEST-NET-1).
    sh("ip", "-n", ns, "link", "add", "tout", "type", "veth", "peer", "name", "eth0",
       "netns", outside)
    sh("ip", "-n", ns, "addr", "add", "192.0.2.1/24", "dev", "tout")
    sh("ip", "-n", ns, "link", "set", "tout", "up")
    sh("ip", "-n", outside, "addr", "add", "192.0.2.2/24", "dev", "eth0")
    sh("ip", "-n", outside, "link", "set", "eth0", "up")

    with server(outside, "192.0.2.2", 9000):
        assert ask(guest, "192.0.2.2", 9000) == "error TimeoutError"  # no NAT: no way back
        call(c, "nat-ensure", {})
        assert ask(guest, "192.0.2.2", 9000) == "192.0.2.1"  # masqueraded
        call(c, "nat-remove", {})  # a lease remains: the rules stay
        assert ask(guest, "192.0.2.2", 9000) == "192.0.2.1"
    with server(guest, lease["ip"], 80):
        assert ask(ns, GATEWAY, 8080) == "error ConnectionRefusedError"
        call(c, "forward-add", {"vm": g, "host_port": 8080, "guest_port": 80})
        assert ask(ns, GATEWAY, 8080) == GATEWAY  # GATEWAY:8080 → the guest's :80
        assert ask(ns, lease["ip"], 80) == GATEWAY
        call(c, "forward-remove", {"vm": g, "host_port": 8080})
        assert ask(ns, GATEWAY, 8080) == "error ConnectionRefusedError"
    sh("ip", "-n", ns, "link", "del", "tguest")
    call(c, "net-release", {"vm": g})
    assert call(c, "nat-remove", {}) == {"removed": True, "leases": 0}
    assert "KILN" not in sh("ip", "netns", "exec", ns, "iptables-save")
    assert_host_clean(nc.names(g).tap)


# -- refusals ---------------------------------------------------------------------------------


def test_foreign_devices_overlapping_routes_and_missing_namespaces_are_refused(ns: str) -> None:
    c = cfg(ns)
    sh("ip", "-n", ns, "link", "add", "kilnbrt", "type", "bridge")  # not kiln's
    e = refused(c, "bridge-ensure", {})
    assert (type(e), e.message) == (UsageError, "refusing bridge kilnbrt: it exists but kiln "
                                                "did not create it")
    sh("ip", "-n", ns, "link", "del", "kilnbrt")
    # (this kernel has no dummy devices: veth pairs stand in for other kinds of links)
    sh("ip", "-n", ns, "link", "add", "kilnbrt", "type", "veth", "peer", "name", "kilnbrtp")
    e = refused(c, "bridge-ensure", {})
    assert e.message == "refusing kilnbrt: it is a veth device, not a bridge"
    sh("ip", "-n", ns, "link", "del", "kilnbrt")
    sh("ip", "-n", ns, "link", "add", "uplink", "type", "veth", "peer", "name", "uplinkp")
    sh("ip", "-n", ns, "addr", "add", "10.231.0.1/16", "dev", "uplink")
    sh("ip", "-n", ns, "link", "set", "uplink", "up")  # its connected route appears
    e = refused(c, "bridge-ensure", {})
    assert (type(e), e.message) == (
        Conflict, f"subnet {SUBNET} overlaps the route 10.231.0.0/16 dev uplink of network "
                  f"namespace {ns}")
    assert e.hint == "choose another [net] subnet in /etc/kiln/config.toml"
    sh("ip", "-n", ns, "link", "del", "uplink")
    assert "kilnbrt" not in sh("ip", "-n", ns, "link", "show")  # nothing made by the refusals

    e = refused(c, "netns-create", {"vm": vm_id(), "uid": UID, "gid": UID})
    assert (e.message, e.hint) == ("netns-create does not fit [net] isolation = 'none'",
                                   "use tap-attach")
    e = refused(cfg(ns, isolation="netns"), "tap-attach", {"vm": vm_id(), "uid": UID,
                                                          "gid": UID})
    assert e.message == "tap-attach does not fit [net] isolation = 'netns'"
    e = refused(cfg("kilnnosuchns"), "bridge-ensure", {})
    assert (type(e), e.message) == (NotFound, "network namespace kilnnosuchns does not exist")
    e = refused(c, "nat-ensure", {})
    assert e.message == "NAT is off in the trusted config ([net] nat = false)"

    a = vm_id()
    call(c, "net-lease", {"vm": a, "root": ROOT_A}, uid=1000)
    for req, msg in [({"vm": a, "uid": 5, "gid": UID}, "uid 5 is outside the VM range "
                      "900000-965535"),
                     ({"vm": a, "uid": UID, "gid": 1000}, "gid 1000 is outside the VM range "
                      "900000-965535")]:
        assert refused(c, "tap-attach", req, uid=1000).message == msg
    assert refused(c, "tap-attach", {"vm": a, "uid": UID, "gid": UID}).message == (
        f"the address lease of VM {a} belongs to uid 1000")  # another caller's lease
    e = refused(c, "tap-attach", {"vm": vm_id(), "uid": UID, "gid": UID})
    assert type(e) is NotFound
    assert e.message.endswith(" has no address lease")
    call(c, "tap-attach", {"vm": a, "uid": UID, "gid": UID}, uid=1000)
    tap = nc.names(a).tap
    assert refused(c, "tap-attach", {"vm": a, "uid": UID, "gid": UID}, uid=1000).message == (
        f"network device {tap} already exists")
    assert refused(c, "tap-detach", {"name": tap}).message == (
        f"refusing tap {tap}: it belongs to uid 1000")
    assert refused(c, "net-release", {"vm": a}).message == (
        f"the address lease of VM {a} belongs to uid 1000")
    call(c, "forward-add", {"vm": a, "host_port": 2222, "guest_port": 22}, uid=1000)
    b = vm_id()
    call(c, "net-lease", {"vm": b, "root": ROOT_A})
    assert refused(c, "forward-add", {"vm": b, "host_port": 2222, "guest_port": 22}).message \
        == f"port 2222 is already forwarded (to VM {a})"
    assert refused(c, "forward-remove", {"vm": a}).message == (
        "refusing the forward of port 2222: it belongs to uid 1000")
    assert refused(c, "forward-remove", {"vm": b}).message == f"VM {b} has no forward of any port"
    # A tap kiln did not tag, and a device with a kiln-like name that is no tap.
    sh("ip", "-n", ns, "tuntap", "add", "dev", "kt-foreign", "mode", "tap")
    assert refused(c, "tap-detach", {"name": "kt-foreign"}).message == (
        "refusing tap kt-foreign: kiln did not create it")
    sh("ip", "-n", ns, "link", "add", "kt-veth", "type", "veth", "peer", "name", "kt-vethp")
    assert refused(c, "tap-detach", {"name": "kt-veth"}).message == (
        "kt-veth is not a tun/tap device")
    assert refused(c, "tap-detach", {"name": "kt-nosuch"}).message == (
        f"tap kt-nosuch does not exist in network namespace {ns}")
    assert refused(c, "netns-delete", {"name": "kn-nosuch"}).message == (
        "network namespace kn-nosuch does not exist")
    assert "kt-foreign" in sh("ip", "-n", ns, "link", "show")  # still there

    # The owner cleans up: reclaim of its root by uid 1000, then root's own.
    assert call(c, "net-reclaim", {"root": ROOT_A, "keep": []}, uid=1000)["removed"] == [
        "forward:2222", f"tap:{tap}", f"lease:{a}"]
    assert call(c, "net-reclaim", {"root": ROOT_A}) == {"removed": [f"lease:{b}"]}
    assert_host_clean(tap)


@pytest.mark.slow
def test_concurrent_callers_make_one_bridge_and_one_forward_per_port(ns: str) -> None:
    c = cfg(ns, nat=True)
    vms = [vm_id() for _ in range(4)]
    for v in vms:
        call(c, "net-lease", {"vm": v, "root": ROOT_A})

    def race(op: str, reqs: list[dict[str, Any]]) -> list[str]:
        with ThreadPoolExecutor(len(reqs)) as pool:
            futs = [pool.submit(call, c, op, r) for r in reqs]
        return sorted("ok" if f.exception() is None else str(f.exception()) for f in futs)

    assert race("bridge-ensure", [{}] * 4) == ["ok"] * 4
    assert race("nat-ensure", [{}] * 4) == ["ok"] * 4
    got = race("forward-add", [{"vm": v, "host_port": 8080, "guest_port": 80} for v in vms])
    assert [g.split(" (to VM")[0] for g in got] == ["ok", *["port 8080 is already forwarded"] * 3]
    rules = sh("ip", "netns", "exec", ns, "iptables-save")
    assert rules.count("--dport 8080") == 1
    assert rules.count("-j KILN-POSTROUTING") == rules.count("-j KILN-FORWARD") == 1
    e = refused(c, "forward-add", {"vm": vms[0], "host_port": 80, "guest_port": 80})
    assert e.message == "host port 80 is privileged"  # for sudo callers (not in-process root)
    assert call(c, "net-reclaim", {"root": ROOT_A})["removed"][0] == "forward:8080"
    assert "KILN" not in sh("ip", "netns", "exec", ns, "iptables-save")


def test_small_subnet_runs_out_of_addresses(ns: str) -> None:
    c = config.parse(f'[net]\nnamespace = "{ns}"\nbridge = "kilnbrt"\nsubnet = '
                     f'"10.231.7.0/29"\ngateway = "10.231.7.1"\n'.encode())
    vms = [vm_id() for _ in range(5)]
    ips = [call(c, "net-lease", {"vm": v, "root": ROOT_B})["ip"] for v in vms]
    assert ips == [f"10.231.7.{i}" for i in range(2, 7)]
    e = refused(c, "net-lease", {"vm": vm_id(), "root": ROOT_B})
    assert e.message == "no free address left in 10.231.7.0/29 (5 leased)"
    assert call(c, "net-reclaim", {"root": ROOT_B, "keep": vms[:2]})["removed"] == [
        f"lease:{v}" for v in sorted(vms[2:])]
    assert call(c, "net-reclaim", {"root": ROOT_B, "keep": []})["removed"] == [
        f"lease:{v}" for v in sorted(vms[:2])]
    assert not list(netlease.LEASE_DIR.glob(f"{ns}-*"))  # the last release removes the file


@pytest.mark.slow
def test_reclaim_keeps_live_vms_other_roots_and_other_callers(ns: str) -> None:
    plain, iso = cfg(ns), cfg(ns, isolation="netns")
    live, dead, dead_iso, other = vm_id(), vm_id(), vm_id(), vm_id()
    for c, v, root in ((plain, live, ROOT_A), (plain, dead, ROOT_A), (iso, dead_iso, ROOT_A),
                       (plain, other, ROOT_B)):
        call(c, "net-lease", {"vm": v, "root": root})
    for v in (live, dead, other):
        call(plain, "tap-attach", {"vm": v, "uid": UID, "gid": UID})
    call(iso, "netns-create", {"vm": dead_iso, "uid": UID, "gid": UID})
    call(plain, "forward-add", {"vm": dead, "host_port": 8000, "guest_port": 80})
    assert call(plain, "net-reclaim", {"root": ROOT_A, "keep": [live]}, uid=1000) == {
        "removed": []}  # another caller's objects: untouched
    got = call(plain, "net-reclaim", {"root": ROOT_A, "keep": [live]})["removed"]
    assert got == ["forward:8000", f"tap:{nc.names(dead).tap}",
                   f"netns:{nc.names(dead_iso).netns}",
                   *sorted([f"lease:{dead}", f"lease:{dead_iso}"])]
    left = {(o["kind"], o["vm"]) for o in call(plain, "net-list", {})["objects"]}
    assert left == {("lease", live), ("tap", live), ("lease", other), ("tap", other)}
    assert not (net.NETNS_DIR / nc.names(dead_iso).netns).exists()
    for root in (ROOT_A, ROOT_B):
        call(plain, "net-reclaim", {"root": root})
    assert call(plain, "net-list", {})["objects"] == []
    call(plain, "bridge-remove", {})


# -- the real program: exit 2 malformed, exit 1 refused ---------------------------------------


@pytest.mark.parametrize(("op", "request_", "code", "stderr"), [
    ("tap-detach", {"name": "eth0"}, 2, "kiln-helper: malformed tap-detach request: name: "
     "String should match pattern '^kt-[a-z2-7]{1,12}$' (see `kiln-helper --list`)"),
    ("tap-detach", {"name": "kt-abcdefghijklm"}, 2, "kiln-helper: malformed tap-detach "
     "request: name: String should have at most 15 characters (see `kiln-helper --list`)"),
    ("netns-delete", {"name": "kilnt0"}, 2, "kiln-helper: malformed netns-delete request: "
     "name: String should match pattern '^kn-[a-z2-7]{1,12}$' (see `kiln-helper --list`)"),
    ("bridge-ensure", {"bridge": "docker0"}, 2, "kiln-helper: malformed bridge-ensure request: "
     "bridge: Extra inputs are not permitted (see `kiln-helper --list`)"),
    ("netns-delete", {"name": "kn-nosuchthing"}, 1,
     "kiln-helper: network namespace kn-nosuchthing does not exist"),
])
def test_the_real_helper_exits_1_or_2(installed: str, op: str,
                                      request_: dict[str, Any],
                                      code: int, stderr: str) -> None:
    """The installed kiln-helper (its root-owned venv: a checkout's own venv may sit under
    a world-writable directory, which the helper refuses to import from)."""
    res = helper_as(None, op, request_)
    assert (res.returncode, res.stderr.strip()) == (code, stderr)


def test_join_netns_refuses_paths() -> None:
    for bad in ("", "../x", "a/b", ".hidden"):
        with pytest.raises(UsageError) as e:
            net.join_netns(bad)
        assert e.value.message == f"invalid network namespace name {bad!r}"


@pytest.mark.slow
def test_another_callers_vm_uid_is_refused_to_tap_attach_and_netns_create(
        ns: str, tmp_path: Path) -> None:
    """The attack: A asks for a tap owned by B's VM uid (its Firecracker, run as that uid,
    could then open B's tap). Refused while B's tap exists; U+1 works; after B's
    tap-detach A may take U. Same for netns-create (the tap inside B's namespace)."""
    from dataclasses import replace

    held = f"uid {UID} is in use by another user's VM"
    for iso in ("none", "netns"):
        c = replace(cfg(ns, isolation=iso), pool_dir=tmp_path)
        op = "tap-attach" if iso == "none" else "netns-create"
        a, b = vm_id(), vm_id()
        call(c, "net-lease", {"vm": a, "root": ROOT_A}, uid=1001)
        call(c, "net-lease", {"vm": b, "root": ROOT_B}, uid=1000)
        call(c, op, {"vm": b, "uid": UID, "gid": UID}, uid=1000)
        e = refused(c, op, {"vm": a, "uid": UID, "gid": UID}, uid=1001)
        assert (type(e), e.message) == (UidInUse, held), iso
        e = refused(c, op, {"vm": a, "uid": UID + 1, "gid": UID}, uid=1001)
        assert e.message == f"gid {UID} is in use by another user's VM"
        assert net.link(ns, nc.names(a).tap) is None
        assert nc.names(a).netns not in net.netns_names()
        call(c, op, {"vm": a, "uid": UID + 1, "gid": UID + 1}, uid=1001)
        # Root in-process is one more caller: B's uid is refused to it too.
        r = vm_id()
        call(c, "net-lease", {"vm": r, "root": ROOT_A})
        assert refused(c, op, {"vm": r, "uid": UID, "gid": UID}).message == held
        for vm, uid in ((b, 1000), (a, 1001)):
            if iso == "none":
                call(c, "tap-detach", {"name": nc.names(vm).tap}, uid=uid)
            else:
                call(c, "netns-delete", {"name": nc.names(vm).netns}, uid=uid)
        call(c, op, {"vm": r, "uid": UID, "gid": UID})  # B's tap is gone: U is free
        if iso == "none":
            call(c, "tap-detach", {"name": nc.names(r).tap})
        else:
            call(c, "netns-delete", {"name": nc.names(r).netns})
        for vm, uid in ((a, 1001), (b, 1000), (r, 0)):
            call(c, "net-release", {"vm": vm}, uid=uid)


def test_a_released_address_takes_its_forwards_along(ns: str) -> None:
    """Review: net-release left the VM's forwards in place; the address went to the next
    VM leased (another user's, the attacker steering the cursor), and the attacker's
    forward then led into it. Now the forwards go with the lease, in one step, and a
    lease whose tap or namespace still exists is not released."""
    c = cfg(ns)
    call(c, "bridge-ensure", {})
    atk, vm = 4101, vm_id()
    call(c, "net-lease", {"vm": vm, "root": ROOT_A}, uid=atk)
    call(c, "forward-add", {"vm": vm, "host_port": 9000, "guest_port": 22}, uid=atk)
    # A link of the VM's tap name still there: the release waits for it.
    tap = nc.names(vm).tap
    sh("ip", "-n", ns, "link", "add", tap, "type", "veth", "peer", "name", "tpeer")
    e = refused(c, "net-release", {"vm": vm}, uid=atk)
    assert e.message == f"VM {vm} still has its tap or namespace"
    assert vm in {x.vm for x in netlease.read_book(c.net).leases}
    sh("ip", "-n", ns, "link", "del", tap)
    call(c, "net-release", {"vm": vm}, uid=atk)
    assert [f for f in net.forwards(c.net) if f.tag.vm == vm] == []
    assert "KILN" not in sh("ip", "netns", "exec", ns, "iptables-save")


def _counts(ns: str, chain: str) -> dict[str, int]:
    """Packets each rule of an ebtables chain matched: rule text -> count."""
    out = sh("ip", "netns", "exec", ns, "ebtables", "-L", chain, "--Lc")
    got: dict[str, int] = {}
    for line in out.splitlines():
        if ", pcnt = " in line:
            rule, _, rest = line.partition(" , pcnt = ")
            got[rule.strip()] = int(rest.split()[0])
    return got


def _port_state(ns: str, link: str) -> str:
    """A bridge port's STP state as ``ip`` names it ("disabled", "forwarding", …)."""
    d = link_of(ns, link)
    return str(d.get("linkinfo", {}).get("info_slave_data", {}).get("state", ""))


def test_a_tap_speaks_only_as_its_vm(ns: str) -> None:
    """Review: with isolation = none a tap fd (tap-open, or a guest its user controls)
    could answer ARP for another VM's address and take its traffic. Each tap now has an
    ebtables chain, made before it joins the bridge: frames from another MAC, ARP or IPv4
    from another address, and IPv6 are dropped; the chain goes with the tap."""
    from helper.net import guard as netguard
    from helper.net import tapfd as nettap

    c = cfg(ns)
    call(c, "bridge-ensure", {})
    atk, vm = 4102, vm_id()
    lease = call(c, "net-lease", {"vm": vm, "root": ROOT_A}, uid=atk)
    tap = call(c, "tap-attach", {"vm": vm, "uid": UID, "gid": UID}, uid=atk)["tap"]
    mac = bytes.fromhex(nc.mac_for(vm).replace(":", ""))
    victim_ip = bytes([10, 231, 7, 200])  # another VM's address in SUBNET
    own_ip = bytes(int(x) for x in lease["ip"].split("."))
    fd = nettap.tap_open(c.net, vm, atk)
    try:
        # Opening the fd brings the tap's carrier up; the bridge takes the port into
        # forwarding from the link-watch work queue, later on a busy machine: a frame written
        # before that is dropped before any ebtables rule sees it.
        deadline = time.monotonic() + limit(5)
        while _port_state(ns, tap) != "forwarding" and time.monotonic() < deadline:
            time.sleep(0.02)

        def arp(src_mac: bytes, sender_ip: bytes) -> bytes:  # a gratuitous ARP reply
            return (b"\xff" * 6 + src_mac + b"\x08\x06" + b"\x00\x01\x08\x00\x06\x04\x00\x02"
                    + src_mac + sender_ip + b"\xff" * 6 + sender_ip)
        vnet = bytes(10)  # IFF_VNET_HDR: a virtio-net header before each frame
        os.write(fd, vnet + arp(mac, victim_ip))  # its own MAC, another VM's address
        os.write(fd, vnet + arp(b"\x02\xde\xad\xbe\xef\x01", own_ip))  # a forged MAC
        os.write(fd, vnet + arp(mac, own_ip))  # what it may say
    finally:
        os.close(fd)
    # A frame written to a tap reaches the bridge (and its ebtables chain) in the receive
    # softirq, later on a busy machine: wait until all three frames went through.
    chain, deadline = netguard.chain(tap), time.monotonic() + limit(2)
    while (counts := _counts(ns, chain)) and sum(counts.values()) < 2 \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert counts[f"-p ARP --arp-ip-src ! {lease['ip']} -j DROP"] == 1, counts
    assert counts[f"-s ! {nc.mac_for(vm)} -j DROP"] == 1, counts
    assert sum(counts.values()) == 2  # the honest frame passed every rule
    call(c, "tap-detach", {"name": tap}, uid=atk)
    assert netguard.chain(tap) not in sh("ip", "netns", "exec", ns, "ebtables", "-L")
    call(c, "net-release", {"vm": vm}, uid=atk)


def test_guard_plan_exact_argv() -> None:
    from helper.net import guard as netguard

    assert netguard.plan("kt-abc", "02:aa:bb:cc:dd:ee", "10.0.0.7") == [
        ["-N", "kg-abc", "-P", "RETURN"],
        ["-A", "kg-abc", "-s", "!", "02:aa:bb:cc:dd:ee", "-j", "DROP"],
        ["-A", "kg-abc", "-p", "ARP", "--arp-mac-src", "!", "02:aa:bb:cc:dd:ee", "-j", "DROP"],
        ["-A", "kg-abc", "-p", "ARP", "--arp-ip-src", "!", "10.0.0.7", "-j", "DROP"],
        ["-A", "kg-abc", "-p", "IPv4", "--ip-src", "!", "10.0.0.7", "-j", "DROP"],
        ["-A", "kg-abc", "-p", "IPv6", "-j", "DROP"],
        ["-A", "INPUT", "-i", "kt-abc", "-j", "kg-abc"],
        ["-A", "FORWARD", "-i", "kt-abc", "-j", "kg-abc"],
    ]
    assert netguard.unplan("kt-abc") == [
        ["-D", "INPUT", "-i", "kt-abc", "-j", "kg-abc"],
        ["-D", "FORWARD", "-i", "kt-abc", "-j", "kg-abc"],
        ["-F", "kg-abc"], ["-X", "kg-abc"]]
