"""Kiln's process runner: every process kiln starts outside the privileged helper starts
here (the helper has its own stdlib runner, ``helper/base/run.py``: ``helper/`` must not
depend on ``sh``). Both take their rules from ``helper.base.toolenv``: a tool is resolved
to an absolute path from a fixed search path (never the caller's ``PATH``), runs with an
environment built from an allowlist and is logged as a shell-quoted command line.

* ``run(tool, args)``: a tool run to completion, through ``sh`` (the only importer of
  ``sh``), with a timeout; it leads its own session and dies with kiln. Failures come back
  as typed errors that name the command: ``ToolNotFound``, ``ToolTimeout``,
  ``ToolError(cmd, code, stderr_tail)``.
* ``spawn(tool, args)``: a long-lived child kiln watches, talks to or stops itself (the
  VMM, the test registry, ``sudo kiln-helper``): stdlib fork + exec. Per call: its own
  session, SIGKILL when kiln dies, fds it keeps under their numbers, a hook run in the
  child before exec (cgroup entry, network namespace) and ``before_exec``, a parent-side
  step the child waits for (kiln-helper moving it into the VM's cgroup). An exec failure
  comes back through a close-on-exec pipe as an error, not a silent exit 127.
* ``fork(fn)``: a Python callable in a child (the owner process of ``kiln run -d``, the
  KVM probe's guest); the child always ends in ``os._exit``, never in the caller's stack.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

from helper.base import toolenv
from helper.base.errors import KilnError, ToolError, ToolNotFound, ToolTimeout
from helper.base.toolenv import Result

# Result is re-exported: callers type against proc.Result.
__all__ = ["PIPE", "Child", "Result", "fork", "run", "spawn", "tool_env", "version_of",
           "which"]

log = logging.getLogger("kiln.proc")

DEFAULT_TIMEOUT = 600.0
PIPE = -1  # spawn(stdin=PIPE, ...): a pipe; the parent's end is on the Child


def which(tool: str) -> str:
    """Absolute path of ``tool`` on kiln's fixed search path, or raise ``ToolNotFound``.
    A path (``/usr/bin/sudo``) is taken as it is when it is executable."""
    if "/" in tool:
        if os.access(tool, os.X_OK):
            return tool
        raise ToolNotFound(tool, toolenv.PACKAGES.get(Path(tool).name, ""))
    return toolenv.which(tool)


def tool_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a tool runs with: kiln's allowlist, a fixed PATH and C locale."""
    return toolenv.tool_env(toolenv.KILN_ENV_ALLOW, extra)


def _tail(data: bytes, lines: int = 15) -> str:
    text = data.decode("utf-8", "replace").rstrip()
    return "\n".join(text.splitlines()[-lines:])


def run(
    tool: str,
    args: Iterable[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    stdin: bytes | BinaryIO | None = None,
    ok_codes: tuple[int, ...] = (0,),
    on_line: Callable[[str], None] | None = None,
    hint: str = "",
    stdout_path: str | os.PathLike[str] | None = None,
) -> Result:
    """Run ``tool`` with ``args`` and wait for it.

    ``on_line`` receives stdout line by line as it arrives (progress); ``stdout_path``
    sends stdout to a file instead of memory. Raises ``ToolError`` for an exit code not in
    ``ok_codes``, ``ToolTimeout`` when ``timeout`` seconds pass (the process group is
    killed), ``ToolNotFound`` when the tool is missing.
    """
    import sh  # here, not at the top: ~30 ms that spawn's users (kiln ps, sudo) need not pay

    exe = which(tool)
    argv = [exe, *[str(a) for a in args]]
    toolenv.log_command(log, "run", argv)
    out_chunks: list[bytes] = []
    kwargs = _sh_options(env, ok_codes, cwd, stdin)
    out_file = None
    if stdout_path is not None:
        out_file = open(stdout_path, "wb")  # noqa: SIM115 - closed below, after the run
        kwargs["_out"] = out_file
    elif on_line is not None:
        lock = threading.Lock()

        def _cb(line: str) -> None:
            with lock:
                out_chunks.append(line.encode())
            on_line(line.rstrip("\n"))

        kwargs["_out"] = _cb
    timed_out = threading.Event()
    timer: threading.Timer | None = None
    try:
        proc = sh.Command(exe)(*argv[1:], **kwargs)

        def _kill() -> None:
            timed_out.set()
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, _kill)
        timer.daemon = True
        timer.start()
        proc.wait()
    except sh.ErrorReturnCode as e:
        if timed_out.is_set():
            raise ToolTimeout(argv, timeout, hint) from None
        # A negative code: killed by a signal from outside (OOM killer, an operator).
        raise ToolError(argv, e.exit_code, _tail(e.stderr), hint) from None
    finally:
        if timer is not None:
            timer.cancel()
        if out_file is not None:
            out_file.close()
    stdout = b"".join(out_chunks) if on_line is not None else _bytes(proc.stdout)
    return Result(argv, proc.exit_code, stdout, _bytes(proc.stderr))


