"""A small read-only ext4 reader: a finished volume back into a ``Tree``.

The verifier compares what the volume holds with what the image's layers say, using a
reader that shares no code with the writer (mke2fs), so a bug on either side shows up as a
difference. It reads the image file directly (``mmap``), needs no root, no loop device and
no mount, and understands what kiln's ``mke2fs`` feature set produces:

* 32- and 64-byte group descriptors (``64bit``), ``flex_bg`` (tables found via descriptors);
* extent trees of any depth (uninitialised extents and holes read as zeros), and the
  classic block map for the direct blocks of a slow symlink;
* directories by a linear scan of every block: htree index blocks look like one empty
  entry (inode 0) and the ``metadata_csum`` tail like another, so both are skipped;
* xattrs in the inode body (after ``i_extra_isize``) and in an external block, with the
  name-index prefixes; POSIX ACLs are turned from ext4's compact form back into the
  ``system.posix_acl_*`` value ``getxattr`` would return; values stored in an ``ea_inode``;
* old and new device-number encodings, fast (< 60 bytes, in ``i_block``) and slow symlinks,
  32-bit uid/gid (``osd2`` high halves).

``lost+found``: mke2fs always creates it. ``read_tree`` drops it when it is exactly the
directory mke2fs makes (empty, ``0700``, ``0:0``, no xattrs), unless ``keep_lost_found``
is set: the verifier passes ``keep_lost_found="lost+found" in expected`` so an image that
ships its own ``lost+found`` is still compared field by field.

Entry fields: ``size`` and ``sha256`` are set for regular files only (0 / "" otherwise);
``mtime`` is the inode's (informational: not compared).
"""

from __future__ import annotations

import dataclasses
import hashlib
import mmap
import os
import struct
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from builder.tree import Entry, Kind, Tree, sort_key
from helper.base.errors import IntegrityError

ROOT_INO = 2
_EXTENTS_FL = 0x80000
_INLINE_DATA_FL = 0x10000000
_EXTENT_MAGIC = 0xF30A
_XATTR_MAGIC = 0xEA020000
_KIND = {0o100000: Kind.REG, 0o040000: Kind.DIR, 0o120000: Kind.SYMLINK, 0o020000: Kind.CHR,
         0o060000: Kind.BLK, 0o010000: Kind.FIFO}
_XATTR_PREFIX = {0: "", 1: "user.", 2: "system.posix_acl_access",
                 3: "system.posix_acl_default", 4: "trusted.", 6: "security.", 7: "system.",
                 8: "system.richacl"}
_ZEROS = bytes(1 << 20)

FEATURES_COMPAT = {0x1: "dir_prealloc", 0x2: "imagic_inodes", 0x4: "has_journal",
                   0x8: "ext_attr", 0x10: "resize_inode", 0x20: "dir_index",
                   0x200: "sparse_super2", 0x400: "fast_commit", 0x800: "stable_inodes",
                   0x1000: "orphan_file"}
FEATURES_INCOMPAT = {0x1: "compression", 0x2: "filetype", 0x4: "needs_recovery",
                     0x8: "journal_dev", 0x10: "meta_bg", 0x40: "extent", 0x80: "64bit",
                     0x100: "mmp", 0x200: "flex_bg", 0x400: "ea_inode", 0x1000: "dirdata",
                     0x2000: "metadata_csum_seed", 0x4000: "large_dir",
                     0x8000: "inline_data", 0x10000: "encrypt", 0x20000: "casefold"}
FEATURES_RO_COMPAT = {0x1: "sparse_super", 0x2: "large_file", 0x8: "huge_file",
                      0x10: "uninit_bg", 0x20: "dir_nlink", 0x40: "extra_isize",
                      0x100: "quota", 0x200: "bigalloc", 0x400: "metadata_csum",
                      0x1000: "read-only", 0x2000: "project", 0x8000: "verity",
                      0x10000: "orphan_present"}


