"""kiln's process runner with real processes: ``run``'s log line, ``spawn``'s per-call
options (environment allowlist, session, die-with-parent, kept fds, the pre-exec hook and
the parent-side gate, signal state, exec failure), ``Child`` (communicate, timeouts, group
kill) and ``fork``."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder import proc
from helper.base import toolenv
from helper.base.errors import KilnError, ToolNotFound, ToolTimeout
from tests.support.procs import dead
from tests.support.timing import limit

REPO = Path(__file__).resolve().parents[2]


def _status(pid: int, field: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return line.split()[1]
    raise KeyError(field)


@pytest.fixture
def reaped() -> Iterator[list[proc.Child]]:
    """Children a test started: killed and reaped at its end, whatever happened."""
    children: list[proc.Child] = []
    yield children
    for c in children:
        c.kill()
        c.wait()


def test_run_logs_the_shell_quoted_command(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="kiln.proc"):
        res = proc.run("echo", ["a b", "c"])
    assert res.cmd == [proc.which("echo"), "a b", "c"]
    assert res.text == "a b c\n"
    assert [r.getMessage() for r in caplog.records] == [f"run: {res.cmd[0]} 'a b' c"]


def test_spawn_env_is_the_allowlist(monkeypatch: pytest.MonkeyPatch,
                                    caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("LD_PRELOAD", "/nonexistent.so")
    monkeypatch.setenv("PYTHONPATH", "/evil")
    monkeypatch.setenv("KILN_TEST_SECRET", "x")
    monkeypatch.setenv("PATH", "/evil:/usr/bin:/bin")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    monkeypatch.setenv("HOME", "/home/someone")
    with caplog.at_level(logging.DEBUG, logger="kiln.proc"):
        child = proc.spawn("env", [], env={"EXTRA": "1"}, stdout=proc.PIPE)
    out, _ = child.communicate(timeout=30)
    env = dict(line.split("=", 1) for line in out.decode().splitlines())
    assert env == {"HOME": "/home/someone", "HTTPS_PROXY": "http://proxy:3128",
                   "PATH": toolenv.SEARCH_PATH, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8",
                   "EXTRA": "1"}
    assert child.code == 0
    assert [r.getMessage() for r in caplog.records] == [f"spawn: {proc.which('env')}"]


def test_spawn_session_is_a_per_call_option(tmp_path: Path,
                                            reaped: list[proc.Child]) -> None:
    for new_session in (True, False):
        child = proc.spawn("sleep", ["60"], new_session=new_session)
        reaped.append(child)
        sid = int(Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[3])
        assert sid == (child.pid if new_session else os.getsid(0))
        assert child.group is new_session


# An intermediate process that spawns `sleep 60` (or forks a sleeper), prints its pid and
# waits to be SIGKILLed: what happens to its child when it dies?
_PARENT = """
import os, sys, time
from builder import proc
mode, dwp = sys.argv[1], sys.argv[2] == "1"
if mode == "spawn":
    pid = proc.spawn("sleep", ["60"], die_with_parent=dwp).pid
else:
    pid = proc.fork(lambda: time.sleep(60) or 0, die_with_parent=dwp).pid
print(pid, flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("mode", ["spawn", "fork"])
@pytest.mark.parametrize("die_with_parent", [True, False])
def test_die_with_parent_kills_the_child_when_the_parent_dies(mode: str,
                                                              die_with_parent: bool) -> None:
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, mode, str(int(die_with_parent))],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    try:
        assert not dead(pid, within=0.2)
        parent.kill()
        parent.wait()
        # killed at once, or still alive a second later
        assert dead(pid, within=10.0 if die_with_parent else 1.0) is die_with_parent
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # our grandchild: started by this test
        parent.kill()
        parent.wait()


def test_spawn_keeps_pass_fds_and_closes_every_other(tmp_path: Path) -> None:
    kept_r, kept_w = os.pipe()
    other_r, other_w = os.pipe()
    os.set_inheritable(other_w, True)  # even an inheritable fd is not passed unless asked
    try:
        code = f"import os; os.write({kept_w}, b'kept'); os.write({other_w}, b'leaked')"
        child = proc.spawn(sys.executable, ["-c", code], pass_fds=(kept_w,),
                           stderr=proc.PIPE)
        os.close(kept_w)
        os.close(other_w)
        _, err = child.communicate(timeout=30)
        assert os.read(kept_r, 100) == b"kept"
        assert os.read(other_r, 100) == b""
        assert b"OSError: [Errno 9] Bad file descriptor" in err
        assert child.code == 1
    finally:
        os.close(kept_r)
        os.close(other_r)


