"""runner/network.py — the interface ``kiln run --net tap`` calls — against the real ops,
inside a namespace the test creates (``caller`` runs them with a config naming it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helper.base.errors import Conflict, UsageError
from helper.net import core as nc
from helper.net import host as net
from runner import network
from runner.guest_init.channel import GuestNet
from runner.vm import resources as vmres
from runner.vm.state import State, VMRecord
from runner.vmm import qemuargv
from tests.support.net import (
    ROOT_A,
    ROOT_B,
    UID,
    assert_host_clean,
    caller,
    cfg,
    ns,
    snapshot,
    vm_id,
)

pytestmark = pytest.mark.root
__all__ = ["ns"]  # the fixture, shared with test_net_ops


@pytest.mark.parametrize(("field", "value"), [
    ("guest_ip", "10.0.0.2 init=/bin/sh"),
    ("gateway", "10.0.0.1\ninit=/bin/sh"),
    ("dns", ("192.0.2.53", "x y")),
    ("mac", "02:00:00:00:00:01 x"),
])
def test_a_lease_that_is_not_addresses_never_reaches_the_guest(field: str, value: object
                                                               ) -> None:
    """The helper's lease becomes eth0 in the guest's settings (a cold Firecracker run's
    are written on its disk): a field that is not an address is refused before anything
    is written, naming it, with the lease as the thing to check."""
    from runner.guest_init import Workload
    from runner.vmm import fcwarm

    good = network.VmNet(vm_id="a", ip="10.0.0.2", guest_ip="10.0.0.2", prefix=24,
                         gateway="10.0.0.1", mac="02:00:00:00:00:01", tap="kt-a", netns=None,
                         namespace="", dns=("192.0.2.53",))
    work = Workload(("true",), (), "", "", "vm1")
    s = fcwarm.settings(None, work, good)
    assert s is not None
    assert s.net == GuestNet("02:00:00:00:00:01", "10.0.0.2/24", "10.0.0.1", ("192.0.2.53",))
    with pytest.raises(UsageError) as e:
        fcwarm.settings(None, work, network.VmNet(**{**good.__dict__, field: value}))
    assert e.value.message.startswith("the run's settings cannot be sent to the guest: "
                                      "invalid ")
    assert e.value.hint == "the helper's lease must hold addresses only: see docs/net.md"


@pytest.mark.slow
def test_attach_detach_both_isolations_with_nat_and_forwards(ns: str) -> None:
    plain, iso = caller(cfg(ns, nat=True, dns=["192.0.2.53", "192.0.2.54"])), caller(
        cfg(ns, nat=True, isolation="netns"))
    before = snapshot(ns)
    a, b = vm_id(), vm_id()
    va = network.attach(plain, a, ROOT_A, UID, UID, forwards=(qemuargv.Forward(8080, 80),))
    assert va == network.VmNet(
        vm_id=a, ip="10.231.7.2", guest_ip="10.231.7.2", prefix=24, gateway="10.231.7.1",
        mac=nc.mac_for(a), tap=nc.names(a).tap, netns=None, namespace=ns,
        dns=("192.0.2.53", "192.0.2.54"), forwards=(qemuargv.Forward(8080, 80),))
    assert va.spawn_netns == ns
    # the guest's settings, from the lease's fields
    assert va.guest() == GuestNet(nc.mac_for(a), "10.231.7.2/24", "10.231.7.1",
                                  ("192.0.2.53", "192.0.2.54"))
    assert va.qemu_tap() == qemuargv.TapNic(nc.names(a).tap, nc.mac_for(a))
    assert va.firecracker_nic().guest_mac == nc.mac_for(a)
    assert va.doc()["forwards"] == ["8080:80"]
    vb = network.attach(iso, b, ROOT_A, UID, UID)
    assert (vb.ip, vb.guest_ip, vb.prefix, vb.gateway, vb.netns, vb.spawn_netns) == (
        "10.231.7.3", "172.16.0.2", 30, "172.16.0.1", nc.names(b).netns, nc.names(b).netns)
    assert vb.guest() == GuestNet(nc.mac_for(b), "172.16.0.2/30", "172.16.0.1")
    rules = json.dumps(snapshot(ns)["rules"])
    assert "KILN-POSTROUTING" in rules
    assert "KILN-DNAT" in rules

    assert network.detach(plain, a) == ["forward-remove", "tap-detach", "net-release"]
    assert "KILN-POSTROUTING" in json.dumps(snapshot(ns)["rules"])  # b still holds a lease
    assert network.detach(iso, b) == ["netns-delete", "net-release"]
    assert network.detach(iso, b) == []  # idempotent
    caller(cfg(ns))("bridge-remove", {})
    assert snapshot(ns) == before
    assert_host_clean(va.tap, vb.tap)


@pytest.mark.slow
def test_a_failed_attach_leaves_nothing_of_the_vm(ns: str) -> None:
    plain = caller(cfg(ns))
    a, b = vm_id(), vm_id()
    network.attach(plain, a, ROOT_A, UID, UID, forwards=(qemuargv.Forward(8080, 80),))
    after_a = snapshot(ns)
    with pytest.raises(Conflict) as e:
        network.attach(plain, b, ROOT_A, UID, UID,
                       forwards=(qemuargv.Forward(9090, 90), qemuargv.Forward(8080, 80)))
    assert e.value.message == f"port 8080 is already forwarded (to VM {a})"
    assert snapshot(ns) == after_a  # b's tap, lease and first forward are gone again
    assert network.reconcile(plain, ROOT_A, keep=[]) == [
        "forward:8080", f"tap:{nc.names(a).tap}", f"lease:{a}"]
    assert network.reconcile(plain, ROOT_A, keep=[]) == []


@pytest.mark.slow
def test_a_vm_uid_another_caller_holds_is_retried_with_another(ns: str, tmp_path: Path) -> None:
    """What `kiln run --net tap` does (``vmres.retry_uid``) when its record's uid is one
    another caller's tap holds: the helper refuses it (UidInUse), the record gets another
    uid (never the refused one), the tap is attached with that; nothing of the refused
    attempt stays. A range with no other uid ends in "no free VM uid"."""
    from dataclasses import replace

    (tmp_path / "pool").mkdir()
    c = replace(cfg(ns), pool_dir=tmp_path / "pool")
    before = snapshot(ns)
    mine, theirs = caller(c, uid=1001), caller(c, uid=1000)
    a, b = vm_id(), vm_id()
    network.attach(theirs, b, ROOT_B, UID, UID)
    (tmp_path / "root").mkdir()
    st = State(tmp_path / "root")
    rec = st.create(vm_id=a, name=None, vmm="qemu", volume="sha256:" + "0" * 64,
                    snapshot="vm" + a, vm_dir=tmp_path / "vm", cgroups=[], want_uid=True,
                    auto_remove=False, spec={}, uid_range=(UID, 1))
    assert rec.uid == UID

    def attach(r: VMRecord) -> network.VmNet:
        assert r.uid is not None
        return network.attach(mine, a, ROOT_A, r.uid, r.uid)

    with pytest.raises(Conflict) as e:  # U is all this range has
        vmres.retry_uid(st, rec, vmres.UidPicker((UID, 1)), attach)
    assert e.value.message == "no free VM uid"
    assert net.link(ns, nc.names(a).tap) is None
    picker = vmres.UidPicker((UID, 3))
    vn, now = vmres.retry_uid(st, rec, picker, attach)
    assert (picker.refused, now.uid in (UID + 1, UID + 2)) == ({UID}, True)
    stored = st.get(a)
    assert (stored.uid if stored else None) == now.uid
    tap = net.link(ns, vn.tap)
    assert tap is not None
    assert tap["linkinfo"]["info_data"]["user"] == now.uid
    assert network.detach(mine, a) == ["tap-detach", "net-release"]
    assert network.detach(theirs, b) == ["tap-detach", "net-release"]
    caller(c)("bridge-remove", {})
    assert snapshot(ns) == before