def _sh_options(env: Mapping[str, str] | None, ok_codes: tuple[int, ...],
                cwd: str | os.PathLike[str] | None,
                stdin: bytes | BinaryIO | None) -> dict[str, Any]:
    """``run``'s keyword arguments for ``sh`` (all but where stdout goes)."""
    kwargs: dict[str, Any] = {
        "_env": tool_env(env),
        "_ok_code": list(ok_codes),
        # No `_timeout`: sh then polls on a 100 ms tick and every call returns on the next
        # tick (0.1 s per tool, measured). A timer that kills the process group instead.
        "_bg": True,
        "_bg_exc": False,
        "_new_session": True,  # the timeout kill reaches the whole process group
        # In the child: SIGKILL it when kiln dies, so no tool outlives a killed kiln and
        # keeps writing into work directories the next kiln command is about to remove.
        "_preexec_fn": toolenv.die_with_parent,
        "_return_cmd": True,
        "_decode_errors": "replace",
    }
    if cwd is not None:
        kwargs["_cwd"] = str(cwd)
    if stdin is not None:
        kwargs["_in"] = stdin
    return kwargs


def _bytes(data: bytes | str | None) -> bytes:
    return data.encode() if isinstance(data, str) else data or b""


def version_of(tool: str, args: Iterable[str] = ("--version",)) -> str:
    """First line of a tool's version output (``missing`` when it is not installed).

    Asked once per process: the build key, the mke2fs check and ``kiln version`` all want
    the same answers."""
    return _version_of(tool, tuple(args))


@functools.cache
def _version_of(tool: str, args: tuple[str, ...]) -> str:
    try:
        res = run(tool, args, timeout=20, ok_codes=(0, 1))
    except ToolNotFound:
        return "missing"
    text = (res.stdout or res.stderr).decode("utf-8", "replace").strip()
    return text.splitlines()[0] if text else "unknown"


# -- children kiln keeps: spawn and fork -----------------------------------------------------


