"""mkfs: the pure sizing core (properties), the exact argv, and reproducible real builds."""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from builder import ext4, mkfs, proc
from builder.tree import Entry, Kind, Tree
from helper.base.errors import BuildError
from tests.support.ext4 import KEYS, Builder, build, diff, sample

MIB = 1 << 20


# -- argv ------------------------------------------------------------------------------

def test_argv_exact() -> None:
    g = mkfs.Geometry(size=300 * MIB, inodes=12345)
    argv = mkfs.mke2fs_argv(Path("/w/volume.ext4"), g, source="/w/rootfs.tar",
                            uuid="11111111-2222-4333-8444-555555555555",
                            hash_seed="66666666-7777-4888-9999-aaaaaaaaaaaa", label="kiln")
    assert argv == [
        "-t", "ext4",
        "-O", "none,has_journal,ext_attr,resize_inode,dir_index,filetype,extent,64bit,"
              "flex_bg,sparse_super,large_file,huge_file,dir_nlink,extra_isize,metadata_csum",
        "-b", "4096",
        "-I", "256",
        "-N", "12345",
        "-m", "0",
        "-J", "size=16",
        "-U", "11111111-2222-4333-8444-555555555555",
        "-E", "hash_seed=66666666-7777-4888-9999-aaaaaaaaaaaa,nodiscard,lazy_itable_init=0,"
              "lazy_journal_init=0,root_owner=0:0",
        "-L", "kiln",
        "-d", "/w/rootfs.tar",
        "-F",
        "-q",
        "/w/volume.ext4",
        "76800",
    ]


