"""The helper's operations: one pydantic request model and one function per op.

``OPS`` maps each op name to ``(Request model, function)``; ``run_op`` validates a request
and runs it with a ``Ctx``:

* ``area``: the directory every caller-named path is relative to — the kiln root when
  root calls in-process, ``<[pool] directory>/users/<uid>`` (created by the helper,
  root-owned) for a sudo caller. Relative paths are resolved by ``safepath`` (no symlinks);
* ``caller_uid/gid``: who asked (0 in-process); VM uids are never 0 or the caller's;
* ``trusted``: an in-process root caller (skips nothing that guards the host; only the
  re-hash of an imported volume, which protects a pool from its own user).

Request models: ``extra="forbid"``, ``frozen``, ``strict`` (no "1" → 1 coercion), a
description on every field, every string constrained (pattern or enum). No op takes a
program path or an argv. An op on an object that does not exist raises ``NotFound``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import re
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from helper import cgroup as cg
from helper import jail, privileged, safepath, tap
from helper.config import Config
from helper.errors import Conflict, IntegrityError, NotFound, UsageError
from helper.pool import dmthin_core as core
from helper.pool.fileops import FICLONE

# -- field types --------------------------------------------------------------------------

RelPath = Annotated[str, Field(pattern=safepath.REL_PATTERN, max_length=1024,
                               description="a path relative to the caller's area")]
LoopDev = Annotated[str, Field(pattern=r"^/dev/loop[0-9]{1,4}$", description="/dev/loopN")]
DmName = Annotated[str, Field(
    pattern=r"^kiln-[0-9a-f]{8}-(pool|vol-[0-9a-f]{64}|snap-[a-z2-7]{1,32})$",
    description="a kiln device-mapper name of the caller's area")]
VolumeId = Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$",
                                description="volume id: sha256: + 64 hex digits")]
KilnId = Annotated[str, Field(pattern=r"^[a-z2-7]{1,32}$",
                              description="a VM / jail / snapshot id ([a-z2-7]{1,32})")]
Uid = Annotated[int, Field(ge=1, le=2**32 - 2, description="a uid/gid of the VM range")]
FsName = Literal["btrfs", "xfs"]


class Req(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


@dataclass(frozen=True)
class Ctx:
    cfg: Config
    area: Path
    caller_uid: int
    caller_gid: int
    trusted: bool = False


# -- loop devices ---------------------------------------------------------------------------

_LOOP_CTL_GET_FREE = 0x4C82
_LOOP_SET_FD = 0x4C00
_LOOP_CLR_FD = 0x4C01


class LoopAttach(Req):
    """Attach a root-owned image file under the area to a loop device (reuse if attached)."""

    image: RelPath = Field(description="the image file, relative to the area")


def _open_image(ctx: Ctx, rel: str) -> int:
    fd = safepath.open_beneath(ctx.area, rel, os.O_RDWR)
    try:
        # Root-owned only: a caller-made file could hold a hostile filesystem image.
        safepath.fstat_kind(fd, "reg", rel, owner=0, single_link=True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def loop_attach(ctx: Ctx, req: LoopAttach) -> dict[str, Any]:
    fd = _open_image(ctx, req.image)
    try:
        real = os.readlink(safepath.fd_path(fd))
        for loop in privileged.loop_list(ctx.area):
            if loop.back_file == real:
                return {"device": loop.device}
        return {"device": attach_fd(fd)}
    finally:
        os.close(fd)


def attach_fd(fd: int) -> str:
    """Bind the open file ``fd`` to a free loop device by ioctl (acts on the fd itself)."""
    ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        for _ in range(16):
            n = fcntl.ioctl(ctl, _LOOP_CTL_GET_FREE)
            dev = f"/dev/loop{n}"
            lfd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.ioctl(lfd, _LOOP_SET_FD, fd)
                return dev
            except OSError as e:
                if e.errno != errno.EBUSY:  # another process took it between the two calls
                    raise
            finally:
                os.close(lfd)
    finally:
        os.close(ctl)
    raise Conflict("no free loop device after 16 tries", "retry in a moment")


class LoopDetach(Req):
    """Detach a loop device backed by a file under the area."""

    device: LoopDev = Field(description="the loop device, /dev/loopN")


def loop_detach(ctx: Ctx, req: LoopDetach) -> dict[str, Any]:
    privileged.loop_detach(ctx.area, req.device)
    return {}


# -- device-mapper --------------------------------------------------------------------------


class DmCreate(Req):
    """Create a thin-pool over two area loop devices, or a thin device in the area's pool.
    The helper writes the table; no caller text reaches dmsetup."""

    name: DmName = Field(description="the new device's kiln name")
    kind: Literal["thin-pool", "thin"] = Field(description="what to create")
    meta: LoopDev | None = Field(default=None, description="thin-pool: metadata loop device")
    data: LoopDev | None = Field(default=None, description="thin-pool: data loop device")
    data_sectors: int = Field(default=0, ge=0, le=2**48, description="thin-pool: data size")
    block_sectors: int = Field(default=core.DEFAULT_BLOCK_SECTORS, ge=128, le=2**21,
                               description="thin-pool: data block size in sectors")
    pool: DmName | None = Field(default=None, description="thin: the pool device's name")
    thin_id: int = Field(default=0, ge=0, lt=core.THIN_ID_LIMIT, description="thin: its id")
    sectors: int = Field(default=0, ge=0, le=2**48, description="thin: size in sectors")


def dm_create(ctx: Ctx, req: DmCreate) -> dict[str, Any]:
    if req.kind == "thin-pool":
        own = {lp.device for lp in privileged.loop_list(ctx.area)}
        if req.meta not in own or req.data not in own or req.meta == req.data:
            raise UsageError("thin-pool devices must be two loop devices backed by files "
                             "under the caller's area", "")
        try:
            table = core.thin_pool_table(req.meta, req.data, req.data_sectors,
                                         req.block_sectors)
        except ValueError as e:
            raise UsageError(str(e), "") from None
    else:
        if req.pool is None or core.parse_name(req.pool) is None \
                or core.parse_name(req.pool).kind != "pool":  # type: ignore[union-attr]
            raise UsageError("a thin device needs its pool's kiln name", "")
        privileged.check_dm_name(ctx.area, req.pool)
        if not os.path.exists(f"/dev/mapper/{req.pool}"):
            raise NotFound(f"pool device {req.pool} does not exist", "")
        try:
            table = core.thin_table(f"/dev/mapper/{req.pool}", req.thin_id, req.sectors)
        except ValueError as e:
            raise UsageError(str(e), "") from None
    return {"path": privileged.dm_create(ctx.area, req.name, table)}


class DmMessage(Req):
    """Send create_thin / create_snap / delete to the area's thin-pool."""

    name: DmName = Field(description="the thin-pool's kiln name")
    message: str = Field(pattern=r"^(create_thin [0-9]{1,8}|create_snap [0-9]{1,8} [0-9]{1,8}"
                         r"|delete [0-9]{1,8})$", description="the thin-pool message")


