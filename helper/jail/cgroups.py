"""The cgroups a jailed Firecracker gets (op ``jail-launch``): which cgroup files the jailer
may write, and exactly which host cgroup directories it will write or join.

The jailer (1.12) writes every ``--cgroup FILE=VALUE`` into
``<hierarchy of FILE>/<parent>/<id>`` (``create_dir_all``, then the parent's value, then
ours), and on v2 with no file only moves into ``<v2>/<parent>`` when that exists. So the
request decides which host cgroups root writes: ``jailer_dirs`` computes them (pure apart
from the mount layout) and the op checks each is the caller's.

Files come from an allowlist of limit keys with numeric ranges (``check_files``), plus
v1 ``freezer.state=THAWED`` (the jailer then joins the freezer hierarchy, which
``cgroup-kill`` freezes to kill without a race; never ``FROZEN``); never ``cgroup.*``
(moving, killing, delegating). Every directory written is the caller's (``jailer_dirs``).
No ``cpuset.*`` either: a fresh v1 cpuset cgroup needs its parent's cpus and mems, which
kiln does not manage (the jailer's inheritance writes ancestors).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from helper import cgroup as cg
from helper.base.errors import UsageError

MEMORY = (1 << 24, 1 << 44)  # as cgroup-create: 16 MiB .. 16 TiB
PIDS = (1, 4_194_304)
PERIOD = (1000, 1_000_000)  # CFS period, µs
QUOTA = (1000, 1024 * 1_000_000)  # at most 1024 CPUs of the longest period


def _int_in(lo: int, hi: int) -> Callable[[str], bool]:
    return lambda v: v.isdigit() and len(v) <= 20 and lo <= int(v) <= hi


def _cpu_max(v: str) -> bool:
    quota, _, period = v.partition(" ")
    return _int_in(*QUOTA)(quota) and _int_in(*PERIOD)(period)


# key -> (cgroup versions it exists in, value check)
ALLOWED: dict[str, tuple[tuple[int, ...], Callable[[str], bool]]] = {
    "cpu.max": ((2,), _cpu_max),
    "cpu.cfs_quota_us": ((1,), _int_in(*QUOTA)),
    "cpu.cfs_period_us": ((1,), _int_in(*PERIOD)),
    "memory.max": ((2,), _int_in(*MEMORY)),
    "memory.limit_in_bytes": ((1,), _int_in(*MEMORY)),
    "pids.max": ((1, 2), _int_in(*PIDS)),
    "freezer.state": ((1,), lambda v: v == "THAWED"),
}
MEMORY_KEYS = {1: "memory.limit_in_bytes", 2: "memory.max"}


def check_files(version: int, files: Sequence[tuple[str, str]]) -> None:
    """Every FILE=VALUE an allowed limit of this cgroup version, each key at most once."""
    keys = [k for k, _ in files]
    if len(set(keys)) != len(keys):
        raise UsageError("refusing cgroup settings: a file is named twice", "send each once")
    for key, value in files:
        versions, ok = ALLOWED.get(key, ((), lambda _v: False))
        if version not in versions or not ok(value):
            allowed = ", ".join(k for k, (v, _) in ALLOWED.items() if version in v)
            raise UsageError(f"refusing cgroup setting {key!r}={value!r}",
                             f"cgroup v{version} allows {allowed}, with in-range numbers")


def check_bounded(version: int, files: Sequence[tuple[str, str]], vm: str) -> None:
    """A sudo caller's jailer cgroup has a memory and a pids limit, as cgroup-create's."""
    keys = {k for k, _ in files}
    missing = [k for k in (MEMORY_KEYS[version], "pids.max") if k not in keys]
    if missing:
        raise UsageError(f"refusing jail {vm}: no {' or '.join(missing)} limit",
                         "send the memory and pids limits, or launch into your VM cgroup "
                         "(v2, parent_cgroup PARENT/VM)")


def jailer_dirs(cfg: cg.CgroupConfig, version: int, parent: str | None, vm: str,
                files: Sequence[tuple[str, str]], exec_name: str) -> list[Path]:
    """The host cgroup directories the jailer writes (files) or joins (v2, no file)."""
    rel = [*(parent or exec_name).split("/")]
    lay = cg.layout(cfg)
    if not files:
        if version == 2 and lay.v2 is not None:
            return [lay.v2.joinpath(*rel)]
        return []
    if version == 2:
        if lay.v2 is None:
            raise UsageError("no cgroup2 hierarchy is mounted", "use cgroup v1")
        return [lay.v2.joinpath(*rel, vm)]
    out: list[Path] = []
    for c in cg.controllers(files):
        if c not in lay.v1:
            raise UsageError(f"cgroup v1 controller {c} is not mounted", "drop its files")
        out.append(lay.v1[c].joinpath(*rel, vm))
    return list(dict.fromkeys(out))  # co-mounted controllers: one directory
