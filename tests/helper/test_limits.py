"""kiln-helper's entry-point limits, through sudo as real unprivileged users (issue 11).

The op name is checked before it is logged (a 131,000-character name adds one short line);
a request is at most ``[limits] request_bytes`` and no more is read; a uid's audit lines are
capped per UTC day; a sudo caller's op runs under RLIMIT_CPU and holds the signals sudo
relays (a SIGTERM to sudo does not cut an op); the caller's area is root-owned 0711; the
``usage`` op counts the caller's objects against its caps.

A helper waiting for its request (``_waiting_helper``: stdin held open) is how the limits
and the signal mask of a real sudo'd helper are observed without racing its exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.oci import User, run_as
from tests.support.sudo import (
    AUDIT,
    BASE,
    GOOD_CONFIG,
    HELPER,
    TEST_CONFIG,
    _write_config,
    helper_as,
)

pytestmark = pytest.mark.root

RATE = AUDIT.parent / "rate"
REPO = Path(__file__).resolve().parents[2]


def _audit_size() -> int:
    return AUDIT.stat().st_size if AUDIT.exists() else 0


def _audit_since(offset: int, uid: int) -> list[bytes]:
    """Lines of ``uid`` appended after ``offset`` (other test runs may write too)."""
    with open(AUDIT, "rb") as f:
        f.seek(offset)
        lines = f.read().splitlines(keepends=True)
    return [x for x in lines if json.loads(x)["uid"] == uid]


@pytest.fixture(scope="module", autouse=True)
def _fresh_counters(sudo_user: User, victim_user: User) -> Iterator[None]:
    """Throw-away users get recycled uids: their daily audit counters start (and are
    left) empty."""
    counters = [RATE / str(u.uid) for u in (sudo_user, victim_user)]
    for c in counters:
        c.unlink(missing_ok=True)
    yield
    for c in counters:
        c.unlink(missing_ok=True)


@contextlib.contextmanager
def _config(extra: str) -> Iterator[None]:
    """The test config plus ``extra``. Every sudo test module shares that one file: when a
    concurrent test session replaced it meanwhile, a failure says nothing (skip)."""
    text = GOOD_CONFIG + extra
    _write_config(text)
    try:
        yield
    except Exception:  # an assertion, or an unpacking of lines that were not dropped
        try:
            ours = TEST_CONFIG.read_text() == text
        except FileNotFoundError:
            ours = False
        if not ours:
            pytest.skip("a concurrent test session replaced /etc/kiln/test-config.toml")
        raise
    finally:
        _write_config(GOOD_CONFIG)


# -- op name, request size -----------------------------------------------------------------------


def test_huge_op_name_is_refused_and_logged_bounded(sudo_user: User) -> None:
    start = _audit_size()
    res = helper_as(sudo_user, "a" * 131_000, {})
    mine = _audit_since(start, sudo_user.uid)
    assert [len(x) <= 300 for x in mine] == [True], [len(x) for x in mine]
    assert json.loads(mine[0])["outcome"] == "unknown op"
    assert res.returncode == 2, res.stderr
    assert json.loads(res.stdout)["error"]["type"] == "UsageError"
    assert len(res.stdout) + len(res.stderr) < 600  # not echoed back whole either
    # Control characters and non-ASCII are escaped, never written raw.
    start = _audit_size()
    assert helper_as(sudo_user, "x\x1b[2J\u202e" + "é" * 5000, {}).returncode == 2
    (line,) = _audit_since(start, sudo_user.uid)
    assert line.isascii()
    assert b"\x1b" not in line
    assert len(line) <= 300


def test_every_op_name_passes_the_name_check() -> None:
    from helper.ops import registry as ops

    assert [n for n in ops.OPS if not ops.valid_op(n)] == []
    assert not ops.valid_op("a" * 33)
    assert not ops.valid_op("loop-")


def test_oversized_request_exits_2_and_reads_no_more(sudo_user: User, tmp_path: Path) -> None:
    limit = 64 << 10  # the default [limits] request_bytes
    ok = helper_as(sudo_user, "area", "{}" + " " * (limit - 2))  # valid JSON, at the limit
    assert ok.returncode == 0, ok.stderr
    big = tmp_path / "request.json"
    big.write_bytes(b"{}" + b" " * (4 << 20))  # valid JSON, but 4 MiB
    with open(big, "rb") as stdin:
        res = subprocess.run(
            ["setpriv", f"--reuid={sudo_user.uid}", f"--regid={sudo_user.gid}",
             "--clear-groups", "--", "/usr/bin/sudo", "--non-interactive", HELPER, "area"],
            stdin=stdin, capture_output=True, text=True, timeout=60, check=False,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, cwd="/")
        # The helper read from the file's (shared) offset: exactly one byte past the limit.
        assert os.lseek(stdin.fileno(), 0, os.SEEK_CUR) == limit + 1
    assert res.returncode == 2, res.stderr
    assert f"request larger than {limit} bytes" in res.stderr
    just_over = helper_as(sudo_user, "area", "{}" + " " * (limit - 1))
    assert just_over.returncode == 2


# -- the audit log's daily cap ------------------------------------------------------------------


def test_audit_lines_are_capped_per_uid_and_day(sudo_user: User, victim_user: User) -> None:
    cap = 4096  # the smallest [limits] audit_bytes_per_day
    counter = RATE / str(sudo_user.uid)
    counter.unlink(missing_ok=True)
    with _config(f"\n[limits]\naudit_bytes_per_day = {cap}\n"):
        start = _audit_size()
        assert helper_as(sudo_user, "area", {}).returncode == 0
        (line,) = _audit_since(start, sudo_user.uid)
        day, used, noted = counter.read_text().split()
        assert (day, int(used), noted) == (time.strftime("%Y-%m-%d", time.gmtime()),
                                           len(line), "0")
        st = counter.stat()
        assert (st.st_uid, st.st_mode & 0o777, RATE.stat().st_mode & 0o777) == (0, 0o600,
                                                                                0o700)
        # One byte short of room for the next line: it is replaced by one notice...
        counter.write_text(f"{day} {cap - len(line) + 1:020d} 0\n")
        start = _audit_size()
        for _ in range(3):
            res = helper_as(sudo_user, "area", {})
            assert res.returncode == 0, res.stderr  # dropping lines never fails an op
            assert json.loads(res.stdout)["uid"] == sudo_user.uid
        (notice,) = _audit_since(start, sudo_user.uid)  # ...and the rest is dropped
        assert json.loads(notice)["outcome"].startswith(
            f"rate-limited: uid {sudo_user.uid} reached {cap} audit bytes today")
        # Another uid is counted on its own.
        assert helper_as(victim_user, "area", {}).returncode == 0
        assert len(_audit_since(start, victim_user.uid)) == 1
        # A new UTC day starts from zero.
        counter.write_text(f"2000-01-01 {cap:020d} 1\n")
        start = _audit_size()
        assert helper_as(sudo_user, "area", {}).returncode == 0
        assert len(_audit_since(start, sudo_user.uid)) == 1
    counter.unlink()


def test_audit_log_rotates_by_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from helper import audit

    logdir = tmp_path / "log"
    monkeypatch.setattr(audit, "AUDIT_DIR", logdir)
    monkeypatch.setattr(audit, "AUDIT_ROTATE_BYTES", 1000)
    for i in range(40):
        audit.audit(0, "area", f"ok {i}")
    assert (logdir.stat().st_mode & 0o777) == 0o700
    live, one, two = (logdir / n for n in ("audit.log", "audit.log.1", "audit.log.2"))
    assert 0 < live.stat().st_size <= 1000 + 200
    assert one.exists()
    assert two.exists()
    assert not (logdir / "audit.log.3").exists()
    last = [json.loads(x)["outcome"] for x in live.read_text().splitlines()][-1]
    assert last == "ok 39"
    # A symlink planted as the log is never followed.
    for p in (live, one, two):
        p.unlink()
    target = tmp_path / "elsewhere"
    live.symlink_to(target)
    audit.audit(0, "area", "ok")
    assert not target.exists()


# -- a helper waiting for its request: its limits and signal mask ------------------------------


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
    return out


def _reading_stdin(pid: int) -> bool:
    """Blocked reading its stdin pipe (a read(2) of fd 0; nothing else reads a pipe yet)."""
    try:
        if Path(f"/proc/{pid}/wchan").read_text() == "pipe_read":
            return True
        call = Path(f"/proc/{pid}/syscall").read_text().split()
    except OSError:
        return False
    read_nr = {"x86_64": "0", "aarch64": "63"}.get(os.uname().machine)
    return len(call) > 1 and call[0] == read_nr and int(call[1], 16) == 0


@contextlib.contextmanager
def _waiting_helper(user: User, op: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """``sudo kiln-helper OP`` as ``user``, in its own process group (sudo relays only
    signals from outside the command's group), with stdin open: yields (sudo, the helper's
    pid) once the helper blocks reading its request."""
    proc = subprocess.Popen(
        ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups", "--",
         "/usr/bin/sudo", "--non-interactive", HELPER, op],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, cwd="/", start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        helper = None
        while helper is None and time.monotonic() < deadline and proc.poll() is None:
            kids = [k for c in _children(proc.pid) for k in (c, *_children(c))]
            helper = next((k for k in kids if HELPER in Path(f"/proc/{k}/cmdline")
                           .read_bytes().decode(errors="replace")
                           and _reading_stdin(k)), None)
            time.sleep(0.02)
        assert helper is not None, f"no helper waiting for stdin ({proc.poll()})"
        yield proc, helper
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=60)


def _limits(pid: int) -> dict[str, tuple[str, str]]:
    out = {}
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]:
        name, soft, hard = line[:26].strip(), *line[26:].split()[:2]
        out[name] = (soft, hard)
    return out


def test_a_sudo_callers_op_runs_under_the_cpu_limit(sudo_user: User) -> None:
    with _config("\n[limits]\ncpu_seconds = 10\n"), _waiting_helper(sudo_user, "area") as (
            proc, helper):
        lim = _limits(helper)
        assert lim["Max cpu time"] == ("10", "10")
        assert lim["Max core file size"] == ("0", "0")
        out, err = proc.communicate("{}", timeout=60)
        assert proc.returncode == 0, err
        assert json.loads(out)["uid"] == sudo_user.uid


@pytest.mark.slow
def test_the_cpu_limit_kills_outright() -> None:
    """Soft = hard: at the limit the kernel sends SIGKILL (no SIGXCPU left to handle)."""
    code = ("from helper.base import run\nrun.limit_cpu(1)\nwhile True:\n    pass\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=300, check=False)
    assert res.returncode == -signal.SIGKILL


def test_tools_and_vmms_start_with_no_signal_blocked() -> None:
    code = ("import json, subprocess\nfrom helper import main\nfrom helper.base import run\n"
            "main.hold_signals()\n"
            "tool = run.run('grep', ['-E', '^SigBlk', '/proc/self/status']).text.split()[1]\n"
            "vmm = run.spawn(['/usr/bin/grep', '-E', '^SigBlk', '/proc/self/status'],\n"
            "                stdout=subprocess.PIPE).communicate()[0].split()[1].decode()\n"
            "own = open('/proc/self/status').read().split('SigBlk:')[1].split()[0]\n"
            "print(json.dumps([own, tool, vmm]))")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=True)
    own, tool, vmm = json.loads(res.stdout)
    assert int(own, 16) & (1 << (signal.SIGTERM - 1))  # the helper holds SIGTERM...
    assert int(tool, 16) == int(vmm, 16) == 0  # ...what it starts does not


def test_sudo_relayed_signals_do_not_cut_an_op(sudo_user: User) -> None:
    with _waiting_helper(sudo_user, "usage") as (proc, helper):
        sent = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
        for sig in sent:
            os.kill(proc.pid, sig)  # to sudo, as a caller would: sudo relays it
        want = sum(1 << (s - 1) for s in sent)
        deadline = time.monotonic() + 30
        pending = 0
        while pending & want != want and time.monotonic() < deadline:
            try:
                status = Path(f"/proc/{helper}/status").read_text()
            except FileNotFoundError:
                pytest.fail("a relayed signal ended the helper")
            pending = int(status.split("ShdPnd:")[1].split()[0], 16)
            time.sleep(0.02)
        assert pending & want == want  # relayed, and held: pending, not delivered
        out, err = proc.communicate("{}", timeout=60)
    assert proc.returncode == 0, err
    answer = json.loads(out)
    assert answer["jails"]["used"] == 0
    assert "pool_bytes" in answer


# -- the area ---------------------------------------------------------------------------------


def test_area_is_root_0711_and_not_listable_by_others(sudo_user: User,
                                                      victim_user: User) -> None:
    area = Path(json.loads(helper_as(sudo_user, "area", {}).stdout)["path"])
    assert area == BASE / "users" / str(sudo_user.uid)
    os.chmod(area, 0o755)  # as an older helper made it
    os.chmod(area.parent, 0o755)
    assert helper_as(sudo_user, "area", {}).returncode == 0
    for d in (area, area.parent):
        st = d.stat()
        assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o711), d
    for path in (area, area.parent):
        res = run_as(victim_user, ["ls", str(path)], check=False)
        assert res.returncode != 0
        assert "Permission denied" in res.stderr


# -- usage ------------------------------------------------------------------------------------


def test_usage_counts_the_callers_objects(sudo_user: User) -> None:
    area = Path(json.loads(helper_as(sudo_user, "area", {}).stdout)["path"])
    made = [area / "jails", area / "cgroups", area / "pool"]
    try:
        for d in (area / "jails", area / "cgroups", area / "pool" / "thin" / "bases"):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name in ("aaaa", "bbbb"):
            (area / "jails" / name).write_text("{}")
        (area / "jails" / ".aaaa.1234.tmp").write_text("")  # an interrupted write
        (area / "cgroups" / "aaaa").write_text("{}")
        with open(area / "pool" / "pool.img", "wb") as f:
            f.truncate(3 << 20)  # sparse: its apparent size counts
        with open(area / "pool" / "thin" / "data.img", "wb") as f:
            f.truncate(5 << 20)
        (area / "pool" / "thin" / "meta.img").write_bytes(b"x" * 4096)
        (area / "pool" / "thin" / "link").symlink_to("/etc/passwd")  # never followed
        with _config("\n[limits]\njails = 3\npool_bytes = 268435456\n"):
            res = helper_as(sudo_user, "usage", {})
        assert res.returncode == 0, res.stderr
        got = json.loads(res.stdout)
        assert got["jails"] == {"used": 2, "max": 3}
        assert got["cgroups"] == {"used": 1, "max": 64}
        assert got["leases"] == {"used": 0, "max": 0}  # no [net]: nothing leased or run
        assert got["forwards"] == {"used": 0, "max": 0}
        assert got["pool_bytes"] == {"used": (8 << 20) + 4096, "max": 256 << 20}
        assert got["audit_bytes"]["max"] == 1 << 20
        assert helper_as(sudo_user, "usage", {"extra": 1}).returncode == 2
    finally:
        for d in made:
            subprocess.run(["rm", "-rf", "--one-file-system", str(d)], check=False)
