"""The helper's own process runner: stdlib ``subprocess`` only (``helper/`` never imports
``sh``), and the only module under ``helper/`` that starts a process.

Same rules as ``builder/proc.py``, from the same module (``helper.base.toolenv``), so both
layers fail the same way: a tool is resolved to an absolute path from a fixed search path
(never the caller's ``PATH``), runs with an environment built from an allowlist, is logged
shell-quoted at debug level, and is killed with its whole process group when its timeout
passes. Failures raise ``ToolNotFound``, ``ToolTimeout`` or ``ToolError(cmd, code,
stderr_tail)``.

* ``run(tool, args)``: a tool named by the helper, run to completion; it dies with us.
* ``spawn(argv)``: a child that outlives the op (the jailer, which leaves Firecracker
  running): a binary from the trusted config, its own session, no PDEATHSIG; ``wait`` ends
  it when it overruns.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import signal
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeAlias

from helper.base import toolenv
from helper.base.errors import ToolError, ToolNotFound, ToolTimeout
from helper.base.toolenv import Result

# Result is the runner's public type: callers type against run.Result.
__all__ = ["Child", "Result", "limit_cpu", "run", "spawn", "wait", "which"]

log = logging.getLogger("kiln.helper.run")

DEFAULT_TIMEOUT = 300.0

Child: TypeAlias = "subprocess.Popen[bytes]"


def which(tool: str) -> str:
    """Absolute path of ``tool`` on the fixed search path, or raise ``ToolNotFound``.
    (``helper.main`` points this at the trusted config's ``Config.tool``.)"""
    if "/" in tool:
        raise ToolNotFound(tool)  # callers name tools, never paths
    return toolenv.which(tool)


def limit_cpu(seconds: int) -> None:
    """Cap this process' CPU time for a sudo caller's op (``helper.main``). Soft = hard:
    at the limit the kernel sends SIGKILL (it checks the hard limit first), so there is no
    SIGXCPU to handle and the op dies like any killed op (its records and ``reclaim`` deal
    with what it leaves). No core dumps either: a root helper's memory is not for disk.
    Children inherit both, so a tool a caller makes spin is bounded too. Irreversible
    without CAP_SYS_RESOURCE (containers lack it): an op whose child outlives it (a VM) is
    never limited (``helper.main.UNLIMITED_CPU_OPS``)."""
    resource.setrlimit(resource.RLIMIT_CPU, (seconds, seconds))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _tail(data: bytes, lines: int = 15) -> str:
    return "\n".join(data.decode("utf-8", "replace").rstrip().splitlines()[-lines:])


def run(tool: str, args: Iterable[str], *, timeout: float = DEFAULT_TIMEOUT,
        stdin: bytes | None = None, ok_codes: tuple[int, ...] = (0,), hint: str = "",
        env: Mapping[str, str] | None = None,
        pass_fds: tuple[int, ...] = ()) -> Result:
    """Run ``tool args`` to completion and return its output. ``env``: variables set over
    the allowlisted environment. ``pass_fds``: open files the tool gets at the same numbers
    (it is given ``/proc/self/fd/N``, never a name)."""
    argv = [which(tool), *[str(a) for a in args]]
    toolenv.log_command(log, "run", argv)
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=toolenv.tool_env(toolenv.ENV_ALLOW, env),
        pass_fds=pass_fds,
        start_new_session=True,  # the timeout kill reaches the whole process group
        preexec_fn=toolenv.die_with_parent,  # noqa: PLW1509 - no threads are started in the child
    )
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise ToolTimeout(argv, timeout, hint) from None
    if proc.returncode not in ok_codes:
        raise ToolError(argv, proc.returncode, _tail(err), hint)
    return Result(argv, proc.returncode, out, err)


def spawn(argv: Sequence[str], *, stdout: int, stderr: int | None = None,
          die_with_parent: bool = False) -> Child:
    """Start ``argv`` and return at once: a child that may outlive the op (the jailer).

    ``argv[0]`` is an absolute path the caller took from the trusted config (``run`` is
    for tools found by name). stdin is /dev/null, stdout and stderr (default: stdout) the
    files given, cwd ``/``, the environment the allowlisted one; it leads its own session
    (the VM outlives us and our terminal) and starts with the default signal mask (an op
    holds the signals sudo relays, and a blocked mask survives exec). No PDEATHSIG unless
    ``die_with_parent``: the jailer's Firecracker must outlive the helper."""
    if not os.path.isabs(argv[0]):
        raise ToolNotFound(argv[0])  # never looked up: a trusted absolute path or nothing
    toolenv.log_command(log, "spawn", argv)
    return subprocess.Popen(
        list(argv), stdin=subprocess.DEVNULL, stdout=stdout,
        stderr=stdout if stderr is None else stderr,
        env=toolenv.tool_env(toolenv.ENV_ALLOW), cwd="/", start_new_session=True,
        # The helper is single-threaded, so preexec_fn is safe.
        preexec_fn=toolenv.die_with_parent if die_with_parent else toolenv.unblock_signals)  # noqa: PLW1509


def wait(child: Child, timeout: float) -> int | None:
    """``child``'s exit code, or None when ``timeout`` seconds passed first: then its whole
    process group has been killed and it is reaped."""
    try:
        return child.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        return None


def fork_as(uid: int, gid: int, work: Callable[[], None], keep: Sequence[int]) -> int:
    """Run ``work`` in a forked child with only ``uid``/``gid`` (no groups, no
    capabilities, no fd but ``keep`` and stdio), no exec; its exit code: 0 done, an errno
    (1-123) when ``work`` raised ``OSError``, 124 another failure. The helper's one fork:
    bytes it moves for a caller are moved with the caller's rights only."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 125
        try:
            prev = 2
            for fd in sorted(keep):
                os.closerange(prev + 1, fd)
                prev = fd
            os.closerange(prev + 1, 1 << 16)
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            work()
            code = 0
        except OSError as e:
            code = e.errno if e.errno and 0 < e.errno < 124 else 124
        except BaseException:
            code = 124
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)
