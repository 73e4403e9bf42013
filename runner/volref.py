"""What a SOURCE or volume argument names: a stored volume, or something to build.

A volume-id-shaped argument (``(sha256:)?<4-64 hex>``) always names a stored volume: one
that matches none is "no volume …", never a pull of an image with that name (an image
named like that is pulled as ``docker://NAME``); an ambiguous prefix lists its matches.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from helper.base.errors import NotFound

if TYPE_CHECKING:
    from builder.root import Root
    from builder.store import Volume

VOLUME_REF = re.compile(r"^(?:sha256:)?[0-9a-f]{4,64}$")


def is_volume_ref(text: str) -> bool:
    return VOLUME_REF.fullmatch(text.strip().lower()) is not None


def find_volume(root: Root, ref: str, *, source: bool = False) -> Volume:
    """The stored volume ``ref`` (an id or a unique prefix) names. ``source``: ``ref`` is a
    SOURCE of `kiln run`, where an image reference is also accepted (the hint says how)."""
    from builder.store import Store

    try:
        return Store(root).get(ref)
    except NotFound:
        name = ref.strip().lower()
        pull = f"; an image named {name} is pulled as docker://{name}" \
            if source and not name.startswith("sha256:") else ""
        raise NotFound(f"no volume matches {ref!r}",
                       f"list volumes with `kiln volume ls`{pull}") from None


def resolve_volume(root: Root, source: str, registry_opts: Any) -> Volume:
    """A volume id/prefix names a stored volume; anything else is built (cache permitting)."""
    if is_volume_ref(source):
        return find_volume(root, source, source=True)
    from builder.pipeline import build

    return build(root, source, registry_opts).volume
