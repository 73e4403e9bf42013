"""``kiln gc``: what to remove (a pure decision) and removing it (a thin shell).

The decision core ``plan_gc`` sees only facts — each volume's last use, whether something
still references it, the blobs each volume needs, the blobs in the cache — and returns
what to delete (warm images of a removed volume go with it: ``builder.warm``). Its two
safety properties are property-tested: a referenced volume is
never removed, and a blob a kept volume needs is never removed.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder import warm
from builder.pool import snapshot_refs
from builder.root import Root
from builder.store import Store, Volume
from helper.base.errors import Conflict


@dataclass(frozen=True)
class VolumeFacts:
    id: str
    last_used: float
    referenced: bool
    blobs: frozenset[str]


@dataclass(frozen=True)
class GcPlan:
    volumes: tuple[str, ...]
    blobs: tuple[str, ...]


def plan_gc(volumes: Iterable[VolumeFacts], cached_blobs: Iterable[str], *,
            keep_seconds: float, now: float) -> GcPlan:
    """Volumes unused for longer than ``keep_seconds`` and not referenced go; then every
    cached blob that no remaining volume needs goes."""
    vols = list(volumes)
    doomed = {v.id for v in vols if not v.referenced and now - v.last_used > keep_seconds}
    needed: set[str] = set()
    for v in vols:
        if v.id not in doomed:
            needed |= v.blobs
    blobs = sorted(b for b in set(cached_blobs) if b not in needed)
    return GcPlan(volumes=tuple(sorted(doomed)), blobs=tuple(blobs))


@dataclass
class GcReport:
    dry_run: bool
    removed_volumes: list[str] = field(default_factory=list)
    removed_blobs: list[str] = field(default_factory=list)
    removed_leftovers: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    skipped: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "removed_volumes": self.removed_volumes,
            "removed_blobs": self.removed_blobs,
            "removed_leftovers": self.removed_leftovers,
            "freed_bytes": self.freed_bytes,
            "skipped": self.skipped,
        }


def cached_blobs(root: Root) -> dict[str, int]:
    """Digest -> size of every blob file in the shared cache."""
    out: dict[str, int] = {}
    d = root.blobs / "sha256"
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(d):
            if len(entry.name) == 64 and entry.is_file(follow_symlinks=False):
                out["sha256:" + entry.name] = entry.stat(follow_symlinks=False).st_size
    return out


def collect(store: Store, referenced: Callable[[Volume], bool]) -> list[VolumeFacts]:
    return [
        VolumeFacts(
            id=v.id,
            last_used=store.last_used(v),
            referenced=referenced(v),
            blobs=frozenset(v.meta.get("blobs", [])),
        )
        for v in store.list()
    ]


def run_gc(root: Root, *, keep_seconds: float, dry_run: bool,
           referenced: Callable[[Volume], bool] | None = None,
           now: float | None = None,
           recover: Callable[[], list[Path]] | None = None) -> GcReport:
    """Remove crash leftovers, stale volumes and unneeded blobs (or report them).

    ``recover`` removes the crash leftovers (default ``Root.recover``: the build stage's;
    ``kiln gc`` passes ``runner.tempfiles.recover``, which adds the run stage's)."""
    root.ensure()
    store = Store(root)
    report = GcReport(dry_run=dry_run)
    if referenced is None:
        # A volume with live snapshots is in use (VMs boot from snapshots, #4).
        refs = snapshot_refs(root.path)

        def referenced(v: Volume) -> bool:
            return v.id in refs

    if not dry_run:
        report.removed_leftovers = [p.name for p in (recover or root.recover)()]
        for key in store.dangling_keys():
            with contextlib.suppress(FileNotFoundError):
                key.unlink()
            report.removed_leftovers.append(f"keys/{key.name}")
    try:
        # Exclusive: no build may be reading or adding blobs while we decide and delete.
        with root.lock("blobs", blocking=False, what="the blob cache"):
            facts = collect(store, referenced)
            blobs = cached_blobs(root)
            plan = plan_gc(facts, blobs, keep_seconds=keep_seconds,
                           now=time.time() if now is None else now)
            by_id: Mapping[str, Volume] = {v.id: v for v in store.list()}
            for vid in plan.volumes:
                vol = by_id.get(vid)
                if vol is None:
                    continue
                report.removed_volumes.append(vid)
                report.freed_bytes += _du(vol.path)
                if not dry_run:
                    store.remove(vol)
            for digest in plan.blobs:
                report.removed_blobs.append(digest)
                report.freed_bytes += blobs[digest]
                if not dry_run:
                    with contextlib.suppress(FileNotFoundError):
                        (root.blobs / "sha256" / digest[7:]).unlink()
    except Conflict:
        report.skipped.append("blob cache in use by a running build: volumes and blobs kept")
    if not dry_run:  # warm images of removed (or vanished) volumes go too
        gone = {v.id for v in store.list()}
        orphans = {w.volume for w in warm.list_images(root)} - gone
        report.removed_leftovers += [f"warm/{i}" for i in warm.remove_for_volumes(root, orphans)]
    return report


def _du(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512
    except FileNotFoundError:
        return 0
