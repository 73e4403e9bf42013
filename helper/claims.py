"""Root-owned claims in a caller's area: which host-wide objects (VM cgroups, jails) that
caller made.

A host-wide object is named by an id the caller sends, so the name alone does not say
whose it is. When the helper makes one for a sudo caller it writes ``<area>/<kind>/<name>``
(root-owned, 0600; the caller cannot write its area): the boot id and the (device, inode)
of every directory made, plus whatever the op adds. An op acting on the object later
requires that claim, with the same boot id and every directory still the same inode — so
another user's object, or one a reboot or a removal recycled under the same name, is
refused.

A claim is written *before* the object it records exists (``put`` with an intent: a
temp path, an identity still ``None``), so a helper killed half-way leaves a record that
names what it may have made: the caller's next remove finds and deletes it.
``host_lock``: one host-wide flock per purpose (``<[pool] directory>/<name>``) for
check-then-create steps that several callers race for.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from helper import safepath
from helper.errors import NotFound, UsageError
from helper.opbase import replace_in

JAILS = "jails"  # <area>/jails/<vm>: the caller's staged jails (helper.ops_jail)
CGROUPS = "cgroups"  # <area>/cgroups/<vm>: the caller's VM cgroups (helper.ops_vm)


def boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def identity(d: Path) -> list[int]:
    st = os.lstat(d)
    return [st.st_dev, st.st_ino]


def _dir_fd(area: Path, kind: str, *, create: bool) -> int | None:
    """``<area>/<kind>`` (root-owned, made only when a claim is written), or None."""
    if create:
        safepath.mkdirs_beneath(area, kind, 0o700)
    try:
        fd = safepath.open_beneath(area, kind, os.O_RDONLY | os.O_DIRECTORY)
    except NotFound:
        return None
    try:
        safepath.fstat_kind(fd, "dir", f"{area}/{kind}", owner=0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write(area: Path, kind: str, name: str, dirs: list[Path], **extra: Any) -> None:
    put(area, kind, name, {**extra, "dirs": {str(d): identity(d) for d in dirs}})


def put(area: Path, kind: str, name: str, doc: dict[str, Any]) -> None:
    """Write ``doc`` (plus this boot's id) as the claim, replacing any earlier version."""
    doc = {**doc, "boot": boot_id()}
    dfd = _dir_fd(area, kind, create=True)
    assert dfd is not None
    try:
        write_at(dfd, name, doc)
    finally:
        os.close(dfd)


def write_at(dfd: int, name: str, doc: dict[str, Any]) -> None:
    """A root-only JSON record ``name`` in directory ``dfd``, replaced all or nothing."""
    with replace_in(dfd, name, os.O_WRONLY, 0o600) as fd:
        os.write(fd, json.dumps(doc, sort_keys=True).encode())


def read_at(dfd: int, name: str) -> dict[str, Any] | None:
    """The JSON object in ``dfd/name`` (no symlink followed); None if absent or not one."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(os.read(fd, 1 << 16))
    except ValueError:
        return None
    finally:
        os.close(fd)
    return doc if isinstance(doc, dict) else None


def read(area: Path, kind: str, name: str) -> dict[str, Any] | None:
    dfd = _dir_fd(area, kind, create=False)
    if dfd is None:
        return None
    try:
        return read_at(dfd, name)
    finally:
        os.close(dfd)


def names(area: Path, kind: str) -> list[str]:
    """Every claim of that kind (temp files of an interrupted write excluded)."""
    dfd = _dir_fd(area, kind, create=False)
    if dfd is None:
        return []
    try:
        return [n for n in os.listdir(dfd) if not n.startswith(".")]
    finally:
        os.close(dfd)


def drop(area: Path, kind: str, name: str) -> None:
    dfd = _dir_fd(area, kind, create=False)
    if dfd is None:
        return
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dfd)
    finally:
        os.close(dfd)


def holds(claim: dict[str, Any] | None, existing: list[Path]) -> bool:
    """The claim is of this boot and names every existing directory by its inode."""
    dirs = (claim or {}).get("dirs")
    return (isinstance(dirs, dict) and (claim or {}).get("boot") == boot_id()
            and all(dirs.get(str(d)) == identity(d) for d in existing))


def same(recorded: Any, path: Path) -> bool:
    """``path`` exists and is the (device, inode) recorded (``None`` never matches)."""
    try:
        return isinstance(recorded, list) and recorded == identity(path)
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def host_lock(pool_dir: Path, name: str) -> Iterator[None]:
    """Hold the root-owned flock ``<pool_dir>/<name>`` (blocks until the holder is done)."""
    pool_dir.mkdir(mode=0o755, parents=True, exist_ok=True)  # a trusted path
    dfd = safepath.open_dir(pool_dir)
    try:
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=dfd)
    finally:
        os.close(dfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != 0:
            raise UsageError(f"{pool_dir}/{name} is not a root-owned file",
                             "remove it; kiln-helper recreates it")
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock
