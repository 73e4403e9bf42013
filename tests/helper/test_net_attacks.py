"""Attacks on the network ops by a malicious caller, performed for real inside network
namespaces the tests create (the fixture and helpers of tests/support/net.py): each is
refused with its exact error, or harmless."""

from __future__ import annotations

import json
import signal
import threading
from typing import Any

import pytest

from helper import config
from helper.base.errors import Conflict, KilnError
from helper.net import core as nc
from helper.net import host as net
from helper.net import tapfd as nettap
from helper.ops import registry as ops
from tests.support.net import (
    GATEWAY,
    ROOT_A,
    ROOT_B,
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
    vm_id,
)

pytestmark = pytest.mark.root
__all__ = ["ns"]  # the fixture, shared with test_net_ops


def links(ns: str) -> dict[str, Any]:
    return {d["ifname"]: d for d in json.loads(sh("ip", "-n", ns, "-j", "-d", "link", "show"))}


# -- 1. a relayed signal between two steps of an op ------------------------------------------


def test_a_signal_between_creating_and_tagging_the_bridge_leaves_it_complete(
        ns: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """sudo relays SIGINT to the helper: here it arrives (aimed at the op's thread, as in the
    single-threaded helper) right after ``ip link add``. It is held until the op is done."""
    c = cfg(ns)
    real_ip, main = net.ip, threading.get_ident()

    def ip_then_interrupt(nsn: str, *args: str, **kw: Any) -> Any:
        res = real_ip(nsn, *args, **kw)
        if args[:2] == ("link", "add"):
            signal.pthread_kill(main, signal.SIGINT)
        return res

    monkeypatch.setattr(net, "ip", ip_then_interrupt)
    # Python keeps SIGINT ignored when the suite started with it ignored (a background job
    # of a non-interactive shell): this test needs Python's own handler.
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):  # delivered once the op is done
            call(c, "bridge-ensure", {})
    finally:
        signal.signal(signal.SIGINT, handler)
    monkeypatch.undo()
    br = links(ns)["kilnbrt"]
    assert (br["linkinfo"]["info_kind"], br.get("ifalias")) == ("bridge", "kiln bridge")
    assert not [n for n in links(ns) if n.startswith(nc.TMP)]
    call(c, "bridge-ensure", {})  # every caller's bridge-ensure / bridge-remove still works
    call(c, "bridge-remove", {})


def test_the_bridge_never_has_its_name_untagged_and_a_crash_leftover_goes(ns: str) -> None:
    """A run killed outright (no signal can be held then) between creating and tagging
    leaves ``kx-…``, which blocks nobody; the next bridge-ensure removes it."""
    sh("ip", "-n", ns, "link", "add", "kx-brt", "type", "bridge")  # the leftover
    c = cfg(ns)
    call(c, "bridge-ensure", {})
    assert "kx-brt" not in links(ns)
    assert links(ns)["kilnbrt"]["ifalias"] == "kiln bridge"
    call(c, "bridge-remove", {})


# -- 2. a forward must not capture other VMs' connections to the gateway ---------------------


def guest_on_bridge(ns: str, name: str, veth: str, ip: str) -> None:
    sh("ip", "netns", "add", name)
    sh("ip", "-n", name, "link", "set", "lo", "up")
    sh("ip", "-n", ns, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name)
    sh("ip", "-n", ns, "link", "set", veth, "master", "kilnbrt", "up")
    sh("ip", "-n", name, "addr", "add", f"{ip}/24", "dev", "eth0")
    sh("ip", "-n", name, "link", "set", "eth0", "up")
    sh("ip", "-n", name, "route", "add", "default", "via", GATEWAY)


