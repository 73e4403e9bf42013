"""The ``usage`` op: what the caller holds against its per-caller caps (``[limits]``).

Read-only and cheap, so a caller (or an operator running it as that user) can see why an op
was refused before asking again. Every count is of the caller's own objects, found the way
the ops that make them record them:

* ``jails`` / ``cgroups``: the claims in ``<area>/jails/`` and ``<area>/cgroups/``
  (``helper.claims``: opened beneath the area, root-owned, no symlink followed);
* ``leases``: the network's lease book (``helper.net.lease``), entries with the caller's uid;
* ``forwards``: the ``KILN-DNAT`` rules whose tag carries the caller's uid. They live only in
  iptables, so this is one ``iptables -S`` run (``helper.net.host.forwards``); when it fails the
  count is ``null`` rather than a guess;
* ``pool_bytes``: the apparent size (``st_size``: what a sparse image may grow to) of
  ``<area>/pool/pool.img`` plus every regular file directly in ``<area>/pool/thin/``, each
  opened or ``fstatat``-ed beneath the area without following a symlink;
* ``audit_bytes``: the audit log bytes the caller's uid added today (``helper.audit``).

Without ``[net]`` in the trusted config no lease or forward can exist: both count 0 and
nothing is run (their caps read 0). The caps of leases and forwards are ``[net]``'s
per-user maxima, which the network ops enforce.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from helper import claims
from helper.audit import audit_spent
from helper.base.errors import KilnError
from helper.net.config import NetSection
from helper.ops.base import Ctx, Op, Req


class Usage(Req):
    """Report the caller's jails, VM cgroups, leases, forwards, pool bytes and audit bytes,
    each with its cap."""


def _cap(used: int | None, most: int) -> dict[str, Any]:
    return {"used": used, "max": most}


def usage(ctx: Ctx, req: Usage) -> dict[str, Any]:
    del req
    lim, sec, uid = ctx.cfg.limits, ctx.cfg.net_section, ctx.caller_uid
    return {
        "jails": _cap(len(claims.names(ctx.area, "jails")), lim.jails),
        "cgroups": _cap(len(claims.names(ctx.area, "cgroups")), lim.cgroups),
        "leases": _cap(leases(sec, uid), sec.max_leases_per_user if sec else 0),
        "forwards": _cap(forwards(sec, uid), sec.max_forwards_per_user if sec else 0),
        "pool_bytes": _cap(pool_bytes(ctx.area), lim.pool_bytes),
        "audit_bytes": _cap(audit_spent(uid), lim.audit_bytes_per_day),
        "import_bytes": {"max": lim.import_bytes},
        "cpu_seconds": {"max": lim.cpu_seconds},
        "request_bytes": {"max": lim.request_bytes},
    }


def leases(sec: NetSection | None, uid: int) -> int:
    if sec is None:
        return 0
    from helper.net import lease as netlease

    return sum(1 for x in netlease.read_book(sec).leases if x.uid == uid)


def forwards(sec: NetSection | None, uid: int) -> int | None:
    if sec is None:
        return 0
    from helper.net import host as net

    try:
        return sum(1 for f in net.forwards(sec) if f.tag.uid == uid)
    except KilnError:  # iptables missing or the namespace gone: unknown, not zero
        return None


def pool_bytes(area: Path) -> int:
    """Apparent bytes of the area's pool image and thin-pool files (0 when absent)."""
    from helper.storage import poolfs

    return sum(st.st_size for st in poolfs.area_images(area))


OPS: dict[str, tuple[type[Req], Op]] = {"usage": (Usage, usage)}
