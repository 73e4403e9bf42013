"""Device-mapper ops: the area's thin-pool and thin devices, base imports, crash reclaim.

Names are kiln's (``kiln-<area key>-…``) and tables are written by the helper from typed
fields; no caller text reaches dmsetup. The dm-thin backend (``builder.pool.dmthin``) runs
every privileged step through these, in-process as root or via sudo otherwise:

* ``dm-info``: the dm targets and whether ``[pool]`` names operator devices;
* ``dm-create``: the thin-pool, over the area's own sparse files
  ``AREA/pool/thin/{data,meta}.img`` (made when ``fresh``, loop-attached by the helper: the
  caller never names a loop device) or over the operator's devices (claimed and, when
  ``fresh``, formatted); or a snapshot's thin device, whose nodes go to the caller with
  ``grant`` (snapshots only: never the pool, never a base);
* ``dm-import``: a base volume, all or nothing (``create_thin``, write from the fd the
  caller passes, hashed against the id unless root asked in-process, deactivate);
* ``dm-message``, ``dm-remove`` (with ``delete``: the thin id goes too), ``dm-status``,
  ``reclaim`` (devices no record keeps); ``thin-clear`` tears the whole pool down.

A device whose node a jail still holds (``jail.jails_holding``: a block node of its
number in any jail's chroot) is never removed: dm minors are reused, so that node would
open whatever device gets the number next. ``dm-remove`` and ``thin-clear`` refuse it,
``reclaim`` keeps it. Every op runs with the signals sudo relays held
(``cgattach.held``): a caller's SIGTERM never cuts a device loose from its record.
"""


from __future__ import annotations

import contextlib
import os
import stat
from typing import Any, Literal

from pydantic import Field

from helper import cgattach
from helper.base import safepath
from helper.base.errors import Conflict, KilnError, NotFound, UsageError
from helper.jail import jailer as jail
from helper.ops.base import Ctx, DmName, Op, Req, VolumeId, passed_fd
from helper.storage import dmdev, poolfs, privileged
from helper.storage import dmthin_core as core

THIN_DIR = "pool/thin"
FILES = ("data.img", "meta.img")


def _kind(ctx: Ctx, name: str, kind: str) -> str:
    """``name`` is a kiln name of this area, of the given kind."""
    privileged.check_dm_name(ctx.area, name)
    parsed = core.parse_name(name)
    if parsed is None or parsed.kind != kind:
        raise UsageError(f"{name} is not a {kind} device name", "")
    return name


def _dm_exists(name: str) -> None:
    if not os.path.exists(f"/dev/mapper/{name}"):
        raise NotFound(f"device-mapper device {name} does not exist", "")


def _in_jails(ctx: Ctx, names: list[str]) -> dict[str, list[str]]:
    """{device name: jails holding a node of it} for those of ``names`` some jail holds."""
    out: dict[str, list[str]] = {}
    for name in names:
        try:
            rdev = os.stat(f"/dev/mapper/{name}").st_rdev
        except FileNotFoundError:
            continue
        if held := jail.jails_holding(ctx.cfg.chroot_base, rdev):
            out[name] = held
    return out


def _refuse_in_jails(ctx: Ctx, names: list[str]) -> None:
    for name, jails in _in_jails(ctx, names).items():
        raise Conflict(f"refusing to remove {name}: jail {jails[0]} still holds its node",
                       f"remove the jail first (jail-remove {jails[0]})")


def _area_devices(ctx: Ctx) -> list[str]:
    prefix = f"kiln-{core.root_key(str(ctx.area))}-"
    with contextlib.suppress(FileNotFoundError):
        return sorted(n for n in os.listdir("/dev/mapper") if n.startswith(prefix))
    return []


# -- what the host offers ----------------------------------------------------------------------


class DmInfo(Req):
    """The device-mapper targets and the operator's ``[pool]`` devices, if configured."""


def dm_info(ctx: Ctx, req: DmInfo) -> dict[str, Any]:
    del req
    pair = dmdev.configured(ctx.cfg)
    return {"targets": privileged.dm_targets(),
            "devices": None if pair is None else {"data": str(pair[0]),
                                                  "metadata": str(pair[1])}}


