"""Device-level steps of the dm-thin ops (``ops_dm``): the operator's block devices, their
claim, snapshot device nodes given to the caller, base-volume records, verified copies.

* Operator devices: ``[pool] data_device`` / ``metadata_device`` in the trusted config.
  ``block_facts`` looks at a configured path (block device? mounted, also through a
  partition? held by dm/md? refused by an ``O_EXCL`` open?) and ``dmthin_core`` decides
  (``devices_problem``). Tables name them by ``major:minor``, the number that was checked.
* Claim: the devices hold one pool per host. ``<[pool] directory>/thin-devices.json``
  (root-owned) names the area whose pool they hold; ``dmthin_core.claim_problem`` decides
  who may format or activate them, ``release`` drops the claim once that pool is gone.
  Formatting = zeroing the metadata superblock (the kernel formats an all-zero one).
* Grants: a sudo caller's VMM must open its snapshot's device. ``grant_node`` chowns the
  nodes of exactly that dm device (``/dev/mapper/NAME`` when it is a node, and
  ``/dev/dm-N``) to the caller, mode 0600. /dev is root's, so nobody can swap the names.
* Bases: ``AREA/pool/thin/bases/<thin id>`` (root-owned) records the thin ids that hold
  base volumes, written by ``dm-import``; such an id is never granted, so a caller cannot
  write a base (the reflink backend's root-owned ``volumes/`` gives the same guarantee).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from helper.base import fileops, safepath
from helper.base.errors import Conflict, IntegrityError, NotFound, UsageError
from helper.configbase import Config
from helper.storage import dmthin_core as core

BASES = "pool/thin/bases"
CLAIM = "thin-devices.json"

# -- the operator's devices ------------------------------------------------------------------


def _kind(mode: int) -> str:
    if stat.S_ISBLK(mode):
        return "block device"
    if stat.S_ISREG(mode):
        return "regular file"
    if stat.S_ISDIR(mode):
        return "directory"
    return "other file"


def _mountinfo() -> list[tuple[str, str, str]]:
    """(major:minor, mount point, source) of every mount this process sees."""
    out: list[tuple[str, str, str]] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(fields) >= 5 and len(rfields) >= 2:
                out.append((fields[2], _unescape(fields[4]), _unescape(rfields[1])))
    return out


def _unescape(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def block_facts(path: Path) -> core.BlockFacts:
    """What ``path`` is, for ``dmthin_core.device_problem``. Follows a symlink (the config
    is root's, and /dev/disk/by-id names are symlinks)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return core.BlockFacts(str(path), "missing")
    if not stat.S_ISBLK(st.st_mode):
        return core.BlockFacts(str(path), _kind(st.st_mode))
    devno = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    sysdir = Path("/sys/dev/block") / devno
    holders: list[str] = []
    with contextlib.suppress(FileNotFoundError):
        holders = sorted(os.listdir(sysdir / "holders"))
    devnos = {devno}
    with contextlib.suppress(FileNotFoundError):
        for child in sysdir.iterdir():  # partitions are subdirectories with a "partition"
            if (child / "partition").exists():
                devnos.add((child / "dev").read_text().strip())
    real = os.path.realpath(path)
    mounted = tuple(mp for num, mp, src in _mountinfo() if num in devnos or src == real)
    busy, size = False, 0
    try:
        # O_EXCL on a block device: EBUSY if mounted, a dm/md member, swap, or claimed.
        fd = os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as e:
        if e.errno != errno.EBUSY:
            raise
        busy = True
    else:
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)
    if busy:
        with contextlib.suppress(OSError):
            size = int((sysdir / "size").read_text()) * core.SECTOR
    return core.BlockFacts(str(path), "block device", devno, size, mounted, tuple(holders),
                           busy)


@dataclass(frozen=True)
class Devices:
    """The operator's devices, checked usable."""

    data: str  # configured path
    metadata: str
    data_devno: str  # major:minor, what the table names
    meta_devno: str
    data_bytes: int
    meta_bytes: int


def configured(cfg: Config) -> tuple[Path, Path] | None:
    if cfg.data_device is None or cfg.metadata_device is None:
        return None
    return cfg.data_device, cfg.metadata_device


def check_devices(cfg: Config, block_sectors: int) -> Devices:
    """The configured devices, or ``UsageError`` saying exactly what is wrong."""
    pair = configured(cfg)
    if pair is None:
        raise UsageError("no [pool] data_device and metadata_device are configured",
                         "name both in the helper's config, or use the loop-backed files")
    data, meta = block_facts(pair[0]), block_facts(pair[1])
    problem = core.devices_problem(data, meta, block_sectors)
    if problem is not None:
        where = cfg.path or "/etc/kiln/config.toml"
        raise UsageError(problem, f"fix [pool] in {where}, or free the device")
    return Devices(data.path, meta.path, data.devno, meta.devno, data.size, meta.size)


def spare_devices(cfg: Config) -> set[str]:
    """Real paths of the configured devices: reclaim never detaches them."""
    pair = configured(cfg)
    return {os.path.realpath(p) for p in pair} if pair else set()


def clear_superblock(devices: Devices) -> None:
    """Zero the metadata superblock: the kernel formats a new pool on first load."""
    fd = os.open(devices.metadata, os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}" != devices.meta_devno:
            raise Conflict(f"{devices.metadata} changed while being checked", "retry")
        os.pwrite(fd, bytes(core.SUPERBLOCK_BYTES), 0)
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the claim ---------------------------------------------------------------------------------