class _Image:
    """An opened ext4 image: superblock geometry, inode lookup, file data."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.mv = memoryview(self.mm)
        sb = self.mv[1024:2048]
        if len(sb) < 1024 or struct.unpack_from("<H", sb, 0x38)[0] != 0xEF53:
            raise self.corrupt("no ext2/3/4 superblock")
        self.sb = bytes(sb)
        (self.first_data_block, log_bs) = struct.unpack_from("<II", sb, 0x14)
        self.bs = 1024 << log_bs
        self.ipg = struct.unpack_from("<I", sb, 0x28)[0]
        self.inode_size = struct.unpack_from("<H", sb, 0x58)[0] if sb[0x4C] else 128
        incompat = struct.unpack_from("<I", sb, 0x60)[0]
        desc = struct.unpack_from("<H", sb, 0xFE)[0] if incompat & 0x80 else 32
        inodes = struct.unpack_from("<I", sb, 0)[0]
        groups = -(-inodes // self.ipg)
        gdt = (self.first_data_block + 1) * self.bs
        self.itables = []
        for g in range(groups):
            off = gdt + g * desc
            lo = struct.unpack_from("<I", self.mv, off + 8)[0]
            hi = struct.unpack_from("<I", self.mv, off + 0x28)[0] if desc >= 64 else 0
            self.itables.append(lo | hi << 32)

    def close(self) -> None:
        self.mv.release()
        self.mm.close()

    def corrupt(self, what: str) -> IntegrityError:
        return IntegrityError(f"{self.path} is not a readable ext4 volume: {what}",
                              "the volume is damaged; delete it and build again")

    def inode(self, ino: int) -> bytes:
        g, i = divmod(ino - 1, self.ipg)
        off = self.itables[g] * self.bs + i * self.inode_size
        return bytes(self.mv[off:off + self.inode_size])

    def block(self, n: int, count: int = 1) -> memoryview:
        start = n * self.bs
        end = start + count * self.bs
        if end > len(self.mv):
            raise self.corrupt(f"block {n} lies beyond the end of the image")
        return self.mv[start:end]

    # -- file data ---------------------------------------------------------------------

    def extents(self, node: bytes | memoryview) -> Iterator[tuple[int, int, int, bool]]:
        """(logical block, physical block, length, uninitialised) of an extent (sub)tree."""
        magic, count, _max, depth = struct.unpack_from("<HHHH", node, 0)
        if magic != _EXTENT_MAGIC:
            raise self.corrupt("bad extent header")
        for k in range(count):
            off = 12 + 12 * k
            if depth == 0:
                lblk, length, hi, lo = struct.unpack_from("<IHHI", node, off)
                uninit = length > 32768
                yield lblk, lo | hi << 32, length - 32768 if uninit else length, uninit
            else:
                _lblk, lo, hi = struct.unpack_from("<IIH", node, off)
                yield from self.extents(self.block(lo | hi << 32))

    def runs(self, raw: bytes, size: int) -> Iterator[memoryview | bytes]:
        """The file's bytes in order (holes as zeros), ``size`` bytes in total."""
        flags = struct.unpack_from("<I", raw, 0x20)[0]
        if flags & _INLINE_DATA_FL:
            raise self.corrupt("inline data is not produced by kiln and not supported")
        bs = self.bs
        if flags & _EXTENTS_FL:
            exts = sorted(self.extents(raw[0x28:0x64]))
        else:  # block map: direct blocks only (slow symlinks of old-style filesystems)
            ptrs = struct.unpack_from("<12I", raw, 0x28)
            if size > 12 * bs:
                raise self.corrupt("indirect block maps are not supported")
            exts = [(i, p, 1, p == 0) for i, p in enumerate(ptrs) if p]
        pos = 0
        for lblk, pblk, length, uninit in exts:
            start = lblk * bs
            if start >= size:
                break
            if start > pos:
                yield from _zeros(start - pos)
                pos = start
            n = min(length * bs, size - start)
            if uninit:
                yield from _zeros(n)
            else:
                yield self.block(pblk, length)[:n]
            pos = start + n
        if pos < size:
            yield from _zeros(size - pos)

    def data(self, raw: bytes, size: int) -> bytes:
        return b"".join(self.runs(raw, size))

    # -- xattrs ------------------------------------------------------------------------

    def xattrs(self, raw: bytes) -> tuple[tuple[str, bytes], ...]:
        out: list[tuple[str, bytes]] = []
        if self.inode_size > 128:
            extra = struct.unpack_from("<H", raw, 0x80)[0]
            base = 128 + extra
            if base + 4 <= len(raw) and struct.unpack_from("<I", raw, base)[0] == _XATTR_MAGIC:
                out += self._xattr_entries(raw, base + 4, base + 4, len(raw))
        acl = struct.unpack_from("<I", raw, 0x68)[0] | struct.unpack_from("<H", raw, 0x76)[0] << 32
        if acl:
            blk = bytes(self.block(acl))
            if struct.unpack_from("<I", blk, 0)[0] != _XATTR_MAGIC:
                raise self.corrupt(f"bad xattr block {acl}")
            out += self._xattr_entries(blk, 32, 0, len(blk))
        return tuple(sorted(out))

    def _xattr_entries(self, buf: bytes, off: int, vbase: int,
                       end: int) -> Iterator[tuple[str, bytes]]:
        while off + 4 <= end and struct.unpack_from("<I", buf, off)[0] != 0:
            name_len, idx, voff, vinum, vsize = struct.unpack_from("<BBHII", buf, off)
            suffix = buf[off + 16:off + 16 + name_len].decode("utf-8", "surrogateescape")
            if vinum:  # ea_inode: the value is the content of another inode
                value = self.data(self.inode(vinum), vsize)
            else:
                value = buf[vbase + voff:vbase + voff + vsize]
            name = _XATTR_PREFIX.get(idx, f"?{idx}.") + suffix
            if idx in (2, 3):
                value = _acl_from_disk(value)
            yield name, value
            off += (16 + name_len + 3) & ~3


