"""Parsing and printing sizes and durations (``20G``, ``512M``, ``14d``): pure functions."""

from __future__ import annotations

import re

from helper.base.errors import UsageError

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(i?B?)?\s*$", re.IGNORECASE)
_MULT = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_DUR_RE = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$")
_DUR_MULT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(text: str, what: str = "size") -> int:
    """``"20G"`` → bytes (binary multiples, as qemu-img and mke2fs read them)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise UsageError(
            f"invalid {what} {text!r}",
            "give a number of bytes with an optional K, M, G or T suffix, e.g. 512M or 2G",
        )
    value = float(m.group(1)) * _MULT[m.group(2).upper()]
    return int(value)


def parse_duration(text: str, what: str = "duration") -> int:
    """``"14d"`` → seconds."""
    m = _DUR_RE.match(text)
    if not m:
        raise UsageError(
            f"invalid {what} {text!r}",
            "give a whole number with an optional s, m, h, d or w suffix, e.g. 14d",
        )
    return int(m.group(1)) * _DUR_MULT[m.group(2)]


def format_size(n: int) -> str:
    """Bytes → a short human form (``1.5 GiB``)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
