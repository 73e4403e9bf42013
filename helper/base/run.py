"""The helper's own tool runner: stdlib ``subprocess`` only (``helper/`` never imports ``sh``).

Same rules as ``builder/proc.py``, so both layers fail the same way: a tool is resolved to an
absolute path from a fixed search path (never the caller's ``PATH``), runs with an
environment built from an allowlist, is logged shell-quoted at debug level, and is killed
with its whole process group when its timeout passes. Failures raise ``ToolNotFound``,
``ToolTimeout`` or ``ToolError(cmd, code, stderr_tail)``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import shlex
import shutil
import signal
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from helper.base.errors import ToolError, ToolNotFound, ToolTimeout

log = logging.getLogger("kiln.helper.run")

SEARCH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Only these variables reach a tool; LD_PRELOAD, PYTHONPATH and a user's PATH never do.
ENV_ALLOW = ("HOME", "TMPDIR")

PACKAGES = {
    "losetup": "mount",
    "mount": "mount",
    "umount": "mount",
    "dmsetup": "dmsetup",
    "mkfs.btrfs": "btrfs-progs",
    "mkfs.xfs": "xfsprogs",
    "resize2fs": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "dumpe2fs": "e2fsprogs",
    "thin_check": "thin-provisioning-tools",
    "iptables": "iptables",
    "ebtables": "iptables",
}

DEFAULT_TIMEOUT = 300.0
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Result:
    cmd: list[str]
    code: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", "replace")


def which(tool: str) -> str:
    """Absolute path of ``tool`` on the fixed search path, or raise ``ToolNotFound``."""
    if "/" in tool:
        raise ToolNotFound(tool)  # callers name tools, never paths
    found = shutil.which(tool, path=SEARCH_PATH)
    if found is None:
        raise ToolNotFound(tool, PACKAGES.get(tool, ""))
    return found


def tool_env(allow: tuple[str, ...] = ENV_ALLOW) -> dict[str, str]:
    """A tool's environment: the ``allow``-listed variables, a fixed PATH and C locale."""
    env = {k: os.environ[k] for k in allow if k in os.environ}
    env["PATH"] = SEARCH_PATH
    env["LC_ALL"] = "C.UTF-8"  # messages are parsed (resize2fs, losetup): keep them stable
    env["LANG"] = "C.UTF-8"
    return env


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


def unblock_signals() -> None:
    """In a child before exec: the default (empty) signal mask. ``helper.main`` holds the
    signals sudo relays for the whole op, and a blocked mask survives exec; a tool must
    still die of its own SIGTERM/SIGINT (subprocess's ``restore_signals`` resets only the
    dispositions of SIGPIPE and SIGXFSZ, never the mask)."""
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


def die_with_parent() -> None:
    """In the child: SIGKILL us when the caller dies, so no tool outlives a killed kiln;
    the default signal mask (``unblock_signals``)."""
    import ctypes

    unblock_signals()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def vmm_child() -> None:
    """``preexec_fn`` of a child that outlives the op (the jailer, then Firecracker): the
    default signal mask, without the PDEATHSIG a tool gets."""
    unblock_signals()


def _tail(data: bytes, lines: int = 15) -> str:
    return "\n".join(data.decode("utf-8", "replace").rstrip().splitlines()[-lines:])


def run(tool: str, args: Iterable[str], *, timeout: float = DEFAULT_TIMEOUT,
        stdin: bytes | None = None, ok_codes: tuple[int, ...] = (0,), hint: str = "",
        extra_env: Mapping[str, str] | None = None,
        pass_fds: tuple[int, ...] = ()) -> Result:
    """Run ``tool args`` to completion and return its output. ``pass_fds``: open files
    the tool gets at the same numbers (it is given ``/proc/self/fd/N``, never a name)."""
    argv = [which(tool), *[str(a) for a in args]]
    log.debug("run: %s", shlex.join(argv))
    env = tool_env()
    if extra_env:
        env.update(extra_env)
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        pass_fds=pass_fds,
        start_new_session=True,  # the timeout kill reaches the whole process group
        preexec_fn=die_with_parent,  # noqa: PLW1509 - no threads are started in the child
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
