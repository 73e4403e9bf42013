"""The table of the helper's operations: op name → (request model, function).

``OPS`` is gathered from the subject modules (storage, dm, VM cgroups and taps, jails,
network, ``usage``, admin) plus ``area``; names are unique across them. An op name is at
most 32 characters of a-z and inner '-' (``valid_op``, checked before a name is logged).
``parse`` validates a request, ``run_op`` runs it with a ``Ctx``; ``schemas`` is what
``kiln-helper --list`` prints. No op takes a program path or an argv; an op on an object
that does not exist raises ``NotFound``. What the requests and ``Ctx`` are is said once,
in ``helper.ops.base``.
"""

from __future__ import annotations

import re
from typing import Any

from helper.base.errors import UsageError
from helper.ops import admin as ops_admin
from helper.ops import dm as ops_dm
from helper.ops import jail as ops_jail
from helper.ops import jaildisk as ops_jaildisk
from helper.ops import jailfiles as ops_jailfiles
from helper.ops import net as ops_net
from helper.ops import storage as ops_storage
from helper.ops import usage as ops_usage
from helper.ops import vm as ops_vm
from helper.ops.base import Ctx, Op, Req

__all__ = ["OPS", "Ctx", "Req", "parse", "run_op", "schemas", "valid_op"]

# -- area and reclaim -----------------------------------------------------------------------


class Area(Req):
    """Create (if needed) and name the caller's area."""


def area(ctx: Ctx, req: Area) -> dict[str, Any]:
    del req
    return {"path": str(ctx.area), "uid": ctx.caller_uid}



# -- the table ------------------------------------------------------------------------------

# Each subject module declares its own ops; names are unique across them.
OPS: dict[str, tuple[type[Req], Op]] = {
    "area": (Area, area),
    **ops_storage.OPS,
    **ops_dm.OPS,
    **ops_vm.OPS,
    **ops_jail.OPS,
    **ops_jailfiles.OPS,
    **ops_jaildisk.OPS,
    **ops_net.OPS,
    **ops_usage.OPS,
    **ops_admin.OPS,
}
MAX_OP_LEN = 32  # every op name is far shorter; checked before a name is logged or echoed
_OP_RE = re.compile(r"[a-z]+(-[a-z]+)*")


def valid_op(op: str) -> bool:
    """``op`` could name an op: at most 32 characters of a-z and inner '-' (the length is
    checked first, so a huge name costs nothing)."""
    return len(op) <= MAX_OP_LEN and _OP_RE.fullmatch(op) is not None


def schemas() -> dict[str, Any]:
    """Each op's request JSON Schema (what ``kiln-helper --list`` prints)."""
    return {name: model.model_json_schema() for name, (model, _) in OPS.items()}


def parse(op: str, payload: bytes | str) -> Req:
    """Validate a request (raises pydantic's ValidationError, or UsageError for the op)."""
    if not valid_op(op) or op not in OPS:
        raise UsageError(f"unknown op {op[:MAX_OP_LEN]!r}", "see `kiln-helper --list`")
    return OPS[op][0].model_validate_json(payload)


def run_op(ctx: Ctx, op: str, req: Req) -> dict[str, Any]:
    model, fn = OPS[op]
    if not isinstance(req, model):
        raise UsageError(f"request for {op} has the wrong type", "")
    return fn(ctx, req)
