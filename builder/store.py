"""The volume store: committed base volumes, the build-key index, and id resolution.

A volume is a directory ``ROOT/volumes/<hex>/`` holding ``volume.ext4`` (mode 0444) and
``meta.json``. It is assembled under ``ROOT/tmp/`` and committed with one ``rename`` of
the directory, so a volume is either wholly visible or absent. A second build that makes
the same bytes finds the directory already there and keeps the first one (same id, same
bytes: nothing is lost).

``ROOT/keys/<hex>`` maps a build key to a volume id; it is written after the volume is
committed, so a crash in between costs one rebuild at most, never a dangling volume.
``ROOT/used/<hex>`` records when a volume was last used (its mtime), for ``gc --keep``.
``meta.json`` is rewritten (atomically) only to add a recipe that builds the same volume
(``note_recipe``).
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.root import Root
from helper.base.errors import Conflict, IntegrityError, NotFound, UsageError
from helper.base.fileops import atomic_write, fsync_dir

VOLUME_FILE = "volume.ext4"
META_FILE = "meta.json"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_PREFIX = re.compile(r"^(?:sha256:)?([0-9a-f]{4,64})$")


def hash_file(path: Path, chunk: int = 4 << 20) -> str:
    """``sha256:<hex>`` of a file's bytes, read in large chunks (hashlib drops the GIL)."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return "sha256:" + h.hexdigest()


def hex_of(volume_id: str) -> str:
    if not volume_id.startswith("sha256:") or not _HEX64.match(volume_id[7:]):
        raise UsageError(f"invalid volume id {volume_id!r}",
                         "a volume id is sha256: followed by 64 hex digits")
    return volume_id[7:]


@dataclass(frozen=True)
class Volume:
    """A committed base volume."""

    id: str
    dir: Path
    meta: dict[str, Any]

    @property
    def path(self) -> Path:
        return self.dir / VOLUME_FILE

    @property
    def size(self) -> int:
        return int(self.meta["size"])

    def summary(self) -> dict[str, Any]:
        """The object ``volume ls --json`` and ``build --json`` print."""
        return {
            "id": self.id,
            "source": self.meta.get("source"),
            "source_digest": self.meta.get("source_digest"),
            "build_key": self.meta.get("build_key"),
            "path": str(self.path),
            "size": self.size,
            "created": self.meta.get("created"),
        }


class Store:
    """Volumes under one root."""

    def __init__(self, root: Root) -> None:
        self.root = root

    @property
    def used_dir(self) -> Path:
        return self.root.path / "used"

    # -- reading ----------------------------------------------------------------------

    def _load(self, hexid: str) -> Volume | None:
        d = self.root.volumes / hexid
        try:
            meta = json.loads((d / META_FILE).read_text())
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, ValueError) as e:
            raise IntegrityError(
                f"volume sha256:{hexid[:12]} has unreadable metadata: {e}",
                f"remove it with `kiln volume rm {hexid[:12]}` and rebuild",
            ) from None
        return Volume(id=f"sha256:{hexid}", dir=d, meta=meta)

    def list(self) -> list[Volume]:
        vols: list[Volume] = []
        with contextlib.suppress(FileNotFoundError):
            for name in sorted(os.listdir(self.root.volumes)):
                if _HEX64.match(name) and (v := self._load(name)) is not None:
                    vols.append(v)
        return vols

    def get(self, ref: str) -> Volume:
        """Resolve a full id or a prefix of at least 4 hex digits (with or without sha256:)."""
        m = _PREFIX.match(ref.strip().lower())
        if not m:
            raise UsageError(
                f"invalid volume id {ref!r}",
                "give sha256:<64 hex> or a prefix of at least 4 hex digits (see `kiln volume ls`)",
            )
        prefix = m.group(1)
        try:
            names = [n for n in os.listdir(self.root.volumes)
                     if n.startswith(prefix) and _HEX64.match(n)]
        except FileNotFoundError:
            names = []
        vols = [v for n in sorted(names) if (v := self._load(n)) is not None]
        if not vols:
            raise NotFound(f"no volume matches {ref!r}", "list volumes with `kiln volume ls`")
        if len(vols) > 1:
            cands = ", ".join(v.id[:19] for v in vols)
            raise Conflict(f"volume id {ref!r} is ambiguous: {cands}",
                           "give more hex digits of the id")
        return vols[0]

    def lookup_key(self, build_key: str) -> Volume | None:
        try:
            vid = (self.root.keys / hex_of(build_key)).read_text().strip()
        except FileNotFoundError:
            return None
        try:
            return self._load(hex_of(vid))
        except UsageError:
            return None

    # -- writing ----------------------------------------------------------------------

    def commit(self, staging: Path, volume_id: str, meta: dict[str, Any]) -> Volume:
        """Move ``staging`` (holding volume.ext4) into the store as ``volume_id``.

        The image file is made read-only and fsync-ed, meta.json is written and fsync-ed,
        then the directory is renamed into place and the volumes directory fsync-ed.
        """
        hexid = hex_of(volume_id)
        image = staging / VOLUME_FILE
        fd = os.open(image, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(image, 0o444)
        full = {**meta, "id": volume_id}
        atomic_write(staging / META_FILE, json.dumps(full, indent=2, sort_keys=True).encode(),
                     mode=0o444)
        os.chmod(staging, 0o755)  # noqa: S103 - volumes are meant to be readable by all
        dest = self.root.volumes / hexid
        try:
            os.rename(staging, dest)
        except OSError as e:
            if not dest.is_dir():
                raise
            # The same bytes were committed by another build first: keep theirs.
            del e
        fsync_dir(self.root.volumes)
        vol = self._load(hexid)
        assert vol is not None
        self.touch(vol.id)
        return vol

    def note_recipe(self, vol: Volume, recipe: Path) -> None:
        """Record in ``vol``'s metadata (``recipes``) that ``recipe`` builds it too.

        One volume serves every recipe with the same image and content (a volume's id does
        not depend on where the image came from); ``meta["recipe"]`` names only the first,
        and ``kiln refresh`` must find them all.
        """
        path = str(recipe.absolute())
        with self.root.lock("meta"):
            current = self._load(hex_of(vol.id))
            if current is None:
                return
            meta = current.meta
            others = meta.get("recipes")
            known = [meta.get("recipe"), *(others if isinstance(others, builtins.list) else [])]
            if path in {str(Path(p).absolute()) for p in known if isinstance(p, str) and p}:
                return
            meta["recipes"] = sorted({*(p for p in known[1:] if isinstance(p, str)), path})
            atomic_write(vol.dir / META_FILE,
                         json.dumps(meta, indent=2, sort_keys=True).encode(), mode=0o444)

    def set_key(self, build_key: str, volume_id: str) -> None:
        atomic_write(self.root.keys / hex_of(build_key), volume_id.encode() + b"\n")

    def touch(self, volume_id: str) -> None:
        """Record that a volume was used now (cache hit, snapshot, run)."""
        self.used_dir.mkdir(exist_ok=True)
        p = self.used_dir / hex_of(volume_id)
        p.touch()
        os.utime(p)

    def last_used(self, vol: Volume) -> float:
        try:
            return (self.used_dir / hex_of(vol.id)).stat().st_mtime
        except FileNotFoundError:
            return (vol.dir / META_FILE).stat().st_mtime

    def remove(self, vol: Volume) -> None:
        """Remove a volume: drop its keys, then move it to tmp/ and delete it there."""
        hexid = hex_of(vol.id)
        for key in self._keys_pointing_to(vol.id):
            with contextlib.suppress(FileNotFoundError):
                key.unlink()
        with self.root.workdir("rm") as wd:
            try:
                os.rename(vol.dir, wd / hexid)
            except FileNotFoundError:
                raise NotFound(f"volume {vol.id[:19]} is already gone", "") from None
            fsync_dir(self.root.volumes)
        for record in (self.used_dir / hexid, self.root.path / "dist" / f"{hexid}.json"):
            with contextlib.suppress(FileNotFoundError):
                record.unlink()

    def _keys_pointing_to(self, volume_id: str) -> Iterator[Path]:
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.root.keys):
                with contextlib.suppress(OSError):
                    if Path(entry.path).read_text().strip() == volume_id:
                        yield Path(entry.path)

    def dangling_keys(self) -> builtins.list[Path]:
        """Keys whose volume no longer exists."""
        out: list[Path] = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.root.keys):
                try:
                    vid = Path(entry.path).read_text().strip()
                    ok = (self.root.volumes / hex_of(vid)).is_dir()
                except (OSError, UsageError):
                    ok = False
                if not ok:
                    out.append(Path(entry.path))
        return out

    def verify(self, vol: Volume) -> float:
        """Re-hash the stored bytes against the id; return seconds taken."""
        t0 = time.monotonic()
        actual = hash_file(vol.path)
        if actual != vol.id:
            raise IntegrityError(
                f"volume {vol.id[:19]} is corrupt: its bytes hash to {actual[:19]}",
                f"remove it (`kiln volume rm {vol.id[7:19]}`) and rebuild or pull it again",
            )
        return time.monotonic() - t0
