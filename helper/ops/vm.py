"""VM ops: cgroups and taps (Firecracker jails: ``helper.ops.jail``).

VM uids/gids come only from the configured range, never 0 or the caller's
(``opbase.check_vm_uid``).

Cgroup ownership. VM cgroups live in a host-wide tree under the configured parent, named
by the VM id the caller sends, so the name alone does not say whose a cgroup is. When
``cgroup-create`` makes one for a sudo caller, the helper writes a claim into that caller's
area — ``<area>/cgroups/<vm>`` (root-owned; the caller cannot write there): the cgroup
version, the boot id and the (device, inode) of every directory made (``helper.claims``).
``cgroup-attach`` and ``cgroup-kill`` act only when every existing directory of that VM
matches the caller's claim, so another user's cgroup (or one a reboot or a removal
recycled under the same name) is refused. ``cgroup-kill`` drops the claim. Root in-process
(``trusted``) needs no claim. A sudo caller's cgroup always has a memory limit (required)
and a pids limit (``DEFAULT_PIDS`` when none is sent), and one caller holds at most
``[limits] cgroups`` VM cgroups: what the helper makes for a caller is bounded. A VM
cgroup directory a jail-launch made for the caller's jail (recorded in its jail claim)
counts as the caller's too. ``cgroup-create`` and ``cgroup-kill`` hold the host-wide
``CG_LOCK`` that ``jail-launch`` holds from its ownership check until its jailer is done,
so no cgroup of that name appears or goes in between.

Taps (``tap-create``/``tap-delete``): a tap made for a sudo caller carries the alias tag
``kiln vm=<tap> root=<area key> uid=<caller>`` (the ``helper.net.core`` format), and
``tap-delete`` removes only a tap whose tag names the caller's uid (root: any kiln tap).
"""


from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from helper import cgattach, claims
from helper import cgroup as cg
from helper.base import safepath
from helper.base.errors import NotFound, UsageError
from helper.net import core as netcore
from helper.net import tap
from helper.ops.base import Ctx, KilnId, Op, Req, Uid, check_vm_uid

# -- cgroups and taps -----------------------------------------------------------------------


def _cgroups(ctx: Ctx) -> cg.CgroupConfig:
    """Where VM cgroups live (no jail tools needed: QEMU VMs have cgroups too)."""
    return cg.CgroupConfig(parent=ctx.cfg.cgroup_parent)


class Limits(Req):
    """A VM's resource limits."""

    cpus: float | None = Field(default=None, ge=0.01, le=1024, description="CPU quota")
    memory_bytes: int | None = Field(default=None, ge=1 << 24, le=1 << 44,
                                     description="memory limit in bytes")
    pids: int | None = Field(default=None, ge=1, le=4_194_304, description="pids limit")


class CgroupCreate(Req):
    """Create a VM's cgroup(s) under the configured parent and apply limits."""

    vm: KilnId = Field(description="the VM id")
    version: Literal[1, 2] = Field(description="cgroup version to use")
    limits: Limits = Field(default_factory=Limits, description="resource limits")


_CLAIMS = claims.CGROUPS  # <area>/cgroups/<vm>: the caller's VM cgroups (see the docstring)
CG_LOCK = "vm-cgroups.lock"  # <[pool] directory>/…: cgroup-create/-kill vs jail-launch
DEFAULT_PIDS = 4096  # the pids limit of a sudo caller's VM cgroup when it sends none


def check_owner(ctx: Ctx, vm: str, version: int) -> None:
    """Refuse unless every existing directory of ``vm`` is one this caller created."""
    if ctx.trusted:
        return
    existing = [d for d in cg.vm_dirs(_cgroups(ctx), vm, version) if d.is_dir()]
    claim = claims.read(ctx.area, _CLAIMS, vm)
    mine = claim is not None and claim.get("version") == version
    jailed = jail_cgroups(ctx, vm)
    if (not mine and not jailed) or not all(
            (mine and claims.holds(claim, [d])) or claims.same(jailed.get(str(d)), d)
            for d in existing):
        raise UsageError(f"refusing cgroup {vm}: uid {ctx.caller_uid} did not create it",
                         "kiln-helper acts only on cgroups its caller made (cgroup-create)")


def jail_cgroups(ctx: Ctx, vm: str) -> dict[str, Any]:
    """{directory: identity} of the cgroups jail-launch made for the caller's jail ``vm``."""
    doc = claims.read(ctx.area, claims.JAILS, vm) or {}
    got = doc.get("cgroups") if doc.get("boot") == claims.boot_id() else None
    return got if isinstance(got, dict) else {}


