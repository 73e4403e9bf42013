"""The pool interface, its on-disk layout, snapshot records and the crash rules.

Layout (one pool per kiln root)::

    ROOT/pool/config.json             PoolConfig: backend, why it was chosen, sizes
    ROOT/pool/snapshots/<id>.json     one record per snapshot (state creating|ready|removing)
    ROOT/pool/fs/                     reflink/copy: the pool directory (the mount point of
                                      pool.img when the root's filesystem has no reflinks)
    ROOT/pool/fs/volumes/<hex>.ext4   base volumes (0444);  fs/snapshots/<id>.ext4 snapshots
    ROOT/pool/pool.img                reflink: sparse btrfs/XFS image, loop-mounted at fs/
    ROOT/pool/thin/                   dm-thin: data.img, meta.img, ids.json, volumes/<hex>.json
    ROOT/locks/pool.lock              every pool operation holds it (flock)

Records live outside ``fs/`` so they are readable while the pool is unmounted (and the
dm-thin backend has no filesystem at all).

Crash rules. A snapshot's record is written (state ``creating``, atomically) BEFORE any of
its data exists, and set ``ready`` after the last step; removal sets ``removing`` first.
Every pool operation takes the pool lock and then runs ``reclaim``: any record not
``ready`` is abandoned work (its owner held the lock and died), so its data and the record
go; then the backend sweeps temp files, unrecorded snapshot data, and stale devices. The
named steps of creation (``snapshot-record``, ``snapshot-clone``, ``snapshot-resize``,
``snapshot-commit``) are fault points: ``KILN_FAULT_KILL_AT=snapshot-<step>`` SIGKILLs the
process there (crash tests).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import os
import re
import secrets
import signal
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from helper.base import fileops
from helper.base.errors import Conflict, IntegrityError, KilnError, NotFound, UsageError

SNAP_ID_RE = re.compile(r"^[a-z2-7]{1,32}$")
VOLUME_ID_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
FAULT_STEPS = ("snapshot-record", "snapshot-clone", "snapshot-resize", "snapshot-commit")

BackendName = Literal["dm-thin", "reflink", "copy"]


_FIELDS: dict[str, tuple[type, tuple[Any, ...] | None]] = {
    # name: (type, allowed values or None)
    "backend": (str, ("dm-thin", "reflink", "copy")),
    "reason": (str, None),
    "fs": (str, ("btrfs", "xfs", "host")),
    "size": (int, None),
    "created": (str, None),
    "block_sectors": (int, None),
}


@dataclass(frozen=True)
class PoolConfig:
    """``ROOT/pool/config.json``: what ``kiln pool init`` decided. Kiln's own state file,
    not user input: a dataclass checked by ``from_json`` (no pydantic on every `kiln run`,
    whose start-up time is a benchmark target)."""

    backend: str  # dm-thin | reflink | copy: the backend holding volumes and snapshots
    reason: str  # why this backend was chosen, shown by `pool status`
    fs: str  # btrfs | xfs | host: reflink/copy: the pool dir's fs; host = the root's
    size: int  # bytes of the pool image or thin data (0: host fs)
    created: str  # when the pool was made (UTC, ISO 8601)
    block_sectors: int = 128  # dm-thin data block size

    def __post_init__(self) -> None:
        for name, (typ, allowed) in _FIELDS.items():
            v = getattr(self, name)
            if type(v) is not typ:
                raise ValueError(f"{name} must be {typ.__name__}, not {type(v).__name__}")
            if allowed is not None and v not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {v!r}")
        if self.size < 0 or self.block_sectors < 128:
            raise ValueError("size must be >= 0 and block_sectors >= 128")

    @classmethod
    def from_json(cls, data: object) -> PoolConfig:
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise ValueError(f"unknown field {unknown[0]!r}")
        missing = sorted(set(_FIELDS) - {"block_sectors"} - set(data))
        if missing:
            raise ValueError(f"field {missing[0]!r} is missing")
        return cls(**data)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Snapshot:
    """One snapshot: a private writable copy of a base volume."""

    id: str
    volume: str
    path: str
    size: int
    thin: bool
    created: str
    state: str = "ready"  # creating | ready | removing
    thin_id: int = -1  # dm-thin only

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "volume": self.volume, "path": self.path, "size": self.size,
                "thin": self.thin, "created": self.created}


def new_snapshot_id() -> str:
    """16 characters of base32 (lowercase): 80 random bits."""
    return base64.b32encode(secrets.token_bytes(10)).decode().lower()


def check_snapshot_id(snap_id: str) -> str:
    if not SNAP_ID_RE.fullmatch(snap_id):
        raise UsageError(f"invalid snapshot id {snap_id!r}",
                         "a snapshot id is 1-32 characters of a-z and 2-7 (see `kiln snapshot ls`)")
    return snap_id


def check_volume_id(volume_id: str) -> str:
    if not VOLUME_ID_RE.fullmatch(volume_id):
        raise UsageError(f"invalid volume id {volume_id!r}",
                         "a volume id is sha256: followed by 64 hex digits")
    return volume_id


def fault_point(step: str) -> None:
    """Crash-test hook: SIGKILL this process at ``step`` when KILN_FAULT_KILL_AT names it."""
    if os.environ.get("KILN_FAULT_KILL_AT", "").partition(":")[0] == step:
        os.kill(os.getpid(), signal.SIGKILL)


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def pool_dir(root_dir: Path) -> Path:
    return root_dir / "pool"


def read_config(root_dir: Path) -> PoolConfig | None:
    path = pool_dir(root_dir) / "config.json"
    try:
        data = fileops.read_json(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise IntegrityError(f"cannot read the pool config {path}: {e.strerror}",
                             "it must be a regular file (not a symlink); run `kiln pool destroy "
                             "--force` and `kiln pool init`") from None
    except ValueError as e:
        raise IntegrityError(f"pool config {path} is not JSON: {e}",
                             "run `kiln pool destroy --force` and `kiln pool init`") from None
    try:
        return PoolConfig.from_json(data)
    except (TypeError, ValueError) as e:
        raise IntegrityError(f"pool config {path} is invalid: {e}",
                             "run `kiln pool destroy --force` and `kiln pool init`") from None


class Pool(ABC):
    """A volume pool. Public methods lock the pool and reclaim crash leftovers first."""

    backend: BackendName
    thin: bool

    def __init__(self, root_dir: Path, config: PoolConfig) -> None:
        self.root_dir = root_dir
        self.config = config
        self.dir = pool_dir(root_dir)
        self.records = self.dir / "snapshots"

    # -- the interface ----------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the pool lock and reclaim what a crashed command left (leaf first)."""
        with fileops.flock(self.root_dir / "locks" / "pool.lock"):
            self._reclaim_locked()
            yield

    def import_volume(self, volume_id: str, src: Path) -> Path:
        """Put a base volume into the pool (idempotent); return where it lives there."""
        check_volume_id(volume_id)
        with self.locked():
            if self._has_volume(volume_id):
                return self._volume_path(volume_id)
            return self._import(volume_id, Path(src))

    def has_volume(self, volume_id: str) -> bool:
        return self._has_volume(check_volume_id(volume_id))

    def volume_path(self, volume_id: str) -> Path:
        check_volume_id(volume_id)
        if not self._has_volume(volume_id):
            raise NotFound(f"volume {volume_id[:19]} is not in the pool",
                           "import it: `kiln pool init` imports every volume")
        return self._volume_path(volume_id)

    def remove_volume(self, volume_id: str) -> None:
        """Drop a base volume from the pool. Snapshots stay usable: every backend keeps
        them independent of their origin."""
        check_volume_id(volume_id)
        with self.locked():
            if self._has_volume(volume_id):
                self._remove_volume(volume_id)

    def create_snapshot(self, volume_id: str, snap_id: str | None = None,
                        size: int | None = None) -> Snapshot:
        check_volume_id(volume_id)
        sid = check_snapshot_id(snap_id) if snap_id else new_snapshot_id()
        with self.locked():
            if not self._has_volume(volume_id):
                raise NotFound(f"volume {volume_id[:19]} is not in the pool",
                               "import it first (`kiln snapshot create` does so on demand)")
            base_size = self._volume_size(volume_id)
            want = base_size if size is None else size
            if want < base_size:
                raise UsageError(f"snapshot size {want} is smaller than its base ({base_size})",
                                 "give a --size at least as large as the volume, or none")
            if want % 4096:
                raise UsageError(f"snapshot size {want} is not a multiple of 4 KiB",
                                 "give a size in whole KiB multiples of 4, e.g. 4G")
            if (self.records / f"{sid}.json").exists():
                raise Conflict(f"snapshot {sid} already exists", "choose another id")
            snap = Snapshot(id=sid, volume=volume_id, path=str(self._snapshot_path(sid)),
                            size=want, thin=self.thin, created=now_iso(), state="creating")
            snap = self._prepare(snap)
            self._write_record(snap)
            fault_point("snapshot-record")
            try:
                self._make_snapshot(snap)
                fault_point("snapshot-clone")
                if want > base_size:
                    self._grow(snap)
                fault_point("snapshot-resize")
                fault_point("snapshot-commit")
                snap = replace(snap, state="ready")
                self._write_record(snap)
            except BaseException:
                with contextlib.suppress(KilnError, OSError):
                    self._drop(snap)
                raise
            return snap

    def remove_snapshot(self, snap_id: str) -> None:
        check_snapshot_id(snap_id)
        with self.locked():
            snap = self._read_record(snap_id)
            if snap is None:
                raise NotFound(f"no snapshot {snap_id}", "list snapshots with `kiln snapshot ls`")
            self._write_record(replace(snap, state="removing"))
            self._drop(snap)

    def get_snapshot(self, snap_id: str) -> Snapshot:
        check_snapshot_id(snap_id)
        snap = self._read_record(snap_id)
        if snap is None or snap.state != "ready":
            raise NotFound(f"no snapshot {snap_id}", "list snapshots with `kiln snapshot ls`")
        return snap

    def list_snapshots(self) -> list[Snapshot]:
        with self.locked():
            return [s for s in self._records() if s.state == "ready"]

    def status(self) -> dict[str, Any]:
        with self.locked():
            capacity, used = self._usage()
            return {
                "backend": self.backend,
                "thin": self.thin,
                "reason": self.config.reason,
                "fs": self.config.fs,
                "path": str(self.dir),
                "capacity": capacity,
                "used": used,
                "volumes": len(self._volume_ids()),
                "snapshots": sum(1 for s in self._records() if s.state == "ready"),
            }

    def destroy(self, force: bool = False) -> None:
        """Remove every snapshot and volume, the devices and mounts, and the pool itself."""
        with self.locked():
            live = [s for s in self._records() if s.state == "ready"]
            if live and not force:
                raise Conflict(f"the pool still holds {len(live)} snapshot(s)",
                               "remove them (`kiln snapshot rm`) or pass --force")
            self._teardown()
            with contextlib.suppress(FileNotFoundError):
                (self.dir / "config.json").unlink()
            remove_tree(self.dir)

    def reclaim(self) -> None:
        with self.locked():
            pass

    def snapshot_refs(self) -> set[str]:
        return {s.volume for s in self._records() if s.state != "removing"}

    # -- records ----------------------------------------------------------------------

    def _write_record(self, snap: Snapshot) -> None:
        self.records.mkdir(parents=True, exist_ok=True)
        fileops.write_json(self.records / f"{snap.id}.json", asdict(snap))

    def _read_record(self, snap_id: str) -> Snapshot | None:
        return read_record(self.records, snap_id)

    def _records(self) -> list[Snapshot]:
        return load_records(self.records)

    def _drop(self, snap: Snapshot) -> None:
        """Remove a snapshot's data, then its record (the record goes last)."""
        self._remove_snapshot_data(snap)
        with contextlib.suppress(FileNotFoundError):
            (self.records / f"{snap.id}.json").unlink()
        fileops.fsync_dir(self.records)

    def _reclaim_locked(self) -> None:
        self._activate()
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.records):
                if name.startswith(".") and name.endswith(".tmp"):
                    (self.records / name).unlink()
        for snap in self._records():
            if snap.state != "ready":
                self._drop(snap)
        self._sweep({s.id for s in self._records()})

    # -- what a backend provides --------------------------------------------------------

    @abstractmethod
    def _activate(self) -> None:
        """Bring the pool up (mount, dm devices) if a reboot took it down."""

    @abstractmethod
    def _has_volume(self, volume_id: str) -> bool: ...

    @abstractmethod
    def _volume_ids(self) -> list[str]: ...

    @abstractmethod
    def _volume_path(self, volume_id: str) -> Path: ...

    @abstractmethod
    def _volume_size(self, volume_id: str) -> int: ...

    @abstractmethod
    def _import(self, volume_id: str, src: Path) -> Path: ...

    @abstractmethod
    def _remove_volume(self, volume_id: str) -> None: ...

    @abstractmethod
    def _snapshot_path(self, snap_id: str) -> Path: ...

    def _prepare(self, snap: Snapshot) -> Snapshot:
        """Fill in backend fields (a thin id) before the record is first written."""
        return snap

    @abstractmethod
    def _make_snapshot(self, snap: Snapshot) -> None: ...

    @abstractmethod
    def _grow(self, snap: Snapshot) -> None: ...

    @abstractmethod
    def _remove_snapshot_data(self, snap: Snapshot) -> None:
        """Remove whatever exists of a snapshot's data (may be nothing)."""

    @abstractmethod
    def _sweep(self, recorded: set[str]) -> None:
        """Remove temp files, unrecorded snapshot data and stale devices."""

    @abstractmethod
    def _usage(self) -> tuple[int, int]: ...

    @abstractmethod
    def _teardown(self) -> None:
        """Unmount / remove devices / detach loops (the files go afterwards)."""


def read_record(records: Path, snap_id: str) -> Snapshot | None:
    try:
        data = fileops.read_json(records / f"{snap_id}.json")
        return Snapshot(**data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as e:
        raise IntegrityError(f"snapshot record {snap_id} is unreadable: {e}",
                             f"remove {records / (snap_id + '.json')}") from None


def load_records(records: Path) -> list[Snapshot]:
    """Every snapshot record in ``records`` (any state), by id."""
    out: list[Snapshot] = []
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir(records)):
            sid, ext = os.path.splitext(name)
            if ext == ".json" and SNAP_ID_RE.fullmatch(sid):
                rec = read_record(records, sid)
                if rec is not None:
                    out.append(rec)
    return out


def remove_tree(path: Path) -> None:
    import shutil

    if path.is_symlink():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
