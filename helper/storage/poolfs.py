"""The privileged primitives of a loop-backed reflink pool, all by file descriptor.

Rules (docs/helper.md, "Storage"):

* **No name a caller can change.** The pool's objects have fixed names under the caller's
  area (``pool/pool.img``, ``pool/fs``, ``pool/fs/volumes``, ``pool/fs/snapshots``), every
  directory root-owned and not writable by the caller; they are opened beneath the area
  (``safepath``: no symlinks) and acted on through the fds. New files are made unnamed
  (``O_TMPFILE``) and linked in only when whole (``link_tmpfile``): a SIGKILL leaves nothing.
* **Root mounts only what it made.** ``pool-create`` records the image it made (device,
  inode, size, filesystem, the UUID it chose) before mkfs runs; ``mount_image`` refuses an
  image that is not exactly that record (same inode, size, one link, root-owned, the
  superblock carrying the recorded UUID).
* **Loops cannot leak.** A loop is configured on the open image fd with ``AUTOCLEAR``
  (``LOOP_CONFIGURE``) and mounted through ``/proc/self/fd`` of the open loop fd: a death
  before the mount frees it, an unmount frees it.
* **Space promised, not only used.** Sparse images cost nothing until written; a new one is
  admitted only while every area's promised bytes plus it stay below the free space of the
  pool directory's filesystem minus a margin (``promise_lock`` + ``check_promise``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import stat
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from helper.base import safepath
from helper.base.errors import Conflict, IntegrityError, KilnError, UsageError
from helper.configbase import Limits
from helper.storage import privileged

POOL, IMAGE = "pool", "pool.img"  # an area's pool directory and its image
_LOOP_CTL_GET_FREE = 0x4C82
_LOOP_CONFIGURE = 0x4C0A
_LO_FLAGS_AUTOCLEAR = 4
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 2, 4, 8
_UMOUNT_NOFOLLOW = 8
UMOUNT_TRIES = 60  # x 50 ms
_libc = ctypes.CDLL(None, use_errno=True)

# Where each filesystem keeps its magic and UUID (offsets into the image).
_SUPER = {
    "btrfs": (0x10040, b"_BHRfS_M", 0x10020),  # superblock at 64 KiB: magic, fsid
    "xfs": (0, b"XFSB", 32),  # sb_magicnum, sb_uuid
}


def superblock_uuid(fd: int, fs: str) -> str | None:
    """The filesystem UUID in the image's superblock, or None if it is not ``fs``."""
    magic_at, magic, uuid_at = _SUPER[fs]
    if os.pread(fd, len(magic), magic_at) != magic:
        return None
    raw = os.pread(fd, 16, uuid_at)
    return str(uuid.UUID(bytes=raw)) if len(raw) == 16 else None


def mkfs_argv(fs: str, fs_uuid: str, fd: int) -> tuple[str, list[str]]:
    """(tool, args) making ``fs`` with the helper's chosen UUID on the open image (pure)."""
    target = safepath.fd_path(fd)
    if fs == "btrfs":
        # --metadata single: one image file, duplicate metadata buys nothing.
        return "mkfs.btrfs", ["--quiet", "--label", "kiln-pool", "--uuid", fs_uuid,
                              "--metadata", "single", target]
    # reflink needs the v5 (crc) format.
    return "mkfs.xfs", ["-q", "-L", "kiln-pool", "-m", f"reflink=1,crc=1,uuid={fs_uuid}",
                        target]


def exists_at(dfd: int, name: str) -> bool:
    """Whether ``dfd/name`` exists (as anything; a symlink is not followed)."""
    try:
        os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def open_tmpfile(dfd: int, mode: int) -> int:
    """An unnamed file in directory ``dfd`` (``O_TMPFILE``): gone if we die before
    ``link_tmpfile``."""
    return os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, mode, dir_fd=dfd)


def link_tmpfile(fd: int, dfd: int, name: str) -> None:
    """Give the unnamed file ``fd`` its name in ``dfd`` (EEXIST: ``Conflict``), durably."""
    os.fsync(fd)
    try:
        os.link(safepath.fd_path(fd), name, dst_dir_fd=dfd, follow_symlinks=True)
    except FileExistsError:
        raise Conflict(f"{name} already exists", "remove it first") from None
    os.fsync(dfd)


