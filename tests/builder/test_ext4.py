"""Tree -> tar -> mke2fs -> read_tree round trips, checked against debugfs/dumpe2fs/e2fsck."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from builder import ext4, mkfs, proc
from builder.tree import Kind, Tree
from helper.base.errors import IntegrityError
from tests.support.ext4 import KEYS, Builder, build, diff, sample


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
