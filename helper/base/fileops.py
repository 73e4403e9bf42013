"""File primitives both sides share: atomic replace, clone, sparse copy, locks, ext4 grow.

Stdlib only (the helper's base: ``builder`` and ``runner`` import it too).

``atomic_replace`` is kiln's one way to write a file so readers see the old one or the whole
new one: a temp file ``.<name>.<8 hex>.<suffix>`` beside the destination (``O_EXCL``,
``O_NOFOLLOW``, ``O_CLOEXEC``; by dirfd when given), flock-ed by its writer until it is
renamed (a crash-recovery sweep removes only temp files whose lock is free: see
``runner.tempfiles``), fsync-ed, renamed over the destination, the directory fsync-ed;
on any error the temp file is removed. ``atomic_write`` and ``write_json`` are it for bytes
and JSON; ``materialise`` for a clone or sparse copy of a file.

``clone`` is the reflink (FICLONE ioctl: O(1), extents shared until written; ``probe_reflink``
asks a filesystem whether it can); ``sparse_copy`` copies only the data extents
(SEEK_DATA/SEEK_HOLE: ``extents``) with ``os.copy_file_range``, so holes stay holes and the
kernel may still share or offload; ``hashing_copy`` walks the same extents through this
process when the bytes must be hashed on the way (a volume imported from a caller's fd,
checked against its id).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helper.base import run
from helper.base.errors import IntegrityError, KilnError

FICLONE = 0x40049409  # _IOW(0x94, 9, int)
_CHUNK = 1 << 30  # per copy_file_range call
_IO_CHUNK = 1 << 20  # per pread/pwrite of hashing_copy
_ZERO = bytes(_IO_CHUNK)


class PoolFull(KilnError):
    """The pool's filesystem or thin pool has no space left."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"the pool is full: no space left while {what}",
            "remove snapshots (`kiln snapshot rm`) or volumes, or re-create the pool "
            "larger (`kiln pool destroy` then `kiln pool init --size ...`)",
        )


def clone(src: Path, dst_fd: int) -> None:
    """Make ``dst_fd`` share all of ``src``'s extents (raises OSError when unsupported)."""
    fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        fcntl.ioctl(dst_fd, FICLONE, fd)
    finally:
        os.close(fd)


def probe_reflink(directory: Path) -> str | None:
    """None when ``directory``'s filesystem can clone a file (FICLONE), else why not (the
    kernel's error text)."""
    try:
        with tempfile.NamedTemporaryFile(dir=directory) as a, \
                tempfile.NamedTemporaryFile(dir=directory) as b:
            a.write(b"x" * 4096)
            a.flush()
            fcntl.ioctl(b.fileno(), FICLONE, a.fileno())
    except OSError as e:
        return e.strerror or str(e)
    return None


def extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """The data extents ``[start, end)`` of ``fd`` within ``[0, size)`` (SEEK_DATA/SEEK_HOLE):
    everything else reads as zeros."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole remains
                return
            raise
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        pos = end


def sparse_copy(src: Path, dst_fd: int) -> None:
    """Copy ``src``'s data extents into ``dst_fd`` at the same offsets; holes are skipped
    (the destination must read zeros there: a fresh file, or a fresh thin device)."""
    fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        sparse_copy_fd(fd, dst_fd)
    finally:
        os.close(fd)


def sparse_copy_fd(src_fd: int, dst_fd: int, limit: int | None = None) -> int:
    """``sparse_copy`` from an open file, of its first ``limit`` bytes at most; returns the
    size copied (a file destination needs ``ftruncate`` to it for a trailing hole)."""
    size = os.fstat(src_fd).st_size
    if limit is not None:
        size = min(size, limit)
    for start, end in extents(src_fd, size):
        _copy_range(src_fd, dst_fd, start, end)
    return size


def hashing_copy(src: int, dst: int, *, hashed: bool = True) -> tuple[int, str]:
    """Copy ``src``'s bytes to ``dst`` at the same offsets through this process: data
    extents are read, all-zero chunks are not written (holes stay holes; a fresh thin
    device reads zeros). With ``hashed`` every byte (holes as zeros) is hashed, so the
    digest is of exactly what was copied. Returns (size, ``sha256:…`` or "")."""
    size = os.fstat(src).st_size
    h = hashlib.sha256() if hashed else None
    pos = 0
    for start, end in extents(src, size):
        if h is not None:
            _hash_zeros(h, start - pos)
        off = start
        while off < end:
            chunk = os.pread(src, min(_IO_CHUNK, end - off), off)
            if not chunk:
                raise IntegrityError("the volume file shrank while being copied", "retry")
            if h is not None:
                h.update(chunk)
            if chunk != _ZERO[:len(chunk)]:
                os.pwrite(dst, chunk, off)
            off += len(chunk)
        pos = end
    if h is None:
        return size, ""
    _hash_zeros(h, size - pos)
    return size, "sha256:" + h.hexdigest()


def _hash_zeros(h: hashlib._Hash, n: int) -> None:
    while n > 0:
        step = min(n, _IO_CHUNK)
        h.update(_ZERO[:step])
        n -= step


def _copy_range(src_fd: int, dst_fd: int, start: int, end: int) -> None:
    """Copy bytes [start, end) to the same offsets: copy_file_range (in-kernel, may share
    extents) where the kernel allows it, sendfile across filesystem types (EXDEV)."""
    off = start
    fast = True
    while off < end:
        count = min(end - off, _CHUNK)
        if fast:
            try:
                n = os.copy_file_range(src_fd, dst_fd, count, off, off)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
                fast = False
                continue
        else:
            os.lseek(dst_fd, off, os.SEEK_SET)
            n = os.sendfile(dst_fd, src_fd, off, count)
        if n == 0:
            raise OSError(errno.EIO, "short copy: the source shrank while being copied")
        off += n


# -- all or nothing: a temp name, then rename ---------------------------------------------


@dataclass(frozen=True)
class Temp:
    """The temp file ``atomic_replace`` yields: write through ``fd``, or let a tool write to
    ``path`` (relative to the ``dir_fd`` given, if any) in place (same inode)."""

    fd: int
    path: Path


def _ours(path: Path, fd: int, dir_fd: int | None) -> bool:
    try:
        st = os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_ino == os.fstat(fd).st_ino


@contextlib.contextmanager
def atomic_replace(dest: Path | str, *, mode: int = 0o644, final_mode: int | None = None,
                   dir_fd: int | None = None, suffix: str = "tmp") -> Iterator[Temp]:
    """Create or replace ``dest`` all or nothing (see the module docstring).

    ``mode`` is the temp file's creation mode (the umask applies, as for open(2));
    ``final_mode``, when given, is set exactly (fchmod) before the rename. The temp name
    ``.<name>.<8 hex>.<suffix>`` is what crash recovery recognises. When the block raises,
    the temp file is removed and ``dest`` is untouched.
    """
    dest = Path(dest)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

    def make() -> tuple[Path, int]:
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.{suffix}")
        return tmp, os.open(tmp, flags, mode, dir_fd=dir_fd)

    while True:  # a sweep may remove the new file before it is locked: then make another
        tmp, fd = make()
        fcntl.flock(fd, fcntl.LOCK_EX)
        if _ours(tmp, fd, dir_fd):
            break
        os.close(fd)
    try:
        try:
            yield Temp(fd, tmp)
            if not _ours(tmp, fd, dir_fd):
                raise OSError(errno.ESTALE, f"temp file {tmp} was replaced while written")
            if final_mode is not None:
                os.fchmod(fd, final_mode)
            os.fsync(fd)
            os.rename(tmp, dest, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                if _ours(tmp, fd, dir_fd):
                    os.unlink(tmp, dir_fd=dir_fd)
            raise
    finally:
        os.close(fd)
    fsync_dir(dest.parent, dir_fd=dir_fd)


def write_all(fd: int, data: bytes) -> None:
    """All of ``data`` to ``fd`` (os.write may write less than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one
    (``mode``: as for open(2), the umask applies)."""
    with atomic_replace(path, mode=mode) as tmp:
        write_all(tmp.fd, data)


def write_json(path: Path, obj: Any, mode: int = 0o644) -> None:
    """Write ``obj`` as JSON so readers see the old file or the whole new one."""
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n", mode)


def fsync_dir(path: Path, *, dir_fd: int | None = None) -> None:
    """fsync a directory (a rename in it is durable after this). With ``dir_fd``, ``path``
    is ignored and that directory is synced: it may be an O_PATH fd, so it is reopened."""
    if dir_fd is None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    else:
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def materialise(src: Path, dst: Path, *, allow_clone: bool, mode: int = 0o444) -> bool:
    """Create ``dst`` (a new file) with ``src``'s bytes: temp name, clone or sparse copy,
    fsync, rename. Returns whether it was cloned. ENOSPC → ``PoolFull`` and no file left."""
    cloned = False
    try:
        with atomic_replace(dst, mode=0o600, final_mode=mode) as tmp:
            if allow_clone:
                try:
                    clone(src, tmp.fd)
                    cloned = True
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.EOPNOTSUPP, errno.EINVAL,
                                       errno.ENOTTY):
                        raise
            if not cloned:
                os.ftruncate(tmp.fd, os.stat(src).st_size)
                sparse_copy(src, tmp.fd)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise PoolFull(f"writing {dst.name}") from None
        raise
    return cloned


def read_json(path: Path) -> Any:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        return json.loads(f.read())


@contextlib.contextmanager
def flock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created if missing) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def grow_ext4(target: Path | str) -> None:
    """Grow the ext4 in ``target`` (a file already extended, or a block device) to fill it.

    resize2fs refuses a filesystem that was mounted since its last check; then it is
    checked with ``e2fsck -fp`` (fixes nothing a clean volume needs) and resized again."""
    try:
        run.run("resize2fs", [str(target)], timeout=600)
    except KilnError as e:
        if "e2fsck -f" not in str(getattr(e, "stderr_tail", "")) + e.message:
            raise
        run.run("e2fsck", ["-f", "-p", str(target)], timeout=600)  # -f force, -p preen
        run.run("resize2fs", [str(target)], timeout=600)


def allocated_bytes(path: Path) -> int:
    """Bytes a file occupies on disk (shared extents counted once per file)."""
    try:
        return os.lstat(path).st_blocks * 512
    except FileNotFoundError:
        return 0
