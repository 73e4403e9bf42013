"""The volume pool: ``open_pool``, ``init_pool``, ``snapshot_refs`` and the backend choice.

Backends (one pool per kiln root; see ``base.py`` for the layout and crash rules):
``dm-thin`` (thin-pool over loop files or the operator's devices), ``reflink`` (FICLONE
clones on the root's filesystem or a loop-mounted btrfs/XFS image) and ``copy`` (full
sparse copies; explicit only). ``choose_backend`` is the pure decision; it never falls
back silently: the reason is recorded and shown by ``kiln pool status``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from builder import helperclient as client
from builder.pool.base import (
    Pool,
    PoolConfig,
    load_records,
    now_iso,
    pool_dir,
    read_config,
    remove_tree,
)
from helper.base.errors import Conflict, KilnError, NotFound, UsageError
from helper.base.fileops import probe_reflink, write_json

DEFAULT_SIZE = 20 << 30
BACKENDS = ("auto", "dm-thin", "reflink", "copy")
FILESYSTEMS = ("btrfs", "xfs")

__all__ = ["DEFAULT_SIZE", "Choice", "Pool", "choose_backend", "init_pool", "open_pool",
           "snapshot_refs"]


@dataclass(frozen=True)
class Choice:
    backend: str  # dm-thin | reflink | copy
    fs: str  # btrfs | xfs | host
    reason: str


def choose_backend(requested: str, fs: str | None, *, thin_pool: bool, thin_detail: str,
                   host_reflink: bool, reflink_detail: str) -> Choice:
    """Which backend and where, from the request and what the host offers (pure)."""
    if requested not in BACKENDS:
        raise UsageError(f"unknown pool backend {requested!r}",
                         "use one of: " + ", ".join(BACKENDS))
    if fs is not None and fs not in FILESYSTEMS:
        raise UsageError(f"unknown pool filesystem {fs!r}", "use --fs btrfs or --fs xfs")
    if fs is not None and requested in ("dm-thin", "copy"):
        raise UsageError(f"--fs applies to the reflink backend, not {requested}",
                         "drop --fs, or use --backend reflink")
    if requested == "copy":
        return Choice("copy", "host", "copy backend chosen explicitly (full copies, not thin)")
    if requested == "dm-thin":
        if not thin_pool:
            raise UsageError(f"dm-thin is not available here: {thin_detail}",
                             "load dm-thin-pool (modprobe dm-thin-pool) or use "
                             "--backend reflink")
        return Choice("dm-thin", "host", "dm-thin chosen explicitly")
    if requested == "auto" and thin_pool and fs is None:
        return Choice("dm-thin", "host", f"auto: {thin_detail}")
    why = "auto: " if requested == "auto" else ""
    if requested == "auto" and not thin_pool:
        why += f"no dm-thin ({thin_detail}); "
    if fs is not None:
        return Choice("reflink", fs, f"{why}reflink on a loop-mounted {fs} image (--fs {fs})")
    if host_reflink:
        return Choice("reflink", "host", f"{why}reflink on the root's filesystem "
                      f"({reflink_detail})")
    return Choice("reflink", "btrfs", f"{why}the root's filesystem has no reflinks "
                  f"({reflink_detail}): loop-mounted btrfs image")


@dataclass(frozen=True)
class ThinFacts:
    available: bool
    detail: str
    devices: dict[str, str] | None  # the helper's [pool] data/metadata devices, if named


def _thin_facts(root_dir: Path, backend: str) -> ThinFacts:
    """dm-thin's availability, asked of the helper (``dm-info``; in-process as root):
    a sudo caller cannot list dm targets itself."""
    if backend not in ("auto", "dm-thin"):
        return ThinFacts(False, "not asked for", None)
    try:
        info = client.call("dm-info", {}, area=client.area(root_dir))
    except KilnError as e:
        return ThinFacts(False, f"kiln-helper dm-info failed: {e.message}", None)
    thin = "thin-pool" in info["targets"]
    return ThinFacts(thin, "dmsetup targets lists thin-pool" if thin
                     else "dmsetup targets does not list thin-pool", info.get("devices"))


def _probe_reflink(directory: Path) -> tuple[bool, str]:
    why = probe_reflink(directory)
    return (True, "FICLONE works") if why is None else (False, f"FICLONE refused: {why}")


def _backend_class(config: PoolConfig) -> type[Pool]:
    if config.backend == "reflink":
        from builder.pool.reflink import ReflinkPool

        return ReflinkPool
    if config.backend == "copy":
        from builder.pool.copy import CopyPool

        return CopyPool
    from builder.pool.dmthin import DmThinPool

    return DmThinPool


def open_pool(root_dir: Path) -> Pool | None:
    """The root's pool, brought up (mounted, devices active) and reclaimed; None if there
    is none."""
    config = read_config(root_dir)
    if config is None:
        return None
    pool = _backend_class(config)(root_dir, config)
    pool.reclaim()
    return pool


def init_pool(root_dir: Path, backend: str = "auto", size: int | None = None,
              fs: str | None = None) -> Pool:
    """Create the root's pool, or return the existing one when it matches the request."""
    existing = read_config(root_dir)
    if existing is not None:
        if backend not in ("auto", existing.backend) or (fs and fs != existing.fs):
            raise Conflict(f"this root already has a {existing.backend} pool",
                           "remove it with `kiln pool destroy` first")
        pool = open_pool(root_dir)
        assert pool is not None
        return pool
    if size is not None and size < (256 << 20):
        raise UsageError(f"pool size {size} is too small", "give at least 256M (e.g. 20G)")
    thin = _thin_facts(root_dir, backend)
    reflink, reflink_detail = _probe_reflink(root_dir)
    choice = choose_backend(backend, fs, thin_pool=thin.available, thin_detail=thin.detail,
                            host_reflink=reflink, reflink_detail=reflink_detail)
    if choice.backend == "dm-thin" and thin.devices and size is not None:
        raise UsageError("--size does not apply to a pool on the operator's devices",
                         "the pool takes the whole [pool] data_device; drop --size")
    _clear_leftovers(root_dir)
    config = PoolConfig(backend=choice.backend,
                        reason=choice.reason, fs=choice.fs,
                        size=(size or DEFAULT_SIZE) if choice.fs != "host"
                        or choice.backend == "dm-thin" else 0,
                        created=now_iso())
    try:
        pool = _create(root_dir, config, thin.devices)
        # The backend may refine it (dm-thin on the operator's devices: their size).
        write_json(pool_dir(root_dir) / "config.json", pool.config.as_json())  # commits
    except BaseException:
        with contextlib.suppress(KilnError, OSError):
            _clear_leftovers(root_dir)
        raise
    return pool


