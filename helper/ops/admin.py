"""The administrator's op: ``reclaim-all``, for root only (at boot, or for departed users).

A caller's own ops reclaim what that caller left, but two kinds of leftovers have no caller
to come back: objects of a **previous boot** (a jail directory and its claim survive a
reboot on disk; the claim names a boot id that no longer holds, so even its owner's
``jail-remove`` is refused) and everything of a **departed user** (no passwd entry: its
mounted pool, jails, VM cgroups, VM uids, area). ``reclaim-all`` walks every area under
``[pool] directory/users``: for a departed uid it removes everything and then the area;
for a live one only what a previous boot left. Whatever cannot go now (a jail whose
Firecracker still runs, a busy mount) is reported and left for the next run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import shutil
from typing import Any

from helper import claims, vmuids
from helper.base.errors import KilnError, NotFound, UsageError
from helper.jail import jailer as jail
from helper.ops import jail as ops_jail
from helper.ops import storage as ops_storage
from helper.ops import vm as ops_vm
from helper.ops.base import Ctx, Op, Req


class ReclaimAll(Req):
    """Root only: reclaim every area's leftovers of a previous boot, and everything of
    users that no longer exist."""


def reclaim_all(ctx: Ctx, req: ReclaimAll) -> dict[str, Any]:
    del req
    if ctx.caller_uid != 0:
        raise UsageError("reclaim-all is for root", "run it as root (e.g. at boot)")
    users = ctx.cfg.users_dir()
    done: dict[str, list[str]] = {"removed": [], "left": []}
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir(users)):
            if name.isdigit() and name != "0":
                _reclaim_area(ctx, int(name), done)
    return done


def _departed(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return True
    return False


def _reclaim_area(ctx: Ctx, uid: int, done: dict[str, list[str]]) -> None:
    area = ctx.cfg.area(uid)
    # The area's own objects, acted on as that caller would (its claims, its area).
    actx = dataclasses.replace(ctx, area=area, caller_uid=uid, caller_gid=uid, trusted=False)
    gone = _departed(uid)
    boot = claims.boot_id()
    for kind, remove in ((claims.JAILS, _remove_jail), (claims.CGROUPS, _remove_cgroup)):
        for vm in claims.names(area, kind):
            claim = claims.read(area, kind, vm) or {}
            if gone or claim.get("boot") != boot:
                what = f"{uid}/{kind}/{vm}"
                try:
                    remove(actx, vm, claim)
                    done["removed"].append(what)
                except (KilnError, OSError) as e:
                    done["left"].append(f"{what}: {e}")
    if gone:
        try:
            with contextlib.suppress(KilnError):
                ops_storage.pool_destroy(actx, ops_storage.PoolDestroy())
            shutil.rmtree(area)
            done["removed"].append(f"{uid}")
        except OSError as e:
            done["left"].append(f"{uid}: {e}")


def _remove_jail(actx: Ctx, vm: str, claim: dict[str, Any]) -> None:
    if claim.get("boot") == claims.boot_id():  # this boot's (a departed user's): its own op
        uid = claim.get("uid")
        if isinstance(uid, int):  # its VM uid is the departed caller's: nothing else's
            jail.kill_uid(uid)
        with contextlib.suppress(NotFound):
            ops_jail.jail_remove(actx, ops_jail.JailRemove(vm=vm))
        return
    # A previous boot's: its Firecracker and cgroups are gone, its directory is not. Remove
    # the directory only if it is still the very one the claim names (a name is host-wide:
    # someone else's jail of that name is never touched).
    cfg = ops_jail.jail_config(actx)
    jd = jail.jail_dir(cfg, vm)
    ident = (claim.get("dirs") or {}).get(str(jd))
    if ident is not None and jd.exists() and claims.same(ident, jd):
        jail.jail_remove(cfg, vm)
    vmuids.drop(actx, vm)
    claims.drop(actx.area, ops_jail.JAILS, vm)


def _remove_cgroup(actx: Ctx, vm: str, claim: dict[str, Any]) -> None:
    version = claim.get("version")
    if claim.get("boot") == claims.boot_id() and version in (1, 2):
        with contextlib.suppress(NotFound):  # owner-checked by its claim
            ops_vm.cgroup_kill(actx, ops_vm.CgroupKill(vm=vm, version=version))
    # A previous boot's cgroup is gone with the boot (one of that name now is someone
    # else's): only the claim goes.
    claims.drop(actx.area, claims.CGROUPS, vm)


OPS: dict[str, tuple[type[Req], Op]] = {
    "reclaim-all": (ReclaimAll, reclaim_all),
}
