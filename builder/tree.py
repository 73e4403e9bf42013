"""The flattened filesystem tree: the one description every build step agrees on.

A ``Tree`` maps each path of an image's root filesystem to an ``Entry`` holding exactly the
metadata kiln promises to carry into the volume (type, owner, mode, xattrs, device numbers,
symlink target, content hash, hard-link identity). It is computed three ways and compared:

* from the image's layers (``builder.layers.flatten``): the truth;
* written out as a tar that ``mke2fs -d`` imports (``builder.tarball``);
* read back from the finished ext4 (``builder.ext4.read_tree``) for verification.

Paths are relative POSIX paths without a leading ``/`` (``"bin/sh"``); the root directory is
``""``. Names that are not valid UTF-8 are kept lossless with ``surrogateescape``, so
``os.fsencode(path)`` gives back the original bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import StrEnum


class Kind(StrEnum):
    REG = "reg"
    DIR = "dir"
    SYMLINK = "symlink"
    CHR = "chr"
    BLK = "blk"
    FIFO = "fifo"


@dataclass(frozen=True)
class Entry:
    """One path of a flattened tree.

    ``mode`` holds the permission bits only (``0o7777``, setuid/setgid/sticky included);
    the type is ``kind``. For hard links, every path of the group carries the same
    metadata and ``link`` names the group's first path in ``sort_key`` order (the one
    that is written as the file, symlink, device or fifo itself; a group is never a
    directory); the first path itself has ``link == ""``.
    """

    path: str
    kind: Kind
    mode: int
    uid: int = 0
    gid: int = 0
    size: int = 0
    sha256: str = ""
    target: str = ""
    link: str = ""
    major: int = 0
    minor: int = 0
    mtime: int = 0
    xattrs: tuple[tuple[str, bytes], ...] = field(default=())

    def describe(self) -> str:
        """A short human form of the compared fields, for diff messages."""
        parts = [self.kind.value, f"{self.uid}:{self.gid}", f"{self.mode:04o}"]
        if self.kind is Kind.REG:
            parts.append(f"size={self.size} sha256={self.sha256[:12]}")
        if self.kind is Kind.SYMLINK:
            parts.append(f"-> {self.target!r}")
        if self.kind in (Kind.CHR, Kind.BLK):
            parts.append(f"dev={self.major}:{self.minor}")
        if self.link:
            parts.append(f"link={self.link!r}")
        if self.xattrs:
            parts.append("xattrs=" + ",".join(k for k, _ in self.xattrs))
        return " ".join(parts)


Tree = dict[str, Entry]

# Fields the verifier compares. mtime is deliberately absent: mke2fs clamps timestamps to
# SOURCE_DATE_EPOCH for reproducibility, so the volume cannot carry layer mtimes verbatim.
COMPARED = ("kind", "mode", "uid", "gid", "size", "sha256", "target", "link", "major", "minor",
            "xattrs")


def sort_key(path: str) -> tuple[bytes, ...]:
    """Order in which entries are written: parents before children, bytewise by component."""
    if not path:
        return ()
    return tuple(os.fsencode(part) for part in path.split("/"))


def parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""

