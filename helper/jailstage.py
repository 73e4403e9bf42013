"""Staging a Firecracker jail's chroot (op ``jail-stage``): kernel, initrd and rootfs placed
in ``BASE/<exec-file name>/ID/root`` before the jailer runs.

Nothing a caller sends is trusted: a source resolves beneath a configured source root by
an ``O_NOFOLLOW`` walk, is opened once and acted on through that fd (a swap between check
and use is detected by comparing inodes after linking); block devices only as
``/dev/mapper/kiln-<area key>-snap-…`` — a snapshot of the caller's own area (never the
pool, whose I/O reaches every volume, nor a base, nor another area's device) whose kernel
name matches and whose thin id is not a base's. Nothing under an area's ``pool/thin/``
(the pool's backing files) is staged. Hard links where possible (BASE on the pool's
filesystem); across filesystems a copy that keeps holes (``SEEK_DATA``/``SEEK_HOLE``), and
the result says so. A writable
file (the VM's rootfs snapshot) must have exactly one link and is chowned to the VM; a
read-only one (kernel, initrd) is never chowned: it must already be world-readable, else
a private copy is made.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
from collections.abc import Sequence
from pathlib import Path

from helper import dmdev, privileged
from helper.errors import Conflict, NotFound, UsageError
from helper.jail import (
    JailConfig,
    Staged,
    StageItem,
    check_config,
    check_ids,
    check_name,
    jail_dir,
    open_dir_nofollow,
)
from helper.pool import dmthin_core as core
from helper.pool import fileops

_DM_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")
_DM_LINK_RE = re.compile(r"^\.\./dm-([0-9]{1,6})$")
POOL_FILES = ("pool", "thin")  # <root>/pool/thin/: a dm-thin pool's data and metadata


def _open_source(cfg: JailConfig, source: Path) -> tuple[int, str, int]:
    """(parent dir fd, name, O_RDONLY fd) of a file beneath a source root, no symlinks."""
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
    try:
        for part in rel[:-1]:
            nfd = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=dfd)
            os.close(dfd)
            dfd = nfd
        fd = os.open(rel[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                     dir_fd=dfd)
    except OSError as e:
        os.close(dfd)
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UsageError(f"{source} is or passes through a symlink",
                             "kiln refuses symlinks in the paths it acts on") from None
        raise NotFound(f"{source} does not exist", "") from None
    return dfd, rel[-1], fd


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



def jail_stage(cfg: JailConfig, jail_id: str, uid: int, gid: int, items: Sequence[StageItem],
               *, caller_uid: int | None = None, logs: Sequence[str] = ()) -> Staged:
    """Create ``BASE/<fc>/ID/root`` holding ``items`` (readable by uid:gid) and empty
    ``logs`` files owned by the VM; plus ``console.log`` beside ``root``."""
    check_config(cfg)
    check_ids(cfg, uid, gid, caller_uid)
    names = [check_name(i.name) for i in items] + [check_name(n) for n in logs]
    if len(set(names)) != len(names) or {"firecracker", "dev", "run"} & set(names):
        raise UsageError("staged names must be unique and not firecracker, dev or run", "")
    jd = jail_dir(cfg, jail_id)
    for item in items:
        _precheck(cfg, item)
    base_fd = open_dir_nofollow(cfg.chroot_base)
    try:
        sub = cfg.firecracker.name
        with contextlib.suppress(FileExistsError):
            os.mkdir(sub, 0o755, dir_fd=base_fd)
        sub_fd = os.open(sub, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=base_fd)
    finally:
        os.close(base_fd)
    try:
        try:
            os.mkdir(jail_id, 0o755, dir_fd=sub_fd)
        except FileExistsError:
            raise Conflict(f"jail {jd} already exists", "remove the old VM first") from None
        jfd = os.open(jail_id, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                      dir_fd=sub_fd)
    finally:
        os.close(sub_fd)
    warnings: list[str] = []
    try:
        os.mkdir("root", 0o700, dir_fd=jfd)  # the jailer chowns it to uid:gid
        os.close(os.open("console.log", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o640, dir_fd=jfd))
        rfd = os.open("root", os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                      dir_fd=jfd)
        try:
            for item in items:
                w = _stage_one(cfg, rfd, item, uid, gid)
                if w:
                    warnings.append(w)
            for n in logs:
                fd = os.open(n, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o600, dir_fd=rfd)
                os.fchown(fd, uid, gid)
                os.close(fd)
        finally:
            os.close(rfd)
    except BaseException:
        os.close(jfd)
        shutil.rmtree(jd, ignore_errors=True)
        raise
    os.close(jfd)
    return Staged(jd / "root", warnings)


def _is_device(cfg: JailConfig, source: Path) -> bool:
    under_root = any(source.is_relative_to(r) for r in cfg.sources)
    return str(source).startswith("/dev/") and not under_root


def _precheck(cfg: JailConfig, item: StageItem) -> None:
    """Refuse a bad source before anything is created (staging checks again, by fd)."""
    if _is_device(cfg, item.source):
        _resolve_mapper(cfg, item.source)
        return
    dfd, _name, fd = _open_source(cfg, item.source)
    os.close(fd)
    os.close(dfd)


def _stage_one(cfg: JailConfig, rfd: int, item: StageItem, uid: int, gid: int) -> str:
    if _is_device(cfg, item.source):
        rdev = _resolve_mapper(cfg, item.source)
        mode = 0o600 if item.writable else 0o400
        os.mknod(item.name, stat.S_IFBLK | mode, rdev, dir_fd=rfd)
        os.chown(item.name, uid, gid, dir_fd=rfd, follow_symlinks=False)
        return ""
    dfd, name, fd = _open_source(cfg, item.source)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{item.source} is not a regular file", "")
        if item.writable and st.st_nlink != 1:
            raise Conflict(f"{item.source} has {st.st_nlink} links; a VM's writable disk "
                           "must have exactly one", "snapshot the volume for this VM")
        world_readable = bool(st.st_mode & stat.S_IROTH)
        if not item.writable and not world_readable:
            _copy_fd(fd, rfd, item.name, uid, gid, 0o400)
            return f"{item.source} is not world-readable: staged a private copy"
        try:
            os.link(name, item.name, src_dir_fd=dfd, dst_dir_fd=rfd, follow_symlinks=False)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            _copy_fd(fd, rfd, item.name, uid, gid, 0o600 if item.writable else 0o400)
            return (f"{item.source} is on another filesystem than {cfg.chroot_base}: copied "
                    "it (slow, uses space); put the jail base on the pool's filesystem")
        linked = os.stat(item.name, dir_fd=rfd, follow_symlinks=False)
        if (linked.st_ino, linked.st_dev) != (st.st_ino, st.st_dev):
            os.unlink(item.name, dir_fd=rfd)
            raise Conflict(f"{item.source} changed while it was being staged", "retry")
        if item.writable:
            os.fchown(fd, uid, gid)
            os.fchmod(fd, 0o600)
        return ""
    finally:
        os.close(fd)
        os.close(dfd)


def _copy_fd(src: int, rfd: int, name: str, uid: int, gid: int, mode: int) -> None:
    """Copy ``src`` into a new ``name``, data extents only: holes stay holes, so a sparse
    image costs the jail what it really holds."""
    out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                  0o600, dir_fd=rfd)
    try:
        size = fileops.sparse_copy_fd(src, out)
        os.ftruncate(out, size)  # a trailing hole
        os.fsync(out)
        os.fchown(out, uid, gid)
        os.fchmod(out, mode)
    finally:
        os.close(out)
