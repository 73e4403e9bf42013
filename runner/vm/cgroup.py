"""A VM's cgroups, kiln's side, for both VMMs: which ones, with which limits, made how.

The record names the directories before any exists (``VMCgroups.dirs``, from the driver's
``reserve``); teardown derives what to kill from recorded or scanned directories, so the
reaper passes an orphan's directories the same way. The helper's side (the privileged
create, attach and kill) is ``helper.cgroup`` and ``helper.cgattach``.

QEMU as root (``root_plan``, pure: from the mount table and the v2 root's controllers to
the directories and limit files): ``kiln/<host name>`` in the v2 tree when it has the cpu
and memory controllers, else in the v1 cpu and memory hierarchies; kiln writes the limits
itself (``apply_root_plan``), the VMM's child joins before it execs
(``runner.vmm.process.spawn``), and teardown kills and removes the directories
(``remove_as_root``). Limits are best effort: a host that refuses them gets a warning, the
VM still runs.

QEMU for anyone else (a developer or CI account with the sudoers rule for kiln-helper):
each step is a helper op through ``sudo -n`` (``builder.helperclient.HelperOps``), under the
helper's configured parent (``[jails] cgroup_parent``, default ``kiln``):

* ``cgroup-create`` with cpu and memory limits — v2 when the unified tree has cpu and
  memory, else v1 (cpu, memory, and freezer for the kill), else none (``choice``, pure);
* ``cgroup-attach`` of the forked child that will exec QEMU: it waits on a pipe until the
  helper has moved it, so QEMU runs inside from its first instruction; the helper moves
  only the caller's own processes into the caller's own cgroups;
* ``cgroup-kill`` when the VM ends, is stopped, removed, or reaped.

Firecracker (``firecracker_choice``, pure): the same helper ops under the jails' parent,
made by the driver's launch (``runner.vmm.fcapi``), which the jailer then joins: v2 when
the unified tree has cpu, memory and pids; else v1 when those and freezer are mounted;
else v2 without limits (the cgroup still bounds the teardown); else refused.

Limits: +0.5 cpu for the VMM's own threads beside the vCPUs; memory is the guest's plus
the VMM's own (``QEMU_MEMORY_OVERHEAD``, ``FC_MEMORY_OVERHEAD``); pids bound a guest
escape's fork bomb. ``remove`` never raises (a refusal is logged); a failed create is a
warning, as on root: the VM still runs, without limits.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from helper import cgroup as cg
from helper.base.errors import KilnError

log = logging.getLogger("kiln.vm")

ROOT_PARENT = "kiln"  # root's QEMU cgroups: <hierarchy>/kiln/<host name>
QEMU_MEMORY_OVERHEAD = 320 << 20  # QEMU itself + the TCG code cache (tb-size=128) + slack
QEMU_PIDS = 512
FC_MEMORY_OVERHEAD = 128 << 20  # Firecracker itself (~10 MiB) + the snapshot's page cache (v1)
FC_PIDS = 128


@dataclass(frozen=True)
class CgroupPlan:
    """Root's cgroups of one VM: directories and limit files kiln writes itself."""

    version: int  # 1 | 2 | 0 (none usable)
    dirs: tuple[str, ...]  # created in order, removed in reverse
    writes: tuple[tuple[str, str], ...]  # (file path, value)
    parents: tuple[str, ...] = ()  # created if missing, never removed


@dataclass(frozen=True)
class VMCgroups:
    """What a VM's record names and how the cgroups get made."""

    dirs: tuple[str, ...]  # recorded before anything exists
    root_plan: CgroupPlan | None = None  # as root: made directly
    host: str = ""  # through the helper: the VM's host name (cgroup leaf) ...
    version: int = 0  # ... its cgroup version (0: none) ...
    limits: cg.Limits = field(default_factory=cg.Limits)  # ... and limits


NONE = VMCgroups(())


def privileged() -> bool:
    return os.geteuid() == 0


# -- the choices (pure) -----------------------------------------------------------------------

def parse_cgroup_mounts(mounts: str) -> tuple[dict[str, str], str | None]:
    """(/proc/self/mounts) → ({v1 controller: mount point}, v2 mount point or None)."""
    v1: dict[str, str] = {}
    v2: str | None = None
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        _, mnt, fstype, opts = parts[:4]
        if fstype == "cgroup2" and v2 is None:
            v2 = mnt
        elif fstype == "cgroup":
            for opt in opts.split(","):
                if opt in ("cpu", "memory", "pids"):
                    v1[opt] = mnt
    return v1, v2


