"""Firecracker jails: the config and checks, launch the jailer, hand over the API socket,
remove. Staging the chroot is ``helper.jail.stage``.

Privileged (runs as root inside kiln-helper; ops ``jail-stage``, ``jail-launch``,
``jail-grant-api``, ``jail-remove``), so stdlib only, and nothing a caller sends is trusted:

* binaries come only from ``JailConfig`` (trusted config): absolute, root-owned, not
  writable by group/others, the exec file's name containing "firecracker" (jailer 1.12
  demands it). No op takes a path to run or an argv;
* ids are ``[a-z2-7]{1,32}``; the VM's uid/gid come from the configured range (never 0,
  never the caller's); names inside the chroot are plain file names;
* staged sources resolve beneath a configured source root by an ``O_NOFOLLOW`` walk, are
  opened once and acted on through that fd (a swap between check and use is detected by
  comparing inodes after linking); block devices only as the caller area's own snapshot
  devices ``/dev/mapper/kiln-<area key>-snap-…`` (``helper.jail.stage``).

Layout (the jailer's): ``BASE/<exec-file name>/ID/root`` is the chroot. Beside ``root`` we
keep ``console.log`` (Firecracker's stdout/stderr: the serial console) and, after
``jail_grant_api``, ``api.sock``: a hard link to the socket inside the chroot, the caller
uid's alone (0600; never its group, which other users may share), in the root-owned jail
directory (0711: traversal, no listing) — the chroot root itself stays 0700 to the VM's uid.

Staging (``helper.jail.stage``): what may be staged, and who ends up owning what.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from helper import procstatus
from helper.base import run
from helper.base.errors import Conflict, KilnError, NotFound, ToolError, UsageError
from helper.cgroup import CgroupConfig, check_parent, check_vm_id
from helper.jail import cgroups as jailcg

API_SOCK = "/run/api.sock"  # inside the chroot
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_NETNS_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
RESOURCES = ("fsize", "no-file")
UID_MAX = 2**32 - 2


@dataclass(frozen=True)
class JailConfig:
    """Trusted configuration ([tools] and [jails] of /etc/kiln/config.toml)."""

    jailer: Path
    firecracker: Path
    chroot_base: Path  # on the pool's filesystem, so staging hard-links
    uid_first: int = 900_000  # VM uids/gids: [uid_first, uid_first + uid_count)
    uid_count: int = 65_536
    sources: tuple[Path, ...] = ()  # roots staged files may come from (pool, kernel cache)
    area: Path | None = None  # the caller's area (default: sources[0]); its dm key confines
    netns_dir: Path = Path("/run/netns")
    cgroup: CgroupConfig = field(default_factory=CgroupConfig)


@dataclass(frozen=True)
class StageItem:
    """One file placed at ``/<name>`` in the chroot: from a file under a source root, or a
    block-device node for ``/dev/mapper/kiln-<area key>-snap-…``."""

    name: str
    source: Path
    writable: bool = False


@dataclass(frozen=True)
class Staged:
    root: Path
    warnings: list[str]
    devices: list[str] = field(default_factory=list)  # dm names whose nodes it holds


@dataclass(frozen=True)
class JailSpec:
    """Everything the jailer is told. Built by the runner, validated here."""

    jail_id: str
    uid: int
    gid: int
    cgroup_version: int = 2
    cgroups: tuple[tuple[str, str], ...] = ()  # --cgroup FILE=VALUE
    parent_cgroup: str | None = None
    netns: str | None = None  # a name under JailConfig.netns_dir
    resource_limits: tuple[tuple[str, int], ...] = ()  # --resource-limit R=V
    daemonize: bool = False
    new_pid_ns: bool = True


# -- validation ---------------------------------------------------------------------------


def check_tool(path: Path, must_contain: str = "") -> Path:
    """A trusted binary: absolute, a regular root-owned file no one else can write."""
    if not path.is_absolute():
        raise UsageError(f"tool path {path} is not absolute", "fix [tools] in the kiln config")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise NotFound(f"{path} does not exist", "install it or fix [tools] in the kiln "
                       "config (tests: scripts/fetch-firecracker.sh)") from None
    if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise UsageError(f"refusing tool {path}: not a root-owned regular file writable "
                         "only by root", "chown root:root and chmod 0755 it")
    if must_contain and must_contain not in path.name:
        raise UsageError(f"refusing tool {path}: its name must contain {must_contain!r}",
                         "jailer 1.12 only execs a file named like 'firecracker'")
    return path


def check_config(cfg: JailConfig) -> JailConfig:
    check_tool(cfg.jailer)
    check_tool(cfg.firecracker, "firecracker")
    if not cfg.chroot_base.is_absolute() or ".." in cfg.chroot_base.parts:
        raise UsageError(f"invalid chroot base {cfg.chroot_base}", "give an absolute path")
    if cfg.uid_first < 1 or cfg.uid_count < 1 or cfg.uid_first + cfg.uid_count - 1 > UID_MAX:
        raise UsageError("invalid uid range", "uid_gid_range must exclude 0 and fit 32 bits")
    return cfg


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise UsageError(f"invalid file name {name!r}",
                         "use letters, digits, '.', '_' and '-', not starting with '.' or '-'")
    return name


def check_ids(cfg: JailConfig, uid: int, gid: int, caller_uid: int | None = None) -> None:
    for what, n in (("uid", uid), ("gid", gid)):
        if type(n) is not int or not cfg.uid_first <= n < cfg.uid_first + cfg.uid_count:
            raise UsageError(f"{what} {n!r} is outside the VM range {cfg.uid_first}-"
                             f"{cfg.uid_first + cfg.uid_count - 1}",
                             "VM uids/gids come from [jails] uid_gid_range")
    if caller_uid is not None and uid == caller_uid:
        raise UsageError(f"uid {uid} is the caller's own", "a VM runs as its own uid")


def check_spec(cfg: JailConfig, spec: JailSpec) -> JailSpec:
    check_vm_id(spec.jail_id)
    check_ids(cfg, spec.uid, spec.gid)
    if spec.cgroup_version not in (1, 2):
        raise UsageError(f"invalid cgroup version {spec.cgroup_version!r}", "use 1 or 2")
    jailcg.check_files(spec.cgroup_version, spec.cgroups)  # limits only, in range
    if spec.parent_cgroup is not None:
        check_parent(spec.parent_cgroup)
        allowed = {cfg.cgroup.parent, f"{cfg.cgroup.parent}/{spec.jail_id}"}
        if spec.parent_cgroup not in allowed:
            raise UsageError(f"refusing parent cgroup {spec.parent_cgroup!r}",
                             f"VM cgroups live under {cfg.cgroup.parent!r}")
    if spec.netns is not None and not _NETNS_RE.fullmatch(spec.netns):
        raise UsageError(f"invalid network namespace name {spec.netns!r}", "")
    for res, val in spec.resource_limits:
        if res not in RESOURCES or type(val) is not int or not 0 <= val < 2**63:
            raise UsageError(f"refusing resource limit {res!r}={val!r}",
                             f"use one of {', '.join(RESOURCES)} with a non-negative integer")
    return spec


# -- paths --------------------------------------------------------------------------------


def jail_dir(cfg: JailConfig, jail_id: str) -> Path:
    return cfg.chroot_base / cfg.firecracker.name / check_vm_id(jail_id)


def chroot(cfg: JailConfig, jail_id: str) -> Path:
    return jail_dir(cfg, jail_id) / "root"


def open_dir_nofollow(path: Path) -> int:
    """Open an absolute trusted directory, refusing a symlink as any component."""
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in path.parts[1:]:
            nfd = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=fd)
            os.close(fd)
            fd = nfd
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UsageError(f"{path} has a symlink or non-directory component",
                             "kiln refuses symlinks in the paths it acts on") from None
        raise NotFound(f"{path} does not exist", "") from None
    return fd


# -- operations ---------------------------------------------------------------------------


def jailer_argv(cfg: JailConfig, spec: JailSpec) -> list[str]:
    """The jailer's exact argv for ``spec`` (pure apart from validation)."""
    check_spec(cfg, spec)
    argv = [
        str(cfg.jailer),
        "--id", spec.jail_id,
        "--exec-file", str(cfg.firecracker),
        "--uid", str(spec.uid),
        "--gid", str(spec.gid),
        "--cgroup-version", str(spec.cgroup_version),
    ]
    for fname, value in spec.cgroups:
        argv += ["--cgroup", f"{fname}={value}"]
    if spec.parent_cgroup is not None:
        # v2 with no --cgroup: the jailer only moves itself into this existing cgroup.
        argv += ["--parent-cgroup", spec.parent_cgroup]
    argv += ["--chroot-base-dir", str(cfg.chroot_base)]
    if spec.netns is not None:
        argv += ["--netns", str(cfg.netns_dir / spec.netns)]
    for res, val in spec.resource_limits:
        argv += ["--resource-limit", f"{res}={val}"]
    if spec.daemonize:
        argv.append("--daemonize")  # setsid + stdio to /dev/null (no console log)
    if spec.new_pid_ns:
        argv.append("--new-pid-ns")  # the jailer exits after writing <chroot>/firecracker.pid
    argv += ["--", "--api-sock", API_SOCK]
    return argv


