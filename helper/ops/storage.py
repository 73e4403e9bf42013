"""Storage ops: a caller's loop-backed reflink pool, its volumes and its snapshots.

A caller names no path: the pool's objects have fixed names in its area (``helper.storage.poolfs``
says where and how each is reached by fd), volumes are named by id and snapshots by kiln
id. ``pool-create`` makes the image (recorded before mkfs runs) and mounts it;
``pool-mount`` mounts it again after a reboot, only if it is still exactly what was
recorded; ``pool-umount`` / ``pool-destroy`` take it down. ``volume-import`` copies a
volume from a passed fd (re-hashed against its id) into root's ``volumes/``;
``snapshot-create`` clones one into ``snapshots/`` and hands the clone to the caller
(single link, 0600); ``pool-list`` tells the caller what its pool holds (it cannot list
root's directories).
"""


from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import stat
import uuid as uuid_mod
from typing import Any

from pydantic import Field

from helper import claims
from helper.base import fileops, run, safepath
from helper.base.errors import Conflict, IntegrityError, NotFound, UsageError
from helper.base.fileops import FICLONE
from helper.ops.base import Ctx, FsName, KilnId, Op, Req, VolumeId, passed_fd
from helper.storage import poolfs, privileged

# -- the pool filesystem ----------------------------------------------------------------------

POOL, IMAGE = poolfs.POOL, poolfs.IMAGE
FS, RECORD = "fs", "pool.json"
VOLUMES, SNAPSHOTS = "volumes", "snapshots"
DIR_MODE = 0o711  # root's; the caller reaches its snapshots by name, lists nothing
_SNAP_FILE_RE = re.compile(r"^([a-z2-7]{1,32})\.ext4$")
_VOL_FILE_RE = re.compile(r"^([0-9a-f]{64})\.ext4$")


def _pool_dir(ctx: Ctx, *, create: bool) -> int:
    """``area/pool`` (root-owned 0711: the caller reaches its snapshots, lists nothing)."""
    area = safepath.open_dir(ctx.area)
    try:
        return safepath.root_dir(area, POOL, create=create, mode=DIR_MODE)
    except NotFound:
        raise NotFound("this caller has no pool", "run `kiln pool init`") from None
    finally:
        os.close(area)


def _read_record(pfd: int) -> dict[str, Any] | None:
    return claims.read_at(pfd, RECORD)


def _write_record(pfd: int, doc: dict[str, Any]) -> None:
    claims.write_at(pfd, RECORD, doc)


class PoolCreate(Req):
    """Make the caller's pool: a sparse root-owned image (``pool/pool.img``) with a reflink
    filesystem the helper makes, mounted at ``pool/fs`` (nodev, nosuid, noexec)."""

    size: int = Field(ge=256 << 20, le=1 << 50, description="image size in bytes")
    fs: FsName = Field(description="filesystem to make: btrfs or xfs")


def pool_create(ctx: Ctx, req: PoolCreate) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        if not ctx.trusted:  # the cap first, then checked and made under one host-wide lock
            stack.enter_context(poolfs.admitted(ctx.area, "a pool image", req.size,
                                                ctx.cfg.limits))
            poolfs.check_root_chain(ctx.area)
        with contextlib.suppress(NotFound):
            pfd = _pool_dir(ctx, create=False)
            try:
                rec = _read_record(pfd)
                # A record still "making" with no image is a create killed mid-way (the
                # image was unnamed): taken over by this one.
                if poolfs.exists_at(pfd, IMAGE) or (rec or {}).get("state") == "made":
                    raise Conflict("this caller already has a pool image",
                                   "`kiln pool destroy` it first")
            finally:
                os.close(pfd)
        pfd = _pool_dir(ctx, create=True)
        stack.callback(os.close, pfd)
        _make_image(pfd, req)
    return _mount(ctx)


