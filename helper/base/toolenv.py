"""What every child of kiln gets, on both sides of sudo: where its binary is found, the
environment it runs with, the log line that names it and the process state it starts in.

kiln's tool runner (``builder/proc.py``) and the helper's (``helper/base/run.py``) both
build on this module, so the two fail and log the same way. It starts no process and
imports nothing that does (stdlib only), so either side may import it:

* a tool is found on ``SEARCH_PATH``, never the caller's ``PATH``; a missing one raises
  ``ToolNotFound`` with the Debian package that provides it;
* a child's environment holds the allowlisted variables only, a fixed ``PATH`` and the C
  locale (messages are parsed); LD_PRELOAD, PYTHONPATH and a user's PATH never pass;
* each command is logged shell-quoted at debug level (``run: ...``, ``spawn: ...``);
* in the child before exec: the default signal mask and, per call, SIGKILL when the
  parent dies (``die_with_parent``).
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from helper.base.errors import ToolNotFound

SEARCH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# The helper's tools (root) see only these of its environment...
ENV_ALLOW = ("HOME", "TMPDIR")
# ...kiln's own (the caller's uid) also registry credentials and proxies: skopeo needs them.
KILN_ENV_ALLOW = (
    *ENV_ALLOW,
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
    "thin_check": "thin-provisioning-tools",
    "iptables": "iptables",
    "ebtables": "iptables",
    "lz4": "lz4",
    "cpio": "cpio",
    "busybox": "busybox-static",
    "debootstrap": "debootstrap",
    "ip": "iproute2",
    "setpriv": "util-linux",
    "sudo": "sudo",
}

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Result:
    """A finished tool: its argv as run, exit code and output."""

    cmd: list[str]
    code: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", "replace")


def which(tool: str) -> str:
    """Absolute path of the tool named ``tool`` on ``SEARCH_PATH``, or ``ToolNotFound``.
    (Each runner decides what a path instead of a name means.)"""
    found = shutil.which(tool, path=SEARCH_PATH)
    if found is None:
        raise ToolNotFound(tool, PACKAGES.get(tool, ""))
    return found


def tool_env(allow: tuple[str, ...] = ENV_ALLOW,
             extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A child's environment: the ``allow``-listed variables, a fixed PATH and the C locale,
    then ``extra`` (the caller's own settings for this one command)."""
    env = {k: os.environ[k] for k in allow if k in os.environ}
    env["PATH"] = SEARCH_PATH
    env["LC_ALL"] = "C.UTF-8"  # messages are parsed (resize2fs, losetup): keep them stable
    env["LANG"] = "C.UTF-8"
    if extra:
        env.update(extra)
    return env


def log_command(log: logging.Logger, verb: str, argv: Sequence[str]) -> None:
    """``VERB: argv`` shell-quoted at debug level (``--debug`` shows every command)."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s: %s", verb, shlex.join(argv))


def unblock_signals() -> None:
    """In a child before exec: the default (empty) signal mask. ``helper.main`` holds the
    signals sudo relays for the whole op, and a blocked mask survives exec; a tool must
    still die of its own SIGTERM/SIGINT (subprocess's ``restore_signals`` resets only the
    dispositions of SIGPIPE and SIGXFSZ, never the mask)."""
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


def die_with_parent() -> None:
    """In the child: SIGKILL us when the caller dies, so no tool outlives a killed kiln;
    the default signal mask (``unblock_signals``). "Dies" is the kernel's: the *thread*
    that forked us ending counts, so fork from a thread that outlives the child."""
    import ctypes  # here: only children pay for loading it

    unblock_signals()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
