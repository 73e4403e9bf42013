"""Reconcile VM records with what exists on the host: a pure plan and a thin executor.

Scope: one root. Its VM directories and pool snapshots are its own; cgroups, Firecracker
jails and VMM processes are host-wide, so there kiln names a VM ``<root key><VM id>``
(``runner.vm.state.host_name``) and this root considers only names carrying its key
(``runner.vm.state.vm_of_host``). Another root's VMs (another user, a CI job, a test), names
from before root keys existed, and anything else are never touched.

``plan()`` decides from an ``Observed`` snapshot of the world:

* a live VM (creating/running) whose owner (the ``kiln run`` process, by pid + start time)
  is dead becomes ``failed`` with the reason; its VMM is killed and its cgroups removed;
  with ``--rm`` its snapshot, files and record go too. A VM whose owner lives is never
  touched — in particular a VM being born;
* a finished VM still holding a VMM process or cgroups loses them;
* resources carrying this root's names but no record — a VMM started with ``-name
  kiln-<host name>`` (QEMU) or a Firecracker started by the jailer with ``--id <host
  name>``, a cgroup ``kiln/<host name>`` (every hierarchy, v1 and v2, and the configured
  jails' parent), a Firecracker jail ``<chroot base>/firecracker/<host name>``, a directory
  ``ROOT/vms/<id>``, a pool snapshot ``vm<id>`` — are orphans, removed only when the
  previous reconcile saw them too (records are written before resources, so an orphan
  seen twice is not a VM being born). Anything without kiln's names is never considered.
  Per VM, processes go first, then cgroups, then the jail (``helper.jail.jailer`` refuses to
  remove one with a live Firecracker or mounts inside), then the network;
* the kiln network (``--net tap``): a dead VM whose record holds network objects (or
  whose objects were seen) loses them at once — ``net-reclaim`` of that VM alone, through
  the helper, which touches only objects tagged with this root's key and the caller's uid
  (taps, VM namespaces with their veths, forwards, leases; NAT after the last). Objects
  tagged with this root but no record are orphans like the rest (seen twice). Looking
  costs a helper call, so records drive the common case and the network itself is listed
  only by ``kiln gc`` (``full``) and in the round after one that noted network orphans
  (their second sighting). Records are written before objects exist and deleted only
  after the network is released, so orphans need an outside hand (a deleted database).

Run by an ordinary user, cgroups go through kiln-helper's ``cgroup-kill``
(``runner.vm.cgroup.remove``), which acts only on cgroups that same user created: even a
mistaken plan cannot remove another user's.

``reconcile()`` gathers the observation (records, /proc, cgroup trees, the VM directory,
pool records), runs the plan, executes it, and stores this round's orphans for the next.
``discard()`` removes one finished VM and its record, leaf first: ``rmvm`` here and ``kiln
rm`` (``runner.vm.lifecycle.remove``) alike.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from builder.root import Root, rmtree
from helper.base.errors import KilnError, NotFound
from runner.vm.state import (
    LIVE,
    State,
    VMRecord,
    alive,
    host_name,
    proc_start_time,
    root_key,
    uses_jails,
    vm_of_host,
)

if TYPE_CHECKING:
    from helper.jail.jailer import JailConfig

log = logging.getLogger("kiln.reaper")

VM_ID = re.compile(r"^[a-z2-7]{12}$")
HOST_NAME = re.compile(r"^[a-z2-7]{1,32}$")  # kiln's shape of host-wide names (any root)
SNAP_PREFIX = "vm"
_T = TypeVar("_T")


def snapshot_id(vm_id: str) -> str:
    """The pool snapshot of a VM: kiln's prefix + the VM id."""
    return SNAP_PREFIX + vm_id


def vm_of_snapshot(snap_id: str) -> str | None:
    rest = snap_id.removeprefix(SNAP_PREFIX)
    return rest if snap_id.startswith(SNAP_PREFIX) and VM_ID.fullmatch(rest) else None


@dataclass(frozen=True)
class VMView:
    vm_id: str
    state: str
    auto_remove: bool
    owner_alive: bool
    net: bool = False  # the record says network objects may exist (runner.vm.state.net_held)


