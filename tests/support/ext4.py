"""Ext4 test helpers shared by the builder tests: a content ``Builder`` recording the true
metadata in a Tree, the ``sample`` tree, Tree -> tar -> mke2fs ``build`` and ``diff``."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
from pathlib import Path

from builder import mkfs, tarball
from builder.tree import COMPARED, Entry, Kind, Tree

CAP = bytes.fromhex("01000002" "00200000" "00000000" "00000000" "00000000")  # cap_net_bind
ACL = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, i) for t, p, i in (
    (0x01, 6, 0xFFFFFFFF), (0x02, 4, 1234), (0x04, 4, 0xFFFFFFFF), (0x10, 4, 0xFFFFFFFF),
    (0x20, 0, 0xFFFFFFFF)))
KEYS = {"uuid": mkfs.uuid_from("ab" * 32), "hash_seed": mkfs.uuid_from("cd" * 32),
        "label": "kiln-test"}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _rng_bytes(seed: int, n: int) -> bytes:
    out = bytearray()
    h = seed.to_bytes(8, "little")
    while len(out) < n:
        h = hashlib.sha256(h).digest()
        out += h * 64
    return bytes(out[:n])


class Builder:
    """Writes content under a root (as a rootless unpack would: plain files, our owner)
    and records the true metadata in a Tree."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tree: Tree = {"": Entry("", Kind.DIR, 0o755)}
        root.mkdir(parents=True, exist_ok=True)

    def _fs(self, path: str) -> bytes:
        return os.path.join(os.fsencode(self.root), os.fsencode(path))

    def dir(self, path: str, mode: int = 0o755, **kw: object) -> None:
        os.makedirs(self._fs(path), exist_ok=True)
        self.tree[path] = Entry(path, Kind.DIR, mode, **kw)  # type: ignore[arg-type]

    def file(self, path: str, data: bytes, mode: int = 0o644, *, sparse_to: int = 0,
             **kw: object) -> None:
        with open(self._fs(path), "wb") as f:
            if sparse_to:
                f.truncate(sparse_to - len(data))
                f.seek(sparse_to - len(data))
            f.write(data)
        full = (bytes(sparse_to - len(data)) + data) if sparse_to else data
        self.tree[path] = Entry(path, Kind.REG, mode, size=len(full), sha256=sha(full),
                                **kw)  # type: ignore[arg-type]

    def link(self, path: str, target: str) -> None:
        os.link(self._fs(target), self._fs(path))
        self.tree[path] = dataclasses.replace(self.tree[target], path=path, link=target)

    def symlink(self, path: str, target: str) -> None:
        os.symlink(os.fsencode(target), self._fs(path))
        self.tree[path] = Entry(path, Kind.SYMLINK, 0o777, target=target)

    def special(self, path: str, kind: Kind, mode: int, major: int = 0, minor: int = 0,
                **kw: object) -> None:
        # A rootless unpack leaves an empty file where a device was: so do we.
        open(self._fs(path), "wb").close()
        self.tree[path] = Entry(path, kind, mode, major=major, minor=minor,
                                **kw)  # type: ignore[arg-type]


def sample(root: Path, *, big_dir: int = 3000) -> Tree:
    b = Builder(root)
    b.dir("bin")
    b.dir("etc", 0o755, xattrs=(("trusted.overlay.opaque", b"y"), ("user.dir", b"d")))
    b.file("bin/su", b"\x7fELF setuid", 0o4755,
           xattrs=(("security.capability", CAP), ("user.comment", b"hi")))
    b.link("bin/su-hard", "bin/su")
    b.link("bin/zz-hard", "bin/su")
    b.file("bin/ping", b"ping", 0o755, xattrs=(("security.capability", CAP),))
    b.file("etc/acl", b"acl", 0o664, xattrs=(("system.posix_acl_access", ACL),))
    b.file("etc/big-xattr", b"", 0o600, xattrs=(("user.big", _rng_bytes(3, 3000)),
                                                ("user.small", b"\x00\x01")))
    b.file("etc/owned", b"owned", 0o640, uid=100000, gid=70000)
    b.file("etc/sgid", b"x", 0o2755, uid=65536, gid=65537)
    b.dir("etc/sticky", 0o1777)
    b.symlink("bin/sh", "dash")
    b.symlink("bin/long", "/" + "long-target/" * 20)
    b.symlink("bin/len59", "t" * 59)
    b.symlink("bin/len60", "t" * 60)
    b.dir("dev")
    b.special("dev/null", Kind.CHR, 0o666, 1, 3)
    b.special("dev/nvme0n1p9", Kind.BLK, 0o660, 259, 300000, gid=6)
    b.special("dev/sda", Kind.BLK, 0o660, 8, 0, gid=6)
    b.special("dev/initctl", Kind.FIFO, 0o600)
    b.dir("names", 0o700)
    b.file("names/new\nline", b"nl")
    b.file("names/caf\u00e9 \u65e5\u672c", b"utf8")
    b.file(os.fsdecode(b"names/bad\xff\xfe"), b"latin")
    b.file("names/" + "n" * 255, b"255")
    b.dir("data")
    b.file("data/empty", b"")
    b.file("data/big", _rng_bytes(1, 3 * 1024 * 1024 + 17))
    # Every other block zero: mke2fs skips zero blocks, so this file gets ~600 extents
    # (a depth-1 extent tree) and holes.
    chunks = [(_rng_bytes(i, 4096) if i % 2 else bytes(4096)) for i in range(1200)]
    b.file("data/holey", b"".join(chunks) + b"tail")
    b.file("data/sparse", b"end", sparse_to=32 * 1024 * 1024 + 3)
    b.dir("many")
    for i in range(big_dir):
        b.file(f"many/file-{i:05d}", b"" if i % 3 else str(i).encode())
    return b.tree


def build(tree: Tree, content: Path, image: Path, *, epoch: int = 1_700_000_000) -> None:
    tar = image.with_suffix(".tar")
    tarball.write_tar(tree, content, tar)
    mkfs.make_ext4(tar, image, mkfs.plan(tree), epoch=epoch, tree=tree, **KEYS)
    tar.unlink()


def diff(a: Tree, b: Tree) -> list[str]:
    out = []
    for p in sorted(set(a) | set(b)):
        x, y = a.get(p), b.get(p)
        if x is None or y is None:
            out.append(f"{p!r}: {x and x.describe()} vs {y and y.describe()}")
        elif any(getattr(x, f) != getattr(y, f) for f in COMPARED):
            out.append(f"{p!r}: {x.describe()} vs {y.describe()}")
    return out
