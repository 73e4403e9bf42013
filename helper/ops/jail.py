"""Firecracker jail ops: stage, launch, grant the API socket, remove (``helper.jail.jailer``,
``helper.jail.stage``, ``helper.jail.cgroups``).

Ownership. A jail lives in a host-wide directory named by the VM id the caller sends, so
the name alone does not say whose it is. ``jail-stage`` writes a root-owned claim in the
caller's area, ``<area>/jails/<vm>`` (``helper.claims``: the boot id, the jail
directory's (device, inode), the VM uid/gid, staged dm devices, cgroups made for it)
*before* the jail directory exists (first naming its staging directory), so a helper
killed half-way leaves a record ``jail-remove`` acts on. ``jail-launch``,
``jail-grant-api`` and ``jail-remove`` act only with that claim. Root in-process
(``trusted``) needs no claim. Every caller's jail also holds its VM uid/gid host-wide
(``helper.vmuids``). A sudo caller holds at most ``[limits] jails`` jails.

``jail-launch`` of a sudo caller: the uid/gid are the staged ones; cgroup files come from
``jailcg``'s allowlist and must bound memory and pids; every cgroup directory the jailer
will write or join (``jailcg.jailer_dirs``) is the caller's (its cgroup claim) or does not
exist yet — then the helper makes it first and records it in the jail claim, and
``jail-remove`` removes it. All of that under ``ops_vm.CG_LOCK``, so no other cgroup of
that name appears between the check and the jailer. ``netns`` is only one of the
caller's own VM namespaces (``kn-…`` tagged with its uid).

Every op here runs with the signals sudo relays held (``cgattach.held``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from helper import cgattach, claims, vmuids
from helper import cgroup as cg
from helper.base import safepath
from helper.base.errors import Conflict, NotFound, UsageError
from helper.jail import cgroups as jailcg
from helper.jail import jailer as jail
from helper.jail import stage as jailstage
from helper.net import core as netcore
from helper.net import host as net
from helper.ops.base import Ctx, KilnId, Op, Req, Uid, check_vm_uid
from helper.ops.vm import CG_LOCK, check_owner
from helper.storage import poolfs

JAILS = claims.JAILS  # <area>/jails/<vm>: the caller's staged jails (see the docstring)
_VM_NETNS_RE = re.compile(netcore.NETNS_PATTERN)


def jail_config(ctx: Ctx) -> jail.JailConfig:
    c = ctx.cfg
    return jail.JailConfig(
        jailer=c.tools.get("jailer") or Path(c.tool("jailer")),
        firecracker=c.tools.get("firecracker") or Path(c.tool("firecracker")),
        chroot_base=c.chroot_base, uid_first=c.uid_first, uid_count=c.uid_count,
        sources=(ctx.area, *c.sources), area=ctx.area,
        cgroup=cg.CgroupConfig(parent=c.cgroup_parent))


def check_jail_owner(ctx: Ctx, vm: str) -> dict[str, Any]:
    """``vm``'s jail claim; refuses unless the jail (when it exists) is the one this caller
    staged. Root in-process: an empty claim."""
    if ctx.trusted:
        return {}
    jd = jail.jail_dir(jail_config(ctx), vm)
    claim = claims.read(ctx.area, JAILS, vm)
    existing = [jd] if jd.exists() else []
    if claim is None or not claims.holds(claim, existing) or \
            list(claim.get("dirs") or {}) != [str(jd)]:
        raise UsageError(f"refusing jail {vm}: uid {ctx.caller_uid} did not stage it",
                         "kiln-helper acts only on jails its caller staged (jail-stage)")
    return claim


def netns_problem(name: str, tag: netcore.Tag | None, caller_uid: int) -> str | None:
    """Why a sudo caller's Firecracker may not join network namespace ``name`` (pure):
    only a VM namespace (``kn-…``) whose owner tag is the caller's."""
    if not _VM_NETNS_RE.fullmatch(name):
        return f"refusing network namespace {name}: not a kiln VM namespace"
    if tag is None:
        return f"refusing network namespace {name}: kiln did not tag it"
    if tag.uid != caller_uid:
        return f"refusing network namespace {name}: it belongs to uid {tag.uid}"
    return None


class StageItemReq(Req):
    """One file placed in the chroot."""

    name: str = Field(pattern=jail.NAME_RE.pattern, description="file name in the chroot")
    source: str = Field(pattern=r"^/[A-Za-z0-9_][A-Za-z0-9._/+-]{0,1023}$",
                        description="absolute path under the area, or /dev/mapper/kiln-"
                        "<area key>-snap-… (a snapshot of the caller's area)")
    writable: bool = Field(default=False, description="the VM may write it (its rootfs)")


