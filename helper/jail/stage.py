"""Staging a Firecracker jail's chroot (op ``jail-stage``): kernel, initrd and rootfs placed
in ``BASE/<exec-file name>/ID/root`` before the jailer runs.

Nothing a caller sends is trusted: a source resolves beneath a configured source root by
an ``O_NOFOLLOW`` walk, is opened once and acted on through that fd (a swap between check
and use is detected by comparing inodes after linking); block devices only as
``/dev/mapper/kiln-<area key>-snap-…`` — a snapshot of the caller's own area (never the
pool, whose I/O reaches every volume, nor a base, nor another area's device) whose kernel
name matches and whose thin id is not a base's. Nothing under an area's ``pool/thin/``
is staged.

Ownership (``source_problem``). chown/chmod happen only by fd, on what the helper itself
made (copies, logs, device nodes) — or, for root in-process only, on its own single-link
snapshot. A sudo caller's writable item is only its own snapshot
``<area>/pool/fs/snapshots/<id>.ext4`` (its uid, one link, root-only directories), and the
VM gets a private sparse copy; from its area nothing but its pool's snapshots and volumes
(no claim, ledger, pool image) is staged. Read-only items are never chowned: a hard link
of a world-readable file, else a root-owned copy readable by the VM's gid (0440). Copies
keep holes (``SEEK_DATA``/``SEEK_HOLE``) and the result says so.

Everything is checked before the first mkdir. The jail is built under ``BASE/.staging``
and renamed into place, and the op records it before it exists (``record``), so a helper
killed half-way leaves nothing its caller cannot find and remove (``jail-remove``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from helper.base import fileops
from helper.base.errors import Conflict, NotFound, UsageError
from helper.jail.jailer import (
    JailConfig,
    Staged,
    StageItem,
    check_config,
    check_ids,
    check_name,
    jail_dir,
    open_dir_nofollow,
)
from helper.storage import dmdev, privileged
from helper.storage import dmthin_core as core

_DM_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")
_DM_LINK_RE = re.compile(r"^\.\./dm-([0-9]{1,6})$")
_SNAP_RE = re.compile(r"^[a-z2-7]{1,32}\.ext4$")  # a snapshot of the caller's pool
POOL_FILES = ("pool", "thin")  # <root>/pool/thin/: a dm-thin pool's data and metadata


@dataclass(frozen=True)
class Source:
    """A staged file, opened once: its directory, name and fd, and where it lies."""

    path: Path
    dfd: int  # O_PATH fd of its directory
    name: str
    fd: int  # O_RDONLY
    in_area: bool  # beneath the caller's area (else beneath a [jails] sources root)
    rel: tuple[str, ...]  # its path below that root
    dirs_root: bool  # every directory from that root down is root's, writable by root only

    def close(self) -> None:
        os.close(self.fd)
        os.close(self.dfd)


def _open_source(cfg: JailConfig, source: Path) -> Source:
    """Open a file beneath a source root, no symlinks; every directory on the way fstat'ed."""
    text = str(source)
    if "\x00" in text or "\n" in text or not source.is_absolute():
        raise UsageError(f"invalid source path {text!r}", "give an absolute path")
    if any(p == ".." or p.startswith("-") for p in source.parts):
        raise UsageError(f"refusing source path {text!r}", "no '..' or names starting with '-'")
    root = next((r for r in cfg.sources if source.is_relative_to(r) and source != r), None)
    if root is None:
        raise UsageError(f"{source} is outside kiln's pool and kernel directories",
                         "stage only files kiln created")
    rel = source.relative_to(root).parts
    if rel[:2] == POOL_FILES:
        raise UsageError(f"refusing {source}: the pool's own backing files are never staged",
                         "stage a volume or a snapshot")
    dfd = open_dir_nofollow(root)
    dirs_root = _root_only(dfd)
    try:
        for part in rel[:-1]:
            nfd = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=dfd)
            os.close(dfd)
            dfd = nfd
            dirs_root = dirs_root and _root_only(dfd)
        fd = os.open(rel[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                     dir_fd=dfd)
    except OSError as e:
        os.close(dfd)
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UsageError(f"{source} is or passes through a symlink",
                             "kiln refuses symlinks in the paths it acts on") from None
        raise NotFound(f"{source} does not exist", "") from None
    return Source(source, dfd, rel[-1], fd, root == area_of(cfg), rel, dirs_root)


def _root_only(fd: int) -> bool:
    st = os.fstat(fd)
    return st.st_uid == 0 and not st.st_mode & 0o022


def source_problem(owner: int | None, src: Source, st: os.stat_result,
                   writable: bool) -> str | None:
    """Why a sudo caller (``owner``; None: root in-process) may not stage ``src`` (pure).

    Writable: only the caller's own snapshot ``<area>/pool/fs/snapshots/<id>.ext4`` (a
    single-link regular file of the caller's, in root-only directories). Read-only: a
    file of the caller's or a world-readable one; from the area only its pool's snapshots
    and volumes — never a helper record (claims, ledgers, pool images, thin files)."""
    if not stat.S_ISREG(st.st_mode):
        return f"{src.path} is not a regular file"
    if writable and st.st_nlink != 1:
        return (f"{src.path} has {st.st_nlink} links; a VM's writable disk must have "
                "exactly one")
    if owner is None:
        return None
    if src.in_area and (len(src.rel) != 4 or src.rel[:2] != ("pool", "fs")
                        or src.rel[2] not in ("snapshots", "volumes")):
        return (f"refusing {src.path}: only your pool's snapshots and volumes are staged "
                "from your area")
    if writable and not (src.in_area and src.rel[2] == "snapshots"
                         and _SNAP_RE.fullmatch(src.rel[3])):
        return (f"refusing {src.path}: a VM's writable disk is only one of your snapshots "
                "(pool/fs/snapshots/ID.ext4)")
    if writable and (st.st_uid != owner or not src.dirs_root):
        return (f"refusing {src.path}: not a snapshot kiln-helper made for uid {owner} "
                "(yours, in root-owned directories)")
    if not writable and st.st_uid != owner and not st.st_mode & stat.S_IROTH:
        return f"refusing {src.path}: it is neither yours nor world-readable"
    return None


def area_of(cfg: JailConfig) -> Path | None:
    """The caller's area: every staged device must be one of its snapshots."""
    return cfg.area or (cfg.sources[0] if cfg.sources else None)


def mapper_problem(name: str, area: Path | None) -> str | None:
    """Why ``/dev/mapper/<name>`` may not be staged for the caller of ``area`` (pure):
    only that area's snapshot devices are, never its pool or a base."""
    parsed = core.parse_name(name)
    if parsed is None or area is None:
        return f"refusing block device /dev/mapper/{name}: not a kiln device-mapper name"
    if parsed.rootkey != core.root_key(str(area)):
        return (f"refusing block device /dev/mapper/{name}: it belongs to another kiln "
                "area")
    if parsed.kind != "snap":
        what = "the thin pool" if parsed.kind == "pool" else "a base volume"
        return (f"refusing block device /dev/mapper/{name}: it is {what}; only snapshot "
                "devices are staged")
    return None


def _resolve_mapper(cfg: JailConfig, source: Path) -> int:
    """st_rdev of ``/dev/mapper/kiln-<key>-snap-…`` (a node or udev's ``../dm-N`` symlink)."""
    name = source.name
    area = area_of(cfg)
    if source.parent != Path("/dev/mapper") or not _DM_NAME_RE.fullmatch(name):
        raise UsageError(f"refusing block device {source}",
                         "only /dev/mapper/kiln-… snapshot devices are staged")
    why = mapper_problem(name, area)
    if why is not None:
        raise UsageError(why, "stage a snapshot of your own area (dm-create kind thin)")
    assert area is not None
    try:
        st = os.lstat(source)
    except FileNotFoundError:
        raise NotFound(f"{source} does not exist", "is the pool activated?") from None
    if stat.S_ISLNK(st.st_mode):
        m = _DM_LINK_RE.fullmatch(os.readlink(source))
        if m is None:
            raise UsageError(f"{source} points somewhere other than ../dm-N", "")
        st = os.lstat(f"/dev/dm-{m.group(1)}")
    if not stat.S_ISBLK(st.st_mode):
        raise UsageError(f"{source} is not a block device", "")
    # The kernel's own name for that device number must be the mapper name we were given.
    sysname = Path(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}/dm/name")
    if sysname.read_text().strip() != name:
        raise Conflict(f"{source} does not name device-mapper device {name}", "")
    # A snapshot name may still map a base's thin id (dm-create without grant): refuse it.
    thin_id = core.thin_id_of_table(privileged.dm_table(area, name))
    if thin_id is None or (why := core.grant_problem(name, thin_id, dmdev.base_ids(area))):
        raise UsageError(why or f"{source} is not a thin device", "")
    return st.st_rdev



Record = Callable[[Path, "list[int] | None"], None]


def jail_stage(cfg: JailConfig, jail_id: str, uid: int, gid: int, items: Sequence[StageItem],
               *, caller_uid: int | None = None, logs: Sequence[str] = (),
               owner: int | None = None, record: Record | None = None,
               budget: Budget | None = None) -> Staged:
    """Create ``BASE/<fc>/ID/root`` holding ``items`` (readable by uid:gid) and empty
    ``logs`` files owned by the VM; plus ``console.log`` beside ``root``.

    ``owner``: the sudo caller (its rules: ``source_problem``); None for root in-process.
    Everything is checked before anything is made. The jail is built in
    ``BASE/.staging/ID.<random>`` and renamed into place (same inode): ``record(path,
    identity)`` is called before that directory exists (identity None) and right after,
    so a record names a half-made jail before there is one. ``budget``: the bytes the
    copies may take together (a sudo caller's; a larger copy is refused)."""
    check_config(cfg)
    check_ids(cfg, uid, gid, caller_uid)
    names = [check_name(i.name) for i in items] + [check_name(n) for n in logs]
    if len(set(names)) != len(names) or any(reserved_name(cfg, n) for n in names):
        raise UsageError(f"staged names must be unique and none may be dev, run, "
                         f"{cfg.firecracker.name} or {cfg.firecracker.name}.pid",
                         "the jailer makes those (its binary, pid file, devices)")
    if len({i.source for i in items}) != len(items):
        raise UsageError("a source may be staged once per jail", "stage each file once")
    jd = jail_dir(cfg, jail_id)
    if os.path.lexists(jd):
        raise Conflict(f"jail {jd} already exists", "remove the old VM first")
    for item in items:
        _precheck(cfg, item, owner)
    sub_fd, stage_fd = _base_dirs(cfg)
    tmp = f"{jail_id}.{secrets.token_hex(6)}"
    try:
        if record is not None:
            record(cfg.chroot_base / STAGING / tmp, None)
        os.mkdir(tmp, 0o711, dir_fd=stage_fd)
        try:
            jfd = os.open(tmp, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=stage_fd)
            try:
                if record is not None:
                    st = os.fstat(jfd)
                    record(cfg.chroot_base / STAGING / tmp, [st.st_dev, st.st_ino])
                warnings, devices = _populate(cfg, jfd, items, uid, gid, logs, owner,
                                              budget or Budget(None))
            finally:
                os.close(jfd)
            _rename_noreplace(stage_fd, tmp, sub_fd, jail_id, jd)
        except BaseException:
            shutil.rmtree(cfg.chroot_base / STAGING / tmp, ignore_errors=True)
            raise
    finally:
        os.close(sub_fd)
        os.close(stage_fd)
    return Staged(jd / "root", warnings, devices)


STAGING = ".staging"  # BASE/.staging/: jails being built (root 0700)


def reserved_name(cfg: JailConfig, name: str) -> bool:
    """Names the jailer makes in the chroot: a staged file there would stand in for its
    pid file (a Firecracker the helper then loses track of) or its devices."""
    fc = cfg.firecracker.name
    return name in ("dev", "run", fc, f"{fc}.pid")
_libc = ctypes.CDLL(None, use_errno=True)
_RENAME_NOREPLACE = 1


def _base_dirs(cfg: JailConfig) -> tuple[int, int]:
    """O_PATH fds of ``BASE/<fc>`` (0755) and ``BASE/.staging`` (0700), made if missing."""
    cfg.chroot_base.mkdir(mode=0o755, parents=True, exist_ok=True)  # a trusted path
    base_fd = open_dir_nofollow(cfg.chroot_base)
    fds: list[int] = []
    try:
        for sub, mode in ((cfg.firecracker.name, 0o755), (STAGING, 0o700)):
            with contextlib.suppress(FileExistsError):
                os.mkdir(sub, mode, dir_fd=base_fd)
            fd = os.open(sub, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=base_fd)
            fds.append(fd)
            if not _root_only(fd):
                raise UsageError(f"{cfg.chroot_base}/{sub} is not root's alone", "fix its owner")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    finally:
        os.close(base_fd)
    return fds[0], fds[1]


def _rename_noreplace(src_dir: int, src: str, dst_dir: int, dst: str, jd: Path) -> None:
    """rename(2) that never replaces: os.rename would silently take an empty directory."""
    if _libc.renameat2(src_dir, src.encode(), dst_dir, dst.encode(), _RENAME_NOREPLACE):
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise Conflict(f"jail {jd} already exists", "remove the old VM first")
        raise OSError(err, f"rename {src} to {jd}: {os.strerror(err)}")


@dataclass
class Budget:
    """Bytes the jail's copies may still take (None: no limit, root in-process)."""

    left: int | None

    def spend(self, size: int, what: str) -> None:
        if self.left is None:
            return
        if size > self.left:
            raise UsageError(f"refusing to copy {what} ({size >> 20} MiB) into the jail: "
                             f"{self.left >> 20} MiB left of the caller's jail space and "
                             "the disk's unpromised space",
                             "remove VMs you no longer need, or raise [limits] jail_bytes")
        self.left -= size


def _populate(cfg: JailConfig, jfd: int, items: Sequence[StageItem], uid: int, gid: int,
              logs: Sequence[str], owner: int | None,
              budget: Budget) -> tuple[list[str], list[str]]:
    """``root/`` with the items and logs, ``console.log``: (warnings, staged dm names)."""
    warnings: list[str] = []
    devices: list[str] = []
    os.mkdir("root", 0o700, dir_fd=jfd)  # the jailer chowns it to uid:gid
    os.close(os.open("console.log", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o640, dir_fd=jfd))
    rfd = os.open("root", os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                  dir_fd=jfd)
    try:
        for item in items:
            if _is_device(cfg, item.source):
                _stage_device(cfg, rfd, item, uid, gid)
                devices.append(item.source.name)
            elif w := _stage_file(cfg, rfd, item, uid, gid, owner, budget):
                warnings.append(w)
        for n in logs:
            fd = os.open(n, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=rfd)
            os.fchown(fd, uid, gid)  # a file the helper just made
            os.close(fd)
    finally:
        os.close(rfd)
    return warnings, devices


def _is_device(cfg: JailConfig, source: Path) -> bool:
    under_root = any(source.is_relative_to(r) for r in cfg.sources)
    return str(source).startswith("/dev/") and not under_root


def _precheck(cfg: JailConfig, item: StageItem, owner: int | None) -> None:
    """Refuse a bad source before anything is created (staging checks again, by fd)."""
    if _is_device(cfg, item.source):
        _resolve_mapper(cfg, item.source)
        return
    src = _open_source(cfg, item.source)
    try:
        _check_source(src, item, owner)
    finally:
        src.close()


def _check_source(src: Source, item: StageItem, owner: int | None) -> os.stat_result:
    st = os.fstat(src.fd)
    why = source_problem(owner, src, st, item.writable)
    if why is not None:
        if "links;" in why:
            raise Conflict(why, "snapshot the volume for this VM")
        raise UsageError(why, "stage your own snapshots and kernel files")
    return st


def _stage_device(cfg: JailConfig, rfd: int, item: StageItem, uid: int, gid: int) -> None:
    rdev = _resolve_mapper(cfg, item.source)
    mode = 0o600 if item.writable else 0o400
    os.mknod(item.name, stat.S_IFBLK | mode, rdev, dir_fd=rfd)
    # A node the helper just made, in a directory only root writes: the name stays put.
    os.chown(item.name, uid, gid, dir_fd=rfd, follow_symlinks=False)


def _stage_file(cfg: JailConfig, rfd: int, item: StageItem, uid: int, gid: int,
                owner: int | None, budget: Budget) -> str:
    """Place one file: a link, or a private copy. Only root in-process hands its own
    writable file over (link + fchown); a sudo caller's snapshot is copied for the VM, so
    nothing the caller (or anyone) can reach ever changes owner."""
    src = _open_source(cfg, item.source)
    try:
        st = _check_source(src, item, owner)
        def copy(to_uid: int, mode: int) -> None:
            size = os.fstat(src.fd).st_size
            budget.spend(size, str(item.source))
            copy_fd(src.fd, rfd, item.name, to_uid, gid, mode, size)

        if item.writable and owner is not None:
            copy(uid, 0o600)
            return f"{item.source}: staged a private copy for the VM"
        if not item.writable and not st.st_mode & stat.S_IROTH:
            copy(0, 0o440)  # root's copy, the VM reads it
            return f"{item.source} is not world-readable: staged a private copy"
        try:
            os.link(src.name, item.name, src_dir_fd=src.dfd, dst_dir_fd=rfd,
                    follow_symlinks=False)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            if item.writable:
                copy(uid, 0o600)
            else:
                copy(0, 0o440)
            return (f"{item.source} is on another filesystem than {cfg.chroot_base}: copied "
                    "it (slow, uses space); put the jail base on the pool's filesystem")
        linked = os.stat(item.name, dir_fd=rfd, follow_symlinks=False)
        if (linked.st_ino, linked.st_dev) != (st.st_ino, st.st_dev):
            os.unlink(item.name, dir_fd=rfd)
            raise Conflict(f"{item.source} changed while it was being staged", "retry")
        if item.writable:  # root in-process: its own single-link snapshot, by fd
            os.fchown(src.fd, uid, gid)
            os.fchmod(src.fd, 0o600)
        return ""
    finally:
        src.close()


def copy_fd(src: int, rfd: int, name: str, uid: int, gid: int, mode: int,
             limit: int) -> None:
    """Copy ``src`` into a new ``name``, data extents only: holes stay holes, so a sparse
    image costs the jail what it really holds; never more than the ``limit`` bytes that
    were admitted (a caller growing its file meanwhile gets a cut copy, not more)."""
    out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                  0o600, dir_fd=rfd)
    try:
        size = fileops.sparse_copy_fd(src, out, limit)
        os.ftruncate(out, size)  # a trailing hole
        os.fsync(out)
        os.fchown(out, uid, gid)
        os.fchmod(out, mode)
    finally:
        os.close(out)
