"""A recipe's pydantic validation failure as kiln's one-line message and hint.

pydantic reports every problem with a location tuple and an error type; kiln shows the
first one as ``files[0].mode: ...`` with a hint (a ``Bad`` raised by a validator brings its
own), and counts the rest. ``builder.recipe`` prefixes the file name and raises it as a
``RecipeError``.

Dependency direction: ``builder.recipe`` imports this module; it imports only pydantic and
``builder.recipe_rules``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from pydantic import ValidationError

from builder.recipe_rules import Bad

SCHEMA_DOC = "docs/recipes.md"
Loc = tuple[int | str, ...]

_TOML_TYPES = ((bool, "a boolean"), (str, "a string"), (int, "an integer"),
               (float, "a float"), (list, "an array"), (tuple, "an array"), (dict, "a table"))
_EXPECTED = {"string_type": "a string", "list_type": "an array", "tuple_type": "an array",
             "dict_type": "a table", "model_type": "a table", "model_attributes_type": "a table"}


def _toml_type(value: Any) -> str:
    return next((name for t, name in _TOML_TYPES if isinstance(value, t)),
                f"a {type(value).__name__}")


def _loc(loc: Loc) -> str:
    out = ""
    for part in loc:
        if part == "[key]":
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def describe(err: ValidationError, keys_at: Callable[[Loc], Iterable[str]]) -> tuple[str, str]:
    """(message, hint) for the first error of ``err`` (count of others appended).

    ``keys_at(loc)`` names the keys allowed in the table holding ``loc``, listed when a key
    is unknown.
    """
    errors = err.errors()
    e = errors[0]
    loc = tuple(e["loc"])
    where = _loc(loc)
    hint = f"see {SCHEMA_DOC} or `kiln recipe schema`"
    kind = e["type"]
    if kind == "extra_forbidden":
        parent = _loc(loc[:-1])
        msg = (f"{parent + ': ' if parent else ''}unknown key {loc[-1]!r} "
               f"(allowed: {', '.join(sorted(keys_at(loc)))})")
        hint = "check the key's spelling"
    elif kind == "missing":
        parent = _loc(loc[:-1])
        msg = f"{parent + ': ' if parent else ''}missing required key {loc[-1]!r}"
        hint = f"add {loc[-1]} = ..."
    elif kind == "value_error" and isinstance(e.get("ctx", {}).get("error"), Bad):
        bad = e["ctx"]["error"]
        msg = f"{where}: {bad}" if where else str(bad)
        hint = bad.hint or hint
    elif kind in _EXPECTED:
        msg = f"{where}: expected {_EXPECTED[kind]}, got {_toml_type(e['input'])}"
    else:
        msg = f"{where}: {e['msg']}"
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return msg, hint