LogName = Annotated[str, Field(pattern=jail.NAME_RE.pattern, description="a log file name")]


class JailStage(Req):
    """Create the VM's jail and place its kernel, initrd and rootfs in it."""

    vm: KilnId = Field(description="the VM (= jail) id")
    uid: Uid = Field(description="the VM's uid, from the configured range")
    gid: Uid = Field(description="the VM's gid, from the configured range")
    items: tuple[StageItemReq, ...] = Field(max_length=16, description="files to stage")
    logs: tuple[LogName, ...] = Field(default=(), max_length=4,
                                      description="empty log files owned by the VM")


@cgattach.held
def jail_stage(ctx: Ctx, req: JailStage) -> dict[str, Any]:
    check_vm_uid(ctx, req.uid, req.gid)
    items = [jail.StageItem(i.name, Path(i.source), i.writable) for i in req.items]
    cfg = jail_config(ctx)
    jd = jail.jail_dir(cfg, req.vm)
    if not ctx.trusted:
        held, cap = claims.names(ctx.area, JAILS), ctx.cfg.limits.jails
        if req.vm in held:
            raise Conflict(f"jail {req.vm} is already staged (or half-made)",
                           "remove it first (jail-remove)")
        if len(held) >= cap:
            raise UsageError(f"refusing jail {req.vm}: uid {ctx.caller_uid} already holds "
                             f"{len(held)} jails (at most {cap})",
                             "remove VMs you no longer need (kiln rm)")
    doc: dict[str, Any] = {"uid": req.uid, "gid": req.gid}
    tmp: list[Path] = []

    def record(path: Path, ident: list[int] | None) -> None:
        # Before the staging directory exists, then with its inode (kept by the rename).
        tmp[:] = [path]
        claims.put(ctx.area, JAILS, req.vm, {**doc, "tmp": str(path),
                                             "dirs": {str(jd): ident}})

    with vmuids.locked(ctx), contextlib.ExitStack() as stack:  # uid: checked and claimed
        vmuids.check_free(ctx, req.uid, req.gid, cfg)  # as one step (helper.vmuids)
        budget = None if ctx.trusted else copy_budget(ctx, cfg, stack)
        try:
            staged = jailstage.jail_stage(
                cfg, req.vm, req.uid, req.gid, items, caller_uid=ctx.caller_uid,
                logs=req.logs, owner=None if ctx.trusted else ctx.caller_uid,
                record=None if ctx.trusted else record, budget=budget)
        except BaseException:
            if not ctx.trusted and not (tmp and os.path.lexists(tmp[0])):
                claims.drop(ctx.area, JAILS, req.vm)  # nothing left that it names
            raise
        try:
            if not ctx.trusted:
                claims.write(ctx.area, JAILS, req.vm, [jd], **doc, devices=staged.devices)
            vmuids.claim(ctx, req.vm, jd, req.uid, req.gid)
        except BaseException:
            shutil.rmtree(jd, ignore_errors=True)  # no jail without its claims
            if not ctx.trusted:
                claims.drop(ctx.area, JAILS, req.vm)
            raise
    return {"root": str(staged.root), "warnings": staged.warnings}


def copy_budget(ctx: Ctx, cfg: jail.JailConfig,
                 stack: contextlib.ExitStack) -> jailstage.Budget:
    """What a sudo caller's jail copies may take: the rest of its ``[limits] jail_bytes``
    (its jails' copies so far counted) and of the disk space no area's images were
    promised; the host-wide promise lock is held (on ``stack``) until the copies are made."""
    lim = ctx.cfg.limits
    users = stack.enter_context(poolfs.promise_lock(ctx.area.parent))
    unpromised = poolfs.unpromised(users, lim.pool_margin_percent)
    mine = sum(_copied_bytes(jail.chroot(cfg, vm)) for vm in claims.names(ctx.area, JAILS))
    return jailstage.Budget(max(0, min(lim.jail_bytes - mine, unpromised)))


def _copied_bytes(root: Path) -> int:
    """Bytes a jail's private copies take (single-link files: a hard link costs nothing)."""
    total = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir(root):
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                total += st.st_blocks * 512
    return total


CgFile = Annotated[str, Field(
    pattern=r"^((cpu|memory|pids)\.[a-z_]{1,24}=[0-9][0-9 ]{0,40}|freezer\.state=THAWED)$",
    description="a cgroup limit FILE=VALUE for the jailer (cpu.max, cpu.cfs_quota_us, "
    "cpu.cfs_period_us, memory.max, memory.limit_in_bytes, pids.max; v1 also "
    "freezer.state=THAWED)")]