def _dm_exists(name: str) -> None:
    if not os.path.exists(f"/dev/mapper/{name}"):
        raise NotFound(f"device-mapper device {name} does not exist", "")


def dm_message(ctx: Ctx, req: DmMessage) -> dict[str, Any]:
    privileged.check_dm_name(ctx.area, req.name)
    _dm_exists(req.name)
    privileged.dm_message(ctx.area, req.name, req.message)
    return {}


class DmRemove(Req):
    """Remove one of the area's device-mapper devices."""

    name: DmName = Field(description="the device's kiln name")


def dm_remove(ctx: Ctx, req: DmRemove) -> dict[str, Any]:
    privileged.check_dm_name(ctx.area, req.name)
    _dm_exists(req.name)
    privileged.dm_remove(ctx.area, req.name)
    return {}


# -- pool filesystem ------------------------------------------------------------------------

_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 2, 4, 8
_UMOUNT_NOFOLLOW = 8
_libc = ctypes.CDLL(None, use_errno=True)


class PoolImage(Req):
    """Create a sparse pool image (root-owned, 0600) with a reflink filesystem on it."""

    image: RelPath = Field(description="where the image goes, relative to the area")
    size: int = Field(ge=256 << 20, le=1 << 50, description="image size in bytes")
    fs: FsName = Field(description="filesystem to make: btrfs or xfs")


def pool_image(ctx: Ctx, req: PoolImage) -> dict[str, Any]:
    parent, _, name = req.image.rpartition("/")
    if parent:
        safepath.mkdirs_beneath(ctx.area, parent, 0o755)
    dfd = safepath.open_beneath(ctx.area, parent, os.O_PATH | os.O_DIRECTORY) if parent \
        else safepath.open_dir(ctx.area)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.stat(name, dir_fd=dfd, follow_symlinks=False)
            raise Conflict(f"{req.image} already exists", "destroy the pool first")
        tmp = f".{name}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=dfd)
        try:
            os.ftruncate(fd, req.size)  # sparse: costs nothing until written
            # mkfs writes through a path; /proc/self/fd of *our* fd names exactly this file.
            real = os.readlink(safepath.fd_path(fd))
            privileged.pool_mkfs(Path(real).parent, Path(real), req.fs)
            os.fsync(fd)
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise
        finally:
            os.close(fd)
    finally:
        os.close(dfd)
    return {}


