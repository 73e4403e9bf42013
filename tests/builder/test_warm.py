"""Warm images' pure key and their store (``builder.warm``): any input change changes
the id; an image is published whole by a rename; a volume's images go with it."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from builder import warm
from builder.root import Root
from helper.base.errors import NotFound, UsageError
from tests.support.timing import limit

KEY = warm.WarmKey(volume="sha256:" + "a" * 64, kernel_sha256="b" * 64,
                   initrd_sha256="c" * 64, init_sha256="d" * 64, vmm="qemu",
                   vmm_version="QEMU emulator version 7.2.22", accel="tcg",
                   cpu_model="qemu64", memory_mib=512, cpus=1, disk_size=None,
                   devices="qemu-microvm:v1", cmdline="console=ttyS0 init_on_free=1")
FIELDS = [f.name for f in dataclasses.fields(warm.WarmKey)]


@given(field=st.sampled_from(FIELDS), text=st.text(min_size=1, max_size=20),
       number=st.integers(min_value=1, max_value=1 << 20))
def test_any_change_changes_the_id(field: str, text: str, number: int) -> None:
    old = getattr(KEY, field)
    new: object = number if isinstance(old, int) or old is None else text
    if new == old:
        new = number + 1 if isinstance(new, int) else text + "x"
    other = dataclasses.replace(KEY, **{field: new})
    assert warm.key_id(other) != warm.key_id(KEY)
    assert warm.key_id(dataclasses.replace(KEY)) == warm.key_id(KEY)  # and only then


def test_id_is_hex_and_stable() -> None:
    assert warm.ID_RE.fullmatch(warm.key_id(KEY))
    assert warm.key_id(KEY) == warm.key_id(warm.WarmKey(**dataclasses.asdict(KEY)))


def _publish(root: Root, key: warm.WarmKey) -> warm.WarmRecord:
    image_id = warm.key_id(key)
    with warm.key_lock(root, image_id), root.workdir("warm") as work:
        (work / warm.STATE).write_bytes(b"s" * 5000)
        (work / warm.DISK).write_bytes(b"d" * 5000)
        return warm.publish(root, work, image_id, key.volume, "qemu", key.memory_mib,
                            key.cpus)


def test_publish_find_list_remove(tmp_path: Path) -> None:
    root = Root(tmp_path / "root").ensure()
    rec = _publish(root, KEY)
    assert rec.bytes >= 10000
    assert rec.volume == KEY.volume
    assert warm.find(root, rec.id) == rec
    assert warm.list_images(root) == [rec]
    assert os.listdir(root.tmp) == []  # the work directory became the image
    assert sorted(os.listdir(warm.image_dir(root, rec.id))) == ["disk", "state", "warm.json"]
    warm.remove(root, rec.id)
    assert warm.list_images(root) == []
    assert warm.find(root, rec.id) is None
    with pytest.raises(NotFound):
        warm.remove(root, rec.id)
    with pytest.raises(UsageError):
        warm.remove(root, "../x")


def test_a_volumes_images_go_with_it(tmp_path: Path) -> None:
    root = Root(tmp_path / "root").ensure()
    a = _publish(root, KEY)
    b = _publish(root, dataclasses.replace(KEY, memory_mib=256))
    c = _publish(root, dataclasses.replace(KEY, volume="sha256:" + "e" * 64))
    assert sorted(warm.remove_for_volumes(root, [KEY.volume])) == sorted([a.id, b.id])
    assert warm.list_images(root) == [c]


def test_a_killed_creation_leaves_only_what_recovery_removes(tmp_path: Path) -> None:
    """A work directory whose maker is gone (its flock free) is swept by Root.recover; the
    store never sees it."""
    root = Root(tmp_path / "root").ensure()
    dead = root.tmp / "warm-1-deadbeef"
    dead.mkdir()
    (dead / warm.STATE).write_bytes(b"partial")
    assert warm.list_images(root) == []
    assert dead in root.recover()
    assert not dead.exists()


def test_clone_file_is_a_sparse_copy(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    with open(src, "wb") as f:
        f.truncate(64 << 20)
        f.seek(32 << 20)
        f.write(b"data")
    dst.write_bytes(b"old contents that must go" * 1000)
    warm.clone_file(src, dst)
    assert dst.stat().st_size == 64 << 20
    assert dst.read_bytes() == src.read_bytes()
    assert dst.stat().st_blocks * 512 < 1 << 20  # the holes stayed holes
    new = tmp_path / "new"
    warm.clone_file(src, new)
    assert new.stat().st_mode & 0o777 == 0o600


@given(st.lists(st.tuples(st.integers(0, 63), st.binary(min_size=1, max_size=9000)),
                max_size=8), st.integers(0, 4095))
def test_write_sparse_keeps_the_bytes_and_only_non_zero_blocks(
        writes: list[tuple[int, bytes]], tail: int) -> None:
    """A saved memory (a memfd) into a file: the same bytes, holes where a 4 KiB block is
    all zero (what the guest zeroed costs the image nothing)."""
    import tempfile

    size = 64 * 4096 + tail
    src = os.memfd_create("t")
    try:
        os.ftruncate(src, size)
        for block, data in writes:
            os.pwrite(src, data[:size - block * 4096], block * 4096)
        os.pwrite(src, bytes(4096), 5 * 4096)  # an allocated block of zeros: a hole
        want = os.pread(src, size, 0)
        with tempfile.TemporaryDirectory() as d:
            dst = Path(d) / "mem"
            warm.write_sparse(src, dst)
            assert dst.read_bytes() == want
            assert dst.stat().st_mode & 0o777 == 0o600
            nonzero = sum(1 for i in range(0, size, 4096) if any(want[i:i + 4096]))
            assert dst.stat().st_blocks * 512 <= nonzero * 4096 + 4096  # fs rounding
            with pytest.raises(FileExistsError):
                warm.write_sparse(src, dst)  # never over an existing file
    finally:
        os.close(src)


def test_gc_removes_the_images_of_volumes_that_are_gone(tmp_path: Path) -> None:
    from builder.gc import run_gc

    root = Root(tmp_path / "root").ensure()
    rec = _publish(root, KEY)  # its volume is not in the store
    report = run_gc(root, keep_seconds=0, dry_run=True)
    assert warm.list_images(root) == [rec]  # a dry run removes nothing
    report = run_gc(root, keep_seconds=0, dry_run=False)
    assert f"warm/{rec.id}" in report.removed_leftovers
    assert warm.list_images(root) == []


_IMAGES = st.lists(st.tuples(st.integers(0, 50), st.integers(0, 1000)), max_size=12)


def _records(spec: list[tuple[int, int]]) -> list[warm.WarmRecord]:
    return [warm.WarmRecord(f"{i:064x}", KEY.volume, "qemu", 512, 1, size, float(created))
            for i, (created, size) in enumerate(spec)]


@given(spec=_IMAGES, cap=st.integers(0, 3000), new_bytes=st.integers(0, 1500))
def test_prune_plan_removes_the_oldest_until_it_fits(spec: list[tuple[int, int]], cap: int,
                                                     new_bytes: int) -> None:
    others = _records(spec)
    plan = warm.prune_plan(others, cap, new_bytes)
    assert set(plan.remove) <= {r.id for r in others}  # never the new image
    assert len(set(plan.remove)) == len(plan.remove)
    kept = [r for r in others if r.id not in plan.remove]
    total = new_bytes + sum(r.bytes for r in kept)
    assert plan.over == (new_bytes > cap)
    if plan.over:
        assert kept == []  # said plainly, and everything else went
    else:
        assert total <= cap
    order = [r.id for r in sorted(others, key=lambda r: (r.created, r.id))]
    assert list(plan.remove) == order[:len(plan.remove)]  # the oldest first, in order
    if plan.remove:  # and no more than needed: one fewer would not fit
        last = next(r for r in others if r.id == plan.remove[-1])
        assert total + last.bytes > cap


def test_prune_plan_keeps_everything_that_fits() -> None:
    others = _records([(3, 100), (1, 100), (2, 100)])
    assert warm.prune_plan(others, 400, 100) == warm.PrunePlan((), False)
    assert warm.prune_plan(others, 300, 100).remove == (others[1].id,)
    assert warm.prune_plan(others, 50, 100) == warm.PrunePlan(
        (others[1].id, others[2].id, others[0].id), True)


def test_the_cap_comes_from_the_environment() -> None:
    assert warm.max_bytes({}) == 4 << 30
    assert warm.max_bytes({"KILN_WARM_MAX": "300M"}) == 300 << 20
    with pytest.raises(UsageError, match="KILN_WARM_MAX"):
        warm.max_bytes({"KILN_WARM_MAX": "lots"})


def test_prune_removes_the_oldest_from_the_store(tmp_path: Path) -> None:
    root = Root(tmp_path / "root").ensure()
    recs = [_publish(root, dataclasses.replace(KEY, memory_mib=m)) for m in (256, 512, 1024)]
    for i, rec in enumerate(recs):  # distinct, known creation times
        doc = {**rec.as_json(), "created": 1000.0 + i}
        (warm.image_dir(root, rec.id) / warm.RECORD).write_text(json.dumps(doc))
    new = warm.find(root, recs[2].id)
    assert new is not None
    plan = warm.prune(root, new, 2 * new.bytes)
    assert plan == warm.PrunePlan((recs[0].id,), False)
    assert {r.id for r in warm.list_images(root)} == {recs[1].id, recs[2].id}
    rec_file = warm.image_dir(root, new.id) / warm.RECORD
    assert rec_file.stat().st_mode & 0o777 == 0o600


@pytest.mark.slow
def test_prefetch_reads_an_evicted_image_back_into_the_cache(tmp_path: Path) -> None:
    """A restore reads the whole state: ``prefetch`` starts the kernel's readahead of an
    image's files (here one evicted from the page cache), and ignores the missing ones."""
    import subprocess
    import time

    state = tmp_path / warm.STATE
    state.write_bytes(os.urandom(8 << 20))
    fd = os.open(state, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)

    def resident() -> int:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES",
                              str(state)], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[0])

    if resident() > (1 << 20):
        pytest.skip("this filesystem keeps the file cached (DONTNEED had no effect)")
    warm.prefetch(tmp_path)  # no disk, no mem file: skipped
    deadline = time.monotonic() + limit(10)
    while resident() < (8 << 20) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert resident() == 8 << 20
