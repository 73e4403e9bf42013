"""Address leases of a kiln network: one book per network, under an exclusive lock.

The book lives in ``/run/kiln/net/<namespace or host>-<bridge>.json`` (tmpfs: leases vanish
with the taps at reboot), the directory root-owned 0700. The decisions (which address, whose
lease) are ``helper.net.core``'s; this module reads, locks and writes. The book's lock is also
the network's: ``helper.net.host`` holds it around check-then-act steps (creating the bridge,
planning and applying iptables rules, a forward's port check), never nested.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from helper.base.errors import KilnError, NotFound, UsageError
from helper.base.fileops import atomic_replace, write_all
from helper.net import core as nc
from helper.net.config import NetSection

LEASE_DIR = Path("/run/kiln/net")


def book_path(sec: NetSection) -> Path:
    return LEASE_DIR / f"{sec.namespace or 'host'}-{sec.bridge}.json"


def _lease_dir() -> Path:
    """/run/kiln/net: root-owned, 0700, never a symlink."""
    for d in (LEASE_DIR.parent, LEASE_DIR):
        with contextlib.suppress(FileExistsError):
            os.mkdir(d, 0o700 if d == LEASE_DIR else 0o755)
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
            raise KilnError(f"refusing {d}: not a root-owned directory only root may write",
                            f"remove it; kiln recreates {d}")
    return LEASE_DIR


@contextlib.contextmanager
def lease_book(sec: NetSection) -> Iterator[list[nc.Book]]:
    """Hold the network's lease lock; yields ``[book]``; a replaced ``[0]`` is written.
    With no lease left, the book and its lock file go (removed while locked; a waiter that
    then holds a lock on the removed file notices and starts over)."""
    path = book_path(sec)
    lock = Path(f"{path}.lock")
    _lease_dir()
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            st = os.stat(lock)
        except FileNotFoundError:
            st = None
        fst = os.fstat(fd)
        if st is not None and (st.st_ino, st.st_dev) == (fst.st_ino, fst.st_dev):
            break
        os.close(fd)
    try:
        old = _read(path)
        box = [old]
        yield box
        if box[0] != old:
            _write(path, box[0])
    finally:
        if not path.exists():
            lock.unlink()
        os.close(fd)


def _read(path: Path) -> nc.Book:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return nc.Book()
    with os.fdopen(fd) as f:
        return nc.load_book(f.read())


def _write(path: Path, book: nc.Book) -> None:
    if not book.leases:  # nothing leased: leave nothing behind (lease_book drops the lock)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    with atomic_replace(path, mode=0o600) as tmp:
        write_all(tmp.fd, book.dumps().encode())


def read_book(sec: NetSection) -> nc.Book:
    return _read(book_path(sec))


def lease(sec: NetSection, tag: nc.Tag, capped: bool = True) -> nc.Lease:
    with lease_book(sec) as box:
        box[0], got = nc.allocate(sec, box[0], tag, capped)
    return got


def release(sec: NetSection, vm: str, uid: int) -> nc.Lease:
    with lease_book(sec) as box:
        box[0], gone = nc.release(box[0], vm, uid)
    return gone


def owned_lease(sec: NetSection, vm: str, uid: int) -> nc.Lease:
    got = read_book(sec).get(vm)
    if got is None:
        raise NotFound(f"VM {vm} has no address lease", "lease one first (net-lease)")
    if got.uid != uid:
        raise UsageError(f"the address lease of VM {vm} belongs to uid {got.uid}", "")
    return got