def _make_image(pfd: int, req: PoolCreate) -> None:
    """Record, then make the image unnamed, mkfs it, name it, complete the record."""
    fs_uuid = str(uuid_mod.uuid4())
    rec: dict[str, Any] = {"fs": req.fs, "size": req.size, "uuid": fs_uuid, "state": "making"}
    _write_record(pfd, rec)  # a record before the resource
    fd = poolfs.open_tmpfile(pfd, 0o600)
    try:
        os.ftruncate(fd, req.size)  # sparse: costs nothing until written
        tool, args = poolfs.mkfs_argv(req.fs, fs_uuid, fd)
        run.run(tool, args, timeout=300, pass_fds=(fd,))
        if poolfs.superblock_uuid(fd, req.fs) != fs_uuid:
            raise IntegrityError(f"{tool} did not write the filesystem asked for", "")
        st = os.fstat(fd)
        rec.update(state="made", dev=st.st_dev, ino=st.st_ino)
        _write_record(pfd, rec)
        poolfs.link_tmpfile(fd, pfd, IMAGE)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(RECORD, dir_fd=pfd)
        raise
    finally:
        os.close(fd)


class PoolMount(Req):
    """Mount the caller's pool image at ``pool/fs`` unless it is mounted (after a reboot):
    only the image this helper made and recorded."""


def pool_mount(ctx: Ctx, req: PoolMount) -> dict[str, Any]:
    del req
    return _mount(ctx)


def _mount(ctx: Ctx) -> dict[str, Any]:
    pfd = _pool_dir(ctx, create=False)
    try:
        rec = _read_record(pfd)
        if rec is None or rec.get("state") != "made":
            raise NotFound("this caller's pool has no record kiln-helper made",
                           "`kiln pool destroy --force`, then `kiln pool init` (pools made "
                           "by an older kiln-helper are re-made once)")
        mfd = safepath.root_dir(pfd, FS, create=True, mode=DIR_MODE)
        try:
            if not poolfs.is_mount_root(mfd, pfd):
                _mount_image(pfd, mfd, rec)
        finally:
            os.close(mfd)
        _prepare(pfd)
    finally:
        os.close(pfd)
    return {"fs": rec["fs"], "uuid": rec["uuid"]}


def _mount_image(pfd: int, mfd: int, rec: dict[str, Any]) -> None:
    ifd = safepath.open_beneath(pfd, IMAGE, os.O_RDWR)
    try:
        poolfs.verify_image(ifd, rec)
        with privileged.loops_locked():  # no reclaim sees it unmounted in between
            lfd = poolfs.loop_configure(ifd)
            try:
                poolfs.mount_loop(lfd, mfd, str(rec["fs"]))
            finally:
                os.close(lfd)  # AUTOCLEAR: the mount holds it now, and frees it on umount
    finally:
        os.close(ifd)


def _prepare(pfd: int) -> None:
    """The mounted filesystem's root and ``volumes/``, ``snapshots/``: root's, 0711."""
    mfd = safepath.root_dir(pfd, FS, create=False, mode=DIR_MODE)
    try:
        for sub in (VOLUMES, SNAPSHOTS):
            os.close(safepath.root_dir(mfd, sub, create=True, mode=DIR_MODE))
    finally:
        os.close(mfd)


class PoolUmount(Req):
    """Unmount the caller's pool filesystem (nothing mounted: done)."""


def pool_umount(ctx: Ctx, req: PoolUmount) -> dict[str, Any]:
    del req
    _umount(ctx)
    return {}


def _umount(ctx: Ctx) -> None:
    pfd = _pool_dir(ctx, create=False)
    try:
        try:
            mfd = safepath.open_beneath(pfd, FS, os.O_PATH | os.O_DIRECTORY)
        except NotFound:
            return
        try:
            mounted = poolfs.is_mount_root(mfd, pfd)
        finally:
            os.close(mfd)  # an open fd would keep the mount busy
    finally:
        os.close(pfd)
    if mounted:
        path = ctx.area / POOL / FS
        if not ctx.trusted:
            poolfs.check_root_chain(path.parent)  # the name is root's all the way up
        poolfs.umount_trusted(path)


class PoolDestroy(Req):
    """Tear the caller's pool down: unmount, delete the image (and its volumes and
    snapshots with it), the record and the mount point."""


