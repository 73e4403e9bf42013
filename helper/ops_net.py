"""Network ops (taps on a kiln bridge, per-VM namespaces, NAT): none yet; see issue #7."""

from __future__ import annotations

from helper.opbase import Op, Req

OPS: dict[str, tuple[type[Req], Op]] = {}