def _create(root_dir: Path, config: PoolConfig, devices: dict[str, str] | None) -> Pool:
    if config.backend == "reflink":
        from builder.pool import reflink

        return reflink.create(root_dir, config)
    if config.backend == "copy":
        from builder.pool import copy

        return copy.create(root_dir, config)
    from builder.pool import dmthin

    return dmthin.create(root_dir, config, devices)


def _clear_leftovers(root_dir: Path) -> None:
    """What a pool init killed before writing config.json left: mounts, devices, files."""
    from helper.storage import privileged  # dm-thin's module too: not on a run's path

    d = pool_dir(root_dir)
    area = client.area(root_dir)  # the root itself, or a sudo caller's helper area
    image, fs_dir = area / "pool" / "pool.img", area / "pool" / "fs"
    if os.path.lexists(image) or privileged.is_mounted(fs_dir):
        with contextlib.suppress(NotFound):
            client.pool_destroy(area)
    from builder.pool import dmthin

    dmthin.clear_leftovers(root_dir)
    remove_tree(d)


def destroy_pool(root_dir: Path, force: bool = False) -> bool:
    """Destroy the root's pool; also clears a half-made one. False if there was none."""
    pool = open_pool(root_dir)
    if pool is not None:
        pool.destroy(force=force)
        return True
    if pool_dir(root_dir).exists() or pool_dir(root_dir).is_symlink():
        _clear_leftovers(root_dir)
        return True
    return False


def snapshot_refs(root_dir: Path) -> set[str]:
    """Volume ids that live snapshots were made from (for ``kiln gc``). Reads the records
    only: no mount, no lock, so gc works while the pool is down."""
    if read_config(root_dir) is None:
        return set()
    return {s.volume for s in load_records(pool_dir(root_dir) / "snapshots")
            if s.state != "removing"}