@dataclass
class Child:
    """A started process. ``stdin``/``stdout``/``stderr``: the parent's ends of the pipes
    asked for with ``PIPE`` (closed by ``communicate``). ``group``: it leads its own
    session, so ``kill`` signals its whole process group."""

    pid: int
    argv: list[str]
    group: bool
    stdin: int | None = None
    stdout: int | None = None
    stderr: int | None = None
    code: int | None = None  # once reaped; negative: killed by that signal

    def poll(self) -> int | None:
        """The exit code if it has ended (reaping it), else None."""
        if self.code is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.code = os.waitstatus_to_exitcode(status)
        return self.code

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit code; None when ``timeout`` seconds passed first (it still runs)."""
        if self.code is None and timeout is not None:
            fd = os.pidfd_open(self.pid)  # readable once the process has ended
            try:
                poller = select.poll()
                poller.register(fd, select.POLLIN)
                poller.poll(max(0.0, timeout) * 1000)
            finally:
                os.close(fd)
            return self.poll()
        if self.code is None:
            self.code = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.code

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal it (its process group when it leads one); nothing once it is reaped,
        when its pid may be another process' already."""
        if self.code is None:
            with contextlib.suppress(ProcessLookupError):
                (os.killpg if self.group else os.kill)(self.pid, sig)

    def communicate(self, data: bytes = b"", timeout: float | None = None,
                    hint: str = "") -> tuple[bytes, bytes]:
        """Write ``data`` to its stdin pipe and close it, read its stdout and stderr pipes to
        their end, wait for it: (stdout, stderr). ``ToolTimeout`` when ``timeout`` seconds
        pass first (it is killed and reaped)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        stdin, out, err = self.stdin, self.stdout, self.stderr
        self.stdin = self.stdout = self.stderr = None  # from here on _pump and we own them
        got: dict[int, list[bytes]] = {fd: [] for fd in (out, err) if fd is not None}
        try:
            done = _pump(stdin, memoryview(data), got, deadline)
        finally:
            for fd in got:
                os.close(fd)
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not done or self.wait(left) is None:
            self.kill()
            self.wait()
            raise ToolTimeout(self.argv, timeout or 0.0, hint)
        return (b"".join(got[out]) if out is not None else b"",
                b"".join(got[err]) if err is not None else b"")


def _pump(stdin: int | None, data: memoryview, got: dict[int, list[bytes]],
          deadline: float | None) -> bool:
    """Feed ``data`` to ``stdin`` (then close it: the child reads to EOF) while draining the
    pipes of ``got`` into it, until all are done (True) or ``deadline`` passes (False)."""
    poller = select.poll()
    for fd in got:
        poller.register(fd, select.POLLIN)
    live = len(got)
    try:
        if stdin is not None and data:
            os.set_blocking(stdin, False)  # write what fits, never block on a full pipe
            poller.register(stdin, select.POLLOUT)
        elif stdin is not None:
            os.close(stdin)
            stdin = None
        while live or stdin is not None:
            ms = None if deadline is None else (deadline - time.monotonic()) * 1000
            if ms is not None and ms <= 0:
                return False
            for fd, _ in poller.poll(ms):
                if fd == stdin:
                    try:
                        data = data[os.write(fd, data):]
                    except BrokenPipeError:  # it stopped reading: its exit code will say why
                        data = data[:0]
                    if not data:
                        poller.unregister(fd)
                        os.close(fd)
                        stdin = None
                elif chunk := os.read(fd, 65536):
                    got[fd].append(chunk)
                else:
                    poller.unregister(fd)
                    live -= 1
        return True
    finally:
        if stdin is not None:
            os.close(stdin)


def spawn(tool: str, args: Iterable[str], *, env: Mapping[str, str] | None = None,
          cwd: str | os.PathLike[str] | None = None, stdin: int | None = None,
          stdout: int | None = None, stderr: int | None = None, new_session: bool = True,
          die_with_parent: bool = True, pass_fds: Sequence[int] = (),
          preexec: Callable[[], None] | None = None,
          before_exec: Callable[[int], None] | None = None, hint: str = "") -> Child:
    """Start ``tool args`` and return at once; the caller reaps it (``Child.wait``).

    ``stdin``/``stdout``/``stderr``: an open fd the child gets as 0/1/2, ``PIPE``, or None
    for /dev/null. ``pass_fds`` stay open under their numbers; every other fd is closed.
    ``new_session``: it leads its own (Ctrl-C reaches kiln, not it; ``kill`` reaches its
    group). ``die_with_parent``: SIGKILL when kiln dies. ``preexec`` runs in the child just
    before exec; ``before_exec(pid)`` in the parent while the child waits (if it raises,
    the child is killed and reaped and the error propagates). The child starts with the
    default signal mask and SIGPIPE/SIGXFSZ dispositions. An exec failure raises
    ``KilnError("cannot start NAME: why", hint)``."""
    argv = [which(tool), *[str(a) for a in args]]
    toolenv.log_command(log, "spawn", argv)
    child_env = tool_env(env)
    stdio, ours, opened = _stdio((stdin, stdout, stderr))
    errr, errw = os.pipe2(os.O_CLOEXEC)
    gor, gow = os.pipe2(os.O_CLOEXEC) if before_exec is not None else (-1, -1)
    opened += [fd for fd in (errw, gor) if fd >= 0]
    child = Child(0, argv, new_session, *ours)
    msg = b""
    try:
        child.pid = os.fork()
        if child.pid == 0:
            _exec(argv, child_env, cwd, stdio, pass_fds, new_session, die_with_parent,
                  preexec, gor, errw, [*ours, errr, gow])
        _close(opened)
        opened = []
        if before_exec is not None:
            try:
                before_exec(child.pid)
            except BaseException:
                os.kill(child.pid, signal.SIGKILL)  # still waiting at the gate: no exec
                child.wait()
                raise
            os.write(gow, b"g")
        while chunk := os.read(errr, 256):  # EOF at exec (close-on-exec), or why not
            msg += chunk
    except BaseException:
        _close(ours)
        raise
    finally:
        _close([*opened, errr, gow])
    if msg:
        child.wait()
        _close(ours)
        raise KilnError(f"cannot start {Path(argv[0]).name}: {msg.decode('utf-8', 'replace')}",
                        hint)
    return child


def _stdio(specs: Sequence[int | None]) -> tuple[list[int], list[int | None], list[int]]:
    """(the child's fds 0/1/2, the parent's ends of the PIPEs, what the parent closes after
    the fork) for ``spawn``'s stdin/stdout/stderr."""
    child: list[int] = []
    ours: list[int | None] = []
    opened: list[int] = []
    for i, spec in enumerate(specs):
        mine: int | None = None
        if spec is None:
            fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            opened.append(fd)
        elif spec == PIPE:
            r, w = os.pipe2(os.O_CLOEXEC)
            fd, mine = (r, w) if i == 0 else (w, r)
            opened.append(fd)
        else:
            fd = spec
        child.append(fd)
        ours.append(mine)
    return child, ours, opened


