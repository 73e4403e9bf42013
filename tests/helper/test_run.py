"""The helper's runner with real processes: ``spawn`` (the jailer's launcher: a trusted
absolute binary, the allowlisted environment, its own session, no PDEATHSIG unless asked)
and ``wait`` (the timeout kills the whole group); ``run``'s ``env``."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helper.base import run, toolenv
from helper.base.errors import ToolNotFound
from tests.support.procs import dead

REPO = Path(__file__).resolve().parents[2]


def test_spawn_takes_only_an_absolute_binary() -> None:
    with pytest.raises(ToolNotFound, match=r"^sh not found$"):
        run.spawn(["sh", "-c", "true"], stdout=subprocess.DEVNULL)


def test_spawn_session_env_cwd_and_stdio(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("LD_PRELOAD", "/nonexistent.so")
    monkeypatch.setenv("PATH", "/evil:/usr/bin:/bin")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # kiln's tools only
    monkeypatch.setenv("TMPDIR", "/tmp")
    monkeypatch.delenv("HOME", raising=False)
    script = ("env; pwd; readlink /proc/self/fd/0; read -r _ _ _ _ _ sid _ < /proc/self/stat; "
              'echo "sid=$sid"; echo to-stderr >&2')
    out = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    with caplog.at_level(logging.DEBUG, logger="kiln.helper.run"):
        try:
            child = run.spawn(["/bin/sh", "-c", script], stdout=out)
        finally:
            os.close(out)
    assert run.wait(child, 30) == 0
    lines = (tmp_path / "out").read_text().splitlines()
    assert lines[-4:] == ["/", "/dev/null", f"sid={child.pid}", "to-stderr"], lines
    env = dict(x.split("=", 1) for x in lines[:-4])
    assert env.pop("PWD", "/") == "/"  # sh's own
    assert env.pop("SHLVL", "1") == "1"
    assert env == {"TMPDIR": "/tmp", "PATH": toolenv.SEARCH_PATH, "LC_ALL": "C.UTF-8",
                   "LANG": "C.UTF-8"}
    assert [r.getMessage() for r in caplog.records] == [
        f"spawn: /bin/sh -c '{script}'"]


# A helper that spawns `sleep 60`, prints its pid and waits to be SIGKILLed.
_OP = """
import subprocess, sys, time
from helper.base import run
child = run.spawn(["/bin/sleep", "60"], stdout=subprocess.DEVNULL,
                  die_with_parent=sys.argv[1] == "1")
print(child.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("die_with_parent", [False, True])
def test_a_spawned_child_outlives_the_helper_unless_asked(die_with_parent: bool) -> None:
    op = subprocess.Popen([sys.executable, "-c", _OP, str(int(die_with_parent))], cwd=REPO,
                          stdout=subprocess.PIPE, text=True)
    assert op.stdout is not None
    pid = int(op.stdout.readline())
    try:
        op.kill()
        op.wait()
        assert dead(pid, 10.0 if die_with_parent else 1.0) is die_with_parent
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # our grandchild: started by this test
        op.kill()
        op.wait()


def test_wait_kills_the_group_when_the_time_is_up(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    child = run.spawn(["/bin/sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"],
                      stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    grandchild = int(pidfile.read_text())
    assert run.wait(child, 0.2) is None
    assert child.returncode == -signal.SIGKILL
    assert dead(grandchild, 10.0)
    assert run.wait(run.spawn(["/bin/sh", "-c", "exit 3"], stdout=subprocess.DEVNULL),
                    30) == 3


def test_run_sets_env_over_the_allowlist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_TEST", "dropped")
    env = run.run("env", [], env={"DM_DISABLE_UDEV": "1"}).text.splitlines()
    assert "DM_DISABLE_UDEV=1" in env
    assert not any(x.startswith("KILN_TEST=") for x in env)


@pytest.mark.root
def test_fork_as_runs_with_the_callers_rights_only(tmp_path: Path) -> None:
    """The child has the given uid/gid and no groups, keeps only the fds it was given, and
    reports an OSError as its errno: root's file stays closed to it."""
    if os.geteuid() != 0:
        pytest.skip("changing uid needs root")
    secret = tmp_path / "secret"
    secret.write_text("root's")
    secret.chmod(0o600)
    out = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o666)
    other = os.open(tmp_path / "other", os.O_WRONLY | os.O_CREAT, 0o666)
    try:
        def work() -> None:
            ids = f"{os.getuid()} {os.getgid()} {os.getgroups()}"
            os.write(out, ids.encode())
            with contextlib.suppress(OSError):
                os.fstat(other)
                os.write(out, b" other-open")
            secret.read_text()  # EACCES

        assert run.fork_as(65534, 65534, work, (out,)) == 13  # EACCES
        assert (tmp_path / "out").read_text() == "65534 65534 []"
        assert run.fork_as(65534, 65534, lambda: None, ()) == 0
    finally:
        os.close(out)
        os.close(other)
