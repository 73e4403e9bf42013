"""Temp files beside their destination, which crash recovery can tell from live ones.

Every cache file the run stage writes (``ROOT/kernels/``: initrds, module plans, indexes,
vmlinux copies, the KVM verdict; files in a VM's directory) is written to a temp file
``.<name>.<random>.<suffix>`` beside it and renamed into place
(``helper.base.fileops.atomic_replace``; ``locked_temp`` for scratch files that are not).
The writer holds an ``flock`` on the temp file from its creation to the rename, so a
SIGKILL (which releases the lock) leaves a temp file whose lock anyone can take: ``sweep``
removes exactly those, never a live writer's. ``recover`` is what every kiln command that
uses a root runs first: ``Root.recover`` (``tmp/``, the blob cache) plus these directories.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import signal
from collections.abc import Iterator
from pathlib import Path

from builder.root import Root, locked_new
from helper.base.fileops import atomic_replace, write_all

_TEMP = re.compile(r"^\..+\.[0-9a-f]{8}\.(?:tmp|lz4)$")


def _fault_point(dest: Path) -> None:
    """Crash-test hook: ``KILN_FAULT_KILL_AT=write-<prefix>`` SIGKILLs this process with the
    temp file of a destination named ``<prefix>-…`` (or ``<prefix>.…``) written, not yet
    renamed."""
    spec = os.environ.get("KILN_FAULT_KILL_AT", "")
    if spec.startswith("write-") and re.split(r"[-.]", dest.name)[0] == spec[6:]:
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def locked_temp(dest: Path, suffix: str = "tmp") -> Iterator[Path]:
    """A new temp file beside ``dest``, flock-ed by this process until the block ends (and
    removed then, unless the block renamed it away)."""
    def make() -> tuple[Path, int]:
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.{suffix}")
        return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)

    tmp, fd = locked_new(make)  # a sweep removes only unlocked ones
    try:
        yield tmp
    finally:
        try:
            with contextlib.suppress(FileNotFoundError):
                if os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                    tmp.unlink()
        finally:
            os.close(fd)


def write_atomic(dest: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``dest``: readers see the old file or the whole new one
    (``helper.base.fileops.atomic_replace``, with this module's crash-test hook)."""
    with atomic_replace(dest, mode=0o600, final_mode=mode) as tmp:
        write_all(tmp.fd, data)
        _fault_point(dest)


def sweep(directory: Path) -> list[Path]:
    """Remove the temp files in ``directory`` whose writer is gone (their flock is free)."""
    removed: list[Path] = []
    try:
        entries = [e for e in os.scandir(directory)
                   if _TEMP.match(e.name) and e.is_file(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        p = Path(entry.path)
        try:
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue  # gone (renamed into place), or not a plain file of ours
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer
            with contextlib.suppress(FileNotFoundError):
                if os.stat(p).st_ino == os.fstat(fd).st_ino:
                    p.unlink()
                    removed.append(p)
        finally:
            os.close(fd)
    return removed


def sweep_caches(root: Root) -> list[Path]:
    """Dead temp files of the run stage: ``kernels/`` and every VM directory."""
    removed = sweep(root.path / "kernels")
    with contextlib.suppress(OSError):
        for entry in os.scandir(root.path / "vms"):
            if entry.is_dir(follow_symlinks=False):
                removed += sweep(Path(entry.path))
    return removed


def recover(root: Root, *, work: bool = True) -> list[Path]:
    """Crash leftovers of every kind, removed: ``Root.recover`` (work directories under
    ``tmp/``, the blob cache's temp files) and ``sweep_caches``; ``work=False`` skips the
    former, for a command whose core runs it anyway (``builder.pipeline.build``). Nothing
    happens for a root that does not exist or that this user cannot change (another user's
    root is theirs)."""
    if not root.path.is_dir():
        return []
    try:
        return (root.recover() if work else []) + sweep_caches(root)
    except OSError:
        return []