def test_a_forward_does_not_hijack_other_vms_connections_to_the_gateway(ns: str) -> None:
    c = cfg(ns)
    call(c, "bridge-ensure", {})
    a, b = vm_id(), vm_id()
    la = call(c, "net-lease", {"vm": a, "root": ROOT_A}, uid=1000)  # the attacker
    lb = call(c, "net-lease", {"vm": b, "root": ROOT_B}, uid=2000)  # the victim
    ga, gb = f"{ns}g", f"{ns}o"  # (names the fixture removes)
    guest_on_bridge(ns, ga, "tga", la["ip"])
    guest_on_bridge(ns, gb, "tgb", lb["ip"])
    # B's VM uses a service on the gateway's port 5000 (the kiln namespace's own).
    with server(ns, GATEWAY, 5000), server(ga, la["ip"], 80):
        assert ask(gb, GATEWAY, 5000) == lb["ip"]
        call(c, "forward-add", {"vm": a, "host_port": 5000, "guest_port": 80}, uid=1000)
        assert ask(gb, GATEWAY, 5000) == lb["ip"]  # still the real service, not A's VM
    with server(ga, la["ip"], 80):
        assert ask(ns, GATEWAY, 5000) == GATEWAY  # the host side reaches the forward
        assert ask(gb, GATEWAY, 5000) == "error ConnectionRefusedError"
    nat = sh("ip", "netns", "exec", ns, "iptables", "-t", "nat", "-S")
    assert "-A PREROUTING ! -i kilnbrt -m comment --comment kiln -j KILN-DNAT" in nat
    assert "-A OUTPUT -m comment --comment kiln -j KILN-DNAT" in nat
    call(c, "net-reclaim", {"root": ROOT_A}, uid=1000)
    call(c, "net-reclaim", {"root": ROOT_B}, uid=2000)
    assert "KILN" not in sh("ip", "netns", "exec", ns, "iptables-save")


def test_an_older_wide_prerouting_jump_is_replaced(ns: str) -> None:
    c = cfg(ns)
    x = ["ip", "netns", "exec", ns, "iptables", "-t", "nat"]
    sh(*x, "-N", "KILN-DNAT")
    sh(*x, "-I", "PREROUTING", "1", "-m", "comment", "--comment", "kiln", "-j", "KILN-DNAT")
    v = vm_id()
    call(c, "net-lease", {"vm": v, "root": ROOT_A})
    call(c, "forward-add", {"vm": v, "host_port": 5000, "guest_port": 80})
    pre = [r for r in sh(*x, "-S", "PREROUTING").splitlines() if "KILN-DNAT" in r]
    assert pre == ["-A PREROUTING ! -i kilnbrt -m comment --comment kiln -j KILN-DNAT"]
    call(c, "net-reclaim", {"root": ROOT_A})


# -- 3. tap-open racing the tap's deletion -----------------------------------------------------


def test_tap_open_refuses_a_tap_deleted_between_check_and_attach(ns: str) -> None:
    c = cfg(ns)
    v = vm_id()
    tap = nc.names(v).tap
    call(c, "net-lease", {"vm": v, "root": ROOT_A}, uid=1000)
    call(c, "tap-attach", {"vm": v, "uid": UID, "gid": UID}, uid=1000)
    checked = int(link_of(ns, tap)["ifindex"])
    fd = nettap.attach(ns, tap, checked)  # the legitimate open
    nettap.os.close(fd)
    # The check has seen the tap (index ``checked``); the caller deletes it before the attach.
    call(c, "tap-detach", {"name": tap}, uid=1000)
    with pytest.raises(Conflict) as e:
        nettap.attach(ns, tap, checked)
    assert e.value.message == (f"refusing tap {tap}: it was removed or replaced while it was "
                               "being opened")
    assert tap not in links(ns)  # the tap the attach made went with its fd
    # Re-created under the same name (a new index): refused too.
    call(c, "tap-attach", {"vm": v, "uid": UID, "gid": UID}, uid=1000)
    with pytest.raises(Conflict):
        nettap.attach(ns, tap, checked)
    assert links(ns)[tap]["ifalias"] == f"kiln vm={v} root={ROOT_A} uid=1000"  # untouched
    call(c, "net-reclaim", {"root": ROOT_A}, uid=1000)
    assert_host_clean(tap)


# -- 4. per-caller caps --------------------------------------------------------------------------


