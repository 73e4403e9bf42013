"""The reaper's decision core (hypothesis properties) and its executor on a real root."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from builder.root import Root
from runner.vm import reaper, state
from runner.vm.state import State

ALPHA = "abcdefghijklmnopqrstuvwxyz234567"
ids = st.text(alphabet=ALPHA, min_size=12, max_size=12)
keys = st.text(alphabet=ALPHA, min_size=8, max_size=8)
foreign = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0189-_.ABC", min_size=1, max_size=14)
names = st.one_of(ids, foreign)
states = st.sampled_from(["creating", "running", "exited", "failed"])
KEY = "rootaaaa"  # the root being reconciled
OTHER = "rootbbbb"  # another root on the same host


@st.composite
def worlds(draw: st.DrawFn) -> reaper.Observed:
    """This root's records and directories; host-wide resources of this root, another
    root, kiln before root keys (bare ids) and foreign names, over overlapping VM ids."""
    vms = tuple({v.vm_id: v for v in draw(st.lists(st.builds(
        reaper.VMView, vm_id=ids, state=states, auto_remove=st.booleans(),
        owner_alive=st.booleans(), net=st.booleans()), max_size=6))}.values())
    pool = [v.vm_id for v in vms] + draw(st.lists(names, min_size=1, max_size=6))
    tag = st.sampled_from([KEY, OTHER, ""])  # "": a name from before root keys
    hosts = st.builds(lambda k, i: k + i, tag, st.sampled_from(pool))
    vmm_names = draw(st.lists(hosts, max_size=4, unique=True))
    pids = draw(st.lists(st.integers(2, 99999), min_size=len(vmm_names),
                         max_size=len(vmm_names), unique=True))
    vmm = dict(zip(vmm_names, pids, strict=True))
    cg = draw(st.dictionaries(hosts,
                              st.lists(st.sampled_from(["/c/cpu/kiln/", "/c/memory/kiln/"]),
                                       min_size=1, max_size=2, unique=True), max_size=4))
    cgroups = {k: tuple(p + k for p in v) for k, v in cg.items()}
    jails = {k: "/j/firecracker/" + k for k in draw(st.lists(hosts, max_size=4))}
    dirs = frozenset(draw(st.lists(st.sampled_from(pool), max_size=4)))
    snaps = frozenset(draw(st.lists(st.one_of(st.sampled_from(pool).map(lambda i: "vm" + i),
                                              foreign), max_size=4)))
    # the network's VMs as net-list shows them (already this root's and caller's), or not
    # looked at this round
    net_vms = draw(st.one_of(st.none(), st.frozensets(st.sampled_from(pool), max_size=4)))
    cands = [("process", f"{k[-12:]}:{p}") for k, p in vmm.items()] + \
        [("cgroup", d) for ds in cgroups.values() for d in ds] + \
        [("jail", p) for p in jails.values()] + \
        [("dir", d) for d in dirs] + [("snapshot", s) for s in snaps] + \
        [("net", v) for v in net_vms or ()]
    seen = frozenset(draw(st.lists(st.sampled_from(cands), max_size=len(cands)))
                     if cands else [])
    return reaper.Observed(vms=vms, root_key=KEY, vmm_pids=vmm, cgroups=cgroups,
                           vm_dirs=dirs, snapshots=snaps, jails=jails, net_vms=net_vms,
                           seen_before=seen)


@given(worlds())
def test_a_vm_whose_owner_lives_is_never_touched(obs: reaper.Observed) -> None:
    """Covers every VM being born: its record exists (state creating) and its owner runs."""
    protected = {v.vm_id for v in obs.vms if v.owner_alive}
    assert not [a for a in reaper.plan(obs).actions if a.vm_id in protected]


@given(worlds())
def test_orphans_only_when_seen_twice(obs: reaper.Observed) -> None:
    known = {v.vm_id for v in obs.vms}
    p = reaper.plan(obs)
    kinds = {"kill": "process", "rmcgroup": "cgroup", "rmjail": "jail", "rmdir": "dir",
             "rmsnapshot": "snapshot", "rmnet": "net"}
    acted: set[tuple[str, str]] = set()  # as (orphan kind, orphan name)
    for a in p.actions:
        if a.kind in kinds:
            kind = kinds[a.kind]
            acted.add((kind, f"{a.vm_id}:{a.target}" if kind == "process" else a.target))
        if a.vm_id not in known:
            assert a.reason == "orphan"
            kind = kinds[a.kind]
            name = f"{a.vm_id}:{a.target}" if kind == "process" else a.target
            assert (kind, name) in obs.seen_before
    # and whatever was not acted on is remembered for next time
    for kind, name in p.seen:
        assert (kind, name) not in obs.seen_before
        assert (kind, name) not in acted


def _tagged(obs: reaper.Observed, key: str) -> set[str]:
    """Every host-wide resource (pid, cgroup dir, jail dir) carrying ``key``'s tag."""
    return ({str(p) for n, p in obs.vmm_pids.items() if state.vm_of_host(n, key)} |
            {d for n, ds in obs.cgroups.items() if state.vm_of_host(n, key) for d in ds} |
            {p for n, p in obs.jails.items() if state.vm_of_host(n, key)})