@dataclass(frozen=True)
class Observed:
    """The world as seen: this root's records, directories and snapshots; the host-wide
    kiln resources of *every* root, by host name (``plan`` keeps this root's)."""

    vms: tuple[VMView, ...]
    root_key: str  # this root's tag in host names (runner.vm.state.root_key)
    vmm_pids: dict[str, int] = field(default_factory=dict)  # host name → VMM pid
    cgroups: dict[str, tuple[str, ...]] = field(default_factory=dict)  # host name → dirs
    vm_dirs: frozenset[str] = frozenset()  # names under ROOT/vms
    snapshots: frozenset[str] = frozenset()  # pool snapshot ids
    jails: dict[str, str] = field(default_factory=dict)  # host name → Firecracker jail dir
    # VM ids of this root and caller holding network objects (tagged; net-list), or None
    # when the network was not looked at this round
    net_vms: frozenset[str] | None = None
    seen_before: frozenset[tuple[str, str]] = frozenset()


@dataclass(frozen=True)
class Action:
    kind: str  # fail | kill | rmcgroup | rmjail | rmnet | rmdir | rmsnapshot | rmvm
    target: str  # VM id, pid, path or snapshot id
    vm_id: str  # the VM it concerns
    reason: str = ""


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]
    seen: frozenset[tuple[str, str]]  # orphans seen this round (for the next)


def _mine(by_host: dict[str, _T], key: str) -> dict[str, _T]:
    """VM id → value for the host names of the root of ``key`` (others dropped)."""
    out: dict[str, _T] = {}
    for name, value in by_host.items():
        vm_id = vm_of_host(name, key)
        if vm_id is not None:
            out[vm_id] = value
    return out