def test_journal_policy() -> None:
    assert [mkfs.journal_blocks(n * MIB // 4096) * 4096 // MIB
            for n in (5, 127, 128, 1023, 1024, 2048, 16384)] == [4, 4, 16, 16, 32, 64, 128]


def test_debugfs_script_exact() -> None:
    assert mkfs.debugfs_script([(12, "user.a", "/t/0"), (2, "trusted.b", "/t/1")]) == \
        "ea_set -f /t/0 <12> user.a\nea_set -f /t/1 <2> trusted.b\n"


def test_uuid_from_is_deterministic() -> None:
    a = mkfs.uuid_from("0123456789abcdef" * 4)
    assert a == mkfs.uuid_from("0123456789ABCDEF" * 4)
    assert a == "01234567-89ab-4def-8123-456789abcdef"
    assert uuidlib.UUID(a).version == 4
    assert mkfs.uuid_from("not hex") == mkfs.uuid_from("not hex") != a


def test_version_error_text() -> None:
    assert mkfs.version_error((1, 47, 1)) is None
    assert mkfs.version_error((1, 48)) is None
    err = mkfs.version_error((1, 47, 0))
    assert err is not None
    assert err.message == \
        "mke2fs 1.47.0 is too old: kiln needs 1.47.1 or newer (tar input, SOURCE_DATE_EPOCH)"
    assert err.hint == ("install e2fsprogs from bookworm-backports: "
                        "apt-get install -t bookworm-backports e2fsprogs")


def test_installed_mke2fs_is_new_enough() -> None:
    assert mkfs.mke2fs_version() >= (1, 47, 1)
    mkfs.check_version()


# -- plan (pure) -------------------------------------------------------------------------

_names = st.text(alphabet="abcdefghij", min_size=1, max_size=12)
_files = st.lists(st.tuples(_names, st.integers(0, 50 * MIB),
                            st.booleans()), max_size=40, unique_by=lambda t: t[0])


def _tree(files: list[tuple[str, int, bool]]) -> Tree:
    tree: Tree = {"": Entry("", Kind.DIR, 0o755), "d": Entry("d", Kind.DIR, 0o755)}
    for name, size, in_dir in files:
        p = f"d/{name}" if in_dir else name
        if p == "d":
            continue
        tree[p] = Entry(p, Kind.REG, 0o644, size=size)
    return tree


@settings(max_examples=150, deadline=None)
@given(_files, st.tuples(_names, st.integers(0, 50 * MIB)),
       st.floats(0, 2, allow_nan=False))
def test_plan_is_monotone_in_content(files: list[tuple[str, int, bool]],
                                     extra: tuple[str, int], headroom: float) -> None:
    small = _tree(files)
    big = dict(small)
    name = "x-" + extra[0]
    big[name] = Entry(name, Kind.REG, 0o644, size=extra[1])
    a, b = mkfs.plan(small, headroom=headroom), mkfs.plan(big, headroom=headroom)
    assert b.size >= a.size
    assert b.inodes >= a.inodes
    assert mkfs.need(big) >= mkfs.need(small)


@settings(max_examples=150, deadline=None)
@given(_files, st.floats(0, 2, allow_nan=False))
def test_plan_is_never_below_the_need(files: list[tuple[str, int, bool]],
                                      headroom: float) -> None:
    tree = _tree(files)
    g = mkfs.plan(tree, headroom=headroom)
    content = sum(e.size for e in tree.values())
    assert g.size >= mkfs.need(tree) >= content
    assert g.size - content >= mkfs.MIN_FREE + content * headroom - 4096
    assert g.size % MIB == 0
    assert g.inodes >= len(tree) + mkfs.RESERVED_INODES + 1


@settings(max_examples=100, deadline=None)
@given(_files, st.integers(0, 4096 * MIB))
def test_explicit_size_is_honoured_or_refused(files: list[tuple[str, int, bool]],
                                              size: int) -> None:
    tree = _tree(files)
    needed = mkfs.need(tree)
    if size >= needed:
        assert mkfs.plan(tree, size=size).size == size // 4096 * 4096
    else:
        with pytest.raises(BuildError):
            mkfs.plan(tree, size=size)


def test_too_small_message_exact() -> None:
    tree = _tree([("a", 140 * MIB, False)])
    with pytest.raises(BuildError) as e:
        mkfs.plan(tree, size=10 * MIB)
    need_mib = -(-mkfs.need(tree) // MIB)
    assert e.value.message == \
        f"volume size 10M is too small: the content needs at least {need_mib}M"
    assert e.value.hint == \
        "raise size in the recipe, or remove it to size the volume automatically"
    assert 140 < need_mib < 160


def test_extra_bytes_and_inode_heavy_trees() -> None:
    base = _tree([])
    assert mkfs.plan(base, extra_bytes=100 * MIB).size >= mkfs.plan(base).size + 100 * MIB
    many: Tree = {"": Entry("", Kind.DIR, 0o755)}
    for i in range(70000):
        many[f"f{i}"] = Entry(f"f{i}", Kind.FIFO, 0o644)
    g = mkfs.plan(many)
    # More inodes than one group can hold (32768): the plan grows to enough groups.
    assert g.inodes >= 70000 * 1.25
    assert g.size >= 2 * 32768 * 4096


# -- real builds ---------------------------------------------------------------------------

def test_need_is_enough_for_mke2fs(tmp_path: Path) -> None:
    tree = sample(tmp_path / "c", big_dir=200)
    tar = tmp_path / "t.tar"
    from builder import tarball

    tarball.write_tar(tree, tmp_path / "c", tar)
    g = mkfs.plan(tree, size=mkfs.need(tree))
    mkfs.make_ext4(tar, tmp_path / "v.ext4", g, epoch=0, tree=tree, **KEYS)
    assert diff(tree, ext4.read_tree(tmp_path / "v.ext4")) == []


@pytest.mark.parametrize("files", [0, 1, 2000])
def test_need_is_enough_for_small_trees(tmp_path: Path, files: int) -> None:
    b = Builder(tmp_path / "c")
    for i in range(files):
        b.file(f"f{i}", b"x" * (i * 97 % 9000))
    from builder import tarball

    tarball.write_tar(b.tree, b.root, tmp_path / "t.tar")
    g = mkfs.plan(b.tree, size=mkfs.need(b.tree))
    mkfs.make_ext4(tmp_path / "t.tar", tmp_path / "v.ext4", g, epoch=0, tree=b.tree, **KEYS)
    assert diff(b.tree, ext4.read_tree(tmp_path / "v.ext4")) == []


def test_mke2fs_out_of_space_is_a_build_error(tmp_path: Path) -> None:
    b = Builder(tmp_path / "c")
    b.file("blob", bytes(range(256)) * 4096 * 30)  # 30 MiB without zero blocks
    from builder import tarball

    tarball.write_tar(b.tree, b.root, tmp_path / "t.tar")
    with pytest.raises(BuildError) as e:
        mkfs.make_ext4(tmp_path / "t.tar", tmp_path / "v.ext4",
                       mkfs.Geometry(size=20 * MIB, inodes=1024), epoch=0, tree=b.tree, **KEYS)
    need_mib = -(-mkfs.need(b.tree) // MIB)
    assert e.value.message == ("volume size 20M is too small for the content; the content "
                               f"needs at least {need_mib}M")


def test_unwritable_xattr_name_is_refused(tmp_path: Path) -> None:
    b = Builder(tmp_path / "c")
    b.dir("d", xattrs=(("user.has space", b"1"),))
    with pytest.raises(BuildError) as e:
        build(b.tree, b.root, tmp_path / "v.ext4")
    assert e.value.message == "/d has an xattr name kiln cannot write: 'user.has space'"


def test_oversized_xattr_is_a_build_error(tmp_path: Path) -> None:
    b = Builder(tmp_path / "c")
    b.dir("d", xattrs=(("user.huge", b"x" * 5000),))
    with pytest.raises(BuildError) as e:
        build(b.tree, b.root, tmp_path / "v.ext4")
    assert e.value.message == (
        "debugfs could not set the image's xattrs: ea_set: Insufficient space to store "
        "extended attribute data while setting extended attribute")


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _copy_reversed(tree: Tree, src: Path, dst: Path) -> None:
    """The same content as ``src`` under ``dst``, every directory's entries created in
    reverse order, hard links as separate files, device nodes and fifos as empty files."""
    def fs(root: Path, p: str) -> bytes:
        return os.path.join(os.fsencode(root), os.fsencode(p))

    dst.mkdir(parents=True)
    dirs = [p for p in tree if p and tree[p].kind is Kind.DIR]
    for p in sorted(dirs, key=lambda p: (p.count("/"), p), reverse=True):
        os.makedirs(fs(dst, p), exist_ok=True)
    for p in sorted(tree, reverse=True):
        e = tree[p]
        if e.kind is Kind.REG:
            with open(fs(src, p), "rb") as i, open(fs(dst, p), "wb") as o:
                o.write(i.read())
            os.utime(fs(dst, p), (12345, 12345))
        elif e.kind is Kind.SYMLINK:
            os.symlink(os.fsencode(e.target), fs(dst, p))
        elif e.kind is not Kind.DIR:
            open(fs(dst, p), "wb").close()


def _reproduce(first: Path, second: Path, out: Path) -> None:
    with _umask(0o022):
        tree = sample(first, big_dir=300)
    with _umask(0o077):
        _copy_reversed(tree, first, second)
    build(tree, first, out / "a.ext4", epoch=1_600_000_000)
    time.sleep(1.1)  # a later wall clock must not show
    build(tree, second, out / "b.ext4", epoch=1_600_000_000)
    assert _digest(out / "a.ext4") == _digest(out / "b.ext4")
    assert proc.run("e2fsck", ["-fn", str(out / "b.ext4")]).code == 0


@pytest.mark.slow
def test_reproducible_across_roots_orders_umasks_and_times(tmp_path: Path) -> None:
    _reproduce(tmp_path / "one", tmp_path / "two", tmp_path)


@pytest.mark.slow
@pytest.mark.root
def test_reproducible_across_filesystems(tmp_path: Path) -> None:
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    proc.run("mount", ["-t", "tmpfs", "-o", "size=256m", "kiln-test", str(mnt)])
    try:
        _reproduce(tmp_path / "disk", mnt / "content", tmp_path)
    finally:
        proc.run("umount", [str(mnt)])


def test_epoch_changes_only_times(tmp_path: Path) -> None:
    b = Builder(tmp_path / "c")
    b.file("f", b"x")
    build(b.tree, b.root, tmp_path / "a.ext4", epoch=0)
    build(b.tree, b.root, tmp_path / "b.ext4", epoch=1)
    assert _digest(tmp_path / "a.ext4") != _digest(tmp_path / "b.ext4")
    assert ext4.superblock(tmp_path / "b.ext4")["mkfs_time"] == 1
    assert diff(ext4.read_tree(tmp_path / "a.ext4"), ext4.read_tree(tmp_path / "b.ext4")) == []


@pytest.mark.root
def test_same_bytes_when_mke2fs_runs_unprivileged(tmp_path: Path) -> None:
    import shutil
    import tempfile

    from builder import tarball

    work = Path(tempfile.mkdtemp(prefix="kiln-test-nobody-", dir="/tmp"))
    try:
        os.chmod(work, 0o755)
        tree = sample(tmp_path / "c", big_dir=50)
        tar = work / "t.tar"
        tarball.write_tar(tree, tmp_path / "c", tar)
        os.chmod(tar, 0o644)
        g = mkfs.plan(tree)
        mkfs.make_ext4(tar, work / "root.ext4", g, epoch=7, tree=tree, **KEYS)
        user = work / "user.ext4"
        with open(user, "wb") as f:
            f.truncate(g.size)
        os.chown(user, 65534, 65534)
        argv = mkfs.mke2fs_argv(user, g, source=str(tar), **KEYS)
        proc.run("setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups",
                             proc.which("mke2fs"), *argv], env=mkfs.tool_env(7))
        mkfs.apply_xattrs(user, tree, epoch=7)
        assert _digest(work / "root.ext4") == _digest(user)
    finally:
        shutil.rmtree(work)
