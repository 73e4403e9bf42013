"""Root-owned claims in a caller's area: which host-wide objects (VM cgroups, jails) that
caller made.

A host-wide object is named by an id the caller sends, so the name alone does not say
whose it is. When the helper makes one for a sudo caller it writes ``<area>/<kind>/<name>``
(root-owned, 0600; the caller cannot write its area): the boot id and the (device, inode)
of every directory made, plus whatever the op adds. An op acting on the object later
requires that claim, with the same boot id and every directory still the same inode — so
another user's object, or one a reboot or a removal recycled under the same name, is
refused.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from helper import safepath
from helper.errors import NotFound
from helper.opbase import replace_in


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
    doc = {**extra, "boot": boot_id(), "dirs": {str(d): identity(d) for d in dirs}}
    dfd = _dir_fd(area, kind, create=True)
    assert dfd is not None
    try:
        with replace_in(dfd, name, os.O_WRONLY, 0o600) as fd:
            os.write(fd, json.dumps(doc).encode())
    finally:
        os.close(dfd)


def read(area: Path, kind: str, name: str) -> dict[str, Any] | None:
    dfd = _dir_fd(area, kind, create=False)
    if dfd is None:
        return None
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    except FileNotFoundError:
        return None
    finally:
        os.close(dfd)
    try:
        doc = json.loads(os.read(fd, 1 << 16))
    except ValueError:
        return None
    finally:
        os.close(fd)
    return doc if isinstance(doc, dict) else None


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