def _claim_path(cfg: Config) -> Path:
    return cfg.pool_dir / CLAIM


def claimed_by(cfg: Config) -> str | None:
    try:
        fd = safepath.open_beneath(cfg.pool_dir, CLAIM, os.O_RDONLY)
    except NotFound:
        return None
    try:
        safepath.fstat_kind(fd, "reg", str(_claim_path(cfg)), owner=0)
        area = json.loads(os.read(fd, 65536))["area"]
    except (ValueError, KeyError, TypeError):
        raise IntegrityError(f"{_claim_path(cfg)} is not a kiln claim",
                             "remove it if no pool uses the [pool] devices") from None
    finally:
        os.close(fd)
    return str(area)


def claim(cfg: Config, area: Path, devices: Devices | None, *, fresh: bool) -> None:
    """Claim the devices for ``area`` or raise ``Conflict`` (``dmthin_core.claim_problem``);
    ``fresh`` formats ``devices`` first. Formatting comes before the claim is written: a
    crash in between leaves a claim that still requires ``fresh``, never a claim of this
    area over an earlier pool's metadata that a later non-fresh load would bring up."""
    holder = claimed_by(cfg)
    problem = core.claim_problem(holder, str(area), holder is not None
                                 and os.path.isdir(holder), fresh)
    if problem is not None:
        hint = ("its owner frees them with `kiln pool destroy`" if holder is not None
                else "run `kiln pool init` to make a new pool on them")
        raise Conflict(problem, hint)
    if fresh and devices is not None:
        clear_superblock(devices)
    if holder == str(area):
        return
    cfg.pool_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    dfd = safepath.open_dir(cfg.pool_dir)
    try:
        with fileops.atomic_replace(CLAIM, dir_fd=dfd, mode=0o644) as tmp:
            fileops.write_all(tmp.fd, json.dumps({"area": str(area)}).encode() + b"\n")
    finally:
        os.close(dfd)


def release(cfg: Config, area: Path) -> bool:
    """Drop ``area``'s claim (its pool device must be gone already). Whether it held one."""
    if claimed_by(cfg) != str(area):
        return False
    dfd = safepath.open_dir(cfg.pool_dir)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(CLAIM, dir_fd=dfd)
    finally:
        os.close(dfd)
    return True


# -- device nodes given to the caller -----------------------------------------------------------


def grant_node(name: str, uid: int, gid: int) -> list[str]:
    """Give the nodes of dm device ``name`` to ``uid:gid`` (0600); the paths changed."""
    st = os.stat(f"/dev/mapper/{name}")  # with udev a symlink to ../dm-N
    if not stat.S_ISBLK(st.st_mode):
        raise UsageError(f"/dev/mapper/{name} is not a block device", "")
    done: list[str] = []
    for path in (f"/dev/mapper/{name}", f"/dev/dm-{os.minor(st.st_rdev)}"):
        try:
            lst = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISBLK(lst.st_mode) and lst.st_rdev == st.st_rdev:
            os.chown(path, uid, gid, follow_symlinks=False)
            os.chmod(path, 0o600)  # checked above: a node, not a symlink
            done.append(path)
    return done


# -- base-volume thin ids --------------------------------------------------------------------


def base_ids(area: Path) -> set[int]:
    try:
        dfd = safepath.open_beneath(area, BASES, os.O_RDONLY | os.O_DIRECTORY)
    except NotFound:
        return set()
    try:
        return {int(n) for n in os.listdir(dfd) if n.isdigit()}
    finally:
        os.close(dfd)


def record_base(area: Path, thin_id: int) -> None:
    """Record ``thin_id`` as a base, exclusively: ``Conflict`` when it already is one (an
    import of it in progress or done), so a failed import never drops another's record."""
    safepath.mkdirs_beneath(area, BASES, 0o755)
    dfd = safepath.open_beneath(area, BASES, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fd = os.open(str(thin_id), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o644, dir_fd=dfd)
        except FileExistsError:
            raise Conflict(f"thin device {thin_id} already holds a base volume",
                           "import into a free thin id") from None
        os.close(fd)
        os.fsync(dfd)
    finally:
        os.close(dfd)


def forget_base(area: Path, thin_id: int) -> None:
    try:
        dfd = safepath.open_beneath(area, BASES, os.O_RDONLY | os.O_DIRECTORY)
    except NotFound:
        return
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(str(thin_id), dir_fd=dfd)
    finally:
        os.close(dfd)


# -- copying a volume into a fresh thin device ---------------------------------------------------


def copy_volume(src: int, dst: int, want: str | None) -> None:
    """Copy ``src``'s bytes to ``dst`` at the same offsets, writing only non-zero chunks (a
    fresh thin device reads zeros everywhere else). With ``want`` every byte read (holes
    as zeros) is hashed and must give that volume id: what lands is what was hashed."""
    _, got = fileops.hashing_copy(src, dst, hashed=want is not None)
    os.fsync(dst)
    if want is not None and got != want:
        raise IntegrityError(f"volume bytes hash to {got[:19]}, not {want[:19]}",
                             "the file is not the volume it claims to be")
