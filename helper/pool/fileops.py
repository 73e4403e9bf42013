"""File primitives the pool backends share: clone, sparse copy, atomic JSON, locks, ext4 grow.

Stdlib only. ``clone`` is the reflink (FICLONE ioctl: O(1), extents shared until written);
``sparse_copy`` copies only the data extents (SEEK_DATA/SEEK_HOLE) with
``os.copy_file_range``, so holes stay holes and the kernel may still share or offload.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from helper import run
from helper.errors import KilnError

FICLONE = 0x40049409  # _IOW(0x94, 9, int)
_CHUNK = 1 << 30


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


def sparse_copy(src: Path, dst_fd: int) -> None:
    """Copy ``src``'s data extents into ``dst_fd`` at the same offsets; holes are skipped
    (the destination must read zeros there: a fresh file, or a fresh thin device)."""
    fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # only a hole remains
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            _copy_range(fd, dst_fd, start, end)
            pos = end
    finally:
        os.close(fd)


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


def materialise(src: Path, dst: Path, *, allow_clone: bool, mode: int = 0o444) -> bool:
    """Create ``dst`` (a new file) with ``src``'s bytes: temp name, clone or sparse copy,
    fsync, rename. Returns whether it was cloned. ENOSPC → ``PoolFull`` and no file left."""
    tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                 0o600)
    cloned = False
    try:
        try:
            if allow_clone:
                try:
                    clone(src, fd)
                    cloned = True
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.EOPNOTSUPP, errno.EINVAL,
                                       errno.ENOTTY):
                        raise
            if not cloned:
                os.ftruncate(fd, os.stat(src).st_size)
                sparse_copy(src, fd)
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, dst)
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if e.errno == errno.ENOSPC:
            raise PoolFull(f"writing {dst.name}") from None
        raise
    fsync_dir(dst.parent)
    return cloned


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj: Any, mode: int = 0o644) -> None:
    """Write ``obj`` as JSON so readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                 mode)
    try:
        os.write(fd, json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_dir(path.parent)


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