def jail_launch(cfg: JailConfig, spec: JailSpec, *, timeout: float = 10.0) -> int:
    """Run the jailer for a staged jail; return Firecracker's pid (host namespace).

    Needs ``new_pid_ns`` (the jailer then exits once Firecracker runs, so we can wait for
    it). Firecracker's stdout/stderr (the serial console) go to ``console.log``."""
    check_config(cfg)
    argv = jailer_argv(cfg, spec)
    if not spec.new_pid_ns:
        raise UsageError("jail_launch needs new_pid_ns", "the helper waits for the jailer")
    root = chroot(cfg, spec.jail_id)
    rst = os.lstat(root) if root.parent.is_dir() else None
    if rst is None or not stat.S_ISDIR(rst.st_mode):
        raise NotFound(f"jail {spec.jail_id} is not staged", "run jail-stage first")
    if spec.netns is not None and not (cfg.netns_dir / spec.netns).exists():
        raise NotFound(f"network namespace {spec.netns} does not exist", "")
    console = root.parent / "console.log"
    out = os.open(console, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        # Its own session, the allowlisted env, the default signal mask, and no PDEATHSIG:
        # Firecracker outlives the op (helper.base.run.spawn).
        child = run.spawn(argv, stdout=out)
    finally:
        os.close(out)
    code = run.wait(child, timeout)
    if code is None:
        raise ToolError(argv, -9, _tail(console), "the jailer hung; see console.log")
    if code != 0:
        raise ToolError(argv, code, _tail(console))
    pidfile = root / f"{cfg.firecracker.name}.pid"
    text = pidfile.read_text().strip() if pidfile.exists() else ""
    if not text.isdigit():
        raise ToolError(argv, code, f"no pid in {pidfile}")
    return int(text)


def _tail(path: Path, n: int = 10) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-n:])
    except OSError:
        return ""


