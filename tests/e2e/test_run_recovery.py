"""Crash leftovers are found by the next kiln command, whichever it is: a `kiln run`
SIGKILLed while it writes the initrd cache, a build SIGKILLed mid-way (real kills at the
step, through KILN_FAULT_KILL_AT); and a live writer's temp file is never taken."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builder.root import Root
from builder.source import RegistryOptions
from runner import tempfiles
from tests.support.cli import kiln
from tests.support.images import busybox_layout
from tests.support.timing import limit


def _temps(d: Path) -> list[str]:
    return sorted(n for n in os.listdir(d) if n.startswith(".") and n.endswith(".tmp"))


@pytest.mark.slow
def test_run_killed_while_writing_the_initrd_leaves_nothing_after_volume_ls(
        tmp_path: Path) -> None:
    from builder.pipeline import build

    root = tmp_path / "root"
    vid = build(Root(root), f"oci:{busybox_layout()}:1", RegistryOptions()).volume.id
    kiln(root, "pool", "init", "--backend", "copy")
    crashed = kiln(root, "run", "--rm", vid[7:19], "--", "true",
                   env={"KILN_FAULT_KILL_AT": "write-initrd"}, check=False)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    left = _temps(root / "kernels")
    assert len(left) == 1
    assert left[0].startswith(".initrd-")
    assert left[0].endswith(".cpio." + left[0].split(".")[-2] + ".tmp")
    assert (root / "kernels" / left[0]).stat().st_size > 1 << 20  # the whole cpio
    kiln(root, "volume", "ls")  # any kiln command
    assert _temps(root / "kernels") == []
    # and the next run makes the initrd and boots
    assert kiln(root, "run", "--rm", vid[7:19], "--", "true").returncode == 0
    assert [n for n in os.listdir(root / "kernels") if n.startswith("initrd-")]
    assert _temps(root / "kernels") == []


def test_killed_build_is_removed_by_volume_ls(tmp_path: Path) -> None:
    """docs/architecture.md: an unlocked work directory is removed by the next kiln
    command — `volume ls`, not only the next build."""
    root = tmp_path / "root"
    crashed = kiln(root, "build", f"oci:{busybox_layout()}:1", "--json",
                   env={"KILN_FAULT_KILL_AT": "mkfs"}, check=False)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert [n for n in os.listdir(root / "tmp") if n.startswith("build-")]
    assert json.loads(kiln(root, "volume", "ls", "--json").stdout) == []
    assert os.listdir(root / "tmp") == []


def test_gc_reports_run_stage_leftovers_and_dry_run_keeps_them(tmp_path: Path) -> None:
    root = tmp_path / "root"
    Root(root).ensure()
    kernels = root / "kernels"
    kernels.mkdir()
    dead = kernels / ".initrd-x.cpio.0123abcd.tmp"
    dead.write_bytes(b"x")
    dry = json.loads(kiln(root, "gc", "--dry-run", "--json").stdout)
    assert dead.exists()
    assert dry["removed_leftovers"] == []
    done = json.loads(kiln(root, "gc", "--json").stdout)
    assert done["removed_leftovers"] == [dead.name]
    assert not dead.exists()


_WRITER = """
import sys, time
from pathlib import Path
from runner.tempfiles import locked_temp
with locked_temp(Path(sys.argv[1])) as tmp:
    tmp.write_bytes(b"partial")
    print(tmp.name, flush=True)
    time.sleep(60)
"""


def test_sweep_takes_only_temp_files_whose_writer_died(tmp_path: Path) -> None:
    dest = tmp_path / "initrd-abc.cpio"
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(dest)],
                              stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).parents[2])
    try:
        assert writer.stdout is not None
        name = writer.stdout.readline().strip()
        assert (tmp_path / name).exists()
        assert tempfiles.sweep(tmp_path) == []  # live: its writer holds the flock
        assert (tmp_path / name).exists()
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
        assert tempfiles.sweep(tmp_path) == [tmp_path / name]
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert os.listdir(tmp_path) == []


def test_write_atomic_leaves_only_the_file(tmp_path: Path) -> None:
    dest = tmp_path / "plan-1.json"
    tempfiles.write_atomic(dest, b"[]")
    tempfiles.write_atomic(dest, b"[1]")
    assert (os.listdir(tmp_path), dest.read_bytes(), dest.stat().st_mode & 0o777) == \
        (["plan-1.json"], b"[1]", 0o644)


def test_recover_of_a_missing_root_does_nothing(tmp_path: Path) -> None:
    assert tempfiles.recover(Root(tmp_path / "nope")) == []
    assert not (tmp_path / "nope").exists()


def test_concurrent_writers_and_sweeps_lose_nothing(tmp_path: Path) -> None:
    """A sweep running while files are written never breaks a write."""
    import threading

    stop = threading.Event()

    def sweeper() -> None:
        while not stop.is_set():
            tempfiles.sweep(tmp_path)

    t = threading.Thread(target=sweeper)
    t.start()
    try:
        t0 = time.monotonic()
        for i in range(50):
            tempfiles.write_atomic(tmp_path / f"f{i}", str(i).encode())
        assert time.monotonic() - t0 < limit(60)
    finally:
        stop.set()
        t.join()
    assert sorted(os.listdir(tmp_path)) == sorted(f"f{i}" for i in range(50))