class JailLaunch(Req):
    """Run the jailer for a staged jail; returns Firecracker's pid."""

    vm: KilnId = Field(description="the VM (= jail) id")
    uid: Uid = Field(description="the VM's uid")
    gid: Uid = Field(description="the VM's gid")
    cgroup_version: Literal[1, 2] = Field(default=2, description="cgroup version")
    cgroups: tuple[CgFile, ...] = Field(default=(), max_length=16,
                                        description="v1: cgroup files the jailer sets")
    parent_cgroup: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9_./-]{0,255}$",
                                      description="the configured parent, or parent/VM "
                                      "(a VM cgroup of the caller's)")
    netns: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$",
                              description="the caller's VM network namespace (kn-…) under "
                              "/run/netns")


@cgattach.held
def jail_launch(ctx: Ctx, req: JailLaunch) -> dict[str, Any]:
    check_vm_uid(ctx, req.uid, req.gid)
    claim = check_jail_owner(ctx, req.vm)
    if not ctx.trusted and (claim.get("uid"), claim.get("gid")) != (req.uid, req.gid):
        raise UsageError(f"refusing jail {req.vm}: it was staged for uid {claim.get('uid')} "
                         f"gid {claim.get('gid')}", "launch it as the uid/gid it was staged for")
    cfg = jail_config(ctx)
    files = tuple((k, v) for k, _, v in (c.partition("=") for c in req.cgroups))
    spec = jail.JailSpec(jail_id=req.vm, uid=req.uid, gid=req.gid,
                         cgroup_version=req.cgroup_version, cgroups=files,
                         parent_cgroup=req.parent_cgroup, netns=req.netns)
    jail.check_spec(cfg, spec)  # the allowlist of cgroup files, before anything is made
    if not ctx.trusted and req.netns is not None:
        tag = net.netns_tag(req.netns) if _VM_NETNS_RE.fullmatch(req.netns) else None
        if why := netns_problem(req.netns, tag, ctx.caller_uid):
            raise UsageError(why, "give your VM's own namespace (netns-create) or none")
    with safepath.root_lock(ctx.cfg.pool_dir, CG_LOCK):  # no cgroup appears until it ran
        if not ctx.trusted:
            make = _jailer_cgroups(ctx, cfg, spec, claim)
            if make:
                _make_cgroups(ctx, cfg, spec, claim, make)
        try:
            return {"pid": jail.jail_launch(cfg, spec)}
        except BaseException:
            if not ctx.trusted:  # a jailer that failed late may have started Firecracker:
                jail.kill_uid(req.uid)  # a refused launch leaves no process (uid held)
            raise


def _jailer_cgroups(ctx: Ctx, cfg: jail.JailConfig, spec: jail.JailSpec,
                    claim: dict[str, Any]) -> list[Path]:
    """Refuse unless every cgroup the jailer will write or join is the caller's; the ones
    that do not exist yet (the helper makes them first)."""
    top, vm, version = cfg.cgroup.parent, spec.jail_id, spec.cgroup_version
    if not spec.cgroups:  # v2: the jailer only joins <parent>, when it exists
        if version != 2 or spec.parent_cgroup != f"{top}/{vm}":
            raise UsageError(f"refusing jail {vm}: no memory and pids limits",
                             f"send cgroup limits with parent_cgroup {top!r}, or (v2) "
                             f"join your VM cgroup: parent_cgroup {top}/{vm}")
        check_owner(ctx, vm, 2)
        if not cg.cgroup_exists(cfg.cgroup, vm, 2):
            raise NotFound(f"VM {vm} has no cgroup", "create it first (cgroup-create)")
        return []
    if spec.parent_cgroup != top:
        raise UsageError(f"refusing parent cgroup {spec.parent_cgroup!r} with cgroup files",
                         f"send parent_cgroup {top!r}: the jailer's cgroup is {top}/{vm}")
    jailcg.check_bounded(version, spec.cgroups, vm)
    mine = claims.read(ctx.area, claims.CGROUPS, vm)
    mine = mine if (mine or {}).get("version") == version else None
    jailed = claim.get("cgroups") or {}
    make: list[Path] = []
    for d in jailcg.jailer_dirs(cfg.cgroup, version, top, vm, spec.cgroups,
                                cfg.firecracker.name):
        if not os.path.lexists(d):
            make.append(d)
        elif not ((mine and claims.holds(mine, [d])) or claims.same(jailed.get(str(d)), d)):
            raise UsageError(f"refusing cgroup {d}: uid {ctx.caller_uid} did not create it",
                             "launch into your own VM cgroup (cgroup-create) or a new one")
    return make


