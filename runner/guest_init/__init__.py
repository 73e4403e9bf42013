"""What kiln puts into a VM's snapshot so any image runs its workload.

Most images have no init, many have no shell. kiln injects into the VM's **snapshot**
(never the base volume, and never by mounting the untrusted filesystem on the host: the
writes go through ``debugfs -w`` on the snapshot file) its static files under ``/.kiln/``:

* ``busybox`` — a copy of the host's busybox-static: the init's only dependency;
* ``init`` — ``init.sh`` beside this module, booted as PID 1 (``init=/.kiln/init``);
* ``agent`` — ``agent.c`` and ``agentrun.c`` beside this module, static
  (``runner.guest_init.agentbin``): the guest end of the control channel
  (``runner.guest_init.channel``), which also runs the workload;
* ``settings`` — only where no control channel is up before the guest boots (a cold
  Firecracker run; ``write_settings``): the run's ``SET1`` frame
  (``runner.guest_init.channel``) without ``time``, which the agent reads and removes.

``workload()`` is the pure merge of the image's runtime config (``meta["config"]``, written
by ``builder.pipeline.merge_config``) with the CLI's overrides, docker's way: ``--entrypoint``
is not offered, a CLI command replaces ``Cmd``, ``-e`` overrides ``Env`` by key, PATH
defaults to docker's. ``inject()`` is the debugfs run. The workload travels in
``runner.vmm.driver.Boot`` to the driver, which sends it over the control channel
(``runner.guest_init.channel``) or, a cold Firecracker run's, writes it as ``settings``.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder import proc
from helper.base.errors import KilnError, UsageError

INIT_PATH = "/.kiln/init"
# The kernel command line's word for settings on the disk (``write_settings``): init.sh
# reads /.kiln/settings only when it is there (an image's own file is never taken).
SETTINGS_ARG = "kiln.ctl=file:/.kiln/settings"
# The kernel command line's word of a warm image's boot: the agent reads, before its
# hello, the files every run's settings are applied with (agentrun.c, warm_reads).
WARM_ARG = "kiln.warm"
BUSYBOX = Path("/bin/busybox")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_USER = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]*(?::[A-Za-z0-9_.][A-Za-z0-9_.-]*)?$")
_HOSTNAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def init_script() -> bytes:
    return (Path(__file__).parent / "init.sh").read_bytes()


@dataclass(frozen=True)
class Workload:
    """What the guest init runs."""

    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    workdir: str
    user: str
    hostname: str

    @property
    def path(self) -> str:
        return dict(self.env).get("PATH", DEFAULT_PATH)


def parse_env(items: Sequence[str], what: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep and what == "-e":
            # docker: `-e NAME` passes the caller's value (or nothing if unset)
            if key not in os.environ:
                continue
            value = os.environ[key]
        if not _ENV_KEY.fullmatch(key) or "\0" in value:
            raise UsageError(f"invalid environment entry {item!r} in {what}",
                             "write NAME=VALUE with NAME of letters, digits and _")
        out.append((key, value))
    return out


def workload(config: Mapping[str, Any], *, command: Sequence[str] = (),
             env: Sequence[str] = (), workdir: str | None = None, user: str | None = None,
             hostname: str, entrypoint: str | None = None) -> Workload:
    """Merge the image's runtime config with the CLI's overrides (pure).

    docker's rules: the command replaces the image's Cmd; ``entrypoint`` (``--entrypoint``)
    replaces the image's Entrypoint — ``""`` clears it — and then the image's Cmd is not
    used either (only the command given)."""
    merged: dict[str, str] = {}
    for k, v in parse_env(list(config.get("Env") or []), "the image's Env"):
        merged[k] = v
    for k, v in parse_env(env, "-e"):
        merged[k] = v
    merged.setdefault("PATH", DEFAULT_PATH)
    merged.setdefault("HOSTNAME", hostname)
    if entrypoint is None:
        entry = list(config.get("Entrypoint") or [])
        default_cmd = list(config.get("Cmd") or [])
    else:
        entry, default_cmd = ([entrypoint] if entrypoint else []), []
    argv = entry + (list(command) if command else default_cmd)
    if not argv:
        what = "--entrypoint ''" if entrypoint == "" else "the image has no Entrypoint or Cmd"
        raise UsageError(f"nothing to run: {what}",
                         "give a command after the source: kiln run SOURCE -- CMD ARG…")
    if any("\0" in a for a in argv):
        raise UsageError("a command argument contains a NUL byte", "remove it")
    wd = workdir if workdir is not None else str(config.get("WorkingDir") or "")
    if wd and not wd.startswith("/"):
        raise UsageError(f"working directory {wd!r} is not absolute", "give an absolute path")
    usr = user if user is not None else str(config.get("User") or "")
    if usr and not _USER.fullmatch(usr):
        raise UsageError(f"invalid user {usr!r}", "give NAME, UID, NAME:GROUP or UID:GID")
    if not _HOSTNAME.fullmatch(hostname):
        raise UsageError(f"invalid hostname {hostname!r}", "use lowercase letters, digits, -")
    return Workload(argv=tuple(argv), env=tuple(merged.items()), workdir=wd, user=usr,
                    hostname=hostname)


def debugfs_script(files: Mapping[str, Path]) -> str:
    """debugfs commands that create ``/.kiln`` and the mount points init.sh needs (an
    existing one makes a harmless "already exists" complaint) and write ``files`` (name
    in /.kiln → host file) owned by root (pure)."""
    cmds = [f"mkdir /{d}" for d in ("proc", "sys", "dev", ".kiln")]
    for name, src in files.items():
        # debugfs splits its arguments on blanks: kiln's own temp paths never have any
        if any(c in str(src) for c in ' "\t\n'):
            raise KilnError(f"unsafe temp path {src}", "set TMPDIR to a plain path")
        cmds += [f"write {src} /.kiln/{name}",
                 f"sif /.kiln/{name} uid 0",
                 f"sif /.kiln/{name} gid 0"]
    return "\n".join(cmds) + "\n"


def debugfs_errors(stderr: str) -> list[str]:
    """The complaints in debugfs's stderr that mean the injection failed (pure).

    debugfs exits 0 whatever its commands did, so its stderr is the result. Expected:
    its banner, "already exists" from the ``mkdir`` of a mount point the image has, and
    "File not found" from the ``rm`` of a settings file not written yet.
    """
    out: list[str] = []
    for raw in stderr.splitlines():
        line = raw.strip()
        if (not line or line.startswith(("debugfs ", "rm: File not found"))
                or "directory already exists" in line):
            continue
        out.append(line)
    return out


def _debugfs_write(image: Path, script: str) -> list[str]:
    """Run ``script`` in ``debugfs -w`` on ``image``; its complaints (``debugfs_errors``)."""
    res = proc.run("debugfs", ["-w", "-f", "-", str(image)], stdin=script.encode(),
                   timeout=120)
    return debugfs_errors(res.stderr.decode("utf-8", "replace"))


def inject(image: Path, w: Workload | None, *, agent: Path, busybox: Path = BUSYBOX,
           scratch: Path | None = None, settings: bytes | None = None) -> None:
    """Write kiln's init, busybox, the agent and — ``settings``, a ``SET1`` frame for a
    guest without a control channel — ``/.kiln/settings`` into the snapshot ``image`` (one
    debugfs run). ``w=None`` (``--init image``) writes nothing."""
    if w is None:
        return
    if not busybox.is_file():
        raise KilnError(f"{busybox} not found", "apt-get install busybox-static")
    with tempfile.TemporaryDirectory(prefix="kiln-init-", dir=scratch) as tmp:
        t = Path(tmp)
        (t / "init").write_bytes(init_script())
        os.chmod(t / "init", 0o755)  # noqa: S103 - executable in the guest
        files = {"busybox": busybox, "init": t / "init", "agent": agent}
        if settings is not None:
            files["settings"] = _settings_file(t, settings)
        errors = _debugfs_write(image, debugfs_script(files))
    if errors:
        raise KilnError(f"cannot write kiln's init into the VM's snapshot: {errors[0]}",
                        "an image with its own /.kiln cannot use kiln's init (boot it with "
                        "--init image); else the snapshot is full: give a larger --disk-size")


def _settings_file(tmp: Path, frame: bytes) -> Path:
    """The frame in a 0600 temp file: debugfs gives the guest's file its mode (the seed
    in it is root's to read until the agent removes it)."""
    path = tmp / "settings"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(frame)
    return path


def write_settings(image: Path, frame: bytes, *, scratch: Path | None = None) -> None:
    """(Re)write ``/.kiln/settings`` — a ``SET1`` frame — in the snapshot ``image``, which
    ``inject`` has given kiln's init (a cold Firecracker run: the frame holds eth0 from a
    lease taken after the snapshot was made, and is written again for another lease)."""
    with tempfile.TemporaryDirectory(prefix="kiln-init-", dir=scratch) as tmp:
        errors = _debugfs_write(image, "rm /.kiln/settings\n" + debugfs_script(
            {"settings": _settings_file(Path(tmp), frame)}))
    if errors:
        raise KilnError(f"cannot write the run's settings into the VM's snapshot: {errors[0]}",
                        "the snapshot is full: give a larger --disk-size")