def pool_destroy(ctx: Ctx, req: PoolDestroy) -> dict[str, Any]:
    del req
    _umount(ctx)
    pfd = _pool_dir(ctx, create=False)
    try:
        try:
            ifd = safepath.open_beneath(pfd, IMAGE, os.O_RDONLY)
        except NotFound:
            ifd = -1
        if ifd >= 0:
            try:  # only the helper's own kind of file: root's, one link
                safepath.fstat_kind(ifd, "reg", IMAGE, owner=0, single_link=True)
            finally:
                os.close(ifd)
            os.unlink(IMAGE, dir_fd=pfd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(RECORD, dir_fd=pfd)
        with contextlib.suppress(OSError):
            os.rmdir(FS, dir_fd=pfd)
        os.fsync(pfd)
    finally:
        os.close(pfd)
    return {}


# -- volumes and snapshots --------------------------------------------------------------------


def _pool_sub(ctx: Ctx, sub: str) -> int:
    """``pool/fs/<sub>`` of a mounted pool (a sudo caller's: its mounted image only)."""
    pfd = _pool_dir(ctx, create=False)
    try:
        mfd = safepath.root_dir(pfd, FS, create=False, mode=DIR_MODE)
        try:
            if not ctx.trusted and not poolfs.is_mount_root(mfd, pfd):
                raise NotFound("this caller's pool is not mounted", "run `kiln pool status`")
            return safepath.root_dir(mfd, sub, create=ctx.trusted, mode=DIR_MODE)
        finally:
            os.close(mfd)
    finally:
        os.close(pfd)


class VolumeImport(Req):
    """Copy a volume the caller passes open (an inherited fd) into the pool's root-owned
    ``volumes/`` as ``<hex>.ext4`` (0400), hashing what is copied against the id."""

    volume: VolumeId = Field(description="the volume's id (sha256 of its bytes)")
    fd: int = Field(ge=3, le=255, description="the open volume file descriptor")
    clone: bool = Field(default=False, description="try a reflink clone of the fd first")


def volume_import(ctx: Ctx, req: VolumeImport) -> dict[str, Any]:
    st = passed_fd(req.fd, "pass the volume open")
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"file descriptor {req.fd} is not a regular file", "")
    dfd = _pool_sub(ctx, VOLUMES)
    try:
        if not ctx.trusted:
            cap = min(ctx.cfg.limits.import_bytes, _capacity(dfd))
            if st.st_size > cap:
                raise UsageError(f"refusing a volume of {st.st_size} bytes: at most {cap}",
                                 "the pool or [limits] import_bytes is smaller")
        name = f"{req.volume[7:]}.ext4"
        if poolfs.exists_at(dfd, name):
            return {"created": False}
        out = poolfs.open_tmpfile(dfd, 0o600)  # unnamed until verified: nothing to leak
        try:
            _fill(ctx, req, out)
            os.fchmod(out, 0o400 if not ctx.trusted else 0o444)
            poolfs.link_tmpfile(out, dfd, name)
        finally:
            os.close(out)
    finally:
        os.close(dfd)
    return {"created": True}


def _fill(ctx: Ctx, req: VolumeImport, out: int) -> None:
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


def _capacity(dfd: int) -> int:
    st = os.fstatvfs(dfd)
    return st.f_blocks * st.f_frsize


def _hash_fd(fd: int) -> str:
    h = hashlib.sha256()
    off = 0
    while chunk := os.pread(fd, 1 << 22, off):
        h.update(chunk)
        off += len(chunk)
    return "sha256:" + h.hexdigest()


class VolumeRemove(Req):
    """Remove an imported volume from the caller's pool."""

    volume: VolumeId = Field(description="the volume's id")


def volume_remove(ctx: Ctx, req: VolumeRemove) -> dict[str, Any]:
    dfd = _pool_sub(ctx, VOLUMES)
    try:
        try:
            os.unlink(f"{req.volume[7:]}.ext4", dir_fd=dfd)
        except FileNotFoundError:
            raise NotFound(f"volume {req.volume[:19]} is not in the pool", "") from None
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return {}


