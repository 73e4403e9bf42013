"""What every helper op shares: the field types, ``Req`` (the request base model) and ``Ctx``
(who asks, confined to which area).

Request models: ``extra="forbid"``, ``frozen``, ``strict`` (no "1" → 1 coercion), a
description on every field, every string constrained (pattern or enum).

``Ctx``:

* ``area``: the directory every caller-named path is relative to — the kiln root when
  root calls in-process, ``<[pool] directory>/users/<uid>`` (created by the helper,
  root-owned) for a sudo caller. Relative paths are resolved by ``safepath`` (no symlinks);
* ``caller_uid/gid``: who asked (0 in-process); VM uids are never 0 or the caller's;
* ``trusted``: an in-process root caller (skips nothing that guards the host; only the
  re-hash of an imported volume, which protects a pool from its own user).
"""


from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from helper.base.errors import NotFound, UsageError
from helper.configbase import Config

# -- field types --------------------------------------------------------------------------

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


Op = Callable[[Ctx, Any], dict[str, Any]]  # what each module's ``OPS`` table maps to


def check_vm_uid(ctx: Ctx, uid: int, gid: int) -> None:
    """A VM's uid/gid: from the configured range, never 0 or the caller's own."""
    c = ctx.cfg
    for what, n in (("uid", uid), ("gid", gid)):
        if not c.uid_first <= n < c.uid_first + c.uid_count or n in (0, ctx.caller_uid):
            raise UsageError(f"{what} {n} is outside the VM range {c.uid_first}-"
                             f"{c.uid_first + c.uid_count - 1}",
                             "VM uids/gids come from [jails] uid_gid_range")


def passed_fd(fd: int, hint: str) -> os.stat_result:
    """The stat of a file descriptor the caller passed open (NotFound when it is not)."""
    try:
        return os.fstat(fd)
    except OSError:
        raise NotFound(f"file descriptor {fd} is not open", hint) from None