def _close(fds: Iterable[int | None]) -> None:
    for fd in fds:
        if fd is not None and fd >= 0:
            os.close(fd)


def _exec(argv: list[str], env: dict[str, str], cwd: str | os.PathLike[str] | None,
          stdio: list[int], pass_fds: Sequence[int], new_session: bool, die_with_parent: bool,
          preexec: Callable[[], None] | None, gate: int, errw: int,
          parents: list[int | None]) -> NoReturn:
    """In the forked child of ``spawn``: set up, exec; write why to ``errw`` if it cannot."""
    try:
        _close(parents)  # the parent's pipe ends: a gate whose writer died reads EOF
        if new_session:
            os.setsid()
        if die_with_parent:
            toolenv.die_with_parent()
        else:
            toolenv.unblock_signals()
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores them; tools expect not
            signal.signal(sig, signal.SIG_DFL)
        if gate >= 0 and os.read(gate, 1) != b"g":  # the parent's step failed: no exec
            os._exit(127)
        if preexec is not None:
            preexec()
        # A source among 0-2 other than its own target could be overwritten before its turn.
        stdio = [fd if fd == target or fd > 2 else fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
                 for target, fd in enumerate(stdio)]
        for target, fd in enumerate(stdio):
            if fd == target:
                os.set_inheritable(fd, True)
            else:
                os.dup2(fd, target)
        for fd in pass_fds:
            os.set_inheritable(fd, True)
        low = 0
        for keep in sorted({0, 1, 2, errw, *pass_fds}):
            if low < keep:  # closerange(n, n) would close everything from n (close_range)
                os.closerange(low, keep)
            low = keep + 1
        os.closerange(low, os.sysconf("SC_OPEN_MAX"))
        if cwd is not None:
            os.chdir(cwd)
        os.execve(argv[0], argv, env)  # noqa: S606 - argv[0] resolved by which()
    except BaseException as e:  # the child must always reach os._exit
        why = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
        with contextlib.suppress(OSError):
            os.write(errw, why.encode())
    finally:
        os._exit(127)


def fork(fn: Callable[[], int], *, new_session: bool = False, die_with_parent: bool = False,
         null_stdio: bool = False, close_fds: Sequence[int] = ()) -> Child:
    """Run ``fn()`` in a child process and return at once; its result is the child's exit
    code. The child always ends in ``os._exit`` (it never unwinds into the caller's stack
    nor runs its atexit handlers); an exception escaping ``fn`` goes to fd 2, exit 1.

    ``close_fds``: the parent's ends of pipes, closed in the child first. ``new_session``:
    it leads its own (a terminal's Ctrl-C and hangup no longer reach it).
    ``die_with_parent``: SIGKILL when kiln dies. ``null_stdio``: /dev/null as 0/1/2 (it
    outlives the terminal). The parent reaps it (``Child.wait``) or exits first."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for fd in close_fds:
                os.close(fd)
            if new_session:
                os.setsid()
            if die_with_parent:
                toolenv.die_with_parent()
            if null_stdio:
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
            code = fn()
        except BaseException:
            with contextlib.suppress(BaseException):
                import traceback  # only a failing child needs it

                os.write(2, traceback.format_exc().encode())
        finally:
            os._exit(code)
    return Child(pid, [getattr(fn, "__qualname__", "fork")], new_session)