class SnapshotCreate(Req):
    """Clone a pool volume into ``snapshots/<id>.ext4``, handed to the caller (0600, one
    link); the caller grows and boots it as its own file."""

    volume: VolumeId = Field(description="the base volume's id")
    snapshot: KilnId = Field(description="the snapshot's id")


def snapshot_create(ctx: Ctx, req: SnapshotCreate) -> dict[str, Any]:
    vfd = _pool_sub(ctx, VOLUMES)
    try:
        try:
            src = os.open(f"{req.volume[7:]}.ext4", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=vfd)
        except FileNotFoundError:
            raise NotFound(f"volume {req.volume[:19]} is not in the pool",
                           "import it first") from None
    finally:
        os.close(vfd)
    sfd = _pool_sub(ctx, SNAPSHOTS)
    try:
        out = poolfs.open_tmpfile(sfd, 0o600)
        try:
            try:
                fcntl.ioctl(out, FICLONE, src)
            except OSError:
                fileops.sparse_copy_fd(src, out)
            os.fchown(out, ctx.caller_uid, ctx.caller_gid)  # our own unnamed file, by fd
            os.fchmod(out, 0o600)
            poolfs.link_tmpfile(out, sfd, f"{req.snapshot}.ext4")
        finally:
            os.close(out)
    finally:
        os.close(src)
        os.close(sfd)
    return {"path": str(ctx.area / POOL / FS / SNAPSHOTS / f"{req.snapshot}.ext4")}


class SnapshotRemove(Req):
    """Remove one of the caller's snapshots (not while a VM's jail holds it)."""

    snapshot: KilnId = Field(description="the snapshot's id")


def snapshot_remove(ctx: Ctx, req: SnapshotRemove) -> dict[str, Any]:
    sfd = _pool_sub(ctx, SNAPSHOTS)
    name = f"{req.snapshot}.ext4"
    try:
        try:
            st = os.stat(name, dir_fd=sfd, follow_symlinks=False)
        except FileNotFoundError:
            raise NotFound(f"no snapshot {req.snapshot}", "`kiln snapshot ls`") from None
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"snapshot {req.snapshot} is not a regular file", "")
        if st.st_uid != ctx.caller_uid or st.st_nlink != 1:
            raise Conflict(f"snapshot {req.snapshot} is staged in a VM's jail",
                           "stop the VM first")
        os.unlink(name, dir_fd=sfd)
        os.fsync(sfd)
    finally:
        os.close(sfd)
    return {}


class PoolList(Req):
    """What the caller's pool holds: volume ids with sizes, snapshot ids, capacity, used."""


def pool_list(ctx: Ctx, req: PoolList) -> dict[str, Any]:
    del req
    out: dict[str, Any] = {"volumes": {}, "snapshots": []}
    for sub, pattern in ((VOLUMES, _VOL_FILE_RE), (SNAPSHOTS, _SNAP_FILE_RE)):
        dfd = _pool_sub(ctx, sub)
        try:
            for name in sorted(os.listdir(dfd)):
                m = pattern.fullmatch(name)
                if m is None:
                    continue
                if sub == VOLUMES:
                    size = os.stat(name, dir_fd=dfd, follow_symlinks=False).st_size
                    out["volumes"]["sha256:" + m.group(1)] = size
                else:
                    out["snapshots"].append(m.group(1))
            if sub == VOLUMES:
                st = os.fstatvfs(dfd)
                out["capacity"] = st.f_blocks * st.f_frsize
                out["used"] = (st.f_blocks - st.f_bfree) * st.f_frsize
        finally:
            os.close(dfd)
    return out


OPS: dict[str, tuple[type[Req], Op]] = {
    "pool-create": (PoolCreate, pool_create),
    "pool-mount": (PoolMount, pool_mount),
    "pool-umount": (PoolUmount, pool_umount),
    "pool-destroy": (PoolDestroy, pool_destroy),
    "pool-list": (PoolList, pool_list),
    "volume-import": (VolumeImport, volume_import),
    "volume-remove": (VolumeRemove, volume_remove),
    "snapshot-create": (SnapshotCreate, snapshot_create),
    "snapshot-remove": (SnapshotRemove, snapshot_remove),
}