def _zeros(n: int) -> Iterator[bytes]:
    while n > 0:
        k = min(n, len(_ZEROS))
        yield _ZEROS[:k]
        n -= k


def _acl_from_disk(value: bytes) -> bytes:
    """ext4's compact POSIX ACL (version 1) -> the xattr form getxattr returns (version 2)."""
    if len(value) < 4 or struct.unpack_from("<I", value, 0)[0] != 1:
        return value
    out = [struct.pack("<I", 2)]
    off = 4
    while off + 4 <= len(value):
        tag, perm = struct.unpack_from("<HH", value, off)
        off += 4
        ident = 0xFFFFFFFF
        if tag in (0x02, 0x08):  # ACL_USER, ACL_GROUP carry an id
            ident = struct.unpack_from("<I", value, off)[0]
            off += 4
        out.append(struct.pack("<HHI", tag, perm, ident))
    return b"".join(out)


def _dirents(img: _Image, raw: bytes) -> Iterator[tuple[bytes, int, int]]:
    size = struct.unpack_from("<I", raw, 4)[0] | struct.unpack_from("<I", raw, 0x6C)[0] << 32
    data = img.data(raw, size)
    off = 0
    while off + 8 <= len(data):
        ino, rec_len, name_len, ftype = struct.unpack_from("<IHBB", data, off)
        if rec_len < 8:
            raise img.corrupt("bad directory entry")
        if ino:
            name = data[off + 8:off + 8 + name_len]
            if name not in (b".", b".."):
                yield name, ino, ftype
        off += rec_len


def walk(image: Path) -> dict[str, int]:
    """Every path of the volume (root ``""``) mapped to its inode number."""
    img = _Image(image)
    try:
        return _walk(img)
    finally:
        img.close()


def _walk(img: _Image) -> dict[str, int]:
    paths: dict[str, int] = {"": ROOT_INO}
    todo = [("", ROOT_INO)]
    while todo:
        dpath, dino = todo.pop()
        for name, ino, ftype in _dirents(img, img.inode(dino)):
            p = f"{dpath}/{os.fsdecode(name)}" if dpath else os.fsdecode(name)
            paths[p] = ino
            # The entry's file type (feature "filetype") saves reading every inode here.
            if ftype == 2 or (ftype == 0 and struct.unpack_from("<H", img.inode(ino), 0)[0]
                                 & 0o170000 == 0o040000):
                todo.append((p, ino))
    return paths


