"""The one module that runs external tools (and the only importer of ``sh``).

Every tool is resolved to an absolute path from a fixed search path (never the caller's
``PATH``), runs with an environment built from an allowlist, is logged as a shell-quoted
command line, and has a timeout. Failures come back as typed errors that name the command:
``ToolNotFound``, ``ToolTimeout``, ``ToolError(cmd, code, stderr_tail)``.

The privileged helper has its own stdlib runner (``helper/`` must not depend on ``sh``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shlex
import shutil
import signal
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import sh

from helper.base import run as helper_run
from helper.base.errors import ToolError, ToolNotFound, ToolTimeout
from helper.base.run import SEARCH_PATH, Result

# Result is re-exported: callers type against proc.Result.
__all__ = ["Result", "run", "tool_env", "version_of", "which"]

log = logging.getLogger("kiln.proc")


# Environment variables passed through to tools. Anything else (LD_PRELOAD, PYTHONPATH, a
# user's PATH, ...) is dropped.
ENV_ALLOW = (
    *helper_run.ENV_ALLOW,
    "XDG_RUNTIME_DIR",
    "XDG_CONFIG_HOME",
    "REGISTRY_AUTH_FILE",
    "DOCKER_CONFIG",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
)

# Debian package that provides each tool, for the "install it" hint.
PACKAGES = {
    "skopeo": "skopeo",
    "umoci": "umoci",
    "mke2fs": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "dumpe2fs": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "resize2fs": "e2fsprogs",
    "docker-registry": "docker-registry",
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "mkfs.btrfs": "btrfs-progs",
    "mkfs.xfs": "xfsprogs",
    "losetup": "mount",
    "mount": "mount",
    "umount": "mount",
    "dmsetup": "dmsetup",
    "lz4": "lz4",
    "cpio": "cpio",
    "busybox": "busybox-static",
    "debootstrap": "debootstrap",
    "ip": "iproute2",
    "setpriv": "util-linux",
}

DEFAULT_TIMEOUT = 600.0

def which(tool: str) -> str:
    """Absolute path of ``tool`` on kiln's fixed search path, or raise ``ToolNotFound``."""
    if "/" in tool:
        if os.access(tool, os.X_OK):
            return tool
        raise ToolNotFound(tool, PACKAGES.get(Path(tool).name, ""))
    found = shutil.which(tool, path=SEARCH_PATH)
    if found is None:
        raise ToolNotFound(tool, PACKAGES.get(tool, ""))
    return found


def tool_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a tool runs with: the allowlist, a fixed PATH and C locale."""
    env = helper_run.tool_env(ENV_ALLOW)
    if extra:
        env.update(extra)
    return env


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
    exe = which(tool)
    argv = [exe, *[str(a) for a in args]]
    log.debug("run: %s", shlex.join(argv))
    out_chunks: list[bytes] = []
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
        "_preexec_fn": helper_run.die_with_parent,
        "_return_cmd": True,
        "_decode_errors": "replace",
    }
    if cwd is not None:
        kwargs["_cwd"] = str(cwd)
    if stdin is not None:
        kwargs["_in"] = stdin
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
    stdout = b"".join(out_chunks) if on_line is not None else (proc.stdout or b"")
    if isinstance(stdout, str):
        stdout = stdout.encode()
    stderr = proc.stderr or b""
    if isinstance(stderr, str):
        stderr = stderr.encode()
    return Result(argv, proc.exit_code, stdout, stderr)


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