def is_mount_root(fd: int, parent_fd: int) -> bool:
    """Whether something is mounted on the directory ``fd`` (in ``parent_fd``)."""
    return os.fstat(fd).st_dev != os.fstat(parent_fd).st_dev


def loop_configure(image_fd: int, *, autoclear: bool = True) -> int:
    """A loop device bound to the open image: its open fd. With ``autoclear`` it lives
    while this fd or a mount holds it and detaches itself afterwards; without, it stays
    until detached (``privileged.loop_detach``)."""
    flags = _LO_FLAGS_AUTOCLEAR if autoclear else 0
    cfg = struct.pack("=II", image_fd, 0) + struct.pack("=QQQQQIIII", 0, 0, 0, 0, 0, 0, 0, 0,
                                                        flags)
    cfg += bytes(232 - 56) + bytes(64)  # the rest of loop_info64, then __reserved[8]
    ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        for _ in range(16):
            n = fcntl.ioctl(ctl, _LOOP_CTL_GET_FREE)
            lfd = os.open(f"/dev/loop{n}", os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.ioctl(lfd, _LOOP_CONFIGURE, cfg)
                return lfd
            except OSError as e:
                os.close(lfd)
                if e.errno != errno.EBUSY:  # another process took it between the calls
                    raise
    finally:
        os.close(ctl)
    raise Conflict("no free loop device after 16 tries", "retry in a moment")


def attach_image(area: Path, rel: str) -> str:
    """The loop device of ``area/rel`` (the thin pool's own files: root's, one link),
    attached by fd unless it already is; under the host-wide loop lock."""
    fd = safepath.open_beneath(area, rel, os.O_RDWR)
    try:
        # Root-owned only: a caller-made file could hold a hostile filesystem image.
        safepath.fstat_kind(fd, "reg", rel, owner=0, single_link=True)
        real = os.readlink(safepath.fd_path(fd))
        with privileged.loops_locked():
            for loop in privileged.loop_list(area):
                if loop.back_file == real:
                    return loop.device
            lfd = loop_configure(fd, autoclear=False)
            try:
                return os.readlink(safepath.fd_path(lfd))
            finally:
                os.close(lfd)
    finally:
        os.close(fd)


def mount_loop(loop_fd: int, target_fd: int, fs: str) -> None:
    """Mount the open loop device on the open directory (nodev, nosuid, noexec)."""
    r = _libc.mount(safepath.fd_path(loop_fd).encode(), safepath.fd_path(target_fd).encode(),
                    fs.encode(), _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, None)
    if r != 0:
        e = ctypes.get_errno()
        raise UsageError(f"mounting the pool image failed: {os.strerror(e)}",
                         "`kiln pool destroy --force`, then `kiln pool init`")


def umount_trusted(path: Path) -> None:
    """Unmount ``path``, a name every component of which is root's (the caller cannot
    swap any of it: ``check_root_chain``); ``UMOUNT_NOFOLLOW`` for the last one too."""
    # EBUSY also comes from a mere path lookup passing through the mount at that instant
    # (anyone may look up names in a 0711 area): retried for a moment; an open file (a
    # running VM) stays busy and is reported.
    for _ in range(UMOUNT_TRIES):
        if _libc.umount2(str(path).encode(), _UMOUNT_NOFOLLOW) == 0:
            return
        e = ctypes.get_errno()
        if e == errno.EINVAL:  # not a mount point (any more)
            return
        if e != errno.EBUSY:
            break
        time.sleep(0.05)
    raise Conflict(f"cannot unmount the pool: {os.strerror(e)}",
                   "stop whatever uses it (a running VM?), then retry")


def check_root_chain(path: Path) -> None:
    """Every directory from ``path`` up to ``/`` is root-owned and not writable by group
    or others: a name made of them cannot be changed by anyone but root."""
    cur = path
    while True:
        st = os.lstat(cur)
        if stat.S_ISLNK(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
            raise UsageError(f"refusing {cur}: not a root-owned directory only root may "
                             "write", f"chown root:root {cur}; chmod go-w {cur}")
        if cur.parent == cur:
            return
        cur = cur.parent


def verify_image(fd: int, record: dict[str, object]) -> None:
    """The open image is exactly the one the helper made and recorded."""
    st = os.fstat(fd)
    fs = str(record.get("fs"))
    if fs not in _SUPER:
        raise IntegrityError("the pool record names no filesystem", _REMAKE)
    same = (st.st_dev, st.st_ino, st.st_size) == (record.get("dev"), record.get("ino"),
                                                  record.get("size"))
    if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_nlink != 1 or not same:
        raise IntegrityError("the pool image is not the one kiln-helper made", _REMAKE)
    if superblock_uuid(fd, fs) != record.get("uuid"):
        raise IntegrityError("the pool image's filesystem is not the one kiln-helper made",
                             _REMAKE)


_REMAKE = "`kiln pool destroy --force`, then `kiln pool init`"


# -- space promised by sparse images ----------------------------------------------------------

@contextlib.contextmanager
def promise_lock(users_dir: Path) -> Iterator[int]:
    """Hold the host-wide lock over every area's images (flock on ``users/``); the fd."""
    fd = os.open(users_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def area_images(base: Path | int, area: str = "") -> list[os.stat_result]:
    """The root-owned image files of an area: ``pool/pool.img`` and ``pool/thin/*``
    (``area``: the area's path beneath ``base``, e.g. ``"1000/"``, or "" when ``base`` is
    the area), found by fd without following a symlink."""
    out: list[os.stat_result] = []
    for rel, only in ((POOL, IMAGE), (f"{POOL}/thin", None)):
        try:
            dfd = safepath.open_beneath(base, f"{area}{rel}", os.O_RDONLY | os.O_DIRECTORY)
        except (KilnError, OSError):  # no such directory (or not one): no images there
            continue
        try:
            for name in [only] if only else os.listdir(dfd):
                with contextlib.suppress(FileNotFoundError):  # removed since the listing
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                    if stat.S_ISREG(st.st_mode) and st.st_uid == 0:
                        out.append(st)
        finally:
            os.close(dfd)
    return out


def promised_bytes(users_fd: int) -> int:
    """Bytes every area's images may still grow by (size - allocated)."""
    return sum(max(0, st.st_size - st.st_blocks * 512)
               for uid in os.listdir(users_fd) if uid.isdigit()
               for st in area_images(users_fd, f"{uid}/"))


def room(free: int, capacity: int, promised: int, margin_percent: int) -> int:
    """Bytes a new image may still be promised (pure; negative: none)."""
    return free - capacity * margin_percent // 100 - promised


def unpromised(users_fd: int, margin_percent: int) -> int:
    """``room`` on the filesystem of ``users/`` now (call with ``promise_lock`` held)."""
    st = os.fstatvfs(users_fd)
    return room(st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize,
                promised_bytes(users_fd), margin_percent)


def promise_problem(what: str, size: int, promised: int, free: int, capacity: int,
                    margin_percent: int) -> str | None:
    """Why a new sparse image of ``size`` bytes may not be made (pure), or None."""
    left = room(free, capacity, promised, margin_percent)
    if size > left:
        return (f"refusing {what} of {size >> 20} MiB: the pool directory's filesystem has "
                f"{max(left, 0) >> 20} MiB not yet promised to other images "
                f"(free {free >> 20} MiB, promised {promised >> 20} MiB, "
                f"{margin_percent}% kept free)")
    return None


@contextlib.contextmanager
def admitted(area: Path, what: str, size: int, limits: Limits) -> Iterator[None]:
    """Refuse, or admit and hold the host-wide lock while, a sudo caller's new sparse
    image(s) of ``size`` bytes are made in ``area`` (a ``users/<uid>`` directory): at most
    ``limits.pool_bytes``, and within the space not yet promised (``check_promise``)."""
    if size > limits.pool_bytes:
        raise UsageError(f"refusing {what} of {size >> 20} MiB: a caller's pool is at most "
                         f"{limits.pool_bytes >> 20} MiB ([limits] pool_bytes)",
                         "use a smaller --size, or ask the operator for [pool] data_device "
                         "and metadata_device")
    with promise_lock(area.parent) as users:
        check_promise(users, what, size, limits.pool_margin_percent)
        yield


def check_promise(users_fd: int, what: str, size: int, margin_percent: int) -> None:
    """Refuse ``size`` more promised bytes (call with ``promise_lock`` held)."""
    st = os.fstatvfs(users_fd)
    problem = promise_problem(what, size, promised_bytes(users_fd), st.f_bavail * st.f_frsize,
                              st.f_blocks * st.f_frsize, margin_percent)
    if problem is not None:
        raise UsageError(problem, "use a smaller --size, remove unused pools, or ask the "
                         "operator for more space")
