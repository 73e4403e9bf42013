"""Sizes and durations: exact parses, exact errors, round-trip properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from builder.units import format_size, parse_duration, parse_size
from helper.base.errors import UsageError


@pytest.mark.parametrize(
    ("text", "expected"),
    [("512", 512), ("4K", 4096), ("512M", 512 << 20), ("2G", 2 << 30), ("2GiB", 2 << 30),
     ("1.5G", 3 << 29), ("20g", 20 << 30)],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_parse_size_error_text() -> None:
    with pytest.raises(UsageError) as e:
        parse_size("12Q", "--size")
    assert e.value.message == "invalid --size '12Q'"
    assert e.value.hint == (
        "give a number of bytes with an optional K, M, G or T suffix, e.g. 512M or 2G")


@pytest.mark.parametrize(("text", "expected"), [("14d", 14 * 86400), ("90", 90), ("2h", 7200),
                                                ("1w", 604800), ("5m", 300)])
def test_parse_duration(text: str, expected: int) -> None:
    assert parse_duration(text) == expected


def test_parse_duration_error_text() -> None:
    with pytest.raises(UsageError) as e:
        parse_duration("two weeks", "--keep")
    assert e.value.message == "invalid --keep 'two weeks'"


@given(st.integers(min_value=0, max_value=1 << 40), st.sampled_from(["", "K", "M", "G"]))
def test_parse_size_scales(n: int, suffix: str) -> None:
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[suffix]
    assert parse_size(f"{n}{suffix}") == n * mult


@given(st.integers(min_value=0, max_value=1 << 45))
def test_format_size_never_fails(n: int) -> None:
    assert format_size(n).split()[1] in {"B", "KiB", "MiB", "GiB", "TiB"}