class PoolMount(Req):
    """Mount the area's pool loop device at a directory under the area (nodev, nosuid,
    noexec) and prepare ``volumes/`` (root) and ``snapshots/`` (the caller)."""

    device: LoopDev = Field(description="the pool image's loop device")
    mountpoint: RelPath = Field(description="the mount point, relative to the area")
    fs: FsName = Field(description="the image's filesystem")


def _is_mount_root(fd: int) -> bool:
    mnt = os.readlink(safepath.fd_path(fd))
    return any(m.mountpoint == mnt for m in privileged.mounts())


def pool_mount(ctx: Ctx, req: PoolMount) -> dict[str, Any]:
    loops = {lp.device: lp for lp in privileged.loop_list(ctx.area)}
    if req.device not in loops:
        raise NotFound(f"{req.device} is not a loop device backed by a file under the area",
                       "attach the pool image first (loop-attach)")
    back = os.lstat(loops[req.device].back_file)
    if back.st_uid != 0:
        raise UsageError(f"{req.device} is backed by a file root does not own", "")
    safepath.mkdirs_beneath(ctx.area, req.mountpoint, 0o755)
    fd = safepath.open_beneath(ctx.area, req.mountpoint, os.O_PATH | os.O_DIRECTORY)
    try:
        if not _is_mount_root(fd):
            r = _libc.mount(req.device.encode(), safepath.fd_path(fd).encode(),
                            req.fs.encode(), _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, None)
            if r != 0:
                e = ctypes.get_errno()
                raise UsageError(f"mounting {req.device} failed: {os.strerror(e)}", "")
    finally:
        os.close(fd)
    _prepare_pool_dirs(ctx, req.mountpoint)
    return {}


def _prepare_pool_dirs(ctx: Ctx, mountpoint: str) -> None:
    for sub, owner, mode in (("volumes", 0, 0o755),
                             ("snapshots", ctx.caller_uid, 0o755)):
        safepath.mkdirs_beneath(ctx.area, f"{mountpoint}/{sub}", mode)
        fd = safepath.open_beneath(ctx.area, f"{mountpoint}/{sub}",
                                   os.O_RDONLY | os.O_DIRECTORY)
        try:
            st = os.fstat(fd)
            if st.st_uid != owner:
                os.fchown(fd, owner, ctx.caller_gid if owner else 0)
        finally:
            os.close(fd)


class PoolUmount(Req):
    """Unmount the area's pool filesystem."""

    mountpoint: RelPath = Field(description="the mount point, relative to the area")


def _umount_at(rel: str, ctx: Ctx, *, must: bool) -> None:
    """Unmount the mount whose root is ``area/rel``. The fd that proves it (opened
    beneath the area, no symlinks) would pin the mount, so it is closed first and the
    kernel's own name for it is unmounted with UMOUNT_NOFOLLOW; every component of that
    name is root-owned, so nobody can swap it in between."""
    try:
        fd = safepath.open_beneath(ctx.area, rel, os.O_PATH | os.O_DIRECTORY)
    except NotFound:
        if must:
            raise
        return
    try:
        mounted = _is_mount_root(fd)
        real = os.readlink(safepath.fd_path(fd))
    finally:
        os.close(fd)
    if not mounted:
        if must:
            raise NotFound(f"nothing is mounted at {rel}", "")
        return
    if _libc.umount2(real.encode(), _UMOUNT_NOFOLLOW) != 0:
        e = ctypes.get_errno()
        raise Conflict(f"cannot unmount {rel}: {os.strerror(e)}",
                       "stop whatever uses it (a running VM?), then retry")


def pool_umount(ctx: Ctx, req: PoolUmount) -> dict[str, Any]:
    _umount_at(req.mountpoint, ctx, must=True)
    return {}


class PoolRemove(Req):
    """Tear down a loop-backed pool: unmount, detach its loop devices, delete the image
    and the (empty) mount point. Missing pieces are skipped; no image at all is NotFound."""

    image: RelPath = Field(description="the pool image, relative to the area")
    mountpoint: RelPath = Field(description="its mount point, relative to the area")


