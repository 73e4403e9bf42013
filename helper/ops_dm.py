"""Device-mapper ops: the area's thin-pool and thin devices, and crash reclaim.

Names are kiln's (``kiln-<area key>-…``) and tables are written by the helper from typed
fields; no caller text reaches dmsetup.
"""


from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field

from helper import privileged
from helper.errors import NotFound, UsageError
from helper.opbase import (
    Ctx,
    DmName,
    LoopDev,
    Op,
    Req,
)
from helper.pool import dmthin_core as core

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



class Reclaim(Req):
    """Remove the area's dm devices not in ``keep`` and detach its unused loop devices."""

    keep: tuple[DmName, ...] = Field(default=(), max_length=4096,
                                     description="kiln device names to keep")


def reclaim(ctx: Ctx, req: Reclaim) -> dict[str, Any]:
    return {"removed": privileged.reclaim(ctx.area, list(req.keep))}


OPS: dict[str, tuple[type[Req], Op]] = {
    "dm-create": (DmCreate, dm_create),
    "dm-message": (DmMessage, dm_message),
    "dm-remove": (DmRemove, dm_remove),
    "reclaim": (Reclaim, reclaim),
}