def _host_wide(obs: reaper.Observed) -> set[str]:
    return ({str(p) for p in obs.vmm_pids.values()} |
            {d for ds in obs.cgroups.values() for d in ds} | set(obs.jails.values()))


@given(worlds())
def test_plan_for_a_root_never_touches_another_roots_resources(obs: reaper.Observed) -> None:
    """Only resources tagged with this root's key: never another root's, never a bare
    12-character name from before root keys (whose root cannot be proven), even when
    another root's VM has the id of one of this root's records."""
    for o in (obs, replace(obs, root_key=OTHER)):
        p = reaper.plan(o)
        theirs = _host_wide(o) - _tagged(o, o.root_key)
        hit = {a.target for a in p.actions if a.kind in ("kill", "rmcgroup", "rmjail")}
        assert not hit & theirs
        assert hit <= _tagged(o, o.root_key)
        remembered = {n.split(":", 1)[1] if k == "process" else n for k, n in p.seen}
        assert not remembered & theirs


@given(worlds())
def test_never_anything_without_kilns_names(obs: reaper.Observed) -> None:
    for a in reaper.plan(obs).actions:
        assert reaper.VM_ID.fullmatch(a.vm_id)
        if a.kind == "rmsnapshot":
            assert a.target == "vm" + a.vm_id
        if a.kind == "rmcgroup":
            assert a.target.endswith("/kiln/" + KEY + a.vm_id)
        if a.kind == "rmjail":
            assert a.target == "/j/firecracker/" + KEY + a.vm_id
        if a.kind == "rmdir":
            assert a.target == a.vm_id
        if a.kind == "kill":
            assert obs.vmm_pids[KEY + a.vm_id] == int(a.target)
        if a.kind == "rmnet":  # one VM's objects, through net-reclaim with only=[vm]
            assert a.target == a.vm_id


@given(worlds())
def test_dead_owner_fails_live_vm_and_cleans_up(obs: reaper.Observed) -> None:
    p = reaper.plan(obs)
    for v in obs.vms:
        mine = [a for a in p.actions if a.vm_id == v.vm_id]
        if v.owner_alive:
            continue
        kinds = [a.kind for a in mine]
        assert ("fail" in kinds) == (v.state in ("creating", "running"))
        assert ("kill" in kinds) == (KEY + v.vm_id in obs.vmm_pids)
        assert ("rmvm" in kinds) == v.auto_remove
        # a dead VM's network goes at once, whether its record or the network says so
        assert ("rmnet" in kinds) == (v.net or v.vm_id in (obs.net_vms or ()))
        if "rmnet" in kinds:  # after its VMM and cgroups, before its record
            order = [k for k in kinds if k in ("kill", "rmcgroup", "rmnet", "rmvm")]
            assert order == sorted(order, key=["kill", "rmcgroup", "rmnet", "rmvm"].index)


@given(worlds())
def test_network_orphans_need_two_looks(obs: reaper.Observed) -> None:
    """A VM on the network without a record is reaped only when this round and the one
    before both looked at the network; a round that looks at nothing remembers nothing of
    it, and the next round always looks when a sighting is pending."""
    known = {v.vm_id for v in obs.vms}
    p = reaper.plan(obs)
    orphans = {a.vm_id for a in p.actions if a.kind == "rmnet" and a.vm_id not in known}
    assert orphans <= set(obs.net_vms or ())
    assert all(("net", vm) in obs.seen_before for vm in orphans)
    noted = {n for k, n in p.seen if k == "net"}
    if obs.net_vms is None:
        assert not noted
    assert noted == {vm for vm in obs.net_vms or () if reaper.VM_ID.fullmatch(vm)
                     and vm not in known and ("net", vm) not in obs.seen_before}
    assert reaper.look_at_net(p.seen, False) == bool(noted)
    assert reaper.look_at_net(frozenset(), True)