def _leaf(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def plan(obs: Observed) -> Plan:
    """What to do (pure). See the module docstring for the rules."""
    actions: list[Action] = []
    known = {v.vm_id for v in obs.vms}
    key = obs.root_key
    vmm_pids = _mine(obs.vmm_pids, key)
    # a cgroup or jail path counts only when its last component is the host name itself
    cgroups = _mine({n: tuple(d for d in ds if _leaf(d) == n) for n, ds in obs.cgroups.items()},
                    key)
    jails = _mine({n: p for n, p in obs.jails.items() if _leaf(p) == n}, key)
    for v in obs.vms:
        if not VM_ID.fullmatch(v.vm_id):
            continue
        if v.state in LIVE:
            if v.owner_alive:
                continue  # its owner is in charge (this covers every VM being born)
            why = ("kiln was killed while creating the VM" if v.state == "creating"
                   else "kiln run (the VM's owner) died")
            actions.append(Action("fail", v.vm_id, v.vm_id, why))
        elif v.owner_alive:
            continue  # the owner is finishing up (cgroups, --rm)
        if v.vm_id in vmm_pids:
            actions.append(Action("kill", str(vmm_pids[v.vm_id]), v.vm_id))
        actions += [Action("rmcgroup", d, v.vm_id) for d in cgroups.get(v.vm_id, ())]
        if v.vm_id in jails:
            actions.append(Action("rmjail", jails[v.vm_id], v.vm_id))
        if v.net or v.vm_id in (obs.net_vms or ()):
            actions.append(Action("rmnet", v.vm_id, v.vm_id))
        if v.auto_remove:
            actions.append(Action("rmvm", v.vm_id, v.vm_id))
    candidates: list[tuple[str, str, str]] = []  # (kind, name, vm id)
    for vm_id, pid in vmm_pids.items():
        if vm_id not in known:
            candidates.append(("process", f"{vm_id}:{pid}", vm_id))
    for vm_id, dirs in cgroups.items():
        if vm_id not in known:
            candidates += [("cgroup", d, vm_id) for d in dirs]
    for vm_id, path in jails.items():
        if vm_id not in known:
            candidates.append(("jail", path, vm_id))
    for vm_id in obs.net_vms or ():
        if VM_ID.fullmatch(vm_id) and vm_id not in known:
            candidates.append(("net", vm_id, vm_id))
    for name in obs.vm_dirs:
        if VM_ID.fullmatch(name) and name not in known:
            candidates.append(("dir", name, name))
    for snap in obs.snapshots:
        owner = vm_of_snapshot(snap)
        if owner is not None and owner not in known:
            candidates.append(("snapshot", snap, owner))
    seen: set[tuple[str, str]] = set()
    kinds = {"process": "kill", "cgroup": "rmcgroup", "jail": "rmjail", "net": "rmnet",
             "dir": "rmdir", "snapshot": "rmsnapshot"}
    order = list(kinds)  # processes, then cgroups, then the jail (no live VMM inside)
    for kind, name, vm_id in sorted(candidates, key=lambda c: (order.index(c[0]), c[1])):
        if (kind, name) in obs.seen_before:
            target = name.split(":", 1)[1] if kind == "process" else name
            actions.append(Action(kinds[kind], target, vm_id, "orphan"))
        else:
            seen.add((kind, name))
    return Plan(tuple(actions), frozenset(seen))


# -- observation -----------------------------------------------------------------------------

def vmm_of(argv: list[bytes]) -> str | None:
    """The host name of a kiln VMM's argv, whatever its root (pure): QEMU's ``-name
    kiln-<host name>,…``, or the ``/firecracker --id <host name>`` the jailer execs (jail
    ids are host names)."""
    if argv and b"qemu-system" in argv[0] and b"-name" in argv:
        i = argv.index(b"-name")
        m = re.match(rb"^kiln-([a-z2-7]{1,32}),", argv[i + 1] if i + 1 < len(argv) else b"")
        return m.group(1).decode() if m else None
    if len(argv) > 2 and b"firecracker" in argv[0].rsplit(b"/", 1)[-1] and argv[1] == b"--id":
        m = re.fullmatch(rb"[a-z2-7]{1,32}", argv[2])  # the jailer execs "/firecracker --id ID"
        return m.group(0).decode() if m else None
    return None


def scan_vmms() -> dict[str, int]:
    """Host name → pid of every kiln VMM on the host, of every root (``vmm_of``)."""
    out: dict[str, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        name = vmm_of(argv)
        if name is not None:
            out[name] = int(entry.name)
    return out


def scan_cgroups(parents: Iterable[str] = ("kiln",)) -> dict[str, tuple[str, ...]]:
    """Host name → its cgroup directories: ``<hierarchy>/<parent>/<name>`` in every mounted
    v1 hierarchy and the v2 one, for kiln's parent(s) only, of every root."""
    from helper.cgroup import CgroupConfig, layout

    found: dict[str, list[str]] = {}
    with contextlib.suppress(OSError):
        lay = layout(CgroupConfig())
        mounts = sorted({str(m) for m in [lay.v2, *lay.v1.values()] if m is not None})
        for mnt in mounts:
            for parent in dict.fromkeys(parents):
                with contextlib.suppress(OSError):
                    for e in os.scandir(Path(mnt, parent)):
                        if e.is_dir(follow_symlinks=False) and HOST_NAME.fullmatch(e.name):
                            found.setdefault(e.name, []).append(e.path)
    return {name: tuple(dirs) for name, dirs in found.items()}


def scan_jails(cfg: JailConfig | None) -> dict[str, str]:
    """Host name → jail directory of every jail under the configured base with a name of
    kiln's shape, whatever its root (the reaper keeps its own root's)."""
    if cfg is None:
        return {}
    base = cfg.chroot_base / cfg.firecracker.name
    try:
        names = os.listdir(base)
    except OSError:
        return {}
    return {n: str(base / n) for n in names if re.fullmatch(r"[a-z2-7]{1,32}", n)}


def look_at_net(seen_before: frozenset[tuple[str, str]], full: bool) -> bool:
    """Whether this round lists the kiln network (pure): ``kiln gc``, or a second sighting
    is due (a round that did not look would forget the first)."""
    return full or any(kind == "net" for kind, _ in seen_before)


def scan_net(root: Root) -> frozenset[str] | None:
    """VM ids of this root (and this caller) holding objects on the kiln network, through
    the helper's ``net-list``; None when it cannot be asked (not installed, refused)."""
    from runner import network
    from runner.vm import resources as vmres

    try:
        return frozenset(network.vms_on_network(vmres.net_call(root), root_key(root.path),
                                                os.getuid()))
    except (KilnError, OSError) as e:
        log.warning("reaper: the network was not looked at: %s", e)
        return None


def observe(root: Root, st: State, *, full: bool = False) -> tuple[Observed, list[VMRecord]]:
    """``full``: also look at the kiln network (a helper call: kiln gc, and any round after
    one that noted network orphans, which records alone cannot reveal)."""
    from builder.pool.base import load_records, pool_dir

    recs = st.all()
    views = tuple(VMView(r.id, r.state, bool(r.auto_remove), alive(r.owner_pid, r.owner_start),
                         r.net_held) for r in recs)
    vm_dirs: frozenset[str] = frozenset()
    with contextlib.suppress(OSError):
        vm_dirs = frozenset(os.listdir(st.vms_dir))
    snaps = frozenset(s.id for s in load_records(pool_dir(root.path) / "snapshots"))
    # Snapshots of known VMs are theirs, whatever their id.
    mine = {r.snapshot for r in recs}
    from runner.vm import cgroup as vmcgroup
    from runner.vmm import choice as vmmchoice

    cfg = vmmchoice.config_problem(root.path)[0] if uses_jails(root.path, recs) else None
    # The trusted config's cgroup parent: sudo callers' QEMU cgroups and Firecracker jails'
    # (cfg.cgroup.parent is the same value, and exists only when this one does).
    helper_parent = vmcgroup.helper_parent()
    parents = ("kiln", *((helper_parent,) if helper_parent is not None else ()))
    seen = frozenset(st.seen_orphans())
    look = look_at_net(seen, full)
    obs = Observed(vms=views, root_key=root_key(root.path), vmm_pids=scan_vmms(),
                   cgroups=scan_cgroups(parents),
                   vm_dirs=vm_dirs, snapshots=snaps - mine,
                   jails=scan_jails(cfg), net_vms=scan_net(root) if look else None,
                   seen_before=seen)
    return obs, recs


def execute(root: Root, st: State, actions: Iterable[Action]) -> None:
    from runner.vm import cgroup as vmcgroup

    key = root_key(root.path)
    for a in actions:
        try:
            if a.kind == "fail":
                st.finish(a.target, "failed", None, a.reason)
            elif a.kind == "kill":
                pid = int(a.target)
                if _is_vmm_of(pid, host_name(key, a.vm_id)):
                    os.kill(pid, signal.SIGKILL)
            elif a.kind == "rmcgroup":
                vmcgroup.remove([a.target])  # as root directly, else through kiln-helper
            elif a.kind == "rmjail":
                from runner.vmm import firecracker  # a jail is Firecracker's, whatever the record

                firecracker.teardown(root.path, host_name(key, a.vm_id), None, a.target)
            elif a.kind == "rmnet":
                from runner.vm import resources as vmres

                vmres.release_net(root, st, a.vm_id, found=True)
            elif a.kind == "rmdir":
                rmtree(st.vms_dir / a.target)
            elif a.kind == "rmsnapshot":
                from builder.pool import open_pool

                pool = open_pool(root.path)
                if pool is not None:
                    pool.remove_snapshot(a.target)
            elif a.kind == "rmvm":
                discard(root, st, st.find(a.target))
        except (KilnError, OSError) as e:
            log.warning("reaper: %s %s: %s", a.kind, a.target, e)


def discard(root: Root, st: State, rec: VMRecord) -> None:
    """Remove a finished VM, leaf first: its network (raises while the helper refuses: the
    record stays, saying what is held), what its VMM holds (its driver's teardown: a
    Firecracker jail links the snapshot), its snapshot, cgroups and files, then its record.
    ``kiln rm`` (``runner.vm.lifecycle.remove``) and ``--rm`` VMs of a dead owner."""
    from builder.pool import open_pool
    from runner.vm import cgroup as vmcgroup
    from runner.vm import resources as vmres
    from runner.vmm import choice as vmmchoice

    vmres.release_net(root, st, rec.id)
    vmmchoice.driver_for(root, rec.vmm).teardown(rec)
    pool = open_pool(root.path)
    if pool is not None:
        with contextlib.suppress(NotFound):
            pool.remove_snapshot(rec.snapshot)
    vmcgroup.remove(rec.cgroup_dirs)
    rmtree(Path(rec.dir))
    st.delete(rec.id)


def _is_vmm_of(pid: int, name: str) -> bool:
    """Re-check just before the kill: the pid is still the VMM of that host name."""
    if proc_start_time(pid) is None:
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return vmm_of(argv) == name


def reconcile(root: Root, st: State | None = None, *, full: bool = False) -> Plan:
    """Observe, plan, execute; remember this round's orphans. ``full``: ``kiln gc``'s
    round, which also looks for network orphans (see ``observe``)."""
    st = st or State(root.path)
    obs, _ = observe(root, st, full=full)
    p = plan(obs)
    execute(root, st, p.actions)
    st.set_orphans(set(p.seen))
    return p
