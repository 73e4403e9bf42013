"""The reaper's decision core (hypothesis properties) and its executor on a real root."""

from __future__ import annotations

import subprocess
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from builder.root import Root
from runner import reaper
from runner.state import State

ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz234567", min_size=12, max_size=12)
foreign = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0189-_.ABC", min_size=1, max_size=14)
names = st.one_of(ids, foreign)
states = st.sampled_from(["creating", "running", "exited", "failed"])


@st.composite
def worlds(draw: st.DrawFn) -> reaper.Observed:
    vms = tuple({v.id: v for v in draw(st.lists(st.builds(
        reaper.VMView, id=ids, state=states, auto_remove=st.booleans(),
        owner_alive=st.booleans()), max_size=6))}.values())
    pool = [v.id for v in vms] + draw(st.lists(names, min_size=1, max_size=6))
    vmm = draw(st.dictionaries(st.sampled_from(pool), st.integers(2, 99999), max_size=4))
    cg = draw(st.dictionaries(st.sampled_from(pool),
                              st.lists(st.sampled_from(["/c/cpu/kiln/", "/c/memory/kiln/"]),
                                       min_size=1, max_size=2, unique=True), max_size=4))
    cgroups = {k: tuple(p + k for p in v) for k, v in cg.items()}
    dirs = frozenset(draw(st.lists(st.sampled_from(pool), max_size=4)))
    snaps = frozenset(draw(st.lists(st.one_of(st.sampled_from(pool).map(lambda i: "vm" + i),
                                              foreign), max_size=4)))
    cands = [("process", f"{k}:{p}") for k, p in vmm.items()] + \
        [("cgroup", d) for ds in cgroups.values() for d in ds] + \
        [("dir", d) for d in dirs] + [("snapshot", s) for s in snaps]
    seen = frozenset(draw(st.lists(st.sampled_from(cands), max_size=len(cands)))
                     if cands else [])
    return reaper.Observed(vms=vms, vmm_pids=vmm, cgroups=cgroups, vm_dirs=dirs,
                           snapshots=snaps, seen_before=seen)


@given(worlds())
def test_a_vm_whose_owner_lives_is_never_touched(obs: reaper.Observed) -> None:
    """Covers every VM being born: its record exists (state creating) and its owner runs."""
    protected = {v.id for v in obs.vms if v.owner_alive}
    assert not [a for a in reaper.plan(obs).actions if a.vm in protected]


@given(worlds())
def test_orphans_only_when_seen_twice(obs: reaper.Observed) -> None:
    known = {v.id for v in obs.vms}
    p = reaper.plan(obs)
    for a in p.actions:
        if a.vm not in known:
            assert a.reason == "orphan"
            kind = {"kill": "process", "rmcgroup": "cgroup", "rmdir": "dir",
                    "rmsnapshot": "snapshot"}[a.kind]
            name = f"{a.vm}:{a.target}" if kind == "process" else a.target
            assert (kind, name) in obs.seen_before
    # and whatever was not acted on is remembered for next time
    acted = {(a.kind, a.target) for a in p.actions}
    for kind, name in p.seen:
        assert (kind, name) not in obs.seen_before
        assert all(t != name for _, t in acted)


@given(worlds())
def test_never_anything_without_kilns_names(obs: reaper.Observed) -> None:
    for a in reaper.plan(obs).actions:
        assert reaper.VM_ID.fullmatch(a.vm)
        if a.kind == "rmsnapshot":
            assert a.target == "vm" + a.vm
        if a.kind == "rmcgroup":
            assert a.target.endswith("/kiln/" + a.vm)
        if a.kind == "rmdir":
            assert a.target == a.vm
        if a.kind == "kill":
            assert obs.vmm_pids[a.vm] == int(a.target)


@given(worlds())
def test_dead_owner_fails_live_vm_and_cleans_up(obs: reaper.Observed) -> None:
    p = reaper.plan(obs)
    for v in obs.vms:
        mine = [a for a in p.actions if a.vm == v.id]
        if v.owner_alive:
            continue
        kinds = [a.kind for a in mine]
        assert ("fail" in kinds) == (v.state in ("creating", "running"))
        assert ("kill" in kinds) == (v.id in obs.vmm_pids)
        assert ("rmvm" in kinds) == v.auto_remove


def test_plan_examples() -> None:
    vm = "abcdefghijkl"
    obs = reaper.Observed(vms=(reaper.VMView(vm, "running", False, False),),
                          vmm_pids={vm: 42}, cgroups={vm: ("/c/cpu/kiln/" + vm,)})
    assert reaper.plan(obs).actions == (
        reaper.Action("fail", vm, vm, "kiln run (the VM's owner) died"),
        reaper.Action("kill", "42", vm),
        reaper.Action("rmcgroup", "/c/cpu/kiln/" + vm, vm),
    )
    orphan = reaper.Observed(vms=(), vm_dirs=frozenset({vm, "not-kiln"}))
    first = reaper.plan(orphan)
    assert (first.actions, first.seen) == ((), frozenset({("dir", vm)}))
    second = reaper.plan(reaper.Observed(vms=(), vm_dirs=frozenset({vm}),
                                         seen_before=first.seen))
    assert second.actions == (reaper.Action("rmdir", vm, vm, "orphan"),)


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