def jail_grant_api(cfg: JailConfig, jail_id: str, caller_uid: int, caller_gid: int, *,
                   timeout: float = 5.0) -> Path:
    """Hand the API socket to the caller's uid: ``BASE/<fc>/ID/api.sock`` (0600, the caller's),
    a hard link of the chroot's socket, in the root-owned jail directory (0711). Also makes
    console.log the caller's (0400). Waits up to ``timeout`` for the socket."""
    return grant_socket(cfg, jail_id, caller_uid, caller_gid, API_SOCK, "api.sock",
                        timeout=timeout, console=True)


def grant_socket(cfg: JailConfig, jail_id: str, caller_uid: int, caller_gid: int,
                 inner: str, outer: str, *, timeout: float = 5.0,
                 console: bool = False) -> Path:
    """Hard-link the socket Firecracker bound at ``inner`` (a path in the chroot) to
    ``BASE/<fc>/ID/<outer>``, the caller uid's alone (0600). The socket must be the VM's
    (or the caller's, granted before); ``console``: also hand over console.log."""
    check_vm_id(jail_id)
    for what, n in (("uid", caller_uid), ("gid", caller_gid)):
        if type(n) is not int or not 0 <= n <= UID_MAX:
            raise UsageError(f"invalid caller {what} {n!r}", "")
    jd = jail_dir(cfg, jail_id)
    jfd = open_dir_nofollow(jd)
    try:
        rst = os.stat("root", dir_fd=jfd, follow_symlinks=False)
        if caller_uid == rst.st_uid:
            raise UsageError("the caller is the VM's own uid", "")
        sock = Path(inner).relative_to("/")
        what = "API" if outer == "api.sock" else outer
        deadline = time.monotonic() + timeout
        rfd = _await_dir(jd / "root" / sock.parent, deadline)
        try:
            sst = _await_socket(rfd, sock.name, jail_id, deadline)
            # Owned by the VM, or by the caller when granted before (the link shares it).
            if not stat.S_ISSOCK(sst.st_mode) or sst.st_uid not in (rst.st_uid, caller_uid):
                raise Conflict(f"the {what} socket of jail {jail_id} is not the VM's socket", "")
            with contextlib.suppress(FileNotFoundError):
                old = os.stat(outer, dir_fd=jfd, follow_symlinks=False)
                if not stat.S_ISSOCK(old.st_mode):
                    raise Conflict(f"{jd}/{outer} exists and is not a socket", "")
                os.unlink(outer, dir_fd=jfd)
            os.link(sock.name, outer, src_dir_fd=rfd, dst_dir_fd=jfd, follow_symlinks=False)
        finally:
            os.close(rfd)
        linked = os.stat(outer, dir_fd=jfd, follow_symlinks=False)
        if (linked.st_ino, linked.st_dev) != (sst.st_ino, sst.st_dev):
            os.unlink(outer, dir_fd=jfd)
            raise Conflict(f"the {what} socket of jail {jail_id} changed while granting", "")
        # A socket cannot be opened to fchown it: by name, in jd, which only root writes,
        # so the name checked above stays put. The caller's uid alone: its primary group
        # may be shared with other users.
        os.chown(outer, caller_uid, 0, dir_fd=jfd, follow_symlinks=False)
        os.chmod(outer, 0o600, dir_fd=jfd)
        if console:
            _give_console(jfd, jail_id, caller_uid)
        os.chmod(jd, 0o711)  # noqa: S103 - traversal only; what is inside guards itself
    finally:
        os.close(jfd)
    return jd / outer