def test_spawn_starts_with_default_signal_state(reaped: list[proc.Child]) -> None:
    """kiln may block or ignore signals; what it starts must not inherit that (a mask and
    an ignored disposition survive exec)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        child = proc.spawn("sleep", ["60"], die_with_parent=False)
        reaped.append(child)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN  # Python's, in this process
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child.pid}/exe").resolve().name != "sleep":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert int(_status(child.pid, "SigBlk"), 16) == 0
    assert int(_status(child.pid, "SigIgn"), 16) & (1 << (signal.SIGPIPE - 1)) == 0


def test_spawn_preexec_and_before_exec(tmp_path: Path) -> None:
    seen: list[str] = []

    def gate(pid: int) -> None:  # the child has not exec'd yet: it is still a Python
        seen.append(Path(f"/proc/{pid}/exe").resolve().name)
        assert not (tmp_path / "hook").exists()

    def hook() -> None:  # in the child, after the gate
        (tmp_path / "hook").write_text(str(os.getpid()))

    child = proc.spawn("true", [], preexec=hook, before_exec=gate)
    assert child.wait(30) == 0
    assert seen == [Path(sys.executable).resolve().name]
    assert (tmp_path / "hook").read_text() == str(child.pid)


def test_spawn_before_exec_failing_kills_the_waiting_child(tmp_path: Path) -> None:
    pids: list[int] = []

    def gate(pid: int) -> None:
        pids.append(pid)
        raise RuntimeError("cannot attach")

    with pytest.raises(RuntimeError, match="cannot attach"):
        proc.spawn("touch", [str(tmp_path / "ran")], before_exec=gate)
    assert not Path(f"/proc/{pids[0]}").exists()  # reaped
    assert not (tmp_path / "ran").exists()  # never exec'd


def test_spawn_reports_what_stops_the_exec(tmp_path: Path) -> None:
    bad = tmp_path / "vmm"
    bad.write_bytes(b"\0\0\0\0not an executable")
    bad.chmod(0o755)
    with pytest.raises(KilnError) as e:
        proc.spawn(str(bad), [], hint="check it")
    assert (e.value.message, e.value.hint) == ("cannot start vmm: Exec format error", "check it")

    def hook() -> None:
        raise ValueError("no such namespace")

    with pytest.raises(KilnError, match=r"^cannot start true: ValueError: no such namespace$"):
        proc.spawn("true", [], preexec=hook)
    with pytest.raises(ToolNotFound, match="no-such-kiln-tool not found"):
        proc.spawn("no-such-kiln-tool", [])


def test_communicate_feeds_stdin_and_drains_both_pipes() -> None:
    data = os.urandom(1 << 20)  # more than a pipe holds: writing and reading interleave
    child = proc.spawn("sh", ["-c", "cat; echo done >&2; exit 3"], stdin=proc.PIPE,
                       stdout=proc.PIPE, stderr=proc.PIPE)
    out, err = child.communicate(data, timeout=60)
    assert (out == data, err, child.code) == (True, b"done\n", 3)
    assert child.stdin is child.stdout is child.stderr is None


def test_communicate_timeout_kills_and_reaps() -> None:
    child = proc.spawn("sleep", ["60"], stdout=proc.PIPE)
    t0 = time.monotonic()
    with pytest.raises(ToolTimeout, match=r"did not finish within 0\.2 s"):
        child.communicate(timeout=0.2)
    assert time.monotonic() - t0 < limit(5)
    assert child.code == -signal.SIGKILL


def test_wait_timeout_then_kill_reaches_the_group() -> None:
    child = proc.spawn("sh", ["-c", "sleep 60 & echo $!; wait"], stdout=proc.PIPE)
    assert child.stdout is not None
    grandchild = int(os.read(child.stdout, 100))
    assert child.wait(0.1) is None
    child.kill(signal.SIGTERM)
    assert child.wait(30) == -signal.SIGTERM
    assert dead(grandchild)
    child.kill()  # reaped: nothing is signalled
    os.close(child.stdout)


def test_fork_runs_a_callable_and_always_exits(tmp_path: Path) -> None:
    r, w = os.pipe()

    def body() -> int:
        os.write(w, json.dumps([os.getpid(), os.getsid(0), os.readlink("/proc/self/fd/0")])
                 .encode())
        return 7

    child = proc.fork(body, new_session=True, null_stdio=True, close_fds=(r,))
    os.close(w)
    assert child.wait(30) == 7
    pid, sid, stdin = json.loads(os.read(r, 1000))
    os.close(r)
    assert (pid, sid, stdin) == (child.pid, child.pid, "/dev/null")

    def boom() -> int:
        raise SystemExit(0)  # never unwinds into pytest: exit 1, the traceback on fd 2

    err = os.open(tmp_path / "err", os.O_WRONLY | os.O_CREAT, 0o600)
    saved = os.dup(2)
    os.dup2(err, 2)
    try:
        child = proc.fork(boom)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(err)
    assert child.wait(30) == 1
    assert "SystemExit: 0" in (tmp_path / "err").read_text()