def pool_remove(ctx: Ctx, req: PoolRemove) -> dict[str, Any]:
    _umount_at(req.mountpoint, ctx, must=False)
    ifd = _open_image(ctx, req.image)
    try:
        real = os.readlink(safepath.fd_path(ifd))
    finally:
        os.close(ifd)
    for loop in privileged.loop_list(ctx.area):
        if loop.back_file == real:
            privileged.loop_detach(ctx.area, loop.device)
    parent, _, name = req.image.rpartition("/")
    dfd = safepath.open_beneath(ctx.area, parent, os.O_PATH | os.O_DIRECTORY) if parent \
        else safepath.open_dir(ctx.area)
    try:
        os.unlink(name, dir_fd=dfd)
    finally:
        os.close(dfd)
    mparent, _, mname = req.mountpoint.rpartition("/")
    with contextlib.suppress(OSError):
        mfd = safepath.open_beneath(ctx.area, mparent, os.O_PATH | os.O_DIRECTORY) \
            if mparent else safepath.open_dir(ctx.area)
        try:
            os.rmdir(mname, dir_fd=mfd)
        finally:
            os.close(mfd)
    return {}


# -- volumes --------------------------------------------------------------------------------


class VolumeImport(Req):
    """Copy a volume the caller passes open (an inherited fd) into a root-owned directory
    under the area as ``<hex>.ext4`` (0444), hashing what is copied against the id."""

    volume: VolumeId = Field(description="the volume's id (sha256 of its bytes)")
    fd: int = Field(ge=3, le=255, description="the open volume file descriptor")
    directory: RelPath = Field(description="destination directory, relative to the area")
    clone: bool = Field(default=False, description="try a reflink clone of the fd first")


