"""Compare two trees field by field: the volume read back against the flattened layers.

Pure functions. ``diff_trees`` gives human lines (``missing /x``, ``extra /y``,
``/bin/ping: mode 4755 != 0755``) over the fields in ``tree.COMPARED``; ``verify_trees``
turns any difference into one ``BuildError`` line. Expected values come first in every
line ("expected != actual").
"""

from __future__ import annotations

import os

from builder.tree import COMPARED, Entry, Tree, sort_key
from helper.base.errors import BuildError


def show_path(path: str) -> str:
    """``/path`` on one printable line: raw bytes as ``\\xff``, control characters escaped."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return "/" + text


def _show(name: str, value: object) -> str:
    if name == "mode" and isinstance(value, int):
        return f"{value:04o}"
    if name == "sha256" and isinstance(value, str):
        return value[:12] or "''"
    if name == "xattrs" and isinstance(value, tuple):
        return "{" + ", ".join(f"{k}={v!r}" for k, v in value) + "}"
    if isinstance(value, str):
        return repr(value)
    return str(value)


def entry_diff(expected: Entry, actual: Entry) -> list[str]:
    """``field expected != actual`` for every compared field that differs."""
    out = []
    for name in COMPARED:
        want, got = getattr(expected, name), getattr(actual, name)
        if want != got:
            out.append(f"{name} {_show(name, want)} != {_show(name, got)}")
    return out


def diff_trees(expected: Tree, actual: Tree, *, limit: int = 20) -> list[str]:
    """Up to ``limit`` lines describing how ``actual`` differs from ``expected``."""
    lines: list[str] = []
    for path in sorted(expected.keys() | actual.keys(), key=sort_key):
        if len(lines) >= limit:
            break
        shown = show_path(path)
        if path not in actual:
            lines.append(f"missing {shown}")
        elif path not in expected:
            lines.append(f"extra {shown}")
        else:
            lines.extend(f"{shown}: {d}" for d in entry_diff(expected[path], actual[path]))
    return lines[:limit]


def count_differences(expected: Tree, actual: Tree) -> int:
    n = len(expected.keys() ^ actual.keys())
    for path in expected.keys() & actual.keys():
        n += len(entry_diff(expected[path], actual[path]))
    return n


def verify_trees(expected: Tree, actual: Tree) -> None:
    """Raise ``BuildError`` when ``actual`` (the volume) differs from ``expected`` (layers)."""
    first = diff_trees(expected, actual, limit=1)
    if not first:
        return
    n = count_differences(expected, actual)
    noun = "difference" if n == 1 else "differences"
    raise BuildError(
        f"volume does not match the image: {n} {noun}, first: {first[0]}",
        "the volume was not written faithfully; rerun the build with --debug and report "
        "the image if it persists",
    )
