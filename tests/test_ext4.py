"""Tree -> tar -> mke2fs -> read_tree round trips, checked against debugfs/dumpe2fs/e2fsck."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import struct
from pathlib import Path

import pytest

from builder import ext4, mkfs, proc, tarball
from builder.tree import COMPARED, Entry, Kind, Tree
from helper.base.errors import IntegrityError

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


def debugfs(image: Path, cmd: str) -> str:
    return proc.run("debugfs", ["-R", cmd, str(image)], env={"DEBUGFS_PAGER": "__none__"}).text


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tree, Path]:
    d = tmp_path_factory.mktemp("ext4")
    tree = sample(d / "content")
    build(tree, d / "content", d / "vol.ext4")
    return tree, d / "vol.ext4"


def test_round_trip_equals_the_tree(built: tuple[Tree, Path]) -> None:
    tree, image = built
    got = ext4.read_tree(image)
    assert diff(tree, got) == []
    # The hard-link group keeps the setuid mode although the link entries come later.
    assert got["bin/zz-hard"].mode == 0o4755
    assert got["bin/zz-hard"].link == "bin/su"


def test_e2fsck_is_clean(built: tuple[Tree, Path]) -> None:
    _, image = built
    res = proc.run("e2fsck", ["-fn", str(image)])
    assert res.code == 0


def test_debugfs_agrees(built: tuple[Tree, Path]) -> None:
    _, image = built
    st = debugfs(image, "stat /bin/su")
    assert re.search(r"Mode:\s+04755", st)
    assert "Links: 3" in st
    st = debugfs(image, "stat /etc/owned")
    assert re.search(r"User:\s+100000\s+Group:\s+70000", st)
    st = debugfs(image, "stat /dev/nvme0n1p9")
    assert "Device major/minor number: 259:300000" in st
    ea = debugfs(image, "ea_list /bin/su")
    assert "security.capability (20)" in ea
    assert 'user.comment (2) = "hi"' in ea
    ea = debugfs(image, "ea_list /etc")
    assert 'trusted.overlay.opaque (1) = "y"' in ea
    assert "user.big (3000)" in debugfs(image, "ea_list /etc/big-xattr")
    assert debugfs(image, "stat /data/holey").count("(") > 50  # many extents
    assert "Level Entries" in debugfs(image, "ex /data/holey")


def test_superblock_matches_dumpe2fs(built: tuple[Tree, Path]) -> None:
    _, image = built
    sb = ext4.superblock(image)
    text = proc.run("dumpe2fs", ["-h", str(image)]).text
    fields = dict(re.findall(r"^([^:\n]+):\s+(.*)$", text, re.M))
    assert fields["Filesystem UUID"] == sb["uuid"] == KEYS["uuid"]
    assert fields["Directory Hash Seed"] == sb["hash_seed"] == KEYS["hash_seed"]
    assert fields["Filesystem volume name"] == sb["label"] == "kiln-test"
    assert sorted(fields["Filesystem features"].split()) == sb["features"]
    assert sb["features"] == sorted(mkfs.FEATURES)
    assert int(fields["Block count"]) == sb["blocks"]
    assert int(fields["Free blocks"]) == sb["free_blocks"]
    assert int(fields["Reserved block count"]) == sb["reserved_blocks"] == 0
    assert int(fields["Inode count"]) == sb["inodes"]


def test_htree_directories_read_the_same(built: tuple[Tree, Path], tmp_path: Path) -> None:
    tree, image = built
    copy = tmp_path / "indexed.ext4"
    shutil.copyfile(image, copy)
    # e2fsck -D rebuilds every directory as an htree index: the reader must not care.
    proc.run("e2fsck", ["-fyD", str(copy)], ok_codes=(0, 1))
    assert "Root node dump" in debugfs(copy, "htree /many")
    assert diff(tree, ext4.read_tree(copy)) == []


def test_lost_found_is_dropped_only_when_mke2fs_made_it(built: tuple[Tree, Path]) -> None:
    _, image = built
    assert "lost+found" not in ext4.read_tree(image)
    kept = ext4.read_tree(image, keep_lost_found=True)["lost+found"]
    assert (kept.kind, kept.mode, kept.uid, kept.gid) == (Kind.DIR, 0o700, 0, 0)


def test_an_image_lost_found_is_kept(tmp_path: Path) -> None:
    b = Builder(tmp_path / "c")
    b.dir("lost+found", 0o755, uid=5)
    build(b.tree, b.root, tmp_path / "v.ext4")
    assert diff(b.tree, ext4.read_tree(tmp_path / "v.ext4")) == []


def test_walk_maps_paths_to_inodes(built: tuple[Tree, Path]) -> None:
    _, image = built
    inodes = ext4.walk(image)
    assert inodes[""] == 2
    assert inodes["bin/su"] == inodes["bin/su-hard"] == inodes["bin/zz-hard"]
    assert f"Inode: {inodes['etc/owned']} " in debugfs(image, "stat /etc/owned")


def test_not_ext4_is_an_integrity_error(tmp_path: Path) -> None:
    bad = tmp_path / "junk.img"
    bad.write_bytes(bytes(8192))
    with pytest.raises(IntegrityError) as e:
        ext4.read_tree(bad)
    assert e.value.message == f"{bad} is not a readable ext4 volume: no ext2/3/4 superblock"
    with pytest.raises(IntegrityError):
        ext4.superblock(bad)


@pytest.mark.slow
def test_twenty_thousand_entry_directory(tmp_path: Path) -> None:
    # mke2fs 1.47.2 links tar entries in O(n^2) per directory: ~20 s here.
    b = Builder(tmp_path / "c")
    b.dir("d")
    for i in range(20000):
        b.special(f"d/entry-{i:05d}", Kind.FIFO, 0o644)
    image = tmp_path / "v.ext4"
    build(b.tree, b.root, image)
    assert diff(b.tree, ext4.read_tree(image)) == []
    proc.run("e2fsck", ["-fyD", str(image)], ok_codes=(0, 1))
    assert "Root node dump" in debugfs(image, "htree /d")
    assert diff(b.tree, ext4.read_tree(image)) == []
