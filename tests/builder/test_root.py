"""Root layout, work directories and crash recovery (real processes, real SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from builder.root import Root, default_root
from helper.base.errors import Conflict
from helper.base.fileops import atomic_write


def test_default_root_prefers_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KILN_ROOT", str(tmp_path / "r"))
    assert default_root() == tmp_path / "r"


def test_workdir_is_removed_after_use(tmp_path: Path) -> None:
    root = Root(tmp_path).ensure()
    with root.workdir("build") as wd:
        (wd / "x").write_text("1")
        assert wd.parent == root.tmp
    assert os.listdir(root.tmp) == []


def test_recover_keeps_live_work_and_removes_dead_work(tmp_path: Path) -> None:
    root = Root(tmp_path).ensure()
    # A child takes a workdir, writes into it, reports, then is SIGKILLed mid-work.
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from builder.root import Root
        with Root(Path({str(tmp_path)!r})).workdir("build") as wd:
            (wd / "partial").write_bytes(b"x" * 100)
            print(wd, flush=True)
            time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    live = Path(child.stdout.readline().strip())
    with root.workdir("mine") as mine:
        assert root.recover() == []  # the child's dir is locked: live work is kept
        assert live.exists()
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert root.recover() == [live]  # now nobody holds it
        assert mine.exists()
    assert os.listdir(root.tmp) == []


def test_recover_removes_unwritable_rootless_leftovers(tmp_path: Path) -> None:
    root = Root(tmp_path).ensure()
    d = root.tmp / "build-1-dead"
    (d / "a" / "b").mkdir(parents=True)
    (d / "a" / "b" / "f").write_text("x")
    os.chmod(d / "a" / "b", 0o500)
    os.chmod(d / "a", 0o500)
    (root.tmp / "stray-file").write_text("x")
    removed = root.recover()
    assert sorted(p.name for p in removed) == ["build-1-dead", "stray-file"]
    assert os.listdir(root.tmp) == []


def test_nonblocking_lock_reports_conflict(tmp_path: Path) -> None:
    root = Root(tmp_path).ensure()
    code = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from builder.root import Root
        with Root(Path({str(tmp_path)!r})).lock("blobs"):
            print("held", flush=True)
            time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(Conflict) as e, root.lock("blobs", blocking=False, what="the cache"):
            pass
        assert e.value.message == "the cache is busy: another kiln command holds it"
    finally:
        child.kill()
        child.wait()


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    p = tmp_path / "f"
    atomic_write(p, b"one")
    atomic_write(p, b"two")
    assert p.read_bytes() == b"two"
    assert [x.name for x in tmp_path.iterdir()] == ["f"]
