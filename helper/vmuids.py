"""Which VM uids/gids are held, and by whom: no caller may take another caller's VM uid.

Callers choose VM uids themselves (each kiln picks the first free one in its own records),
so two callers could pick the same one — by accident or, for a sudo caller, on purpose: a
Firecracker jailed as B's VM uid may TUNSETIFF B's tap (its owner matches) and signal B's
VMM. The ops that bind a VM uid (``jail-stage``, ``tap-attach``, ``netns-create``) hold
``<[pool] directory>/vm-uids.lock`` (root-owned, flock) while they check and claim, so two
callers at once cannot both pass the check.

Holders (``check_free``):

* jails: ``jail-stage`` writes a root-owned ledger entry ``<[pool] directory>/vm-uids/<vm>``
  (``helper.claims``: boot id, the jail directory's inode, uid, gid, caller uid and area)
  for every caller, root in-process too (its area is its kiln root); an entry whose jail
  is gone or is of another boot holds nothing (and is dropped);
* taps: every tun device in the host namespace, the [net] namespace and the VM namespaces
  owned by the uid (or group) whose owner tag does not name the caller.

A caller is (uid, area): two kiln roots run by root are two callers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from helper import claims
from helper.base import safepath
from helper.base.errors import KilnError, UidInUse
from helper.jail import jailer as jail
from helper.net import core as nc
from helper.net import host as net
from helper.ops.base import Ctx

LEDGER = "vm-uids"  # <pool dir>/vm-uids/<vm>: the jail of every caller and its uid/gid
LOCK = "vm-uids.lock"


@contextlib.contextmanager
def locked(ctx: Ctx) -> Iterator[None]:
    """Hold the host-wide VM uid lock (blocks until the other holder is done)."""
    with safepath.root_lock(ctx.cfg.pool_dir, LOCK):
        yield


def _in_use(what: str, n: int) -> UidInUse:
    return UidInUse(f"{what} {n} is in use by another user's VM",
                    "pick another VM uid/gid from [jails] uid_gid_range (kiln retries with "
                    "another free one)")


def _jail_holders(ctx: Ctx, jail_cfg: jail.JailConfig) -> Iterator[tuple[int, int]]:
    """(uid, gid) of every live jail of another caller."""
    pool = ctx.cfg.pool_dir
    for vm in claims.names(pool, LEDGER):
        doc = claims.read(pool, LEDGER, vm)
        try:
            jd = jail.jail_dir(jail_cfg, vm)
        except KilnError:
            continue
        if doc is None or not jd.is_dir() or not claims.holds(doc, [jd]) \
                or list(doc.get("dirs") or {}) != [str(jd)]:
            claims.drop(pool, LEDGER, vm)  # its jail is gone (removed, rebooted): stale
            continue
        if (doc.get("caller"), doc.get("caller_area")) != (ctx.caller_uid, str(ctx.area)):
            yield int(doc.get("uid", -1)), int(doc.get("gid", -1))


def _tap_holders(ctx: Ctx) -> Iterator[tuple[int, int]]:
    """(owner, group) of every tun device whose tag is not the caller's."""
    sec = ctx.cfg.net_section
    spaces = {"", *((sec.namespace,) if sec is not None and sec.namespace else ())}
    spaces |= set(net.netns_names())
    for ns in sorted(spaces):
        try:
            links = net.ip_json(ns, "-d", "link", "show")
        except KilnError:
            continue  # a namespace going away meanwhile holds nothing
        for d in links:
            if net.kind(d) != "tun":
                continue
            tag = nc.parse_tag(d.get("ifalias"))
            if tag is not None and tag.uid == ctx.caller_uid:
                continue
            data = (d.get("linkinfo") or {}).get("info_data") or {}
            yield int(data.get("user", -1)), int(data.get("group", -1))


def check_free(ctx: Ctx, uid: int, gid: int, jail_cfg: jail.JailConfig | None) -> None:
    """Refuse ``uid``/``gid`` while another caller's jail or tap holds it (hold ``locked``).
    ``jail_cfg``: where jails live (None: no jail tools configured, so no jails)."""
    held = list(_jail_holders(ctx, jail_cfg)) if jail_cfg is not None else []
    held += _tap_holders(ctx)
    for u, g in held:
        if uid == u:
            raise _in_use("uid", uid)
        if gid == g:
            raise _in_use("gid", gid)


def claim(ctx: Ctx, vm: str, jd: Path, uid: int, gid: int) -> None:
    claims.write(ctx.cfg.pool_dir, LEDGER, vm, [jd], uid=uid, gid=gid,
                 caller=ctx.caller_uid, caller_area=str(ctx.area))


def drop(ctx: Ctx, vm: str) -> None:
    """Drop ``vm``'s ledger entry when it is this caller's: a jail id is host-wide, so after
    a half-made jail of ours the entry may already be another caller's jail of that id."""
    doc = claims.read(ctx.cfg.pool_dir, LEDGER, vm)
    if doc is None or (doc.get("caller"), doc.get("caller_area")) == (ctx.caller_uid,
                                                                     str(ctx.area)):
        claims.drop(ctx.cfg.pool_dir, LEDGER, vm)