def _await_dir(path: Path, deadline: float) -> int:
    while True:
        try:
            return open_dir_nofollow(path)
        except NotFound:
            if time.monotonic() > deadline:
                raise NotFound(f"{path} never appeared",
                               "did jail-launch succeed? see console.log") from None
            time.sleep(0.02)


def _await_socket(rfd: int, name: str, jail_id: str, deadline: float) -> os.stat_result:
    while True:
        try:
            return os.stat(name, dir_fd=rfd, follow_symlinks=False)
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise NotFound(f"no {name} socket in jail {jail_id}",
                               "Firecracker did not start or bind it; see console.log"
                               ) from None
            time.sleep(0.02)


def _give_console(jfd: int, jail_id: str, caller_uid: int) -> None:
    """console.log (made by jail-stage: root's, one link) readable by the caller alone."""
    fd = os.open("console.log", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                 dir_fd=jfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid not in (0, caller_uid):
            raise Conflict(f"the console log of jail {jail_id} is not the one kiln made", "")
        os.fchown(fd, caller_uid, 0)
        os.fchmod(fd, 0o400)
    finally:
        os.close(fd)


def _mounts_under(path: Path) -> list[str]:
    real = os.path.realpath(path)
    out: list[str] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4:
                mp = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
                if mp == real or mp.startswith(real + "/"):
                    out.append(mp)
    return out


def jail_pid(cfg: JailConfig, jail_id: str) -> int | None:
    """Firecracker's pid from the jail's pid file, when that process still runs it."""
    pidfile = chroot(cfg, jail_id) / f"{cfg.firecracker.name}.pid"
    try:
        text = pidfile.read_text().strip()
        exe = os.readlink(f"/proc/{int(text)}/exe")
    except (OSError, ValueError):
        return None
    return int(text) if Path(exe.removesuffix(" (deleted)")).name == cfg.firecracker.name \
        else None


def uid_processes(uid: int) -> list[int]:
    """Live (not zombie) processes any of whose real, effective, saved or fs uids is
    ``uid``: what a VM uid runs, whatever pid file or namespace it hides behind."""
    out: list[int] = []
    for name in os.listdir("/proc"):
        if name.isdigit() and procstatus.runs_as(int(name), uid):
            out.append(int(name))
    return out


def kill_uid(uid: int, timeout: float = 30.0) -> int:
    """SIGKILL every process of the VM uid ``uid`` (held by this caller: nobody else's
    process has it) and wait until none is left; how many were killed. Each is pinned by
    a pidfd and its uid checked again through it before the signal."""
    killed, deadline = 0, time.monotonic() + timeout
    while procs := uid_processes(uid):
        for pid in procs:
            with contextlib.suppress(OSError):
                fd = os.pidfd_open(pid)
                try:
                    if procstatus.runs_as(pid, uid):  # still that process (the fd pins the number)
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
                        killed += 1
                finally:
                    os.close(fd)
        if time.monotonic() > deadline:
            raise Conflict(f"processes of VM uid {uid} survive SIGKILL", "retry in a moment")
        time.sleep(0.05)
    return killed


def jail_remove(cfg: JailConfig, jail_id: str) -> None:
    """Delete the jail directory. Refuses while something is mounted inside it or its
    Firecracker still runs (kill the VM's cgroup first)."""
    jd = jail_dir(cfg, jail_id)
    try:
        st = os.lstat(jd)
    except FileNotFoundError:
        raise NotFound(f"jail {jail_id} does not exist", "") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{jd} is not a directory", "")
    os.close(open_dir_nofollow(jd))  # raises on a symlinked path
    mounted = _mounts_under(jd)
    if mounted:
        raise Conflict(f"jail {jail_id} still has mounts: {', '.join(mounted)}",
                       "unmount them first; kiln never deletes through a mount")
    if jail_pid(cfg, jail_id) is not None:
        raise Conflict(f"jail {jail_id} still runs Firecracker",
                       "stop the VM (kill its cgroup) first")
    if not shutil.rmtree.avoids_symlink_attacks:  # pragma: no cover - Linux has it
        raise KilnError("this platform cannot remove trees safely", "")
    shutil.rmtree(jd)


def jails_holding(chroot_base: Path, rdev: int) -> list[str]:
    """Ids of the jails (of any exec-file name) whose chroot holds a block node of device
    ``rdev``: a dm minor is reused once its device goes, so such a node must not outlive it."""
    out: list[str] = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for sub in os.scandir(chroot_base):
            if not sub.is_dir(follow_symlinks=False):
                continue
            for jd in os.scandir(sub.path):
                root = os.path.join(jd.path, "root")
                with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                    for e in os.scandir(root):
                        st = e.stat(follow_symlinks=False)
                        if stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev:
                            out.append(jd.name)
                            break
    return sorted(out)
