"""The reflink and copy backends for real: loop-mounted btrfs and XFS pools made by the
tests, small ext4 volumes made with mke2fs, checked with sha256, debugfs, dumpe2fs,
e2fsck, filefrag and statvfs. Every fixture unmounts and detaches what it made, even
when a test fails."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder.pool import init_pool, open_pool, snapshot_refs
from builder.pool.base import Pool
from helper.base.errors import KilnError, NotFound, UsageError
from helper.base.fileops import PoolFull
from tests.support.pool import force_cleanup, leftovers, make_volume, sha

pytestmark = [pytest.mark.root, pytest.mark.loop]


@pytest.fixture
def kroot(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "root"
    for d in ("locks", "volumes", "tmp", "keys", "blobs/sha256"):
        (root / d).mkdir(parents=True)
    yield root
    force_cleanup(root)


@pytest.fixture(params=["btrfs", "xfs"])
def fspool(request: pytest.FixtureRequest, kroot: Path) -> Iterator[tuple[Pool, Path]]:
    pool = init_pool(kroot, backend="reflink", size=512 << 20, fs=request.param)
    yield pool, kroot
    with contextlib.suppress(KilnError):
        pool.destroy(force=True)


def test_snapshot_equals_base_and_writes_stay_private(fspool: tuple[Pool, Path]) -> None:
    pool, root = fspool
    vid, src = make_volume(root)
    base = pool.import_volume(vid, src)
    assert sha(base) == vid[7:]
    assert pool.import_volume(vid, src) == base  # idempotent
    a = pool.create_snapshot(vid)
    b = pool.create_snapshot(vid)
    assert a.id != b.id
    assert a.thin
    assert a.size == os.path.getsize(src)
    assert sha(a.path) == sha(b.path) == vid[7:]
    hello = root / "hello.txt"
    hello.write_text("hello from a\n")
    subprocess.run(["debugfs", "-w", "-R", f"write {hello} hello.txt", a.path], check=True,
                   capture_output=True)
    cat = subprocess.run(["debugfs", "-R", "cat /hello.txt", a.path], capture_output=True,
                         text=True, check=True)
    assert cat.stdout == "hello from a\n"
    subprocess.run(["e2fsck", "-fn", a.path], check=True, capture_output=True)
    assert sha(a.path) != vid[7:]
    assert sha(base) == vid[7:]
    assert sha(b.path) == vid[7:]
    # Shared extents: the untouched sibling still shares all its data with the base.
    ff = subprocess.run(["filefrag", "-v", b.path], capture_output=True, text=True, check=True)
    assert "shared" in ff.stdout
    assert snapshot_refs(root) == {vid}
    assert {s.id for s in pool.list_snapshots()} == {a.id, b.id}
    pool.remove_snapshot(a.id)
    assert not os.path.exists(a.path)
    with pytest.raises(NotFound, match=f"no snapshot {a.id}"):
        pool.remove_snapshot(a.id)


def test_larger_snapshot_grows_its_ext4_only(fspool: tuple[Pool, Path]) -> None:
    pool, root = fspool
    vid, src = make_volume(root)
    pool.import_volume(vid, src)
    big = pool.create_snapshot(vid, size=256 << 20)
    assert os.path.getsize(big.path) == 256 << 20
    assert big.size == 256 << 20

    def blocks(p: str) -> int:
        out = subprocess.run(["dumpe2fs", "-h", p], capture_output=True, text=True,
                             check=True).stdout
        return int(next(ln for ln in out.splitlines() if ln.startswith("Block count:"))
                   .split()[-1])

    assert blocks(big.path) == (256 << 20) // 4096
    assert blocks(str(pool.volume_path(vid))) == (64 << 20) // 4096
    subprocess.run(["e2fsck", "-fn", big.path], check=True, capture_output=True)
    assert sha(pool.volume_path(vid)) == vid[7:]
    with pytest.raises(UsageError, match="smaller than its base"):
        pool.create_snapshot(vid, size=32 << 20)
    assert len(pool.list_snapshots()) == 1


@pytest.mark.slow
def test_twenty_snapshots_share_the_base(kroot: Path) -> None:
    data = kroot / "tmp" / "data"
    data.mkdir(parents=True)
    with open(data / "blob", "wb") as f:
        for _ in range(6):
            f.write(os.urandom(64 << 20))  # 384 MiB of incompressible data in a 2 GiB ext4
    vid, src = make_volume(kroot, "2G", data)
    (data / "blob").unlink()
    pool = init_pool(kroot, backend="reflink", size=3 << 30, fs="btrfs")
    try:
        pool.import_volume(vid, src)
        os.sync()
        used0 = pool.status()["used"]
        snaps = [pool.create_snapshot(vid) for _ in range(20)]
        for i, s in enumerate(snaps):  # a 1 MiB private delta in each
            with open(s.path, "r+b") as f:
                f.seek((1 << 30) + i * (4 << 20))
                f.write(os.urandom(1 << 20))
        os.sync()
        st = pool.status()
        delta = st["used"] - used0
        assert st["snapshots"] == 20
        # 20 full copies would be 7.5 GiB; shared, it is the 20 MiB of deltas plus metadata.
        assert used0 > 384 << 20
        assert delta < 20 * (1 << 20) + (64 << 20), delta
        with open(snaps[0].path, "rb") as a, open(pool.volume_path(vid), "rb") as base:
            a.seek(1 << 30)
            base.seek(1 << 30)
            assert a.read(1 << 20) != base.read(1 << 20)
    finally:
        pool.destroy(force=True)
    assert leftovers(kroot) == ([], [])


def test_copy_backend_is_not_thin(kroot: Path) -> None:
    vid, src = make_volume(kroot)
    pool = init_pool(kroot, backend="copy")
    assert pool.status()["thin"] is False
    assert pool.status()["backend"] == "copy"
    pool.import_volume(vid, src)
    s = pool.create_snapshot(vid, size=128 << 20)
    assert s.thin is False
    assert s.summary()["thin"] is False
    subprocess.run(["e2fsck", "-fn", s.path], check=True, capture_output=True)
    pool.destroy(force=True)
    assert not (kroot / "pool").exists()


@pytest.mark.slow
def test_full_pool_is_a_clear_error_and_leaves_nothing(kroot: Path) -> None:
    pool = init_pool(kroot, backend="reflink", size=256 << 20, fs="btrfs")
    try:
        hexid = "f" * 64
        big = kroot / "volumes" / hexid / "volume.ext4"
        big.parent.mkdir()
        with open(big, "wb") as f:
            for _ in range(6):
                f.write(os.urandom(64 << 20))
        with pytest.raises(PoolFull, match="the pool is full"):
            pool.import_volume(f"sha256:{hexid}", big)
        assert os.listdir(kroot / "pool" / "fs" / "volumes") == []
        assert pool.status()["volumes"] == 0
    finally:
        pool.destroy(force=True)


def test_reboot_remounts_and_destroy_leaves_no_mount_or_loop(kroot: Path) -> None:
    vid, src = make_volume(kroot)
    pool = init_pool(kroot, backend="reflink", size=512 << 20, fs="btrfs")
    pool.import_volume(vid, src)
    snap = pool.create_snapshot(vid)
    # "Reboot": unmount and detach behind kiln's back.
    force_cleanup(kroot)
    assert leftovers(kroot) == ([], [])
    again = open_pool(kroot)
    assert again is not None
    assert sha(again.get_snapshot(snap.id).path) == vid[7:]
    mounts, loops = leftovers(kroot)
    assert len(mounts) == 1
    assert len(loops) == 1
    # The loop detaches itself with its mount (a crash between attach and mount frees it).
    flags = subprocess.run(["losetup", "--list", "--noheadings", "--output", "AUTOCLEAR",
                            loops[0]], capture_output=True, text=True, check=True).stdout
    assert flags.strip() == "1"
    with pytest.raises(KilnError, match="still holds 1 snapshot"):
        again.destroy()
    again.destroy(force=True)
    assert leftovers(kroot) == ([], [])
    assert not (kroot / "pool").exists()


def test_symlinked_pool_files_are_refused(kroot: Path, tmp_path: Path) -> None:
    pool = init_pool(kroot, backend="reflink", size=512 << 20, fs="btrfs")
    force_cleanup(kroot)  # down, as after a reboot
    img = kroot / "pool" / "pool.img"
    elsewhere = tmp_path / "elsewhere.img"
    os.rename(img, elsewhere)
    os.symlink(elsewhere, img)
    with pytest.raises(UsageError, match="is a symlink"):
        open_pool(kroot)
    assert leftovers(kroot) == ([], [])
    os.unlink(img)
    os.rename(elsewhere, img)
    cfg = kroot / "pool" / "config.json"
    os.rename(cfg, tmp_path / "config.json")
    os.symlink(tmp_path / "config.json", cfg)
    with pytest.raises(KilnError, match="cannot read the pool config"):
        open_pool(kroot)
    os.unlink(cfg)
    os.rename(tmp_path / "config.json", cfg)
    assert open_pool(kroot) is not None
    pool.destroy(force=True)
