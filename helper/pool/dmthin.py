"""dm-thin backend: a thin-pool over loop-backed data and metadata files under the root.

* ``ROOT/pool/thin/data.img`` and ``meta.img`` (sparse) are loop-attached and combined into
  the thin-pool device ``kiln-<rootkey>-pool``. A fresh (all-zero) metadata device is
  formatted by the kernel on first load.
* A base volume is a thin device created once (``create_thin``), activated, written from
  the built ext4 (data extents only: fresh thin blocks read as zeros), and deactivated;
  ``thin/volumes/<hex>.json`` records its thin id.
* A snapshot is ``create_snap NEW ORIGIN`` plus its own active device
  ``kiln-<rootkey>-snap-<id>`` (possibly larger than the origin; then resize2fs grows it).
* Thin ids come from a persisted counter (``thin/ids.json``), advanced and fsync-ed before
  the id is used, and skipping ids kiln's records hold: ids never collide across restarts
  or crashes.
* Reclaim: kiln devices of this root that no ready record accounts for are removed leaf
  first (``dmthin_core.reclaim_plan``), then unused loop devices under the root detached.

Not testable on a kernel without device-mapper; the pure parts are in ``dmthin_core``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from helper import privileged
from helper.errors import KilnError
from helper.pool import dmthin_core as core
from helper.pool import fileops
from helper.pool.base import Pool, PoolConfig, Snapshot, check_volume_id
from helper.pool.fileops import PoolFull


class DmThinPool(Pool):
    backend = "dm-thin"
    thin = True

    def __init__(self, root_dir: Path, config: PoolConfig) -> None:
        super().__init__(root_dir, config)
        self.thin_dir = self.dir / "thin"
        self.vol_records = self.thin_dir / "volumes"
        self.rootkey = core.root_key(str(root_dir))
        self.pool_name = core.pool_name(self.rootkey)

    # -- state files --------------------------------------------------------------------

    def _vol_record(self, volume_id: str) -> dict[str, int | str] | None:
        try:
            data = fileops.read_json(self.vol_records / f"{volume_id[7:]}.json")
        except FileNotFoundError:
            return None
        return dict(data)

    def _vol_records(self) -> dict[str, dict[str, int | str]]:
        out: dict[str, dict[str, int | str]] = {}
        with contextlib.suppress(FileNotFoundError):
            for name in sorted(os.listdir(self.vol_records)):
                if name.endswith(".json") and not name.startswith("."):
                    vid = "sha256:" + name.removesuffix(".json")
                    with contextlib.suppress(KilnError):
                        rec = self._vol_record(check_volume_id(vid))
                        if rec is not None:
                            out[vid] = rec
        return out

    def _allocate(self) -> int:
        ids_file = self.thin_dir / "ids.json"
        try:
            counter = int(fileops.read_json(ids_file)["next"])
        except FileNotFoundError:
            counter = 1
        used = {int(r["thin_id"]) for r in self._vol_records().values()}
        used |= {s.thin_id for s in self._records()}
        thin_id, nxt = core.allocate_id(counter, used)
        fileops.write_json(ids_file, {"next": nxt})  # persisted before the id is used
        return thin_id

    # -- pool device ------------------------------------------------------------------------

    def _pool_dev(self) -> str:
        return f"/dev/mapper/{self.pool_name}"

    def _activate(self) -> None:
        self.records.mkdir(parents=True, exist_ok=True)
        self.vol_records.mkdir(parents=True, exist_ok=True)
        if not os.path.exists(self._pool_dev()):
            meta = privileged.loop_attach(self.root_dir, self.thin_dir / "meta.img")
            data = privileged.loop_attach(self.root_dir, self.thin_dir / "data.img")
            sectors, _ = core.pool_sizes(self.config.size, self.config.block_sectors)
            table = core.thin_pool_table(meta, data, sectors, self.config.block_sectors)
            privileged.dm_create(self.root_dir, self.pool_name, table)
        for snap in self._records():  # after a reboot, ready snapshots come back
            name = core.snapshot_name(self.rootkey, snap.id)
            if snap.state == "ready" and not os.path.exists(f"/dev/mapper/{name}"):
                privileged.dm_create(self.root_dir, name, core.thin_table(
                    self._pool_dev(), snap.thin_id, core.sectors_of(snap.size)))

    # -- volumes ----------------------------------------------------------------------------

    def _has_volume(self, volume_id: str) -> bool:
        rec = self._vol_record(volume_id)
        return rec is not None and rec.get("state") == "ready"

    def _volume_ids(self) -> list[str]:
        return [v for v, r in self._vol_records().items() if r.get("state") == "ready"]

    def _volume_path(self, volume_id: str) -> Path:
        # Base devices are inactive between uses; this is where one appears when active.
        return Path("/dev/mapper") / core.volume_name(self.rootkey, volume_id[7:])

    def _volume_size(self, volume_id: str) -> int:
        rec = self._vol_record(volume_id)
        assert rec is not None
        return int(rec["size"])

    def _import(self, volume_id: str, src: Path) -> Path:
        size = os.stat(src).st_size
        thin_id = self._allocate()
        rec_path = self.vol_records / f"{volume_id[7:]}.json"
        fileops.write_json(rec_path, {"thin_id": thin_id, "size": size, "state": "creating"})
        name = core.volume_name(self.rootkey, volume_id[7:])
        self._message(core.msg_create_thin(thin_id), f"importing {volume_id[:19]}")
        privileged.dm_create(self.root_dir, name,
                             core.thin_table(self._pool_dev(), thin_id, core.sectors_of(size)))
        try:
            privileged.dm_write_volume(self.root_dir, name, src)
        finally:
            privileged.dm_remove(self.root_dir, name)
        fileops.write_json(rec_path, {"thin_id": thin_id, "size": size, "state": "ready"})
        return self._volume_path(volume_id)

    def _remove_volume(self, volume_id: str) -> None:
        rec = self._vol_record(volume_id)
        if rec is None:
            return
        rec_path = self.vol_records / f"{volume_id[7:]}.json"
        fileops.write_json(rec_path, {**rec, "state": "removing"})
        self._delete_thin(int(rec["thin_id"]))
        rec_path.unlink()

    # -- snapshots --------------------------------------------------------------------------

    def _snapshot_path(self, snap_id: str) -> Path:
        return Path("/dev/mapper") / core.snapshot_name(self.rootkey, snap_id)

    def _prepare(self, snap: Snapshot) -> Snapshot:
        from dataclasses import replace

        return replace(snap, thin_id=self._allocate())

    def _make_snapshot(self, snap: Snapshot) -> None:
        rec = self._vol_record(snap.volume)
        assert rec is not None
        # The origin is inactive (bases are deactivated after import), so no suspend is
        # needed for a consistent snapshot.
        self._message(core.msg_create_snap(snap.thin_id, int(rec["thin_id"])),
                      f"snapshotting {snap.volume[:19]}")
        privileged.dm_create(self.root_dir, core.snapshot_name(self.rootkey, snap.id),
                             core.thin_table(self._pool_dev(), snap.thin_id,
                                             core.sectors_of(snap.size)))

    def _grow(self, snap: Snapshot) -> None:
        fileops.grow_ext4(snap.path)

    def _remove_snapshot_data(self, snap: Snapshot) -> None:
        name = core.snapshot_name(self.rootkey, snap.id)
        if os.path.exists(f"/dev/mapper/{name}"):
            privileged.dm_remove(self.root_dir, name)
        if snap.thin_id >= 0:
            self._delete_thin(snap.thin_id)

    def _delete_thin(self, thin_id: int) -> None:
        # The id may not exist yet (a crash before create_snap): that is fine.
        with contextlib.suppress(KilnError):
            privileged.dm_message(self.root_dir, self.pool_name, core.msg_delete(thin_id))

    def _message(self, msg: str, what: str) -> None:
        try:
            privileged.dm_message(self.root_dir, self.pool_name, msg)
        except KilnError as e:
            if "No space" in str(getattr(e, "stderr_tail", "")):
                raise PoolFull(what) from None
            raise

    # -- reclaim, usage, teardown -------------------------------------------------------------

    def _sweep(self, recorded: set[str]) -> None:
        del recorded  # snapshot devices are matched against ready records below
        for vid, rec in self._vol_records().items():
            if rec.get("state") != "ready":  # an import or removal that died midway
                self._delete_thin(int(rec["thin_id"]))
                with contextlib.suppress(FileNotFoundError):
                    (self.vol_records / f"{vid[7:]}.json").unlink()
        keep = [self.pool_name] + [core.snapshot_name(self.rootkey, s.id)
                                   for s in self._records() if s.state == "ready"]
        privileged.reclaim(self.root_dir, keep)

    def _usage(self) -> tuple[int, int]:
        usage = core.parse_pool_status(privileged.dm_status(self.root_dir, self.pool_name))
        block = self.config.block_sectors * core.SECTOR
        return usage.total_data_blocks * block, usage.used_data_blocks * block

    def _teardown(self) -> None:
        privileged.reclaim(self.root_dir, [])


def create(root_dir: Path, config: PoolConfig) -> DmThinPool:
    """Make the sparse data and metadata files and load the thin-pool."""
    pool = DmThinPool(root_dir, config)
    pool.thin_dir.mkdir(parents=True, exist_ok=True)
    sectors, meta_bytes = core.pool_sizes(config.size, config.block_sectors)
    for name, size in (("data.img", sectors * core.SECTOR), ("meta.img", meta_bytes)):
        path = pool.thin_dir / name
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                os.ftruncate(fd, size)  # sparse; an all-zero metadata device is formatted
            finally:
                os.close(fd)
    fileops.fsync_dir(pool.thin_dir)
    pool._activate()
    return pool