# -- the loop-backed pool files ----------------------------------------------------------------


def make_thin_files(ctx: Ctx, data_bytes: int, metadata_bytes: int) -> None:
    """The area's sparse ``pool/thin/data.img`` and ``meta.img`` (root-owned, 0600; an
    existing file of the same size is kept, one of another size refused). A sudo caller's
    new files are admitted against its cap and the space not yet promised to any area's
    images (``poolfs.admitted``) before any directory or file is made."""
    missing = _missing_thin_bytes(ctx, (data_bytes, metadata_bytes))
    with contextlib.ExitStack() as stack:
        if missing and not ctx.trusted:
            stack.enter_context(poolfs.admitted(ctx.area, "the pool files", missing,
                                                ctx.cfg.limits))
        _make_thin_files(ctx, data_bytes, metadata_bytes)


def _missing_thin_bytes(ctx: Ctx, sizes: tuple[int, int]) -> int:
    try:
        dfd = safepath.open_beneath(ctx.area, THIN_DIR, os.O_RDONLY | os.O_DIRECTORY)
    except NotFound:
        return sum(sizes)
    try:
        return sum(size for name, size in zip(FILES, sizes, strict=True)
                   if not poolfs.exists_at(dfd, name))
    finally:
        os.close(dfd)


def _make_thin_files(ctx: Ctx, data_bytes: int, metadata_bytes: int) -> None:
    safepath.mkdirs_beneath(ctx.area, THIN_DIR, 0o755)
    dfd = safepath.open_beneath(ctx.area, THIN_DIR, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name, size in zip(FILES, (data_bytes, metadata_bytes), strict=True):
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                fd = poolfs.open_tmpfile(dfd, 0o600)  # unnamed until whole: nothing leaks
                try:
                    os.ftruncate(fd, size)  # sparse: costs nothing until written
                    poolfs.link_tmpfile(fd, dfd, name)
                finally:
                    os.close(fd)
                continue
            if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_size != size:
                raise Conflict(f"{THIN_DIR}/{name} exists and is not a {size}-byte "
                               "root-owned file", "destroy the pool first")
    finally:
        os.close(dfd)


class ThinClear(Req):
    """Tear the area's thin-pool down: remove the area's dm devices leaf first (snapshots,
    bases, the pool) and detach its unused loops (never the operator's devices); when the
    area holds the claim on the operator's devices, zero their metadata superblock and only
    then release the claim; delete its pool files and base records. Refused while the pool
    stays (a device in use)."""

    pool: DmName = Field(description="the area's thin-pool name")


def thin_clear(ctx: Ctx, req: ThinClear) -> dict[str, Any]:
    _kind(ctx, req.pool, "pool")
    _refuse_in_jails(ctx, _area_devices(ctx))
    removed = privileged.reclaim(ctx.area, [], frozenset(dmdev.spare_devices(ctx.cfg)))
    if os.path.exists(f"/dev/mapper/{req.pool}"):
        raise Conflict(f"{req.pool} is still active: a device of it is in use",
                       "stop what uses it (a running VM?), then retry")
    pair = dmdev.configured(ctx.cfg)
    if dmdev.claimed_by(ctx.cfg) == str(ctx.area) and pair is not None \
            and dmdev.block_facts(pair[1]).kind != "missing":
        # Formatted before the claim goes: whoever claims the devices next never finds this
        # pool's thin ids. A failure or crash in between leaves the claim held (and any
        # next claimant must be fresh anyway: it formats them again). A metadata device that
        # is gone has nothing to format; whoever takes it when it returns must be fresh.
        dmdev.clear_superblock(dmdev.check_devices(ctx.cfg, core.DEFAULT_BLOCK_SECTORS))
    released = dmdev.release(ctx.cfg, ctx.area)
    with contextlib.suppress(NotFound):
        for thin_id in dmdev.base_ids(ctx.area):
            dmdev.forget_base(ctx.area, thin_id)
        dfd = safepath.open_beneath(ctx.area, THIN_DIR, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name in FILES:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=dfd)
            with contextlib.suppress(OSError):
                os.rmdir("bases", dir_fd=dfd)
        finally:
            os.close(dfd)
    return {"removed": removed, "released": released}


# -- device-mapper ------------------------------------------------------------------------


class DmCreate(Req):
    """Create the area's thin-pool, or a snapshot's thin device in it. The helper writes
    the table; no caller text reaches dmsetup."""

    name: DmName = Field(description="the new device's kiln name (a pool or a snapshot)")
    kind: Literal["thin-pool", "thin"] = Field(description="what to create")
    source: Literal["files", "devices"] = Field(
        default="files", description="thin-pool: over the area's pool/thin/{data,meta}.img "
        "(loop-attached by the helper), or over the operator's [pool] data_device and "
        "metadata_device")
    fresh: bool = Field(default=False, description="thin-pool: a new pool (files: create "
                        "them; devices: claim them, zero the metadata superblock)")
    data_bytes: int = Field(default=0, ge=0, le=1 << 50,
                            description="thin-pool, fresh files: size of data.img")
    metadata_bytes: int = Field(default=0, ge=0, le=16 << 30,
                                description="thin-pool, fresh files: size of meta.img")
    block_sectors: int = Field(default=core.DEFAULT_BLOCK_SECTORS, ge=128, le=2**21,
                               description="thin-pool: data block size in sectors")
    pool: DmName | None = Field(default=None, description="thin: the pool device's name")
    thin_id: int = Field(default=0, ge=0, lt=core.THIN_ID_LIMIT, description="thin: its id")
    sectors: int = Field(default=0, ge=0, le=2**48, description="thin: size in sectors")
    grant: bool = Field(default=False, description="thin: give the device node to the "
                        "caller (0600), whose VMM opens it; snapshots only, never a base")


def dm_create(ctx: Ctx, req: DmCreate) -> dict[str, Any]:
    if req.kind == "thin-pool":
        _kind(ctx, req.name, "pool")
        if req.grant:
            raise UsageError(core.grant_problem(req.name, 0, ()) or "", "")
        if req.source == "devices":
            return _pool_on_devices(ctx, req)
        return _pool_on_files(ctx, req)
    # Base devices are made by dm-import only, so their bytes are always verified.
    _kind(ctx, req.name, "snap")
    if req.pool is None:
        raise UsageError("a thin device needs its pool's kiln name", "")
    _kind(ctx, req.pool, "pool")
    if req.grant and (why := core.grant_problem(req.name, req.thin_id,
                                                dmdev.base_ids(ctx.area))):
        raise UsageError(why, "")
    _dm_exists(req.pool)
    try:
        table = core.thin_table(f"/dev/mapper/{req.pool}", req.thin_id, req.sectors)
    except ValueError as e:
        raise UsageError(str(e), "") from None
    path = privileged.dm_create(ctx.area, req.name, table)
    granted: list[str] = []
    if req.grant:
        try:
            # Again now the device is active: a dm-import of this id records it before its
            # create_thin, so a base that appeared since the check above is seen here.
            if why := core.grant_problem(req.name, req.thin_id, dmdev.base_ids(ctx.area)):
                raise UsageError(why, "")
            granted = dmdev.grant_node(req.name, ctx.caller_uid, ctx.caller_gid)
        except BaseException:
            with contextlib.suppress(KilnError):
                privileged.dm_remove(ctx.area, req.name)
            raise
    return {"path": path, "granted": granted}


def _pool_on_files(ctx: Ctx, req: DmCreate) -> dict[str, Any]:
    """The helper attaches its own files: the caller never names a loop device."""
    if req.fresh:
        if req.data_bytes < 16 * req.block_sectors * core.SECTOR \
                or req.metadata_bytes < core.MIN_META_BYTES:
            raise UsageError("a new pool needs data_bytes of at least 16 blocks and "
                             f"metadata_bytes of at least {core.MIN_META_BYTES}", "")
        make_thin_files(ctx, req.data_bytes, req.metadata_bytes)
    elif req.data_bytes or req.metadata_bytes:
        raise UsageError("sizes are given only for a new pool (fresh)", "")
    fd = safepath.open_beneath(ctx.area, f"{THIN_DIR}/data.img", os.O_RDONLY)
    try:
        data_bytes = os.fstat(fd).st_size
    finally:
        os.close(fd)
    try:
        sectors = core.device_pool_sectors(data_bytes, req.block_sectors)
    except ValueError as e:
        raise UsageError(str(e), "") from None
    loops: dict[str, str] = {}
    try:
        for name in FILES:
            loops[name] = poolfs.attach_image(ctx.area, f"{THIN_DIR}/{name}")
        table = core.thin_pool_table(loops["meta.img"], loops["data.img"], sectors,
                                     req.block_sectors)
        path = privileged.dm_create(ctx.area, req.name, table)
    except BaseException:
        for dev in loops.values():  # nothing half-made: no loop left attached for nothing
            if not privileged.loop_in_use(dev):
                with contextlib.suppress(KilnError):
                    privileged.loop_detach(ctx.area, dev)
        raise
    return {"path": path, "data_sectors": sectors}


def _pool_on_devices(ctx: Ctx, req: DmCreate) -> dict[str, Any]:
    if req.data_bytes or req.metadata_bytes:
        raise UsageError("the operator's devices come from [pool], not from the request", "")
    devs = dmdev.check_devices(ctx.cfg, req.block_sectors)
    dmdev.claim(ctx.cfg, ctx.area, devs, fresh=req.fresh)  # formats first when fresh
    sectors = core.device_pool_sectors(devs.data_bytes, req.block_sectors)
    table = core.thin_pool_table(devs.meta_devno, devs.data_devno, sectors, req.block_sectors)
    return {"path": privileged.dm_create(ctx.area, req.name, table), "data_sectors": sectors,
            "data": devs.data, "metadata": devs.metadata}


class DmImport(Req):
    """Make a base volume's thin device, all or nothing: ``create_thin``, activate, copy
    the volume from the fd the caller passes (hashed against its id), deactivate. On any
    failure the device and the thin id are gone again."""

    pool: DmName = Field(description="the area's thin-pool")
    name: DmName = Field(description="the base device's name: kiln-<key>-vol-<volume hex>")
    volume: VolumeId = Field(description="the volume's id (sha256 of its bytes)")
    thin_id: int = Field(ge=0, lt=core.THIN_ID_LIMIT, description="a free thin id")
    fd: int = Field(ge=3, le=255, description="the open volume file descriptor")


def dm_import(ctx: Ctx, req: DmImport) -> dict[str, Any]:
    _kind(ctx, req.pool, "pool")
    _kind(ctx, req.name, "vol")
    if req.name != core.volume_name(core.root_key(str(ctx.area)), req.volume[7:]):
        raise UsageError(f"{req.name} is not the device name of {req.volume[:19]}", "")
    st = passed_fd(req.fd, "pass the volume open")
    if not stat.S_ISREG(st.st_mode) or st.st_size <= 0:
        raise UsageError(f"file descriptor {req.fd} is not a non-empty regular file", "")
    _dm_exists(req.pool)
    if os.path.exists(f"/dev/mapper/{req.name}"):
        raise Conflict(f"{req.name} already exists", "reclaim it first")
    # Recorded before create_thin: from the moment thin id T exists it is never granted
    # (dm-create re-checks after activating). Exclusive: a second import of T, or T already
    # a base, is refused without touching the other's record.
    dmdev.record_base(ctx.area, req.thin_id)
    try:
        privileged.dm_message(ctx.area, req.pool, core.msg_create_thin(req.thin_id))
    except BaseException:
        dmdev.forget_base(ctx.area, req.thin_id)  # T was not made by us: leave it alone
        raise
    active = False
    try:
        privileged.dm_create(ctx.area, req.name, core.thin_table(
            f"/dev/mapper/{req.pool}", req.thin_id, core.sectors_of(st.st_size)))
        active = True
        out = os.open(f"/dev/mapper/{req.name}", os.O_WRONLY | os.O_CLOEXEC)
        try:
            # In-process root imports its own build (as before the helper): no re-hash.
            dmdev.copy_volume(req.fd, out, None if ctx.trusted else req.volume)
        finally:
            os.close(out)
        active = False
        privileged.dm_remove(ctx.area, req.name)
    except BaseException:
        with contextlib.suppress(KilnError, OSError):
            if active:
                privileged.dm_remove(ctx.area, req.name)
            privileged.dm_message(ctx.area, req.pool, core.msg_delete(req.thin_id))
            dmdev.forget_base(ctx.area, req.thin_id)
        raise
    return {"thin_id": req.thin_id, "size": st.st_size}


class DmMessage(Req):
    """Send create_thin / create_snap / delete to the area's thin-pool."""

    name: DmName = Field(description="the thin-pool's kiln name")
    message: str = Field(pattern=r"^(create_thin [0-9]{1,8}|create_snap [0-9]{1,8} [0-9]{1,8}"
                         r"|delete [0-9]{1,8})$", description="the thin-pool message")


def dm_message(ctx: Ctx, req: DmMessage) -> dict[str, Any]:
    privileged.check_dm_name(ctx.area, req.name)
    _dm_exists(req.name)
    privileged.dm_message(ctx.area, req.name, req.message)
    verb, *ids = req.message.split()
    if verb == "delete":
        dmdev.forget_base(ctx.area, int(ids[0]))
    return {}


class DmRemove(Req):
    """Remove one of the area's device-mapper devices; with ``delete``, a thin device's
    data goes too (its own thin id, read from its table, deleted from the area's pool)."""

    name: DmName = Field(description="the device's kiln name")
    delete: bool = Field(default=False, description="thin devices: also delete the thin id "
                         "it maps from the pool (what `kiln snapshot rm` does)")


def dm_remove(ctx: Ctx, req: DmRemove) -> dict[str, Any]:
    privileged.check_dm_name(ctx.area, req.name)
    _dm_exists(req.name)
    _refuse_in_jails(ctx, [req.name])
    thin_id = None
    if req.delete:
        thin_id = core.thin_id_of_table(privileged.dm_table(ctx.area, req.name))
        if thin_id is None:
            raise UsageError(f"{req.name} is not a thin device", "remove it without delete")
    privileged.dm_remove(ctx.area, req.name)
    if thin_id is not None:
        pool = core.pool_name(core.root_key(str(ctx.area)))
        privileged.dm_message(ctx.area, pool, core.msg_delete(thin_id))
        dmdev.forget_base(ctx.area, thin_id)
    return {"deleted": thin_id}


class DmStatus(Req):
    """The status line of the area's thin-pool (used and total data blocks)."""

    name: DmName = Field(description="the thin-pool's kiln name")


def dm_status(ctx: Ctx, req: DmStatus) -> dict[str, Any]:
    _kind(ctx, req.name, "pool")
    _dm_exists(req.name)
    return {"status": privileged.dm_status(ctx.area, req.name)}


class Reclaim(Req):
    """Remove the area's dm devices not in ``keep`` and detach its unused loop devices
    (never the operator's ``[pool]`` devices)."""

    keep: tuple[DmName, ...] = Field(default=(), max_length=4096,
                                     description="kiln device names to keep")


def reclaim(ctx: Ctx, req: Reclaim) -> dict[str, Any]:
    spare = frozenset(dmdev.spare_devices(ctx.cfg))
    keep = [*req.keep, *_in_jails(ctx, _area_devices(ctx))]  # and a device a jail holds
    return {"removed": privileged.reclaim(ctx.area, keep, spare)}


OPS: dict[str, tuple[type[Req], Op]] = {
    "dm-info": (DmInfo, dm_info),
    "thin-clear": (ThinClear, cgattach.held(thin_clear)),
    "dm-create": (DmCreate, cgattach.held(dm_create)),
    "dm-import": (DmImport, cgattach.held(dm_import)),
    "dm-message": (DmMessage, cgattach.held(dm_message)),
    "dm-remove": (DmRemove, cgattach.held(dm_remove)),
    "dm-status": (DmStatus, dm_status),
    "reclaim": (Reclaim, cgattach.held(reclaim)),
}
