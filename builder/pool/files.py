"""What the reflink and copy backends share: volumes and snapshots as files in ``fs/``.

A base volume is ``fs/volumes/<hex>.ext4`` (0444); a snapshot is ``fs/snapshots/<id>.ext4``
(0644), made by ``fileops.materialise`` (a clone or a sparse copy) through a temp name and
a rename; a larger snapshot is extended with ``truncate`` and its ext4 grown with
resize2fs (by whoever owns the file).

In a sudo caller's helper area (a loop-mounted pool image, ``_helper_dir``) both
directories are root's and unlistable (0711): volumes enter by ``volume-import``
(re-hashed, 0400: only root reads them), snapshots are made and removed by the helper
(``snapshot-create``: a clone handed to the caller, 0600, one link) and listed by
``pool-list``.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from builder import helperclient as client
from builder.pool.base import SNAP_ID_RE, Pool, Snapshot
from helper.base import fileops
from helper.base.errors import NotFound

_VOL_FILE_RE = re.compile(r"^([0-9a-f]{64})\.ext4$")


class FilePool(Pool):
    """Volumes and snapshots as files under ``ROOT/pool/fs``."""

    clone_ok = False

    @property
    def fs_dir(self) -> Path:
        return self.dir / "fs"

    @property
    def vol_dir(self) -> Path:
        return self.fs_dir / "volumes"

    @property
    def snap_dir(self) -> Path:
        return self.fs_dir / "snapshots"

    def _activate(self) -> None:
        for d in (self.vol_dir, self.snap_dir, self.records):
            d.mkdir(parents=True, exist_ok=True)

    def _has_volume(self, volume_id: str) -> bool:
        return self._volume_path(volume_id).is_file()

    def _volume_ids(self) -> list[str]:
        if self._helper_dir():
            return sorted(client.pool_list(self.area_dir)["volumes"])
        out: list[str] = []
        with contextlib.suppress(FileNotFoundError):
            for name in sorted(os.listdir(self.vol_dir)):
                m = _VOL_FILE_RE.fullmatch(name)
                if m:
                    out.append("sha256:" + m.group(1))
        return out

    def _volume_path(self, volume_id: str) -> Path:
        return self.vol_dir / f"{volume_id[7:]}.ext4"

    def _volume_size(self, volume_id: str) -> int:
        return os.stat(self._volume_path(volume_id)).st_size

    def _helper_dir(self) -> bool:
        """Whether volumes live in a root-owned helper area (a sudo caller's loop pool)."""
        return not client.privileged() and os.stat(self.vol_dir).st_uid != os.getuid()

    @property
    def area_dir(self) -> Path:
        return client.area(self.root_dir)

    def _import(self, volume_id: str, src: Path) -> Path:
        dst = self._volume_path(volume_id)
        if self._helper_dir():
            # Through the helper: it copies from our open fd and re-hashes against the id.
            client.volume_import(self.area_dir, volume_id, src, clone=self.clone_ok)
        elif client.privileged():
            from helper.storage import privileged  # dm-thin's module too: not on a run's path

            privileged.volume_import(self.root_dir, src, dst, allow_clone=self.clone_ok)
        else:  # the caller's own directory (host reflink / copy): plain file work
            fileops.materialise(src, dst, allow_clone=self.clone_ok)
        return dst

    def _remove_volume(self, volume_id: str) -> None:
        if self._helper_dir():
            with contextlib.suppress(NotFound):
                client.volume_remove(self.area_dir, volume_id)
            return
        with contextlib.suppress(FileNotFoundError):
            self._volume_path(volume_id).unlink()
        fileops.fsync_dir(self.vol_dir)

    def _snapshot_path(self, snap_id: str) -> Path:
        return self.snap_dir / f"{snap_id}.ext4"

    def _make_snapshot(self, snap: Snapshot) -> None:
        if self._helper_dir():
            client.snapshot_create(self.area_dir, snap.volume, snap.id)
            return
        fileops.materialise(self._volume_path(snap.volume), Path(snap.path),
                            allow_clone=self.clone_ok, mode=0o644)

    def _grow(self, snap: Snapshot) -> None:
        try:
            os.truncate(snap.path, snap.size)
        except OSError as e:
            if e.errno == 28:  # ENOSPC
                raise fileops.PoolFull(f"growing snapshot {snap.id}") from None
            raise
        fileops.grow_ext4(Path(snap.path))

    def _remove_snapshot_data(self, snap: Snapshot) -> None:
        if self._helper_dir():
            with contextlib.suppress(NotFound):
                client.snapshot_remove(self.area_dir, snap.id)
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(snap.path)

    def _sweep(self, recorded: set[str]) -> None:
        if self._helper_dir():  # the helper's files are unnamed until whole: no temp files
            for sid in client.pool_list(self.area_dir)["snapshots"]:
                if sid not in recorded:
                    with contextlib.suppress(NotFound):
                        client.snapshot_remove(self.area_dir, sid)
            return
        for d in (self.vol_dir, self.snap_dir):
            with contextlib.suppress(FileNotFoundError):
                for name in os.listdir(d):
                    p = d / name
                    if name.startswith(".") and name.endswith(".tmp"):
                        p.unlink()  # an import or clone killed before its rename
                    elif d == self.snap_dir:
                        sid = name.removesuffix(".ext4")
                        if not SNAP_ID_RE.fullmatch(sid) or sid not in recorded:
                            p.unlink()

    def _usage(self) -> tuple[int, int]:
        st = os.statvfs(self.fs_dir)
        capacity = st.f_blocks * st.f_frsize
        # On the root's own filesystem, count the pool's files (shared extents once per
        # file: an upper bound); a dedicated image reports its filesystem's usage.
        files = [*self.vol_dir.glob("*.ext4"), *self.snap_dir.glob("*.ext4")]
        return capacity, sum(fileops.allocated_bytes(p) for p in files)

    def _teardown(self) -> None:
        pass