def _make_cgroups(ctx: Ctx, cfg: jail.JailConfig, spec: jail.JailSpec,
                  claim: dict[str, Any], make: list[Path]) -> None:
    """mkdir the jailer's cgroups, each named in the jail claim before it exists."""
    made = dict(claim.get("cgroups") or {})
    need = cg.controllers(spec.cgroups) if spec.cgroup_version == 2 else []
    for d in make:
        made[str(d)] = None
        claims.put(ctx.area, JAILS, spec.jail_id, {**claim, "cgroups": made})
        try:
            cg.make_leaf(cfg.cgroup, d, spec.cgroup_version, need)
        except FileExistsError:
            raise Conflict(f"cgroup {d} appeared meanwhile", "retry") from None
        made[str(d)] = claims.identity(d)
        claims.put(ctx.area, JAILS, spec.jail_id, {**claim, "cgroups": made})


class JailGrantApi(Req):
    """Give the VM's API socket to the caller's uid (0600, in the root-owned 0711 jail)."""

    vm: KilnId = Field(description="the VM (= jail) id (a jail the caller staged)")


@cgattach.held
def jail_grant_api(ctx: Ctx, req: JailGrantApi) -> dict[str, Any]:
    check_jail_owner(ctx, req.vm)
    sock = jail.jail_grant_api(jail_config(ctx), req.vm, ctx.caller_uid, ctx.caller_gid)
    return {"socket": str(sock)}


class JailRemove(Req):
    """Remove a jail whose Firecracker no longer runs."""

    vm: KilnId = Field(description="the VM (= jail) id (a jail the caller staged)")


@cgattach.held
def jail_remove(ctx: Ctx, req: JailRemove) -> dict[str, Any]:
    cfg = jail_config(ctx)
    jd = jail.jail_dir(cfg, req.vm)
    if ctx.trusted:
        jail.jail_remove(cfg, req.vm)
        vmuids.drop(ctx, req.vm)
        return {}
    claim = claims.read(ctx.area, JAILS, req.vm)
    if claim is None and not jd.exists():
        raise NotFound(f"jail {req.vm} does not exist", "")
    existed = jd.exists()
    if existed:
        claim = check_jail_owner(ctx, req.vm)
        _check_idle(claim)
        jail.jail_remove(cfg, req.vm)  # refuses while mounted or Firecracker runs
    found = _remove_half_made(cfg, req.vm, claim or {})
    if (claim or {}).get("boot") == claims.boot_id():  # cgroup inodes are per boot
        cg.remove_dirs([Path(d) for d, ident in (claim or {}).get("cgroups", {}).items()
                        if claims.same(ident, Path(d))])
    vmuids.drop(ctx, req.vm)  # its uid is free again (only when the entry is ours)
    claims.drop(ctx.area, JAILS, req.vm)
    if not existed and not found:  # removed meanwhile (root, a reboot): claim forgotten
        raise NotFound(f"jail {req.vm} does not exist", "")
    return {}


def _check_idle(claim: dict[str, Any]) -> None:
    """The VM uid is released with the jail only when nothing runs as it any more (a
    Firecracker may outlive its pid file, or sit in the caller's own cgroup)."""
    uid = claim.get("uid")
    if isinstance(uid, int) and jail.uid_processes(uid):
        raise Conflict(f"processes of the jail's VM uid {uid} still run",
                       "stop the VM first (cgroup-kill its cgroup)")


def _remove_half_made(cfg: jail.JailConfig, vm: str, claim: dict[str, Any]) -> bool:
    """The staging directory a killed jail-stage left (its claim names it): whether any."""
    tmp = Path(str(claim.get("tmp") or "/"))
    if tmp.parent != cfg.chroot_base / jailstage.STAGING or not tmp.name.startswith(f"{vm}."):
        return False
    ident = (claim.get("dirs") or {}).get(str(jail.jail_dir(cfg, vm)))
    if not os.path.lexists(tmp) or not (ident is None or claims.same(ident, tmp)):
        return False  # gone, or renamed into place (the jail removed above)
    shutil.rmtree(tmp)
    return True


OPS: dict[str, tuple[type[Req], Op]] = {
    "jail-stage": (JailStage, jail_stage),
    "jail-launch": (JailLaunch, jail_launch),
    "jail-grant-api": (JailGrantApi, jail_grant_api),
    "jail-remove": (JailRemove, jail_remove),
}
