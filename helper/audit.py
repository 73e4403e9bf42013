"""The helper's audit log: one bounded line per op, a daily byte cap per caller, rotation.

Every op is appended to ``/var/log/kiln-helper/audit.log`` (root-owned 0700 directory, all
by dirfd with ``O_NOFOLLOW``): time, caller uid, op, outcome — one bounded line. A non-root
uid adds at most ``[limits] audit_bytes_per_day`` bytes per UTC day (counter
``rate/<uid>``: day, bytes, whether the cap was reported; under flock); past the cap one
"rate-limited" line says so and the rest of that day's lines are dropped. The log rotates
at 16 MiB (``audit.log.1``, ``audit.log.2``). Tests read it to assert which ops ran.

Dependency direction: ``helper.main`` (which writes a line per op) and the ``usage`` op
(``helper.ops.usage``: what a caller spent today) import this module; it imports only
``helper.configbase`` (the built-in cap), lazily.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import time
from pathlib import Path

AUDIT_DIR = Path("/var/log/kiln-helper")
AUDIT_LOG = "audit.log"
AUDIT_ROTATE_BYTES = 16 << 20  # then audit.log -> .1 -> .2 (two generations kept)
AUDIT_GENERATIONS = 2
RATE_DIR = "rate"  # AUDIT_DIR/rate/<uid>: that uid's audit bytes today


def _bounded(text: str, most: int) -> str:
    return text.encode("ascii", "backslashreplace").decode("ascii")[:most]


def _audit_line(caller: int, op: str, outcome: str) -> bytes:
    # ASCII only, bounded: a caller's text inside a message must not stretch the line.
    # ``op`` is a checked name or its op_label already; the bound is a second line of defence.
    return json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "uid": caller, "op": _bounded(op, 100),
                       "outcome": _bounded(outcome, 200)}).encode() + b"\n"


def _root_dir(name: str, dir_fd: int | None = None) -> int:
    """A root-only (0700) directory, made if missing, opened without following a link."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o700, dir_fd=dir_fd)
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                 dir_fd=dir_fd)
    st = os.fstat(fd)
    if st.st_uid != 0:
        os.close(fd)
        raise PermissionError(f"{name} is not root's")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.fchmod(fd, 0o700)
    return fd


def audit(caller: int, op: str, outcome: str, cap: int | None = None) -> None:
    """Append one line for ``caller`` (a non-root caller within ``cap`` bytes a day:
    ``[limits] audit_bytes_per_day``, the built-in default when None)."""
    try:
        dfd = _root_dir(str(AUDIT_DIR))
    except OSError:
        return  # auditing must not turn a done op into a failure
    try:
        line = _audit_line(caller, op, outcome)
        admitted: bytes | None = line
        if caller != 0:  # root could fill the disk anyway; its lines are never dropped
            if cap is None:
                from helper.configbase import Limits

                cap = Limits.audit_bytes_per_day
            admitted = _admit(dfd, caller, op, line, cap)
        if admitted is not None:
            _rotate(dfd)
            _append(dfd, admitted)
    except OSError:
        pass
    finally:
        os.close(dfd)


def _today() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime())


def _parse_rate(raw: bytes) -> tuple[str, int, bool]:
    """``DAY BYTES NOTED`` (fixed width); anything else reads as a fresh day."""
    parts = raw.decode("ascii", "replace").split()
    if len(parts) == 3 and parts[1].isdigit() and parts[2] in ("0", "1"):
        return parts[0], int(parts[1]), parts[2] == "1"
    return "", 0, False


def _admit(dfd: int, uid: int, op: str, line: bytes, cap: int) -> bytes | None:
    """What of ``line`` may be written under ``uid``'s daily cap: the line, the one
    "rate-limited" line of the day, or nothing. Counted under the counter's flock (only
    this uid's own helpers wait on it)."""
    rfd = _root_dir(RATE_DIR, dfd)
    try:
        fd = os.open(str(uid), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=rfd)
    finally:
        os.close(rfd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        day, used, noted = _parse_rate(os.pread(fd, 64, 0))
        if day != _today():
            day, used, noted = _today(), 0, False
        out: bytes | None = None
        if used + len(line) <= cap:
            out, used = line, used + len(line)
        elif not noted:
            noted = True
            out = _audit_line(uid, op, f"rate-limited: uid {uid} reached {cap} audit bytes "
                              "today; its further lines are dropped until 00:00 UTC")
        # One fixed-width pwrite: a kill mid-update cannot leave a shorter, reset counter.
        os.pwrite(fd, f"{day} {used:020d} {int(noted)}\n".encode(), 0)
        return out
    finally:
        os.close(fd)


def audit_spent(uid: int) -> int:
    """Audit bytes ``uid`` added today (0 when none or unreadable)."""
    try:
        fd = os.open(AUDIT_DIR / RATE_DIR / str(uid),
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        day, used, _ = _parse_rate(os.pread(fd, 64, 0))
    finally:
        os.close(fd)
    return used if day == _today() else 0


def _rotate(dfd: int) -> None:
    """Past ``AUDIT_ROTATE_BYTES``: audit.log -> audit.log.1 -> audit.log.2. Whoever gets
    the directory's flock rotates; the others just append (a writer still holding the old
    file appends to ``.1``: nothing is lost)."""
    try:
        if os.stat(AUDIT_LOG, dir_fd=dfd, follow_symlinks=False).st_size < AUDIT_ROTATE_BYTES:
            return
        fcntl.flock(dfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (FileNotFoundError, BlockingIOError):
        return
    try:
        if os.stat(AUDIT_LOG, dir_fd=dfd, follow_symlinks=False).st_size < AUDIT_ROTATE_BYTES:
            return  # rotated by someone else meanwhile
        for n in range(AUDIT_GENERATIONS, 0, -1):  # .1 -> .2 first, the live log last
            src = f"{AUDIT_LOG}.{n - 1}" if n > 1 else AUDIT_LOG
            with contextlib.suppress(FileNotFoundError):
                os.rename(src, f"{AUDIT_LOG}.{n}", src_dir_fd=dfd, dst_dir_fd=dfd)
    finally:
        fcntl.flock(dfd, fcntl.LOCK_UN)


def _append(dfd: int, line: bytes) -> None:
    fd = os.open(AUDIT_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                 | os.O_CLOEXEC, 0o600, dir_fd=dfd)
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_uid == 0 and st.st_nlink == 1:
            os.write(fd, line)  # one write with O_APPEND: lines never interleave
    finally:
        os.close(fd)
