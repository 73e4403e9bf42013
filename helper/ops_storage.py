"""Storage ops: loop devices, the loop-backed reflink pool filesystem, imported volumes.

Every path a caller names is relative to its area and resolved by ``safepath`` without
following symlinks; files are acted on through the fd that was checked.
"""


from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import stat
from pathlib import Path
from typing import Any

from pydantic import Field

from helper import privileged, safepath
from helper.errors import Conflict, IntegrityError, NotFound, UsageError
from helper.opbase import (
    Ctx,
    FsName,
    LoopDev,
    Op,
    RelPath,
    Req,
    VolumeId,
    passed_fd,
    replace_in,
)
from helper.pool import fileops
from helper.pool.fileops import FICLONE

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
        privileged.check_area_file_size(dfd, "the pool image", req.size, trusted=ctx.trusted)
        with replace_in(dfd, name, os.O_RDWR, 0o600) as fd:
            os.ftruncate(fd, req.size)  # sparse: costs nothing until written
            # mkfs writes through a path; /proc/self/fd of *our* fd names exactly this file.
            real = os.readlink(safepath.fd_path(fd))
            privileged.pool_mkfs(Path(real).parent, Path(real), req.fs)
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
    st = passed_fd(req.fd, "pass the volume open")
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"file descriptor {req.fd} is not a regular file", "")
    dfd = safepath.open_beneath(ctx.area, req.directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        safepath.fstat_kind(dfd, "dir", req.directory, owner=0)
        name = f"{req.volume[7:]}.ext4"
        with contextlib.suppress(FileNotFoundError):
            os.stat(name, dir_fd=dfd, follow_symlinks=False)
            return {"created": False}
        with replace_in(dfd, name, os.O_WRONLY, 0o600) as out:
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
                size, got = fileops.hashing_copy(req.fd, out)
                os.ftruncate(out, size)  # a trailing hole
            if got != req.volume:
                raise IntegrityError(f"volume bytes hash to {got[:19]}, not {req.volume[:19]}",
                                     "the file is not the volume it claims to be")
            os.fchmod(out, 0o444)
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


OPS: dict[str, tuple[type[Req], Op]] = {
    "loop-attach": (LoopAttach, loop_attach),
    "loop-detach": (LoopDetach, loop_detach),
    "pool-image": (PoolImage, pool_image),
    "pool-mount": (PoolMount, pool_mount),
    "pool-umount": (PoolUmount, pool_umount),
    "pool-remove": (PoolRemove, pool_remove),
    "volume-import": (VolumeImport, volume_import),
    "volume-remove": (VolumeRemove, volume_remove),
}
