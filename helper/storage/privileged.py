"""Every privileged step of the pool, one function per operation, each validating its input.

The ``kiln-helper`` ops (``ops_storage``, ``ops_dm``) are built on these; kiln's pool
backends reach every privileged step only through ``builder.helperclient`` (in-process as root,
the helper via sudo otherwise) and call only the read-only queries here directly (mounts,
the loop list, dm names from sysfs). Rules every function enforces, whoever calls it:

* paths are absolute, free of ``..`` and of components starting with ``-``, and resolve
  beneath the given kiln ``root`` without crossing a symlink;
* device-mapper names carry kiln's prefix and this root's key (``dmthin_core``); messages
  are only ``create_thin``/``create_snap``/``delete`` with in-range ids;
* a loop device is only detached when it is backed by a file under the root.

Nothing here decides policy (which devices to keep, what size); the backends do.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from helper.base import run, safepath
from helper.base.errors import Conflict, KilnError, NotFound, UsageError
from helper.base.fileops import materialise
from helper.storage import dmthin_core as core

_LOOP_RE = re.compile(r"^/dev/loop[0-9]{1,4}$")


# -- validation ---------------------------------------------------------------------------


def confine(root: Path, path: Path | str, *, must_exist: bool = True) -> Path:
    """``path`` checked to lie beneath ``root`` with no symlink on the way; returned as is.

    Refuses relative paths, ``..``, components starting with ``-``, and any existing
    component below the root that is a symlink (the last one included)."""
    p = Path(path)
    root = Path(root)
    text = str(path)
    if "\x00" in text or "\n" in text:
        raise UsageError(f"invalid path {text!r}", "paths may not contain NUL or newlines")
    if not p.is_absolute():
        raise UsageError(f"path {text!r} is not absolute", "give an absolute path")
    if any(part == ".." for part in p.parts):
        raise UsageError(f"path {text!r} contains '..'", "give a path without '..'")
    if any(part.startswith("-") for part in p.parts):
        raise UsageError(f"path {text!r} has a component starting with '-'",
                         "rename it: names starting with '-' are read as options by tools")
    real_root = Path(os.path.realpath(root))
    try:
        rel = p.relative_to(root)
    except ValueError:
        try:
            rel = p.relative_to(real_root)
        except ValueError:
            raise UsageError(f"path {text!r} is outside the kiln root {root}",
                             "only files under the kiln root can be used") from None
    cur = real_root
    for i, part in enumerate(rel.parts):
        cur = cur / part
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            if must_exist or i < len(rel.parts) - 1:
                raise NotFound(f"{cur} does not exist", "") from None
            break
        if stat.S_ISLNK(st.st_mode):
            raise UsageError(f"{cur} is a symlink", "kiln refuses symlinks inside its pool; "
                             "remove it and run the command again")
    return real_root / rel


def check_dm_name(root: Path, name: str) -> str:
    """``name`` must be a kiln device name of this root."""
    parsed = core.parse_name(name)
    if parsed is None or parsed.rootkey != core.root_key(str(root)):
        raise UsageError(f"refusing device-mapper name {name!r}",
                         f"kiln only manages devices named {core.PREFIX}"
                         f"{core.root_key(str(root))}-...")
    return name


# -- loop devices ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Loop:
    device: str
    back_file: str


def loop_list(root: Path) -> list[Loop]:
    """Loop devices backed by files under ``root``."""
    res = run.run("losetup", ["--list", "--json", "--output", "NAME,BACK-FILE"], timeout=30)
    text = res.text.strip()
    devs = json.loads(text)["loopdevices"] if text else []
    real_root = os.path.realpath(root) + "/"
    # ROOT/users/<uid>/ are sudo callers' helper areas (when ROOT is /var/lib/kiln): each is
    # a root of its own, never swept as part of this one.
    users = real_root + "users/"
    out: list[Loop] = []
    for d in devs:
        # losetup appends " (deleted)" when the backing file was unlinked.
        back = (d.get("back-file") or "").removesuffix(" (deleted)")
        if back.startswith(real_root) and not back.startswith(users):
            out.append(Loop(d["name"], back))
    return out


LOOP_LOCK_DIR = Path("/run/kiln-helper")
_LOOP_GET_STATUS64 = 0x4C05
_LOOP_CLR_FD = 0x4C01


def loops_locked() -> contextlib.AbstractContextManager[None]:
    """The host-wide lock every kiln loop attach and detach holds: a loop number checked
    under it cannot be detached and bound to another file before it is acted on."""
    return safepath.root_lock(LOOP_LOCK_DIR, "loops.lock", 0o700)  # /run: root's


def loop_detach(root: Path, device: str) -> None:
    """Detach ``device`` if, and only if, it is a loop device backed by a file under root:
    checked and detached through one open fd of the device, under ``loops_locked``."""
    if not _LOOP_RE.fullmatch(device):
        raise UsageError(f"{device!r} is not a loop device", "give /dev/loopN")
    with loops_locked():
        loop = next((lp for lp in loop_list(root) if lp.device == device), None)
        if loop is None or not _detach_if_backed_by(loop):
            raise NotFound(f"{device} is not backed by a file under {root}",
                           "kiln only detaches its own loop devices")


def _detach_if_backed_by(loop: Loop) -> bool:
    """Open the loop, check its backing (device, inode) is ``loop.back_file``'s, clear it."""
    try:
        want = os.stat(loop.back_file, follow_symlinks=False)
    except FileNotFoundError:
        want = None  # unlinked ("(deleted)"): nothing else can be bound to that name
    fd = os.open(loop.device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        info = fcntl.ioctl(fd, _LOOP_GET_STATUS64, bytes(232))
        dev, ino = struct.unpack_from("=QQ", info, 0)
        if want is not None and (dev, ino) != (want.st_dev, want.st_ino):
            return False
        fcntl.ioctl(fd, _LOOP_CLR_FD, 0)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def loop_in_use(device: str) -> bool:
    """Whether a loop device is mounted or held by device-mapper."""
    name = device.rsplit("/", 1)[-1]
    with contextlib.suppress(FileNotFoundError):
        if os.listdir(f"/sys/block/{name}/holders"):
            return True
    return any(m.source == device for m in mounts())


# -- mounts and filesystems -------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    mountpoint: str
    fstype: str
    source: str


def mounts() -> list[Mount]:
    """This process's mounts, from /proc/self/mountinfo (octal escapes decoded)."""
    out: list[Mount] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(fields) >= 5 and len(rfields) >= 2:
                out.append(Mount(_unescape(fields[4]), rfields[0], _unescape(rfields[1])))
    return out


def _unescape(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def is_mounted(mountpoint: Path) -> bool:
    return any(m.mountpoint == str(mountpoint) for m in mounts())


def volume_import(root: Path, src: Path, dst: Path, *, allow_clone: bool = True) -> bool:
    """Create ``dst`` under the root with ``src``'s bytes (clone when possible)."""
    s = confine(root, src)
    d = confine(root, dst, must_exist=False)
    if d.exists():
        raise Conflict(f"{d} already exists", "")
    return materialise(s, d, allow_clone=allow_clone)


# -- device-mapper ------------------------------------------------------------------------


def dm_targets() -> list[str]:
    try:
        res = run.run("dmsetup", ["targets"], timeout=30)
    except KilnError:
        return []
    return [line.split()[0] for line in res.text.splitlines() if line.split()]


def dm_node_env(udev_control: str = "/run/udev/control") -> dict[str, str]:
    """dmsetup's environment for creating and removing devices.

    Debian's libdevmapper leaves /dev/mapper/NAME to udev even when no udev runs ("Skipping
    NODE_ADD [trust_udev]"): in a guest or container without udev the node never appears
    and every later existence check fails. Where udev is not running (no control socket,
    libdevmapper's own test), DM_DISABLE_UDEV makes dmsetup make and remove the nodes."""
    return {} if os.path.exists(udev_control) else {"DM_DISABLE_UDEV": "1"}


def dm_create(root: Path, name: str, table: str) -> str:
    """Create and activate a device; returns its /dev/mapper path."""
    check_dm_name(root, name)
    if "\n" in table or "\x00" in table or not table.strip():
        raise UsageError("a table is one line", "")
    run.run("dmsetup", ["create", name, "--table", table], timeout=120,
            env=dm_node_env())
    return f"/dev/mapper/{name}"


def dm_message(root: Path, name: str, message: str) -> None:
    """Send a thin-pool message (sector 0)."""
    check_dm_name(root, name)
    if not core.valid_message(message):
        raise UsageError(f"refusing device-mapper message {message!r}", "")
    run.run("dmsetup", ["message", name, "0", message], timeout=120)


def dm_remove(root: Path, name: str) -> None:
    check_dm_name(root, name)
    run.run("dmsetup", ["remove", "--retry", name], timeout=120,  # --retry: udev races
            env=dm_node_env())


def dm_table(root: Path, name: str) -> str:
    check_dm_name(root, name)
    return run.run("dmsetup", ["table", name], timeout=30).text.strip()


def dm_status(root: Path, name: str) -> str:
    check_dm_name(root, name)
    return run.run("dmsetup", ["status", name], timeout=30).text.strip()


def dm_listing() -> list[core.DmDevice]:
    """Every device-mapper device on the host, with its dependencies (read-only)."""
    ls = run.run("dmsetup", ["ls"], timeout=30).text
    if "No devices found" in ls:
        return []
    table = run.run("dmsetup", ["table"], timeout=30).text
    return core.parse_listing(ls, table)


def dm_names() -> list[str]:
    """Names of every device-mapper device, from sysfs (readable without privileges: kiln
    checks whether a reclaim has anything to do before asking the helper)."""
    out: list[str] = []
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(os.listdir("/sys/block")):
            if entry.startswith("dm-"):
                with contextlib.suppress(OSError):
                    out.append(Path(f"/sys/block/{entry}/dm/name").read_text().strip())
    return out


# -- reclaim ------------------------------------------------------------------------------


def reclaim(root: Path, keep: list[str], spare: frozenset[str] = frozenset()) -> list[str]:
    """Remove this root's dm devices not in ``keep`` (leaf first, retrying while progress is
    made), then detach loop devices backed by files under the root that nothing uses,
    except those in ``spare`` (the operator's configured devices: never detached).
    Returns what was removed or detached."""
    for n in keep:
        check_dm_name(root, n)
    done: list[str] = []
    if "thin" in dm_targets() or "thin-pool" in dm_targets():
        rootkey = core.root_key(str(root))
        pending = core.reclaim_plan(dm_listing(), rootkey, keep)
        while pending:
            failed: list[str] = []
            for name in pending:
                try:
                    dm_remove(root, name)
                    done.append(name)
                except KilnError:
                    failed.append(name)
            if len(failed) == len(pending):
                break  # no progress: leave the rest for the next command
            pending = failed
    with loops_locked():
        for loop in loop_list(root):
            if loop.device not in spare and not loop_in_use(loop.device) \
                    and _detach_if_backed_by(loop):
                done.append(loop.device)
    return done
