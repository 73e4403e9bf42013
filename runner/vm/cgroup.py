"""A QEMU VM's cgroups: made directly when kiln runs as root, through kiln-helper otherwise.

Root: ``supervise.host_cgroup_plan`` — ``kiln/<host name>`` in the v2 tree when it has the
cpu and memory controllers, else in the v1 cpu and memory hierarchies; kiln writes the
limits itself, the VMM's child joins before it execs (``supervise.spawn``), and teardown
kills and removes the directories (``supervise.remove_cgroups``).

Anyone else (a developer or CI account with the sudoers rule for kiln-helper): each step
is a helper op through ``sudo -n`` (``builder.helperclient.HelperOps``), under the helper's
configured parent (``[jails] cgroup_parent``, default ``kiln``):

* ``cgroup-create`` with cpu and memory limits — v2 when the unified tree has cpu and
  memory, else v1 (cpu, memory, and freezer for the kill), else v2 with no limits (the
  cgroup still bounds the teardown), else none (``choice``, pure);
* ``cgroup-attach`` of the forked child that will exec QEMU: it waits on a pipe until the
  helper has moved it, so QEMU runs inside from its first instruction; the helper moves
  only the caller's own processes into the caller's own cgroups;
* ``cgroup-kill`` when the VM ends, is stopped, removed, or reaped.

The record names the directories before any exists (``plan``). Teardown derives (host
name, version) from recorded or scanned directories (``targets``), so the reaper passes an
orphan's directories the same way; it never raises (a refusal is logged). A failed create
is a warning, as on root: the VM still runs, without limits.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from helper import cgroup as cg
from helper.base.errors import KilnError
from runner.vmm import process as supervise

log = logging.getLogger("kiln.vm")


@dataclass(frozen=True)
class VMCgroups:
    """What a VM's record names and how the cgroups get made."""

    dirs: tuple[str, ...]  # recorded before anything exists
    root_plan: supervise.CgroupPlan | None = None  # as root: made directly
    host: str = ""  # through the helper: the VM's host name (cgroup leaf) ...
    version: int = 0  # ... its cgroup version (0: none) ...
    limits: cg.Limits = field(default_factory=cg.Limits)  # ... and limits


NONE = VMCgroups(())


QEMU_PIDS = 512


def privileged() -> bool:
    return os.geteuid() == 0


def choice(lay: cg.Layout, v2_controllers: set[str], cpus: int, memory: int
           ) -> tuple[int, cg.Limits]:
    """(cgroup version, limits) of a VM made through the helper (pure); version 0: none."""
    # +0.5 cpu: QEMU's own threads; pids: QEMU's threads with room, and a bound on a guest
    # escape's fork bomb. The helper refuses a sudo caller's cgroup without a memory limit,
    # so a host without cpu+memory controllers gets no VM cgroup (the VM runs unlimited).
    limits = cg.Limits(cpus=cpus + 0.5, memory_bytes=memory, pids=QEMU_PIDS)
    if lay.v2 is not None and {"cpu", "memory"} <= v2_controllers:
        return 2, limits
    if {"cpu", "memory", "freezer"} <= set(lay.v1):
        return 1, limits
    return 0, cg.Limits()


def helper_parent() -> str | None:
    """The helper's cgroup parent from its trusted config (None when it cannot be read)."""
    from helper import config

    try:
        return config.load().cgroup_parent
    except (KilnError, OSError):
        return None


def plan(host: str, cpus: int, memory: int) -> VMCgroups:
    """The cgroups of the VM with host name ``host`` (``memory`` includes QEMU's own)."""
    if privileged():
        p = supervise.host_cgroup_plan(host, cpus, memory)
        return VMCgroups(p.dirs, root_plan=p)
    from builder.helperclient import HELPER

    parent = helper_parent()
    if parent is None or not os.path.exists(HELPER):  # no sudo prompt/incident for nothing
        return NONE
    cfg = cg.CgroupConfig(parent=parent)
    lay = cg.layout(cfg)
    ctrls: set[str] = set()
    if lay.v2 is not None:
        with contextlib.suppress(OSError):
            ctrls = set((lay.v2 / "cgroup.controllers").read_text().split())
    version, limits = choice(lay, ctrls, cpus, memory)
    if version == 0:
        return NONE
    only = cg.v1_controllers(limits) if version == 1 else None
    dirs = tuple(str(d) for d in cg.vm_dirs(cfg, host, version, only))
    return VMCgroups(dirs, host=host, version=version, limits=limits)


def create(vcg: VMCgroups) -> list[str]:
    """Make the cgroups with their limits; the warnings (best effort, like root's)."""
    if vcg.root_plan is not None:
        return supervise.apply_cgroups(vcg.root_plan)
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


def remove(dirs: Sequence[str]) -> None:
    """Kill whatever is left in the VM's cgroups and remove them (never raises)."""
    if privileged():
        supervise.remove_cgroups(dirs)
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
