"""dm-thin backend: a thin-pool over loop-backed files, or over the operator's devices.

Every privileged step goes through ``builder.helperclient`` (``ops_dm``/``ops_storage``): the
same op functions in-process as root, ``sudo kiln-helper OP`` otherwise, so root and sudo
callers share one code path. ``area`` is where the privileged files live (the kiln root
itself for root, ``/var/lib/kiln/users/<uid>`` for a sudo caller); device names carry the
area's key: ``kiln-<key>-pool``, ``-vol-<hex>``, ``-snap-<id>`` (``dmthin_core``).

* Pool: one ``dm-create``. Over ``AREA/pool/thin/{data,meta}.img`` (sparse, root-owned,
  made and loop-attached by the helper itself); or, when the helper's ``[pool]`` names
  ``data_device`` and ``metadata_device``, over those (checked, claimed, formatted for a
  new pool; reclaim never detaches them). ``thin/pool.json`` records which.
* A base volume is one ``dm-import``: a fresh thin device written from the built ext4
  (the caller passes the file open; the helper hashes what it copies), then deactivated;
  ``thin/volumes/<hex>.json`` records its thin id.
* A snapshot is ``create_snap NEW ORIGIN`` plus its own active device
  ``kiln-<key>-snap-<id>`` (possibly larger than the origin; then resize2fs grows it, as
  the caller: the helper gives the snapshot's device node to the caller, ``grant``).
* Thin ids come from a persisted counter (``thin/ids.json``), advanced and fsync-ed before
  the id is used, and skipping ids kiln's records hold: ids never collide across restarts
  or crashes.
* Reclaim: kiln devices of this area that no ready record accounts for are removed leaf
  first by the ``reclaim`` op, then unused loop devices under the area detached; kiln asks
  only when ``/sys/block/dm-*`` or the loop list shows something to do.

Records (``ROOT/pool/...``) stay in the caller's own root. Not testable on a kernel
without device-mapper: ``tests/e2e/test_dmthin_vm.py`` runs it in a QEMU guest.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from builder import helperclient as client
from builder.pool.base import Pool, PoolConfig, Snapshot, check_volume_id
from helper.base import fileops
from helper.base.errors import KilnError
from helper.base.fileops import PoolFull
from helper.storage import dmthin_core as core
from helper.storage import privileged


class DmThinPool(Pool):
    backend = "dm-thin"
    thin = True

    def __init__(self, root_dir: Path, config: PoolConfig) -> None:
        super().__init__(root_dir, config)
        self.thin_dir = self.dir / "thin"
        self.vol_records = self.thin_dir / "volumes"
        self._area: Path | None = None

    # -- the area and its names -------------------------------------------------------------

    @property
    def area(self) -> Path:
        if self._area is None:
            self._area = client.area(self.root_dir)
        return self._area

    @property
    def rootkey(self) -> str:
        return core.root_key(str(self.area))

    @property
    def pool_name(self) -> str:
        return core.pool_name(self.rootkey)

    def _call(self, op: str, request: dict[str, Any], pass_fd: int | None = None
              ) -> dict[str, Any]:
        return client.call(op, request, area=self.area, pass_fd=pass_fd)

    # -- state files --------------------------------------------------------------------

    def _pool_record(self) -> dict[str, Any]:
        """``thin/pool.json``: where the pool lives (pools made before it: loop files)."""
        try:
            return dict(fileops.read_json(self.thin_dir / "pool.json"))
        except FileNotFoundError:
            return {"source": "files"}

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
            self._load_pool(fresh=False)
        for snap in self._records():  # after a reboot, ready snapshots come back
            name = core.snapshot_name(self.rootkey, snap.id)
            if snap.state == "ready" and not os.path.exists(f"/dev/mapper/{name}"):
                self._activate_snapshot(snap)

    def _load_pool(self, *, fresh: bool) -> dict[str, Any]:
        """One ``dm-create``: the helper attaches its own files (or checks the operator's
        devices) and writes the table; ``fresh`` makes the files / formats the devices."""
        req: dict[str, Any] = {"name": self.pool_name, "kind": "thin-pool", "fresh": fresh,
                               "block_sectors": self.config.block_sectors}
        if self._pool_record().get("source") == "devices":
            req["source"] = "devices"
        elif fresh:
            sectors, meta_bytes = core.pool_sizes(self.config.size, self.config.block_sectors)
            req.update(data_bytes=sectors * core.SECTOR, metadata_bytes=meta_bytes)
        return self._call("dm-create", req)

    def _activate_snapshot(self, snap: Snapshot) -> None:
        # grant: the caller's VMM opens the snapshot; as root this changes nothing.
        self._call("dm-create", {"name": core.snapshot_name(self.rootkey, snap.id),
                                 "kind": "thin", "pool": self.pool_name,
                                 "thin_id": snap.thin_id, "sectors": core.sectors_of(snap.size),
                                 "grant": True})

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
        fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            self._call("dm-import", {"pool": self.pool_name, "volume": volume_id,
                                     "name": core.volume_name(self.rootkey, volume_id[7:]),
                                     "thin_id": thin_id, "fd": fd}, pass_fd=fd)
        except KilnError as e:
            # The helper answered: it removed what it made. (Killed midway, it did not:
            # the "creating" record stays for the next reclaim.)
            rec_path.unlink()
            if _no_space(e):
                raise PoolFull(f"importing {volume_id[:19]}") from None
            raise
        finally:
            os.close(fd)
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
        return replace(snap, thin_id=self._allocate())

    def _make_snapshot(self, snap: Snapshot) -> None:
        rec = self._vol_record(snap.volume)
        assert rec is not None
        # The origin is inactive (bases are deactivated after import), so no suspend is
        # needed for a consistent snapshot.
        self._message(core.msg_create_snap(snap.thin_id, int(rec["thin_id"])),
                      f"snapshotting {snap.volume[:19]}")
        self._activate_snapshot(snap)

    def _grow(self, snap: Snapshot) -> None:
        fileops.grow_ext4(snap.path)  # the caller's own device node: no helper needed

    def _remove_snapshot_data(self, snap: Snapshot) -> None:
        name = core.snapshot_name(self.rootkey, snap.id)
        if os.path.exists(f"/dev/mapper/{name}"):
            res = self._call("dm-remove", {"name": name, "delete": True})  # one helper call
            if res.get("deleted") == snap.thin_id:
                return
        if snap.thin_id >= 0:  # a crash before activation: the id alone may exist
            self._delete_thin(snap.thin_id)

    def _delete_thin(self, thin_id: int) -> None:
        # The id may not exist yet (a crash before create_snap): that is fine.
        with contextlib.suppress(KilnError):
            self._call("dm-message", {"name": self.pool_name,
                                      "message": core.msg_delete(thin_id)})

    def _message(self, msg: str, what: str) -> None:
        try:
            self._call("dm-message", {"name": self.pool_name, "message": msg})
        except KilnError as e:
            if _no_space(e):
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
        if self._reclaim_due(keep):
            client.reclaim(self.area, keep)

    def _reclaim_due(self, keep: list[str]) -> bool:
        """Whether the privileged reclaim has work (read from sysfs: no helper call)."""
        if core.needs_reclaim(privileged.dm_names(), self.rootkey, keep):
            return True
        return any(not privileged.loop_in_use(lp.device)
                   for lp in privileged.loop_list(self.area))

    def _usage(self) -> tuple[int, int]:
        status = self._call("dm-status", {"name": self.pool_name})["status"]
        usage = core.parse_pool_status(str(status))
        block = self.config.block_sectors * core.SECTOR
        return usage.total_data_blocks * block, usage.used_data_blocks * block

    def _teardown(self) -> None:
        self._call("thin-clear", {"pool": self.pool_name})  # devices, loops, files, claim


def _no_space(e: KilnError) -> bool:
    return "No space" in f"{e.message} {getattr(e, 'stderr_tail', '')}"


def create(root_dir: Path, config: PoolConfig,
           devices: dict[str, str] | None = None) -> DmThinPool:
    """Load a new thin-pool: over the operator's ``devices`` (from ``dm-info``) when the
    helper's config names them, else over fresh sparse files in the area. The returned
    pool's config carries the real size and where the pool lives."""
    pool = DmThinPool(root_dir, config)
    pool.thin_dir.mkdir(parents=True, exist_ok=True)
    fileops.write_json(pool.thin_dir / "pool.json", {"source": "devices", **devices}
                       if devices else {"source": "files"})
    res = pool._load_pool(fresh=True)  # files made, or devices checked, claimed, formatted
    if devices:
        pool.config = replace(config, size=int(res["data_sectors"]) * core.SECTOR,
                              reason=f"{config.reason}; on the operator's devices "
                              f"{res['data']} (data) and {res['metadata']} (metadata)")
    pool._activate()
    return pool


def clear_leftovers(root_dir: Path) -> None:
    """What a dm-thin ``pool init`` killed before committing left: the area's devices,
    loops, pool files and claim. Only when a dm-thin pool was begun here."""
    if not (root_dir / "pool" / "thin").exists():  # create() makes it before anything
        return
    area = client.area(root_dir)
    client.call("thin-clear", {"pool": core.pool_name(core.root_key(str(area)))}, area=area)