def volume_import(ctx: Ctx, req: VolumeImport) -> dict[str, Any]:
    try:
        st = os.fstat(req.fd)
    except OSError:
        raise NotFound(f"file descriptor {req.fd} is not open", "pass the volume open") \
            from None
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"file descriptor {req.fd} is not a regular file", "")
    dfd = safepath.open_beneath(ctx.area, req.directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        safepath.fstat_kind(dfd, "dir", req.directory, owner=0)
        name = f"{req.volume[7:]}.ext4"
        with contextlib.suppress(FileNotFoundError):
            os.stat(name, dir_fd=dfd, follow_symlinks=False)
            return {"created": False}
        tmp = f".{name}.{secrets.token_hex(4)}.tmp"
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                      | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        try:
            cloned = False
            if req.clone:
                with contextlib.suppress(OSError):
                    fcntl.ioctl(out, FICLONE, req.fd)
                    cloned = True
            if cloned and ctx.trusted:  # root's own build: same as before the helper
                got = req.volume
            elif cloned:
                got = _hash_fd(out)  # hash what landed in the pool, not the caller's fd
            else:
                got = _copy_hashing(req.fd, out)
            if got != req.volume:
                raise IntegrityError(f"volume bytes hash to {got[:19]}, not {req.volume[:19]}",
                                     "the file is not the volume it claims to be")
            os.fchmod(out, 0o444)
            os.fsync(out)
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise
        finally:
            os.close(out)
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return {"created": True}


def _hash_fd(fd: int) -> str:
    h = hashlib.sha256()
    off = 0
    while chunk := os.pread(fd, 1 << 22, off):
        h.update(chunk)
        off += len(chunk)
    return "sha256:" + h.hexdigest()


def _copy_hashing(src: int, dst: int) -> str:
    """Copy ``src`` from offset 0, hashing exactly the bytes written; zero runs become
    holes (volumes are sparse)."""
    h = hashlib.sha256()
    off = 0
    zero = bytes(1 << 20)
    while True:
        chunk = os.pread(src, 1 << 20, off)
        if not chunk:
            break
        h.update(chunk)
        if chunk != zero[:len(chunk)]:
            os.pwrite(dst, chunk, off)
        off += len(chunk)
    os.ftruncate(dst, off)
    return "sha256:" + h.hexdigest()


class VolumeRemove(Req):
    """Remove an imported volume from a directory under the area."""

    volume: VolumeId = Field(description="the volume's id")
    directory: RelPath = Field(description="the directory it was imported to")


def volume_remove(ctx: Ctx, req: VolumeRemove) -> dict[str, Any]:
    dfd = safepath.open_beneath(ctx.area, req.directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        safepath.fstat_kind(dfd, "dir", req.directory, owner=0)
        try:
            os.unlink(f"{req.volume[7:]}.ext4", dir_fd=dfd)
        except FileNotFoundError:
            raise NotFound(f"volume {req.volume[:19]} is not in {req.directory}", "") from None
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return {}


# -- area and reclaim -----------------------------------------------------------------------


class Area(Req):
    """Create (if needed) and name the caller's area."""


def area(ctx: Ctx, req: Area) -> dict[str, Any]:
    del req
    return {"path": str(ctx.area), "uid": ctx.caller_uid}


class Reclaim(Req):
    """Remove the area's dm devices not in ``keep`` and detach its unused loop devices."""

    keep: tuple[DmName, ...] = Field(default=(), max_length=4096,
                                     description="kiln device names to keep")


def reclaim(ctx: Ctx, req: Reclaim) -> dict[str, Any]:
    return {"removed": privileged.reclaim(ctx.area, list(req.keep))}


# -- cgroups, jails, taps -------------------------------------------------------------------


def jail_config(ctx: Ctx) -> jail.JailConfig:
    c = ctx.cfg
    return jail.JailConfig(
        jailer=c.tools.get("jailer") or Path(c.tool("jailer")),
        firecracker=c.tools.get("firecracker") or Path(c.tool("firecracker")),
        chroot_base=c.chroot_base, uid_first=c.uid_first, uid_count=c.uid_count,
        sources=(ctx.area, *c.sources), cgroup=cg.CgroupConfig(parent=c.cgroup_parent))


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


def cgroup_create(ctx: Ctx, req: CgroupCreate) -> dict[str, Any]:
    lim = cg.Limits(req.limits.cpus, req.limits.memory_bytes, req.limits.pids)
    dirs = cg.cgroup_create(jail_config(ctx).cgroup, req.vm, req.version, lim)
    return {"dirs": [str(d) for d in dirs]}


class CgroupKill(Req):
    """Kill everything in a VM's cgroup(s) and remove them."""

    vm: KilnId = Field(description="the VM id")
    version: Literal[1, 2] = Field(description="cgroup version it was created with")


def cgroup_kill(ctx: Ctx, req: CgroupKill) -> dict[str, Any]:
    cfg = jail_config(ctx).cgroup
    if not cg.cgroup_exists(cfg, req.vm, req.version):
        raise NotFound(f"VM {req.vm} has no cgroup", "")
    return {"killed": cg.cgroup_kill(cfg, req.vm, req.version)}


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
    staged = jail.jail_stage(jail_config(ctx), req.vm, req.uid, req.gid, items,
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


# -- the table ------------------------------------------------------------------------------

Op = Callable[[Ctx, Any], dict[str, Any]]
OPS: dict[str, tuple[type[Req], Op]] = {
    "area": (Area, area),
    "loop-attach": (LoopAttach, loop_attach),
    "loop-detach": (LoopDetach, loop_detach),
    "dm-create": (DmCreate, dm_create),
    "dm-message": (DmMessage, dm_message),
    "dm-remove": (DmRemove, dm_remove),
    "pool-image": (PoolImage, pool_image),
    "pool-mount": (PoolMount, pool_mount),
    "pool-umount": (PoolUmount, pool_umount),
    "pool-remove": (PoolRemove, pool_remove),
    "volume-import": (VolumeImport, volume_import),
    "volume-remove": (VolumeRemove, volume_remove),
    "jail-stage": (JailStage, jail_stage),
    "jail-launch": (JailLaunch, jail_launch),
    "jail-grant-api": (JailGrantApi, jail_grant_api),
    "jail-remove": (JailRemove, jail_remove),
    "cgroup-create": (CgroupCreate, cgroup_create),
    "cgroup-kill": (CgroupKill, cgroup_kill),
    "tap-create": (TapCreate, tap_create),
    "tap-delete": (TapDelete, tap_delete),
    "reclaim": (Reclaim, reclaim),
}
_OP_RE = re.compile(r"^[a-z]+(-[a-z]+)*$")


def schemas() -> dict[str, Any]:
    """Each op's request JSON Schema (what ``kiln-helper --list`` prints)."""
    return {name: model.model_json_schema() for name, (model, _) in OPS.items()}


def parse(op: str, payload: bytes | str) -> Req:
    """Validate a request (raises pydantic's ValidationError, or UsageError for the op)."""
    if not _OP_RE.fullmatch(op) or op not in OPS:
        raise UsageError(f"unknown op {op!r}", "see `kiln-helper --list`")
    return OPS[op][0].model_validate_json(payload)


def run_op(ctx: Ctx, op: str, req: Req) -> dict[str, Any]:
    model, fn = OPS[op]
    if not isinstance(req, model):
        raise UsageError(f"request for {op} has the wrong type", "")
    return fn(ctx, req)