def test_one_caller_cannot_take_every_address_or_port(ns: str) -> None:
    c = config.parse(f'[net]\nnamespace = "{ns}"\nbridge = "kilnbrt"\nsubnet = '
                     '"10.231.7.0/29"\ngateway = "10.231.7.1"\nmax_leases_per_user = 2\n'
                     'max_forwards_per_user = 1\n'.encode())  # 5 addresses to share
    mine = [vm_id() for _ in range(2)]
    for v in mine:
        call(c, "net-lease", {"vm": v, "root": ROOT_A}, uid=1000)
    e = refused(c, "net-lease", {"vm": vm_id(), "root": ROOT_A}, uid=1000)
    assert (type(e), e.message, e.hint) == (
        Conflict, "uid 1000 already holds 2 address leases (the most [net] "
                  "max_leases_per_user allows)", "stop some of its VMs first")
    assert call(c, "net-lease", {"vm": vm_id(), "root": ROOT_B}, uid=2000)["ip"]  # B gets one
    call(c, "forward-add", {"vm": mine[0], "host_port": 5000, "guest_port": 80}, uid=1000)
    e = refused(c, "forward-add", {"vm": mine[1], "host_port": 5001, "guest_port": 80},
                uid=1000)
    assert e.message == ("uid 1000 already holds 1 port forwards (the most [net] "
                         "max_forwards_per_user allows)")
    call(c, "net-reclaim", {"root": ROOT_A}, uid=1000)
    # Root running kiln itself (in-process, trusted) is not capped: 3 leases > 2.
    ctx = ops.Ctx(cfg=c, area=net.Path("/nonexistent"), caller_uid=0, caller_gid=0,
                  trusted=True)
    for _ in range(3):
        ops.run_op(ctx, "net-lease", ops.parse("net-lease", json.dumps(
            {"vm": vm_id(), "root": ROOT_A})))
    for root, uid in ((ROOT_B, 2000), (ROOT_A, 0)):
        call(c, "net-reclaim", {"root": root}, uid=uid)

# -- 5. untagged leftovers of a create cut short ---------------------------------------------


def test_reconcile_removes_untagged_leftovers_of_the_callers_own_vms_only(ns: str) -> None:
    iso = cfg(ns, isolation="netns")
    plain = cfg(ns)
    v, other = vm_id(), vm_id()
    call(iso, "net-lease", {"vm": v, "root": ROOT_A}, uid=1000)
    call(iso, "net-lease", {"vm": other, "root": ROOT_B}, uid=2000)
    n, no = nc.names(v), nc.names(other)
    sh("ip", "netns", "add", n.netns)  # killed right after ip netns add
    sh("ip", "netns", "add", no.netns)
    sh("ip", "-n", ns, "tuntap", "add", "dev", n.tmp, "mode", "tap")  # killed in _new_tap
    try:
        e = refused(iso, "netns-create", {"vm": v, "uid": UID, "gid": UID}, uid=1000)
        assert e.message == f"network namespace {n.netns} already exists"
        e = refused(iso, "netns-delete", {"name": n.netns}, uid=1000)  # no tag: not by name
        assert e.message == f"refusing network namespace {n.netns}: kiln did not create it"
        assert call(iso, "net-reclaim", {"root": ROOT_A, "keep": [v]}, uid=1000) == {
            "removed": []}  # a live VM's: kept
        assert call(iso, "net-reclaim", {"root": ROOT_A}, uid=2000) == {"removed": []}
        assert call(iso, "net-reclaim", {"root": ROOT_A}, uid=1000) == {"removed": [
            f"tap:{n.tmp}", f"netns:{n.netns}", f"lease:{v}"]}
        assert not (net.NETNS_DIR / n.netns).exists()
        assert n.tmp not in links(ns)
        assert (net.NETNS_DIR / no.netns).exists()  # another caller's: untouched
        call(plain, "net-reclaim", {"root": ROOT_B}, uid=2000)
        assert not (net.NETNS_DIR / no.netns).exists()
    finally:
        for x in (n.netns, no.netns):
            sh("ip", "netns", "del", x, check=False)


def test_kiln_names_are_refused_when_untagged_and_unleased(ns: str) -> None:
    v = vm_id()
    n = nc.names(v)
    sh("ip", "netns", "add", n.netns)
    try:
        assert call(cfg(ns), "net-reclaim", {"root": ROOT_A}) == {"removed": []}
        assert (net.NETNS_DIR / n.netns).exists()
        with pytest.raises(KilnError):
            call(cfg(ns), "netns-delete", {"name": n.netns})
    finally:
        sh("ip", "netns", "del", n.netns, check=False)