def root_plan(mounts: str, v2_controllers: str, leaf: str, cpus: int,
              memory: int) -> CgroupPlan:
    """Root's cgroup directories and limits of one QEMU VM (pure): ``kiln/<leaf>`` in each
    hierarchy, ``leaf`` being the VM's host name (``runner.vm.state.host_name``)."""
    v1, v2 = parse_cgroup_mounts(mounts)
    ctrls = set(v2_controllers.split())
    quota = cpus * 100_000 + 50_000  # the VMM's own threads (I/O, TCG) beside the vCPUs
    if v2 is not None and {"cpu", "memory"} <= ctrls:
        parent = f"{v2}/{ROOT_PARENT}"
        d = f"{parent}/{leaf}"
        return CgroupPlan(2, (d,), (
            (f"{d}/cpu.max", f"{quota} 100000"),
            (f"{d}/memory.max", str(memory)),
            (f"{d}/memory.swap.max", "0"),
        ), parents=(parent,))
    if "cpu" in v1 and "memory" in v1:
        cpu_dir = f"{v1['cpu']}/{ROOT_PARENT}/{leaf}"
        mem_dir = f"{v1['memory']}/{ROOT_PARENT}/{leaf}"
        dirs = [cpu_dir] if v1["cpu"] == v1["memory"] else [cpu_dir, mem_dir]
        parents = tuple(sorted({f"{v1[c]}/{ROOT_PARENT}" for c in ("cpu", "memory")}))
        return CgroupPlan(1, tuple(dirs), (
            (f"{cpu_dir}/cpu.cfs_period_us", "100000"),
            (f"{cpu_dir}/cpu.cfs_quota_us", str(quota)),
            (f"{mem_dir}/memory.limit_in_bytes", str(memory)),
        ), parents=parents)
    return CgroupPlan(0, (), ())


def choice(lay: cg.Layout, v2_controllers: set[str], cpus: int, memory: int
           ) -> tuple[int, cg.Limits]:
    """(cgroup version, limits) of a QEMU VM made through the helper (pure); version 0:
    none."""
    # The helper refuses a sudo caller's cgroup without a memory limit, so a host without
    # cpu+memory controllers gets no VM cgroup (the VM runs unlimited).
    limits = cg.Limits(cpus=cpus + 0.5, memory_bytes=memory, pids=QEMU_PIDS)
    if lay.v2 is not None and {"cpu", "memory"} <= v2_controllers:
        return 2, limits
    if {"cpu", "memory", "freezer"} <= set(lay.v1):
        return 1, limits
    return 0, cg.Limits()


def firecracker_choice(lay: cg.Layout, v2_controllers: set[str], cpus: int, memory: int
                       ) -> tuple[int, cg.Limits]:
    """(cgroup version, limits) of a Firecracker VM (pure): v2 when the unified tree has
    cpu, memory and pids; else v1 when those and freezer are mounted (these machines); else
    v2 without limits (the cgroup still bounds the teardown)."""
    limits = cg.Limits(cpus=cpus + 0.5, memory_bytes=memory + FC_MEMORY_OVERHEAD,
                       pids=FC_PIDS)
    if lay.v2 is not None and {"cpu", "memory", "pids"} <= v2_controllers:
        return 2, limits
    if {"cpu", "memory", "pids", "freezer"} <= set(lay.v1):
        return 1, limits
    if lay.v2 is not None:
        return 2, cg.Limits()
    raise KilnError("no usable cgroup hierarchy for a Firecracker VM",
                    "mount cgroup2, or the v1 cpu, memory, pids and freezer controllers")


# -- plans from the host ------------------------------------------------------------------

def host_root_plan(leaf: str, cpus: int, memory: int) -> CgroupPlan:
    mounts = Path("/proc/self/mounts").read_text()
    _, v2 = parse_cgroup_mounts(mounts)
    ctrls = ""
    if v2 is not None:
        with contextlib.suppress(OSError):
            ctrls = Path(v2, "cgroup.subtree_control").read_text()
    return root_plan(mounts, ctrls, leaf, cpus, memory)


def _v2_controllers(lay: cg.Layout) -> set[str]:
    if lay.v2 is None:
        return set()
    with contextlib.suppress(OSError):
        return set((lay.v2 / "cgroup.controllers").read_text().split())
    return set()


def helper_parent() -> str | None:
    """The helper's cgroup parent from its trusted config (None when it cannot be read)."""
    from helper import config

    try:
        return config.load().cgroup_parent
    except (KilnError, OSError):
        return None


def _through_helper(cfg: cg.CgroupConfig, host: str, version: int,
                    limits: cg.Limits) -> VMCgroups:
    only = cg.v1_controllers(limits) if version == 1 else None
    dirs = tuple(str(d) for d in cg.vm_dirs(cfg, host, version, only))
    return VMCgroups(dirs, host=host, version=version, limits=limits)