def test_plan_examples() -> None:
    vm = "abcdefghijkl"
    mine, theirs = KEY + vm, OTHER + vm  # root B runs a VM with the same id
    obs = reaper.Observed(vms=(reaper.VMView(vm, "running", False, False),), root_key=KEY,
                          vmm_pids={mine: 42, theirs: 43, vm: 44},
                          cgroups={mine: ("/c/cpu/kiln/" + mine,),
                                   theirs: ("/c/cpu/kiln/" + theirs,),
                                   vm: ("/c/cpu/kiln/" + vm,)})
    assert reaper.plan(obs) == reaper.Plan((
        reaper.Action("fail", vm, vm, "kiln run (the VM's owner) died"),
        reaper.Action("kill", "42", vm),
        reaper.Action("rmcgroup", "/c/cpu/kiln/" + mine, vm),
    ), frozenset())
    orphan = reaper.Observed(vms=(), root_key=KEY, vm_dirs=frozenset({vm, "not-kiln"}),
                             vmm_pids={mine: 42, theirs: 43}, jails={
                                 mine: "/j/firecracker/" + mine,
                                 theirs: "/j/firecracker/" + theirs,
                                 KEY + "bbbbbbbbbbbb": "/j/firecracker/elsewhere"})
    first = reaper.plan(orphan)
    assert (first.actions, first.seen) == ((), frozenset({
        ("dir", vm), ("process", f"{vm}:42"), ("jail", "/j/firecracker/" + mine)}))
    second = reaper.plan(replace(orphan, seen_before=first.seen))
    assert second.actions == (reaper.Action("kill", "42", vm, "orphan"),
                              reaper.Action("rmjail", "/j/firecracker/" + mine, vm, "orphan"),
                              reaper.Action("rmdir", vm, vm, "orphan"))
    # the network: a dead VM's objects go with it; a recordless VM's on the second look
    net = reaper.Observed(vms=(reaper.VMView(vm, "exited", False, False, net=True),
                               reaper.VMView("bbbbbbbbbbbb", "running", False, True,
                                             net=True)),
                          root_key=KEY, net_vms=frozenset({"bbbbbbbbbbbb", "cccccccccccc"}))
    look = reaper.plan(net)
    assert (look.actions, look.seen) == ((reaper.Action("rmnet", vm, vm),),
                                         frozenset({("net", "cccccccccccc")}))
    assert reaper.plan(replace(net, seen_before=look.seen)).actions == (
        reaper.Action("rmnet", vm, vm),
        reaper.Action("rmnet", "cccccccccccc", "cccccccccccc", "orphan"))
    # no key (or a malformed one): nothing host-wide is ever this root's
    assert reaper.plan(replace(orphan, root_key="", seen_before=first.seen)).actions == (
        reaper.Action("rmdir", vm, vm, "orphan"),)


def test_reconcile_on_a_real_root(tmp_path: Path) -> None:
    """A record whose owner died is failed; an orphan directory goes on the second pass;
    a foreign directory stays."""
    root = Root(tmp_path).ensure()
    st = State(root.path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    st.create(vm_id="aaaaaaaaaaaa", name=None, vmm="qemu", volume="sha256:" + "0" * 64,
              snapshot="vmaaaaaaaaaaaa", vm_dir=st.vms_dir / "aaaaaaaaaaaa", cgroups=[],
              want_uid=False, auto_remove=False, spec={})
    st.update("aaaaaaaaaaaa", owner_pid=dead.pid, owner_start=1, state="running")
    for d in ("aaaaaaaaaaaa", "bbbbbbbbbbbb", "not-kiln"):
        (st.vms_dir / d).mkdir(parents=True)
    reaper.reconcile(root, st)
    rec = st.get("aaaaaaaaaaaa")
    assert rec is not None
    assert (rec.state, rec.reason) == ("failed",
                                                           "kiln run (the VM's owner) died")
    assert (st.vms_dir / "bbbbbbbbbbbb").is_dir()  # seen once: kept
    reaper.reconcile(root, st)
    assert not (st.vms_dir / "bbbbbbbbbbbb").exists()
    assert (st.vms_dir / "not-kiln").is_dir()
    assert (st.vms_dir / "aaaaaaaaaaaa").is_dir()  # a failed VM keeps its files until rm


def test_jails_are_looked_for_only_in_a_root_that_set_one_up(tmp_path: Path,
                                                              monkeypatch: Any) -> None:
    """Loading the jails' configuration costs every command ~20 ms: the reaper does it only
    for a root marked by the Firecracker driver (or holding a Firecracker record); the mark
    is not a VM directory, so no round removes it."""
    from runner.vmm import choice

    root = Root(tmp_path).ensure()
    st = State(root.path)
    asked: list[Path] = []
    monkeypatch.setattr(choice, "config_problem",
                        lambda d: (asked.append(d), (None, "not configured"))[1])
    reaper.observe(root, st)
    assert asked == []
    st.create(vm_id="cccccccccccc", name=None, vmm="firecracker", volume="sha256:" + "0" * 64,
              snapshot="vmcccccccccccc", vm_dir=st.vms_dir / "cccccccccccc", cgroups=[],
              want_uid=False, auto_remove=False, spec={})
    reaper.observe(root, st)
    assert asked == [root.path]
    st.delete("cccccccccccc")
    state.mark_jails(root.path)
    state.mark_jails(root.path)  # idempotent
    reaper.observe(root, st)
    assert asked == [root.path, root.path]
    for _ in range(2):
        reaper.reconcile(root, st)
    assert (st.vms_dir / state.JAILS_MARK).is_file()