def read_tree(image: Path, *, keep_lost_found: bool = False) -> Tree:
    """The ``Tree`` a volume holds (see the module docstring for ``lost+found``)."""
    img = _Image(image)
    try:
        paths = _walk(img)
        by_ino: dict[int, list[str]] = {}
        for p, ino in paths.items():
            by_ino.setdefault(ino, []).append(p)
        tree: Tree = {}
        for ino, group in by_ino.items():
            group.sort(key=sort_key)
            e = _entry(img, group[0], img.inode(ino))
            tree[group[0]] = e
            for other in group[1:]:
                tree[other] = dataclasses.replace(e, path=other, link=group[0])
    finally:
        img.close()
    lf = tree.get("lost+found")
    if (not keep_lost_found and lf is not None and lf.kind is Kind.DIR and lf.mode == 0o700
            and lf.uid == 0 and lf.gid == 0 and not lf.xattrs
            and not any(p.startswith("lost+found/") for p in tree)):
        del tree["lost+found"]
    return tree


def _entry(img: _Image, path: str, raw: bytes) -> Entry:
    mode, uid_lo, size_lo = struct.unpack_from("<HHI", raw, 0)
    mtime = struct.unpack_from("<i", raw, 0x10)[0]
    gid_lo = struct.unpack_from("<H", raw, 0x18)[0]
    size = size_lo | struct.unpack_from("<I", raw, 0x6C)[0] << 32
    uid_hi, gid_hi = struct.unpack_from("<HH", raw, 0x78)
    kind = _KIND.get(mode & 0o170000)
    if kind is None:
        raise img.corrupt(f"/{path} has an unsupported file type {mode:o}")
    fields: dict[str, Any] = {"path": path, "kind": kind, "mode": mode & 0o7777,
                              "uid": uid_lo | uid_hi << 16, "gid": gid_lo | gid_hi << 16,
                              "mtime": mtime, "xattrs": img.xattrs(raw)}
    if kind is Kind.REG:
        h = hashlib.sha256()
        for chunk in img.runs(raw, size):
            h.update(chunk)
        fields["size"] = size
        fields["sha256"] = h.hexdigest()
    elif kind is Kind.SYMLINK:
        flags = struct.unpack_from("<I", raw, 0x20)[0]
        if size < 60 and not flags & (_EXTENTS_FL | _INLINE_DATA_FL):
            target = raw[0x28:0x28 + size]
        else:
            target = img.data(raw, size)
        fields["target"] = os.fsdecode(target)
    elif kind in (Kind.CHR, Kind.BLK):
        old, new = struct.unpack_from("<II", raw, 0x28)
        if old:
            fields["major"], fields["minor"] = (old >> 8) & 0xFF, old & 0xFF
        else:
            fields["major"] = (new & 0xFFF00) >> 8
            fields["minor"] = (new & 0xFF) | ((new >> 12) & 0xFFF00)
    return Entry(**fields)


def superblock(image: Path) -> dict[str, Any]:
    """The superblock facts kiln checks: uuid, hash seed, features, label, block counts."""
    with open(image, "rb") as f:
        f.seek(1024)
        sb = f.read(1024)
    if len(sb) < 1024 or struct.unpack_from("<H", sb, 0x38)[0] != 0xEF53:
        raise IntegrityError(f"{image} is not a readable ext4 volume: no ext2/3/4 superblock",
                             "the volume is damaged; delete it and build again")

    def u32(off: int) -> int:
        return int(struct.unpack_from("<I", sb, off)[0])

    compat, incompat, ro = u32(0x5C), u32(0x60), u32(0x64)
    is64 = bool(incompat & 0x80)
    features = [name for table, bits in ((FEATURES_COMPAT, compat),
                                         (FEATURES_INCOMPAT, incompat),
                                         (FEATURES_RO_COMPAT, ro))
                for bit, name in table.items() if bits & bit]
    return {
        "uuid": str(uuidlib.UUID(bytes=sb[0x68:0x78])),
        "hash_seed": str(uuidlib.UUID(bytes=sb[0xEC:0xFC])),
        "label": sb[0x78:0x88].rstrip(b"\0").decode("utf-8", "replace"),
        "features": sorted(features),
        "block_size": 1024 << u32(0x18),
        "blocks": u32(0x04) | (u32(0x150) << 32 if is64 else 0),
        "free_blocks": u32(0x0C) | (u32(0x158) << 32 if is64 else 0),
        "reserved_blocks": u32(0x08) | (u32(0x154) << 32 if is64 else 0),
        "inodes": u32(0x00),
        "free_inodes": u32(0x10),
        "inode_size": struct.unpack_from("<H", sb, 0x58)[0],
        "mkfs_time": u32(0x108),
        "write_time": u32(0x30),
    }
