"""Resolve caller-named paths beneath a trusted root without following symlinks.

The helper never passes a caller's path string to a syscall that resolves it from ``/``.
A caller names a path *relative* to a root the helper chose (``REL_PATTERN``: plain names,
no ``..``, nothing starting with ``.`` or ``-``); ``open_beneath`` opens it with
``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`` (Linux ≥ 5.6,
called through ``ctypes``), or, where openat2 is missing, by walking the components with
``O_NOFOLLOW`` one ``openat`` at a time. Either way a symlink anywhere on the way (planted
or swapped in by a racing caller) fails with ``ELOOP``; the result is an fd, checked with
``fstat`` and acted on from then on (``/proc/self/fd/N`` for tools that want a path).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

from helper.base.errors import NotFound, UsageError

# One to sixteen components of [A-Za-z0-9_][A-Za-z0-9._-]*: no "..", no ".x", no "-x".
NAME = r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}"
REL_PATTERN = rf"^{NAME}(/{NAME}){{0,15}}$"
_REL_RE = re.compile(REL_PATTERN)

_SYS_OPENAT2 = 437  # x86_64 and aarch64 alike (new syscalls share numbers)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_openat2_ok: bool | None = None  # None: not probed yet


def check_rel(rel: str) -> str:
    """``rel`` is a plain relative path (the pydantic pattern, enforced again here)."""
    if not isinstance(rel, str) or not _REL_RE.fullmatch(rel):
        raise UsageError(f"invalid path {rel!r}",
                         "give a relative path of plain names (no '..', no leading '.' or '-')")
    return rel


def _openat2(dirfd: int, rel: str, flags: int, mode: int) -> int:
    # openat2 insists on mode 0 unless a file may be created.
    how = _OpenHow(flags | os.O_CLOEXEC, mode if flags & os.O_CREAT
                   or flags & os.O_TMPFILE == os.O_TMPFILE else 0,
                   RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
    # Variadic syscall(): every argument passed as a full 64-bit word.
    fd = _libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_long(dirfd),
                       ctypes.c_char_p(os.fsencode(rel)), ctypes.byref(how),
                       ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), rel)
    return int(fd)


def _walk(dirfd: int, rel: str, flags: int, mode: int) -> int:
    parts = rel.split("/")
    cur = os.dup(dirfd)
    try:
        for part in parts[:-1]:
            nxt = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=cur)
            os.close(cur)
            cur = nxt
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=cur)
    finally:
        os.close(cur)


def openat2_available() -> bool:
    global _openat2_ok  # noqa: PLW0603 - a once-per-process probe
    if _openat2_ok is None:
        fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.close(_openat2(fd, "proc", os.O_PATH, 0))
            _openat2_ok = True
        except OSError as e:
            _openat2_ok = e.errno not in (errno.ENOSYS, errno.EPERM)  # EPERM: seccomp
        finally:
            os.close(fd)
    return _openat2_ok


def open_dir(root: Path) -> int:
    """An ``O_PATH`` fd of a trusted absolute directory, no symlink on the way
    (``/bin``-style symlinks at the top are not allowed either: roots are kiln's own)."""
    if not root.is_absolute():
        raise UsageError(f"{root} is not absolute", "")
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    rel = str(root).lstrip("/")
    if not rel:
        return fd
    try:
        return _walk(fd, rel, os.O_PATH | os.O_DIRECTORY, 0)
    except OSError as e:
        raise _error(root, e) from None
    finally:
        os.close(fd)


def open_beneath(root: Path | int, rel: str, flags: int = os.O_RDONLY, mode: int = 0o600,
                 *, force_walk: bool = False) -> int:
    """Open ``root/rel`` with no symlink in ``rel``; the fd. ``root``: a path or a dir fd."""
    check_rel(rel)
    rfd = open_dir(root) if isinstance(root, Path) else root
    try:
        if openat2_available() and not force_walk:
            return _openat2(rfd, rel, flags, mode)
        return _walk(rfd, rel, flags, mode)
    except OSError as e:
        raise _error(Path(f"<root>/{rel}") if isinstance(root, int) else root / rel,
                     e) from None
    finally:
        if isinstance(root, Path):
            os.close(rfd)


def _error(path: Path, e: OSError) -> Exception:
    if e.errno == errno.ENOENT:
        return NotFound(f"{path} does not exist", "")
    if e.errno in (errno.ELOOP, errno.EXDEV):
        return UsageError(f"{path} is a symlink or passes through one",
                          "the helper never follows symlinks in caller-named paths")
    if e.errno == errno.ENOTDIR:
        return UsageError(f"{path} passes through a symlink or a non-directory",
                          "the helper never follows symlinks in caller-named paths")
    if e.errno == errno.EEXIST:
        from helper.base.errors import Conflict

        return Conflict(f"{path} already exists", "")
    return UsageError(f"cannot open {path}: {e.strerror}", "")


def fstat_kind(fd: int, kind: str, path: str, *, owner: int | None = None,
               single_link: bool = False) -> os.stat_result:
    """``fstat(fd)``, checked to be a ``kind`` (reg|dir|blk) owned by ``owner`` (if given)
    with one link (if asked: a planted hard link to someone else's file has two)."""
    st = os.fstat(fd)
    test = {"reg": stat.S_ISREG, "dir": stat.S_ISDIR, "blk": stat.S_ISBLK}[kind]
    if not test(st.st_mode):
        raise UsageError(f"{path} is not a {'regular file' if kind == 'reg' else kind}", "")
    if owner is not None and st.st_uid != owner:
        raise UsageError(f"{path} is not owned by uid {owner}", "")
    if single_link and st.st_nlink != 1:
        raise UsageError(f"{path} has {st.st_nlink} hard links",
                         "the helper only takes files with exactly one link")
    return st


def root_dir(parent: Path | int, name: str, *, create: bool, mode: int) -> int:
    """``parent/name`` (one plain name, no symlink) as an ``O_RDONLY`` directory fd, made
    with ``mode`` if missing and ``create``; it must be root-owned, and its mode is set to
    ``mode`` when it differs (directories made by older helpers were looser)."""
    check_rel(name)
    pfd = open_dir(parent) if isinstance(parent, Path) else parent
    try:
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, mode, dir_fd=pfd)
        fd = open_beneath(pfd, name, os.O_RDONLY | os.O_DIRECTORY)
    finally:
        if isinstance(parent, Path):
            os.close(pfd)
    try:
        label = str(parent / name) if isinstance(parent, Path) else name
        st = fstat_kind(fd, "dir", label, owner=0)
        if stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def root_lock(directory: Path, name: str, mode: int = 0o755) -> Iterator[None]:
    """Hold the root-owned flock ``<directory>/<name>`` (blocks until the holder is done);
    ``directory`` is a trusted path, made with ``mode`` if missing."""
    directory.mkdir(mode=mode, parents=True, exist_ok=True)
    dfd = open_dir(directory)
    try:
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=dfd)
    finally:
        os.close(dfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != 0:
            raise UsageError(f"{directory}/{name} is not a root-owned file",
                             "remove it; kiln-helper recreates it")
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def fd_path(fd: int) -> str:
    """A path naming exactly the open file (for tools that take paths)."""
    return f"/proc/self/fd/{fd}"


def mkdirs_beneath(root: Path, rel: str, mode: int = 0o755) -> None:
    """Create ``root/rel`` and missing parents, refusing symlinks (``mkdirat`` by fd)."""
    check_rel(rel)
    cur = open_dir(root)
    try:
        for part in rel.split("/"):
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, mode, dir_fd=cur)
            try:
                nxt = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=cur)
            except OSError as e:
                raise _error(root / rel, e) from None
            os.close(cur)
            cur = nxt
    finally:
        os.close(cur)
