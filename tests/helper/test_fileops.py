"""helper.base.fileops: the one atomic-write primitive and the reflink probe."""

from __future__ import annotations

import fcntl
import os
import re
import stat
from pathlib import Path

import pytest

from helper.base import fileops

# What the crash-recovery sweeps (runner.tempfiles) recognise as a temp file.
TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{8}\.(?:tmp|lz4)$")


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path: Path) -> None:
    dest = tmp_path / "f"
    fileops.atomic_write(dest, b"one")
    fileops.atomic_write(dest, b"two" * 100_000)
    assert dest.read_bytes() == b"two" * 100_000
    assert os.listdir(tmp_path) == ["f"]


def test_the_temp_file_is_locked_named_for_the_sweeps_and_private(tmp_path: Path) -> None:
    dest = tmp_path / "f"
    with fileops.atomic_replace(dest, mode=0o600, final_mode=0o444) as tmp:
        assert TEMP_NAME.match(tmp.path.name), tmp.path.name
        assert tmp.path.parent == tmp_path
        assert stat.S_IMODE(os.fstat(tmp.fd).st_mode) == 0o600  # nobody reads half a file
        fd = os.open(tmp.path, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):  # what a sweep tries first
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        fileops.write_all(tmp.fd, b"x")
        assert not dest.exists()
    assert dest.read_bytes() == b"x"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o444  # final_mode: exact, not umasked


def _fail_halfway(dest: Path) -> None:
    with fileops.atomic_replace(dest) as tmp:
        fileops.write_all(tmp.fd, b"half")
        raise RuntimeError("writer failed")


def test_a_failing_block_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    dest = tmp_path / "f"
    dest.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        _fail_halfway(dest)
    assert dest.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f"]


def _swap_temp(dest: Path) -> None:
    with fileops.atomic_replace(dest) as tmp:
        tmp.path.unlink()
        tmp.path.write_bytes(b"someone else's")


def test_a_temp_file_replaced_under_the_writer_is_never_renamed(tmp_path: Path) -> None:
    dest = tmp_path / "f"
    with pytest.raises(OSError, match="replaced while written"):
        _swap_temp(dest)
    assert not dest.exists()


def test_by_dirfd_even_an_o_path_one(tmp_path: Path) -> None:
    dfd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        with fileops.atomic_replace("rec", dir_fd=dfd, mode=0o600) as tmp:
            assert TEMP_NAME.match(str(tmp.path))
            fileops.write_all(tmp.fd, b"{}")
        with pytest.raises(ValueError), fileops.atomic_replace("rec", dir_fd=dfd):
            raise ValueError
    finally:
        os.close(dfd)
    assert (tmp_path / "rec").read_bytes() == b"{}"
    assert os.listdir(tmp_path) == ["rec"]


def test_write_json_and_read_json(tmp_path: Path) -> None:
    fileops.write_json(tmp_path / "j", {"b": 1, "a": [2]})
    assert fileops.read_json(tmp_path / "j") == {"a": [2], "b": 1}
    assert (tmp_path / "j").read_text().startswith('{\n  "a"')


def test_materialise_copies_and_sets_the_mode(tmp_path: Path) -> None:
    src = tmp_path / "src"
    with open(src, "wb") as f:
        f.write(b"data")
        f.truncate(4 << 20)
    fileops.materialise(src, tmp_path / "dst", allow_clone=True)
    assert (tmp_path / "dst").read_bytes() == src.read_bytes()
    assert stat.S_IMODE((tmp_path / "dst").stat().st_mode) == 0o444
    assert sorted(os.listdir(tmp_path)) == ["dst", "src"]


def test_probe_reflink_answers_without_leaving_files(tmp_path: Path) -> None:
    why = fileops.probe_reflink(tmp_path)
    assert why is None or why  # None: it can; else the kernel's reason
    assert os.listdir(tmp_path) == []
    assert fileops.probe_reflink(tmp_path / "absent")  # cannot even make the files
