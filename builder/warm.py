"""Warm images (issue #14, docs/warm.md): a booted VM's saved state beside a copy of its
disk, keyed by everything a restore must match.

* ``WarmKey`` → ``key_id`` (pure): the SHA-256 of a canonical JSON of the volume id, the
  kernel's and initrd's content hashes, kiln's init (init.sh, the agent, busybox) hash,
  the VMM's name and version, the accelerator and CPU model, memory, cpus, disk size,
  the device set and the kernel command line. Any field that changes changes the id, so
  a stale image is never used: it is simply not found.
* The store, ``ROOT/warm/<id>/``: ``state`` (the VMM's saved state), ``disk`` (the disk
  as it was when the VM was paused) and ``warm.json`` (``WarmRecord``: id, volume, vmm,
  memory_mib, cpus, bytes allocated, created). An image is made in a work directory under
  ``ROOT/tmp/`` (``Root.workdir``: flock-ed while its maker lives) and renamed into place
  whole (``publish``); a SIGKILL at any step leaves only that work directory, which
  ``Root.recover`` (every kiln command, ``kiln gc``) removes. ``key_lock`` is the per-key
  flock that makes two concurrent creations of one key make one image.
* ``remove_for_volumes`` is what ``kiln volume rm`` and ``kiln gc`` call: a volume's warm
  images go with it.
* The cap (``KILN_WARM_MAX``, default 4G): ``prune_plan`` (pure) picks the oldest images
  to remove so the store fits, never the new one; ``prune`` applies it under the store's
  flock after ``kiln warm create`` made an image.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from builder.root import Root, rmtree
from builder.units import parse_size
from helper.base import fileops
from helper.base.errors import NotFound, UsageError

ID_RE = re.compile(r"^[0-9a-f]{64}$")
STATE, DISK, MEM, RECORD = "state", "disk", "mem", "warm.json"
MAX_ENV, MAX_DEFAULT = "KILN_WARM_MAX", "4G"


@dataclass(frozen=True)
class WarmKey:
    """Everything a restore must match (``key_id`` hashes it)."""

    volume: str
    kernel_sha256: str
    initrd_sha256: str
    init_sha256: str  # kiln's init.sh + agent + busybox
    vmm: str
    vmm_version: str
    accel: str
    cpu_model: str
    memory_mib: int
    cpus: int
    disk_size: int | None  # --disk-size, None: the volume's own
    devices: str  # the device set (runner.vmm.qemuargv.WARM_DEVICES)
    cmdline: str  # the kernel command line the image was booted with


def key_id(key: WarmKey) -> str:
    """The warm image's id: SHA-256 of the key's canonical JSON (pure)."""
    doc = json.dumps(asdict(key), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(doc.encode()).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class WarmRecord:
    """``warm.json``: what ``kiln warm ls --json`` prints for one image."""

    id: str
    volume: str
    vmm: str
    memory_mib: int
    cpus: int
    bytes: int  # allocated on disk: state + disk copy
    created: float

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: object) -> WarmRecord:
        if not isinstance(doc, dict) or set(doc) != set(cls.__dataclass_fields__):
            raise ValueError("not a warm image record")
        rec = cls(**doc)
        if not ID_RE.fullmatch(rec.id) or not isinstance(rec.memory_mib, int):
            raise ValueError("bad warm image record")
        return rec


def warm_dir(root: Root) -> Path:
    return root.path / "warm"


def image_dir(root: Root, image_id: str) -> Path:
    return warm_dir(root) / image_id


def check_id(image_id: str) -> str:
    if not ID_RE.fullmatch(image_id):
        raise UsageError(f"invalid warm image id {image_id!r}",
                         "a warm image id is 64 hex digits (see `kiln warm ls`)")
    return image_id


@contextlib.contextmanager
def key_lock(root: Root, image_id: str) -> Iterator[None]:
    """The per-key flock: one creation of a key at a time."""
    root.ensure()
    with root.lock(f"warm-{check_id(image_id)}"):
        yield


def allocated(path: Path) -> int:
    total = 0
    for p in (path.rglob("*") if path.is_dir() else [path]):
        with contextlib.suppress(OSError):
            total += p.lstat().st_blocks * 512
    return total


def publish(root: Root, work: Path, image_id: str, volume: str, vmm: str,
            memory_mib: int, cpus: int) -> WarmRecord:
    """Write ``work``'s record and rename the work directory to ``ROOT/warm/<id>`` (the
    caller holds ``key_lock``; ``work`` holds ``state`` and ``disk``)."""
    rec = WarmRecord(image_id, volume, vmm, memory_mib, cpus, 0, time.time())
    fileops.write_json(work / RECORD, rec.as_json(), 0o600)
    rec = WarmRecord(**{**rec.as_json(), "bytes": allocated(work)})
    fileops.write_json(work / RECORD, rec.as_json(), 0o600)
    os.chmod(work, 0o700)
    for name in (STATE, DISK, MEM):  # on the disk before the rename makes it an image: a
        _fsync_file(work / name)  # torn memory file would not fail a restore, only the guest
    fileops.fsync_dir(work)
    warm_dir(root).mkdir(mode=0o700, exist_ok=True)
    os.rename(work, image_dir(root, image_id))
    fileops.fsync_dir(warm_dir(root))
    return rec


def _fsync_file(path: Path) -> None:
    """fsync ``path`` if it exists (``mem`` is there for some VMMs only)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prefetch(d: Path, names: Iterable[str] = (STATE, DISK, MEM)) -> None:
    """Start reading an image's files into the page cache (``POSIX_FADV_WILLNEED``: the
    kernel's readahead, no wait) while the run sets itself up: a restore reads the whole
    state, and an image made a while ago may have left the cache (here, DAMON pages cold
    files out: a restore from disk took 0.5-0.9 s instead of 0.43)."""
    for name in names:
        with contextlib.suppress(OSError):
            fd = os.open(d / name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                # its data only: readahead over a sparse memory file's holes would fill
                # the page cache with zeros (512 MiB for a 512M guest)
                for start, end in fileops.extents(fd, os.fstat(fd).st_size):
                    os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)


