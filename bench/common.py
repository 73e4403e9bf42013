"""Shared helpers for kiln's benchmark scripts (``bench/*.py``).

Benchmarks here are scripts, not tests: they print a table (and optionally JSON) of
medians, ratios against the raw tools, and whether each target was met. This module keeps
the pieces every script needs in one place:

* ``Series``: named samples in seconds, with ``median``/``spread``; ``timed`` and
  ``run_timed`` take one sample of a callable or of a whole process;
* ``ratio`` and ``Target`` (a bound on a measured figure, met or missed);
* ``table``: a plain fixed-width text table;
* ``machine`` and ``loadavg``: what the figures were measured on, and how busy it was
  (another job on a 2-core machine moves the figures a lot; the report should say so).

Nothing here imports kiln, so a benchmark can start timing before kiln is imported.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Series:
    """The samples (seconds) of one measured thing."""

    name: str
    samples: list[float] = field(default_factory=list)

    def add(self, seconds: float) -> float:
        self.samples.append(seconds)
        return seconds

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def spread(self) -> tuple[float, float]:
        """(min, max) of the samples."""
        if not self.samples:
            return float("nan"), float("nan")
        return min(self.samples), max(self.samples)

    def as_json(self) -> dict[str, Any]:
        lo, hi = self.spread
        return {"median": self.median, "min": lo, "max": hi, "samples": list(self.samples)}


class Suite:
    """An ordered set of ``Series`` created on first use: ``suite["raw/skopeo"].add(t)``."""

    def __init__(self) -> None:
        self._series: dict[str, Series] = {}

    def __getitem__(self, name: str) -> Series:
        s = self._series.get(name)
        if s is None:
            s = self._series[name] = Series(name)
        return s

    def __contains__(self, name: object) -> bool:
        return name in self._series

    def names(self) -> list[str]:
        return list(self._series)

    def medians(self) -> dict[str, float]:
        return {n: s.median for n, s in self._series.items()}

    def as_json(self) -> dict[str, Any]:
        return {n: s.as_json() for n, s in self._series.items()}


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """(seconds, result) of one call of ``fn``."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run_timed(argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              cwd: Path | None = None) -> tuple[float, bytes]:
    """(seconds, stdout) of one whole process; a failure raises with its stderr shown."""
    t0 = time.perf_counter()
    res = subprocess.run(list(argv), capture_output=True, env=None if env is None else dict(env),
                         cwd=cwd, check=False)
    dt = time.perf_counter() - t0
    if res.returncode != 0:
        tail = res.stderr.decode("utf-8", "replace")[-2000:]
        raise RuntimeError(f"{' '.join(argv)} exited {res.returncode}:\n{tail}")
    return dt, res.stdout


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


@dataclass(frozen=True)
class Target:
    """A bound on a measured figure: ``value <= limit`` (or ``<`` when ``strict``)."""

    name: str
    value: float
    limit: float
    unit: str = ""
    strict: bool = False

    @property
    def met(self) -> bool:
        return self.value < self.limit if self.strict else self.value <= self.limit

    def line(self) -> str:
        op = "<" if self.strict else "≤"
        fmt = "{:.2f}".format
        return (f"{self.name}: {fmt(self.value)}{self.unit} (target {op} {fmt(self.limit)}"
                f"{self.unit}) {'MET' if self.met else 'MISSED'}")

    def as_json(self) -> dict[str, Any]:
        return {"value": self.value, "limit": self.limit, "strict": self.strict,
                "unit": self.unit, "met": self.met}


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A fixed-width text table; the first column left-aligned, the others right-aligned.
    Floats print with 3 decimals."""
    cells = [[_cell(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]

    def fmt(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()

    out = [fmt(list(headers)), fmt(["-" * w for w in widths])]
    out += [fmt(r) for r in cells]
    return "\n".join(out)


def _cell(c: object) -> str:
    if isinstance(c, float):
        return "-" if math.isnan(c) else f"{c:.3f}"  # NaN: nothing measured
    return str(c)


def loadavg() -> tuple[float, float, float]:
    """The 1/5/15-minute load averages (``uptime``'s figures)."""
    with open("/proc/loadavg", encoding="ascii") as f:
        a, b, c = f.read().split()[:3]
    return float(a), float(b), float(c)


def machine() -> dict[str, Any]:
    """CPU count and model, memory, OS and kernel: what the figures were measured on."""
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = 0
    with contextlib.suppress(ValueError, OSError):
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    osname = ""
    with contextlib.suppress(OSError):
        osname = platform.freedesktop_os_release().get("PRETTY_NAME", "")
    return {"cpus": os.cpu_count(), "cpu_model": model, "memory_bytes": mem, "os": osname,
            "kernel": platform.release(), "python": platform.python_version()}
