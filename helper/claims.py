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
Check-then-create steps that several callers race for hold one host-wide flock per
purpose (``safepath.root_lock`` on ``<[pool] directory>/<name>``).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from helper.base import safepath
from helper.base.errors import NotFound
from helper.base.fileops import atomic_replace, write_all

JAILS = "jails"  # <area>/jails/<vm>: the caller's staged jails (helper.ops.jail)
CGROUPS = "cgroups"  # <area>/cgroups/<vm>: the caller's VM cgroups (helper.ops.vm)


def boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def identity(d: Path) -> list[int]:
    st = os.lstat(d)
    return [st.st_dev, st.st_ino]


def _dir_fd(area: Path, kind: str, *, create: bool) -> int | None:
    """``<area>/<kind>`` (root-owned 0700, made only when a claim is written), or None."""
    try:
        return safepath.root_dir(area, kind, create=create, mode=0o700)
    except NotFound:
        return None


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
    with atomic_replace(name, dir_fd=dfd, mode=0o600) as tmp:
        write_all(tmp.fd, json.dumps(doc, sort_keys=True).encode())


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