def write_sparse(src_fd: int, dst: Path, block: int = 4096) -> None:
    """A new file ``dst`` (0600) of ``src_fd``'s size holding its non-zero ``block``-sized
    blocks only: the rest are holes (a saved guest's memory, whose zeroed pages then cost
    the image nothing)."""
    size = os.fstat(src_fd).st_size
    zero = bytes(block)
    out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                  0o600)
    try:
        os.ftruncate(out, size)
        for start, end in fileops.extents(src_fd, size):
            at = start
            while at < end:
                chunk = memoryview(os.pread(src_fd, min(1 << 20, end - at), at))
                if not chunk:
                    break
                run = -1  # the start of a run of non-zero blocks in ``chunk``
                for i in range(0, len(chunk) + block, block):
                    blk = chunk[i:i + block]
                    if blk and blk != zero[:len(blk)]:
                        run = i if run < 0 else run
                    elif run >= 0:
                        _pwrite_all(out, chunk[run:i], at + run)
                        run = -1
                at += len(chunk)
        os.fsync(out)  # published by a rename: whole on the disk first
    finally:
        os.close(out)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """pwrite until all of ``data`` is written (a short write is not an error to pwrite)."""
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def find(root: Root, image_id: str) -> WarmRecord | None:
    """The published image ``image_id`` (None: none, or an unreadable one)."""
    try:
        doc = json.loads((image_dir(root, image_id) / RECORD).read_text())
        return WarmRecord.from_json(doc)
    except (OSError, ValueError, TypeError):
        return None


def list_images(root: Root) -> list[WarmRecord]:
    out: list[WarmRecord] = []
    with contextlib.suppress(OSError):
        for entry in sorted(os.scandir(warm_dir(root)), key=lambda e: e.name):
            if ID_RE.fullmatch(entry.name) and (rec := find(root, entry.name)) is not None:
                out.append(rec)
    return out


def remove(root: Root, image_id: str) -> None:
    """Remove one warm image (a restore that has its files open keeps them until it ends:
    each clone copies the disk, and QEMU has read the state by then)."""
    d = image_dir(root, check_id(image_id))
    if not d.is_dir():
        raise NotFound(f"no warm image {image_id}", "list them with `kiln warm ls`")
    with key_lock(root, image_id):
        rmtree(d)


def remove_for_volumes(root: Root, volumes: Iterable[str]) -> list[str]:
    """Remove every warm image of ``volumes`` (``kiln volume rm``, ``kiln gc``); their ids."""
    doomed = set(volumes)
    gone: list[str] = []
    for rec in list_images(root):
        if rec.volume in doomed:
            with contextlib.suppress(NotFound, OSError):
                remove(root, rec.id)
                gone.append(rec.id)
    return gone


def max_bytes(environ: Mapping[str, str] | None = None) -> int:
    """The cap on the warm images' total allocated size: ``$KILN_WARM_MAX`` (a size such
    as ``4G``; default ``MAX_DEFAULT``)."""
    env = os.environ if environ is None else environ
    return parse_size(env.get(MAX_ENV) or MAX_DEFAULT, MAX_ENV)


@dataclass(frozen=True)
class PrunePlan:
    remove: tuple[str, ...]  # ids, oldest first
    over: bool  # the new image alone is larger than the cap


def prune_plan(others: Sequence[WarmRecord], cap: int, new_bytes: int) -> PrunePlan:
    """Which of ``others`` (every image but the new one) to remove, oldest first (by
    ``created``, then id), so that they and the new image of ``new_bytes`` fit in ``cap``;
    when the new image alone does not fit, every other goes and ``over`` says so (pure)."""
    total = new_bytes + sum(r.bytes for r in others)
    doomed: list[str] = []
    for rec in sorted(others, key=lambda r: (r.created, r.id)):
        if total <= cap:
            break
        doomed.append(rec.id)
        total -= rec.bytes
    return PrunePlan(tuple(doomed), new_bytes > cap)


def prune(root: Root, new: WarmRecord, cap: int) -> PrunePlan:
    """Apply ``prune_plan`` to the store under its flock (``warm-store``), after ``new`` was
    published; the caller must not hold a key lock (``remove`` takes each victim's)."""
    root.ensure()
    with root.lock("warm-store"):
        plan = prune_plan([r for r in list_images(root) if r.id != new.id], cap, new.bytes)
        for image_id in plan.remove:
            with contextlib.suppress(NotFound, OSError):
                remove(root, image_id)
    return plan


def clone_file(src: Path, dst: Path) -> None:
    """``dst`` (made 0600, or replaced in place) becomes a copy of ``src``: a reflink where
    the filesystem has them, else a sparse copy of ``src``'s data extents (holes stay
    holes; ``helper.base.fileops``)."""
    fd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fileops.clone(src, fd)
            return
        except OSError:
            pass
        size = src.stat().st_size
        os.ftruncate(fd, 0)  # reads zeros everywhere, as sparse_copy needs
        os.ftruncate(fd, size)
        fileops.sparse_copy(src, fd)
    finally:
        os.close(fd)