def qemu_plan(host: str, cpus: int, memory: int) -> VMCgroups:
    """The cgroups of the QEMU VM with host name ``host`` and ``memory`` for the guest."""
    memory += QEMU_MEMORY_OVERHEAD
    if privileged():
        p = host_root_plan(host, cpus, memory)
        return VMCgroups(p.dirs, root_plan=p)
    from builder.helperclient import HELPER

    parent = helper_parent()
    if parent is None or not os.path.exists(HELPER):  # no sudo prompt/incident for nothing
        return NONE
    cfg = cg.CgroupConfig(parent=parent)
    lay = cg.layout(cfg)
    version, limits = choice(lay, _v2_controllers(lay), cpus, memory)
    if version == 0:
        return NONE
    return _through_helper(cfg, host, version, limits)


def host_firecracker_choice(cfg: cg.CgroupConfig, cpus: int, memory: int
                            ) -> tuple[int, cg.Limits]:
    lay = cg.layout(cfg)
    return firecracker_choice(lay, _v2_controllers(lay), cpus, memory)


def firecracker_plan(cfg: cg.CgroupConfig, host: str, cpus: int, memory: int) -> VMCgroups:
    """The cgroups of the Firecracker VM with host name ``host`` under the jails' parent
    (``cfg``); made by the driver's launch, whatever the caller."""
    version, limits = host_firecracker_choice(cfg, cpus, memory)
    return _through_helper(cfg, host, version, limits)


# -- making and removing ----------------------------------------------------------------------

def apply_root_plan(plan: CgroupPlan) -> list[str]:
    """Create the directories and write the limits; return warnings (best effort)."""
    warnings: list[str] = []
    for p in plan.parents:
        try:
            os.makedirs(p, exist_ok=True)
            if plan.version == 2:
                Path(p, "cgroup.subtree_control").write_text("+cpu +memory")
        except OSError as e:
            warnings.append(f"cgroup {p}: {e.strerror}")
    for d in plan.dirs:
        try:
            os.mkdir(d)
        except FileExistsError:
            pass
        except OSError as e:
            warnings.append(f"cgroup {d}: {e.strerror}")
    for path, value in plan.writes:
        try:
            Path(path).write_text(value)
        except OSError as e:
            warnings.append(f"cgroup limit {path}={value}: {e.strerror}")
    return warnings


def create(vcg: VMCgroups) -> list[str]:
    """Make a QEMU VM's cgroups with their limits; the warnings (best effort, like
    root's)."""
    if vcg.root_plan is not None:
        return apply_root_plan(vcg.root_plan)
    if not vcg.version:
        return ["no usable cgroup hierarchy, or kiln-helper is not installed (or its "
                "config is unreadable)"]
    from builder.helperclient import HelperOps

    try:
        HelperOps().cgroup_create(vcg.host, vcg.version, vcg.limits)
    except KilnError as e:
        return [f"cgroup {vcg.host}: {e.message}"]
    return [] if vcg.limits != cg.Limits() else \
        [f"cgroup {vcg.host}: no cpu/memory controllers in the v2 tree"]


def targets(dirs: Sequence[str]) -> set[tuple[str, int]]:
    """(host name, version) of each existing VM cgroup directory among ``dirs``."""
    lay = cg.layout(cg.CgroupConfig())
    out: set[tuple[str, int]] = set()
    for d in dirs:
        p = Path(d)
        if not cg.VM_ID_RE.fullmatch(p.name) or not p.is_dir():
            continue
        if lay.v2 is not None and p.is_relative_to(lay.v2):
            out.add((p.name, 2))
        elif any(p.is_relative_to(m) for m in lay.v1.values()):
            out.add((p.name, 1))
    return out


def attacher(dirs: Sequence[str]) -> Callable[[int], None] | None:
    """How the VMM's child joins the cgroups: None as root (the child joins itself)."""
    if privileged():
        return None
    found = sorted(targets(dirs))
    if not found:
        return None  # not made (the warning was given): the VM runs without
    from builder.helperclient import HelperOps

    ops = HelperOps()

    def attach(pid: int) -> None:
        for host, version in found:
            ops.cgroup_attach(host, version, pid)

    return attach


def cgroup_pids(dirs: Sequence[str]) -> set[int]:
    pids: set[int] = set()
    for d in dirs:
        with contextlib.suppress(OSError):
            pids |= {int(x) for x in Path(d, "cgroup.procs").read_text().split()}
    return pids


def remove_as_root(dirs: Sequence[str]) -> None:
    """Kill whatever is left in the VM's cgroups, then remove them."""
    for pid in cgroup_pids(dirs):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for d in reversed(dirs):
        for _ in range(50):
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != errno.EBUSY:
                    break
                time.sleep(0.02)


def remove(dirs: Sequence[str]) -> None:
    """Kill whatever is left in the VM's cgroups and remove them (never raises)."""
    if privileged():
        remove_as_root(dirs)
        return
    found = sorted(targets(dirs))
    if not found:
        return
    from builder.helperclient import HelperOps

    ops = HelperOps()
    for host, version in found:
        try:
            ops.cgroup_kill(host, version)
        except (KilnError, OSError) as e:
            log.warning("cgroup %s: %s", host, e)
