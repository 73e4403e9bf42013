"""VM ops: cgroups, Firecracker jails (stage, launch, grant the API socket, remove), taps.

VM uids/gids come only from the configured range, never 0 or the caller's.

Cgroup ownership. VM cgroups live in a host-wide tree under the configured parent, named
by the VM id the caller sends, so the name alone does not say whose a cgroup is. When
``cgroup-create`` makes one for a sudo caller, the helper writes a claim into that caller's
area — ``<area>/cgroups/<vm>`` (root-owned; the caller cannot write there): the cgroup
version, the boot id and the (device, inode) of every directory made. ``cgroup-attach``
and ``cgroup-kill`` act only when every existing directory of that VM matches the
caller's claim, so another user's cgroup (or one a reboot or a removal recycled under the
same name) is refused. ``cgroup-kill`` drops the claim. Root in-process (``trusted``)
needs no claim.
"""


from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from helper import cgattach, jail, jailstage, safepath, tap
from helper import cgroup as cg
from helper.errors import NotFound, UsageError
from helper.opbase import (
    Ctx,
    KilnId,
    Op,
    Req,
    Uid,
    replace_in,
)

# -- cgroups, jails, taps -------------------------------------------------------------------


def jail_config(ctx: Ctx) -> jail.JailConfig:
    c = ctx.cfg
    return jail.JailConfig(
        jailer=c.tools.get("jailer") or Path(c.tool("jailer")),
        firecracker=c.tools.get("firecracker") or Path(c.tool("firecracker")),
        chroot_base=c.chroot_base, uid_first=c.uid_first, uid_count=c.uid_count,
        sources=(ctx.area, *c.sources), cgroup=cg.CgroupConfig(parent=c.cgroup_parent))


def _cgroups(ctx: Ctx) -> cg.CgroupConfig:
    """Where VM cgroups live (no jail tools needed: QEMU VMs have cgroups too)."""
    return cg.CgroupConfig(parent=ctx.cfg.cgroup_parent)


def _check_vm_uid(ctx: Ctx, uid: int, gid: int) -> None:
    c = ctx.cfg
    for what, n in (("uid", uid), ("gid", gid)):
        if not c.uid_first <= n < c.uid_first + c.uid_count or n in (0, ctx.caller_uid):
            raise UsageError(f"{what} {n} is outside the VM range {c.uid_first}-"
                             f"{c.uid_first + c.uid_count - 1}",
                             "VM uids/gids come from [jails] uid_gid_range")


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


_CLAIMS = "cgroups"  # <area>/cgroups/<vm>: the caller's VM cgroups (see the docstring)


def _boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def _identity(d: Path) -> list[int]:
    st = os.lstat(d)
    return [st.st_dev, st.st_ino]


def _claims_fd(ctx: Ctx, *, create: bool) -> int | None:
    """``<area>/cgroups`` (root-owned, made only when a claim is written), or None."""
    if create:
        safepath.mkdirs_beneath(ctx.area, _CLAIMS, 0o700)
    try:
        fd = safepath.open_beneath(ctx.area, _CLAIMS, os.O_RDONLY | os.O_DIRECTORY)
    except NotFound:
        return None
    try:
        safepath.fstat_kind(fd, "dir", f"{ctx.area}/{_CLAIMS}", owner=0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _claim(ctx: Ctx, vm: str, version: int, dirs: list[Path]) -> None:
    doc = {"version": version, "boot": _boot_id(),
           "dirs": {str(d): _identity(d) for d in dirs}}
    dfd = _claims_fd(ctx, create=True)
    assert dfd is not None
    try:
        with replace_in(dfd, vm, os.O_WRONLY, 0o600) as fd:
            os.write(fd, json.dumps(doc).encode())
    finally:
        os.close(dfd)


def _claimed(ctx: Ctx, vm: str) -> dict[str, Any] | None:
    dfd = _claims_fd(ctx, create=False)
    if dfd is None:
        return None
    try:
        fd = os.open(vm, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    except FileNotFoundError:
        return None
    finally:
        os.close(dfd)
    try:
        doc = json.loads(os.read(fd, 1 << 16))
    except ValueError:
        return None
    finally:
        os.close(fd)
    return doc if isinstance(doc, dict) else None


def _unclaim(ctx: Ctx, vm: str) -> None:
    dfd = None if ctx.trusted else _claims_fd(ctx, create=False)
    if dfd is None:
        return
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(vm, dir_fd=dfd)
    finally:
        os.close(dfd)


def _check_owner(ctx: Ctx, vm: str, version: int) -> None:
    """Refuse unless every existing directory of ``vm`` is one this caller created."""
    if ctx.trusted:
        return
    existing = [d for d in cg.vm_dirs(_cgroups(ctx), vm, version) if d.is_dir()]
    claim = _claimed(ctx, vm) or {}
    dirs = claim.get("dirs")
    ok = (isinstance(dirs, dict) and claim.get("version") == version
          and claim.get("boot") == _boot_id()
          and all(dirs.get(str(d)) == _identity(d) for d in existing))
    if not ok:
        raise UsageError(f"refusing cgroup {vm}: uid {ctx.caller_uid} did not create it",
                         "kiln-helper acts only on cgroups its caller made (cgroup-create)")


def cgroup_create(ctx: Ctx, req: CgroupCreate) -> dict[str, Any]:
    lim = cg.Limits(req.limits.cpus, req.limits.memory_bytes, req.limits.pids)
    cfg = _cgroups(ctx)
    with cgattach.uninterrupted():  # the cgroup and its claim come together
        dirs = cg.cgroup_create(cfg, req.vm, req.version, lim)
        if not ctx.trusted:
            try:
                _claim(ctx, req.vm, req.version, dirs)
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
        _check_owner(ctx, req.vm, req.version)
        dirs = cgattach.cgroup_attach(cfg, req.vm, req.version, req.pid, ctx.caller_uid)
    return {"dirs": [str(d) for d in dirs]}


class CgroupKill(Req):
    """Kill everything in a VM's cgroup(s) and remove them."""

    vm: KilnId = Field(description="the VM id")
    version: Literal[1, 2] = Field(description="cgroup version it was created with")


def cgroup_kill(ctx: Ctx, req: CgroupKill) -> dict[str, Any]:
    cfg = _cgroups(ctx)
    with cgattach.uninterrupted():  # killed and removed, then unclaimed: never half of it
        if not cg.cgroup_exists(cfg, req.vm, req.version):
            if not ctx.trusted and (_claimed(ctx, req.vm) or {}).get("version") == \
                    req.version:
                _unclaim(ctx, req.vm)  # removed meanwhile (by root, a reboot): forget it
            raise NotFound(f"VM {req.vm} has no cgroup", "")
        _check_owner(ctx, req.vm, req.version)
        killed = cg.cgroup_kill(cfg, req.vm, req.version)
        _unclaim(ctx, req.vm)
    return {"killed": killed}


class StageItemReq(Req):
    """One file placed in the chroot."""

    name: str = Field(pattern=jail.NAME_RE.pattern, description="file name in the chroot")
    source: str = Field(pattern=r"^/[A-Za-z0-9_][A-Za-z0-9._/+-]{0,1023}$",
                        description="absolute path under the area (or /dev/mapper/kiln-…)")
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
    _check_vm_uid(ctx, req.uid, req.gid)
    items = [jail.StageItem(i.name, Path(i.source), i.writable) for i in req.items]
    ctx.cfg.chroot_base.mkdir(mode=0o755, parents=True, exist_ok=True)  # trusted path
    staged = jailstage.jail_stage(jail_config(ctx), req.vm, req.uid, req.gid, items,
                             caller_uid=ctx.caller_uid, logs=req.logs)
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
                                      description="the configured parent, or parent/VM")
    netns: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$",
                              description="a network namespace name under /run/netns")


