"""Warm images' pure key and their store (``builder.warm``): any input change changes
the id; an image is published whole by a rename; a volume's images go with it."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from builder import warm
from builder.root import Root
from helper.base.errors import NotFound, UsageError

KEY = warm.WarmKey(volume="sha256:" + "a" * 64, kernel_sha256="b" * 64,
                   initrd_sha256="c" * 64, init_sha256="d" * 64, vmm="qemu",
                   vmm_version="QEMU emulator version 7.2.22", accel="tcg",
                   cpu_model="qemu64", memory_mib=512, cpus=1, disk_size=None,
                   devices="qemu-microvm:v1")
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


def test_gc_removes_the_images_of_volumes_that_are_gone(tmp_path: Path) -> None:
    from builder.gc import run_gc

    root = Root(tmp_path / "root").ensure()
    rec = _publish(root, KEY)  # its volume is not in the store
    report = run_gc(root, keep_seconds=0, dry_run=True)
    assert warm.list_images(root) == [rec]  # a dry run removes nothing
    report = run_gc(root, keep_seconds=0, dry_run=False)
    assert f"warm/{rec.id}" in report.removed_leftovers
    assert warm.list_images(root) == []