def cgroup_create(ctx: Ctx, req: CgroupCreate) -> dict[str, Any]:
    pids = req.limits.pids
    if not ctx.trusted:
        if req.limits.memory_bytes is None:
            raise UsageError(f"refusing cgroup {req.vm}: no memory limit",
                             "a sudo caller's VM cgroup needs limits.memory_bytes")
        pids = pids or DEFAULT_PIDS
        held, cap = claims.names(ctx.area, _CLAIMS), ctx.cfg.limits.cgroups
        if len(held) >= cap:
            raise UsageError(f"refusing cgroup {req.vm}: uid {ctx.caller_uid} already holds "
                             f"{len(held)} VM cgroups (at most {cap})",
                             "remove VMs you no longer need (kiln rm)")
    lim = cg.Limits(req.limits.cpus, req.limits.memory_bytes, pids)
    cfg = _cgroups(ctx)
    with cgattach.uninterrupted(), safepath.root_lock(ctx.cfg.pool_dir, CG_LOCK):
        # the cgroup and its claim come together
        dirs = cg.cgroup_create(cfg, req.vm, req.version, lim)
        if not ctx.trusted:
            try:
                claims.write(ctx.area, _CLAIMS, req.vm, dirs, version=req.version)
            except BaseException:
                cg.cgroup_kill(cfg, req.vm, req.version)
                raise
    return {"dirs": [str(d) for d in dirs]}


class CgroupAttach(Req):
    """Move one of the caller's processes into that caller's VM cgroup(s)."""

    vm: KilnId = Field(description="the VM id (its cgroup must be the caller's)")
    version: Literal[1, 2] = Field(description="cgroup version it was created with")
    pid: int = Field(ge=2, le=4_194_304,
                     description="the process to move: one of the caller's own")


def cgroup_attach(ctx: Ctx, req: CgroupAttach) -> dict[str, Any]:
    cfg = _cgroups(ctx)
    if not cg.cgroup_exists(cfg, req.vm, req.version):
        raise NotFound(f"VM {req.vm} has no cgroup", "create it first (cgroup-create)")
    with cgattach.uninterrupted():  # no relayed stop signal may stretch the check-to-move window
        check_owner(ctx, req.vm, req.version)
        dirs = cgattach.cgroup_attach(cfg, req.vm, req.version, req.pid, ctx.caller_uid)
    return {"dirs": [str(d) for d in dirs]}


class CgroupKill(Req):
    """Kill everything in a VM's cgroup(s) and remove them."""

    vm: KilnId = Field(description="the VM id")
    version: Literal[1, 2] = Field(description="cgroup version it was created with")


def cgroup_kill(ctx: Ctx, req: CgroupKill) -> dict[str, Any]:
    cfg = _cgroups(ctx)
    # killed and removed, then unclaimed: never half of it
    with cgattach.uninterrupted(), safepath.root_lock(ctx.cfg.pool_dir, CG_LOCK):
        if not cg.cgroup_exists(cfg, req.vm, req.version):
            if not ctx.trusted and (claims.read(ctx.area, _CLAIMS, req.vm) or {}).get(
                    "version") == req.version:
                # removed meanwhile (by root, a reboot): forget it
                claims.drop(ctx.area, _CLAIMS, req.vm)
            raise NotFound(f"VM {req.vm} has no cgroup", "")
        check_owner(ctx, req.vm, req.version)
        killed = cg.cgroup_kill(cfg, req.vm, req.version)
        if not ctx.trusted:
            claims.drop(ctx.area, _CLAIMS, req.vm)
    return {"killed": killed}


TapName = Annotated[str, Field(pattern=tap.NAME_PATTERN, max_length=15,
                               description="kiln tap name: kt- + [a-z2-7]{1,12}")]


class TapCreate(Req):
    """Create a kiln tap device usable only by the VM's uid/gid."""

    name: TapName = Field(description="the tap's name")
    uid: Uid = Field(description="the VM's uid")
    gid: Uid = Field(description="the VM's gid")


def _root(ctx: Ctx) -> bool:
    """Root itself: kiln in-process, or root running kiln-helper (not a sudo caller)."""
    return ctx.trusted or ctx.caller_uid == 0


def tap_create(ctx: Ctx, req: TapCreate) -> dict[str, Any]:
    # A sudo caller's tap would be untagged (nobody reclaims it) and could squat the name of
    # another user's VM tap: its VMs get their taps from tap-attach (tagged, on the bridge).
    if not _root(ctx):
        raise UsageError(f"refusing tap-create from uid {ctx.caller_uid}: only root creates "
                         "bare taps", "a VM's tap comes from tap-attach (kiln run --net tap)")
    check_vm_uid(ctx, req.uid, req.gid)
    tap.tap_create(req.name, req.uid, req.gid)
    return {}


class TapDelete(Req):
    """Delete a kiln tap device (a sudo caller: only one tagged as its own)."""

    name: TapName = Field(description="the tap's name")


def tap_delete(ctx: Ctx, req: TapDelete) -> dict[str, Any]:
    if not tap.exists(req.name):
        raise NotFound(f"tap {req.name} does not exist", "")
    if not _root(ctx):
        tag = netcore.parse_tag(tap.alias(req.name))
        if tag is None:
            raise UsageError(f"refusing tap {req.name}: kiln did not tag it",
                             "only root deletes an untagged tap")
        if tag.uid != ctx.caller_uid:
            raise UsageError(f"refusing tap {req.name}: it belongs to uid {tag.uid}",
                             "only its owner removes it")
    tap.tap_delete(req.name)
    return {}


OPS: dict[str, tuple[type[Req], Op]] = {
    "cgroup-create": (CgroupCreate, cgroup_create),
    "cgroup-attach": (CgroupAttach, cgroup_attach),
    "cgroup-kill": (CgroupKill, cgroup_kill),
    "tap-create": (TapCreate, tap_create),
    "tap-delete": (TapDelete, tap_delete),
}