def jail_launch(ctx: Ctx, req: JailLaunch) -> dict[str, Any]:
    _check_vm_uid(ctx, req.uid, req.gid)
    cgroups = tuple(tuple(c.split("=", 1)) for c in req.cgroups)
    spec = jail.JailSpec(jail_id=req.vm, uid=req.uid, gid=req.gid,
                         cgroup_version=req.cgroup_version,
                         cgroups=cgroups,  # type: ignore[arg-type]
                         parent_cgroup=req.parent_cgroup, netns=req.netns)
    return {"pid": jail.jail_launch(jail_config(ctx), spec)}


class JailGrantApi(Req):
    """Give the VM's API socket to the caller (0660, parent 0710)."""

    vm: KilnId = Field(description="the VM (= jail) id")


def jail_grant_api(ctx: Ctx, req: JailGrantApi) -> dict[str, Any]:
    sock = jail.jail_grant_api(jail_config(ctx), req.vm, ctx.caller_uid, ctx.caller_gid)
    return {"socket": str(sock)}


class JailRemove(Req):
    """Remove a jail whose Firecracker no longer runs."""

    vm: KilnId = Field(description="the VM (= jail) id")


def jail_remove(ctx: Ctx, req: JailRemove) -> dict[str, Any]:
    jail.jail_remove(jail_config(ctx), req.vm)
    return {}


TapName = Annotated[str, Field(pattern=tap.NAME_PATTERN, max_length=15,
                               description="kiln tap name: kt- + [a-z2-7]{1,12}")]


class TapCreate(Req):
    """Create a kiln tap device usable only by the VM's uid/gid."""

    name: TapName = Field(description="the tap's name")
    uid: Uid = Field(description="the VM's uid")
    gid: Uid = Field(description="the VM's gid")


def tap_create(ctx: Ctx, req: TapCreate) -> dict[str, Any]:
    _check_vm_uid(ctx, req.uid, req.gid)
    tap.tap_create(req.name, req.uid, req.gid)
    return {}


class TapDelete(Req):
    """Delete a kiln tap device."""

    name: TapName = Field(description="the tap's name")


def tap_delete(ctx: Ctx, req: TapDelete) -> dict[str, Any]:
    del ctx  # taps are host-wide; the name pattern is the confinement
    tap.tap_delete(req.name)
    return {}


OPS: dict[str, tuple[type[Req], Op]] = {
    "jail-stage": (JailStage, jail_stage),
    "jail-launch": (JailLaunch, jail_launch),
    "jail-grant-api": (JailGrantApi, jail_grant_api),
    "jail-remove": (JailRemove, jail_remove),
    "cgroup-create": (CgroupCreate, cgroup_create),
    "cgroup-attach": (CgroupAttach, cgroup_attach),
    "cgroup-kill": (CgroupKill, cgroup_kill),
    "tap-create": (TapCreate, tap_create),
    "tap-delete": (TapDelete, tap_delete),
}
