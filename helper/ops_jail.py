"""Firecracker jail ops: stage, launch, grant the API socket, remove (``helper.jail``,
``helper.jailstage``).

Ownership. A jail lives in a host-wide directory named by the VM id the caller sends, so
the name alone does not say whose it is. ``jail-stage`` writes a root-owned claim in the
caller's area, ``<area>/jails/<vm>`` (``helper.claims``: the boot id and the jail
directory's (device, inode)); ``jail-launch``, ``jail-grant-api`` and ``jail-remove``
act only with that claim, so another user's jail — or one a reboot or a removal recycled
under the same name — is refused. ``jail-remove`` drops the claim. Root in-process
(``trusted``; its area is the kiln root) needs no claim. Every caller's jail (root's too)
also holds its VM uid/gid host-wide: ``jail-stage`` refuses one another caller holds
(``helper.vmuids``).

``jail-launch`` confines the rest of what it is told for a sudo caller: a
``parent_cgroup`` naming a VM cgroup needs the caller's cgroup claim
(``ops_vm.check_owner``), and ``netns`` may only be one of the caller's own VM
namespaces (``kn-…`` whose owner tag names the caller), never another user's nor the
[net] namespace. Staged devices are the caller area's own snapshots (``jailstage``).
"""

from __future__ import annotations

import contextlib
import re
import shutil
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from helper import cgroup as cg
from helper import claims, jail, jailstage, net, netcore, vmuids
from helper.errors import NotFound, UsageError
from helper.opbase import Ctx, KilnId, Op, Req, Uid, check_vm_uid
from helper.ops_vm import check_owner

JAILS = "jails"  # <area>/jails/<vm>: the caller's staged jails (see the docstring)
_VM_NETNS_RE = re.compile(netcore.NETNS_PATTERN)


def jail_config(ctx: Ctx) -> jail.JailConfig:
    c = ctx.cfg
    return jail.JailConfig(
        jailer=c.tools.get("jailer") or Path(c.tool("jailer")),
        firecracker=c.tools.get("firecracker") or Path(c.tool("firecracker")),
        chroot_base=c.chroot_base, uid_first=c.uid_first, uid_count=c.uid_count,
        sources=(ctx.area, *c.sources), area=ctx.area,
        cgroup=cg.CgroupConfig(parent=c.cgroup_parent))


def check_jail_owner(ctx: Ctx, vm: str) -> None:
    """Refuse unless ``vm``'s jail (when it exists) is the one this caller staged."""
    if ctx.trusted:
        return
    jd = jail.jail_dir(jail_config(ctx), vm)
    claim = claims.read(ctx.area, JAILS, vm)
    existing = [jd] if jd.exists() else []
    if claim is None or not claims.holds(claim, existing) or \
            list(claim.get("dirs") or {}) != [str(jd)]:
        raise UsageError(f"refusing jail {vm}: uid {ctx.caller_uid} did not stage it",
                         "kiln-helper acts only on jails its caller staged (jail-stage)")


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


def jail_stage(ctx: Ctx, req: JailStage) -> dict[str, Any]:
    check_vm_uid(ctx, req.uid, req.gid)
    items = [jail.StageItem(i.name, Path(i.source), i.writable) for i in req.items]
    ctx.cfg.chroot_base.mkdir(mode=0o755, parents=True, exist_ok=True)  # trusted path
    cfg = jail_config(ctx)
    with vmuids.locked(ctx):  # check and claim the VM uid as one step (helper.vmuids)
        vmuids.check_free(ctx, req.uid, req.gid, cfg)
        staged = jailstage.jail_stage(cfg, req.vm, req.uid, req.gid, items,
                                      caller_uid=ctx.caller_uid, logs=req.logs)
        jd = jail.jail_dir(cfg, req.vm)
        try:
            if not ctx.trusted:
                claims.write(ctx.area, JAILS, req.vm, [jd], uid=req.uid, gid=req.gid)
            vmuids.claim(ctx, req.vm, jd, req.uid, req.gid)
        except BaseException:
            shutil.rmtree(jd, ignore_errors=True)  # no jail without its claims
            if not ctx.trusted:
                claims.drop(ctx.area, JAILS, req.vm)
            raise
    return {"root": str(staged.root), "warnings": staged.warnings}


CgFile = Annotated[str, Field(pattern=r"^(cpu|cpuset|memory|pids|freezer|io|blkio)\.[a-z_.]"
                              r"{1,48}=[A-Za-z0-9][A-Za-z0-9 :,-]{0,63}$",
                              description="a cgroup FILE=VALUE for the jailer")]


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


def jail_launch(ctx: Ctx, req: JailLaunch) -> dict[str, Any]:
    check_vm_uid(ctx, req.uid, req.gid)
    check_jail_owner(ctx, req.vm)
    cfg = jail_config(ctx)
    if not ctx.trusted:
        if req.parent_cgroup is not None and req.parent_cgroup != cfg.cgroup.parent:
            # parent/<vm> (anything else jail.check_spec refuses): the VM's own cgroup.
            check_owner(ctx, req.vm, req.cgroup_version)
        if req.netns is not None:
            tag = net.netns_tag(req.netns) if _VM_NETNS_RE.fullmatch(req.netns) else None
            if why := netns_problem(req.netns, tag, ctx.caller_uid):
                raise UsageError(why, "give your VM's own namespace (netns-create) or none")
    cgroups = tuple(tuple(c.split("=", 1)) for c in req.cgroups)
    spec = jail.JailSpec(jail_id=req.vm, uid=req.uid, gid=req.gid,
                         cgroup_version=req.cgroup_version,
                         cgroups=cgroups,  # type: ignore[arg-type]
                         parent_cgroup=req.parent_cgroup, netns=req.netns)
    return {"pid": jail.jail_launch(cfg, spec)}


class JailGrantApi(Req):
    """Give the VM's API socket to the caller (0660, parent 0710)."""

    vm: KilnId = Field(description="the VM (= jail) id (a jail the caller staged)")


def jail_grant_api(ctx: Ctx, req: JailGrantApi) -> dict[str, Any]:
    check_jail_owner(ctx, req.vm)
    sock = jail.jail_grant_api(jail_config(ctx), req.vm, ctx.caller_uid, ctx.caller_gid)
    return {"socket": str(sock)}


class JailRemove(Req):
    """Remove a jail whose Firecracker no longer runs."""

    vm: KilnId = Field(description="the VM (= jail) id (a jail the caller staged)")


def jail_remove(ctx: Ctx, req: JailRemove) -> dict[str, Any]:
    cfg = jail_config(ctx)
    if not ctx.trusted and not jail.jail_dir(cfg, req.vm).exists() and \
            claims.read(ctx.area, JAILS, req.vm) is not None:
        claims.drop(ctx.area, JAILS, req.vm)  # removed meanwhile (root, a reboot): forget it
        raise NotFound(f"jail {req.vm} does not exist", "")
    check_jail_owner(ctx, req.vm)
    jail.jail_remove(cfg, req.vm)
    vmuids.drop(ctx, req.vm)  # its uid is free again
    if not ctx.trusted:
        with contextlib.suppress(FileNotFoundError):
            claims.drop(ctx.area, JAILS, req.vm)
    return {}


OPS: dict[str, tuple[type[Req], Op]] = {
    "jail-stage": (JailStage, jail_stage),
    "jail-launch": (JailLaunch, jail_launch),
    "jail-grant-api": (JailGrantApi, jail_grant_api),
    "jail-remove": (JailRemove, jail_remove),
}
