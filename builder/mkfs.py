"""Sizing (pure) and a deterministic ``mke2fs -d`` from the tree's tar.

``plan`` decides the volume's geometry from the ``Tree`` alone (no I/O): the blocks the
content needs, plus ext4's own overhead, plus headroom. ``mke2fs_argv`` is the exact
command line, with every setting that could vary between hosts given explicitly (feature
list, block and inode size, inode count, journal size, reserved blocks, hash seed, UUID)
and ``builder/mke2fs.conf`` in place of the host's ``/etc/mke2fs.conf``. ``make_ext4``
runs it with ``SOURCE_DATE_EPOCH`` so the volume's bytes are a function of its inputs.

xattrs: mke2fs 1.47 imports only ``security.capability`` (and ``gnu.translator``) from a
tar's ``SCHILY.xattr`` records (``set_inode_xattr_tar`` filters by name). The others
(``user.*``, ``trusted.*``, ``security.selinux``, POSIX ACLs...) are set afterwards with
one ``debugfs -w`` script, addressing inodes by number (``<ino>``) so no path is parsed by
debugfs, with values passed as files (binary-safe), in sorted order (deterministic).

Headroom policy (``plan``): free space = ``headroom`` (default 25%) of the content's
bytes + 64 MiB; inodes = (content inodes) x (1 + headroom) + 1024. An explicit ``size``
replaces the headroom; it must hold at least ``need(tree)``.

Known cost: mke2fs 1.47.2 links tar entries into a directory by scanning it linearly, so
one directory of n entries costs O(n^2) (20,000 entries: ~20 s; 2,000: ~0.2 s).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import re
import tempfile
import threading
import uuid as uuidlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from builder import ext4, proc
from builder.tree import Kind, Tree
from helper.base.errors import BuildError, ToolError, ToolNotFound

MIB = 1 << 20
INODE_SIZE = 256
DEFAULT_HEADROOM = 0.25
MIN_FREE = 64 * MIB
EXTRA_INODES = 1024
RESERVED_INODES = 10  # inodes 1..10 are ext4's own; the first file gets inode 11
MIN_VERSION = (1, 47, 1)
CONFIG = Path(__file__).with_name("mke2fs.conf")

# The feature set, explicit and complete ("none" first clears mke2fs.conf's base set).
# Left out on purpose: orphan_file and metadata_csum_seed (kernels before 5.15 / 4.4
# refuse them), inline_data (a file's bytes in its inode: the verifier does not read it),
# quota/project.
FEATURES = ("has_journal", "ext_attr", "resize_inode", "dir_index", "filetype", "extent",
            "64bit", "flex_bg", "sparse_super", "large_file", "huge_file", "dir_nlink",
            "extra_isize", "metadata_csum")
# xattrs mke2fs takes from the tar itself; all others go through debugfs.
TAR_XATTRS = frozenset({"security.capability", "gnu.translator"})


@dataclass(frozen=True)
class Geometry:
    """A volume's shape: total bytes, inode count, block size."""

    size: int
    inodes: int
    block_size: int = 4096

    @property
    def blocks(self) -> int:
        return self.size // self.block_size


# -- sizing (pure) ---------------------------------------------------------------------

def _xattr_bytes(name: str, value: bytes) -> int:
    for prefix in ("user.", "trusted.", "security.", "system."):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    return ((16 + len(name.encode("utf-8", "surrogateescape")) + 3) & ~3) + \
        ((len(value) + 3) & ~3)


def content_blocks(tree: Tree, bs: int = 4096) -> tuple[int, int]:
    """(blocks, inodes) the tree's own content needs, without filesystem overhead."""
    # Room for xattrs in a 256-byte inode: 256 - 128 (base) - 32 (extra) - 4 (magic) - 4 (end).
    in_inode = INODE_SIZE - 128 - 32 - 8
    dir_bytes: dict[str, int] = {}
    blocks = 0
    inodes = 0
    for path, e in tree.items():
        if path:
            name = path.rsplit("/", 1)[-1]
            parent = path.rsplit("/", 1)[0] if "/" in path else ""
            rec = (8 + len(os.fsencode(name)) + 3) & ~3
            dir_bytes[parent] = dir_bytes.get(parent, 24) + rec
        if e.link:
            continue
        inodes += 1
        if e.kind is Kind.REG:
            n = -(-e.size // bs)
            blocks += n
            extents = 2 * -(-n // 32768)  # an extent covers <= 32768 blocks; allow breaks
            if extents > 4:
                blocks += -(-extents // 340)
        elif e.kind is Kind.SYMLINK and len(os.fsencode(e.target)) >= 60:
            blocks += 1
        elif e.kind is Kind.DIR:
            dir_bytes.setdefault(path, 24)
        if e.xattrs and sum(_xattr_bytes(k, v) for k, v in e.xattrs) > in_inode:
            blocks += 1
    for used in dir_bytes.values():
        # 12 bytes of each block hold the metadata_csum tail; entries do not straddle
        # blocks, so allow 10% slack, plus extent leaf blocks for fragmented large dirs.
        n = -(-used * 11 // (10 * (bs - 12)))
        blocks += n + (-(-n // 340) if n > 4 else 0)
    return blocks, inodes


def journal_blocks(total_blocks: int, bs: int = 4096) -> int:
    """kiln's journal size policy (like mke2fs's default, but fixed here): MiB -> blocks."""
    size = total_blocks * bs
    mib = 4 if size < 128 * MIB else 16 if size < 1024 * MIB else 32 if size < 2048 * MIB \
        else 64 if size < 16384 * MIB else 128
    return mib * MIB // bs


def _backup_groups(groups: int) -> int:
    """Groups holding a superblock + descriptor copy under sparse_super: 0, 1, 3^k, 5^k, 7^k."""
    found = {0, 1} & set(range(groups))
    for base in (3, 5, 7):
        g = base
        while g < groups:
            found.add(g)
            g *= base
    return len(found)


def overhead(total_blocks: int, inodes: int, bs: int = 4096) -> tuple[int, int]:
    """(metadata blocks, inodes mke2fs will really make) for a filesystem of that size."""
    bpg = 8 * bs
    groups = max(1, -(-total_blocks // bpg))
    per_block = bs // INODE_SIZE
    ipg = -(-inodes // groups)
    ipg = max(per_block, -(-ipg // per_block) * per_block)
    itable = groups * ipg // per_block
    gdb = -(-groups * 64 // bs)
    max_groups = -(-min(1 << 32, total_blocks * 1024) // bpg)
    rsv = max(0, min(bs // 4, -(-max_groups // (bs // 64)) - gdb))
    backups = _backup_groups(groups) * (1 + gdb + rsv)
    # bitmaps, inode tables, sb/gdt copies, journal (+1 extent block), resize inode's
    # indirect block, root dir and the 4 blocks mke2fs gives lost+found.
    meta = 2 * groups + itable + backups + journal_blocks(total_blocks, bs) + 1 + 1 + 1 + 4
    return meta, ipg * groups


def _fit(data_blocks: int, inodes: int, bs: int) -> int:
    """Smallest block count (rounded up to 1 MiB) holding ``data_blocks`` plus overhead."""
    per_mib = MIB // bs
    total = data_blocks
    for _ in range(100):
        meta, _ = overhead(total, inodes, bs)
        # ext4 cannot hold more than 8*bs inodes per group: more inodes need more groups.
        want = max(data_blocks + meta, (-(-inodes // (8 * bs)) - 1) * 8 * bs + 1,
                   # mke2fs refuses a journal larger than half the blocks still free
                   meta + journal_blocks(total, bs) + 1)
        want = -(-want // per_mib) * per_mib
        if want <= total:
            return total
        total = want
    return total


def _inodes(tree: Tree, headroom: float) -> int:
    _, n = content_blocks(tree)
    return RESERVED_INODES + 1 + math.ceil(n * (1 + headroom)) + EXTRA_INODES


def need(tree: Tree, *, bs: int = 4096, extra_bytes: int = 0) -> int:
    """Bytes the smallest volume holding ``tree`` has (no headroom)."""
    blocks, _ = content_blocks(tree, bs)
    return _fit(blocks + -(-extra_bytes // bs), _inodes(tree, 0.0), bs) * bs


def _mib(n: int) -> str:
    return f"{n // MIB}M" if n % MIB == 0 else f"{n} bytes"


def plan(tree: Tree, *, size: int | None = None, headroom: float | None = None,
         extra_bytes: int = 0) -> Geometry:
    """The volume's geometry for ``tree`` (see the module docstring for the policy)."""
    bs = 4096
    h = DEFAULT_HEADROOM if headroom is None else headroom
    if h < 0:
        raise BuildError(f"headroom {h} is negative", "give a headroom of 0 or more")
    blocks, _ = content_blocks(tree, bs)
    blocks += -(-extra_bytes // bs)
    if size is not None:
        inodes = _inodes(tree, DEFAULT_HEADROOM)
        needed = _fit(blocks, inodes, bs) * bs
        if size < needed:
            raise BuildError(
                f"volume size {_mib(size)} is too small: the content needs at least "
                f"{_mib(-(-needed // MIB) * MIB)}",
                "raise size in the recipe, or remove it to size the volume automatically")
        return Geometry(size=size // bs * bs, inodes=inodes, block_size=bs)
    free = -(-(math.ceil(blocks * bs * h) + MIN_FREE) // bs)
    inodes = _inodes(tree, h)
    return Geometry(size=_fit(blocks + free, inodes, bs) * bs, inodes=inodes, block_size=bs)


# -- mke2fs ------------------------------------------------------------------------------

def uuid_from(key: str) -> str:
    """A deterministic (version-4 shaped) UUID from a hex key (any other text is hashed)."""
    digest = key.lower()
    if not re.fullmatch(r"[0-9a-f]{32,}", digest):
        digest = hashlib.sha256(key.encode()).hexdigest()
    return str(uuidlib.UUID(hex=digest[:32], version=4))


def mke2fs_argv(image: Path, geometry: Geometry, *, source: str, uuid: str, hash_seed: str,
                label: str) -> list[str]:
    """The exact mke2fs arguments (mke2fs has no long options)."""
    journal_bytes = journal_blocks(geometry.blocks, geometry.block_size) * geometry.block_size
    return [
        "-t", "ext4",
        "-O", ",".join(("none", *FEATURES)),
        "-b", str(geometry.block_size),
        "-I", str(INODE_SIZE),
        "-N", str(geometry.inodes),
        "-m", "0",  # no blocks reserved for root: a VM's root fs is sized to fit
        "-J", f"size={journal_bytes // MIB}",
        "-U", uuid,
        # lazy_*_init=0: tables are initialised now, so the guest kernel never writes them
        # later (a lazily initialised volume would change under its snapshots); root_owner
        # keeps lost+found and the root 0:0 when run rootless; nodiscard: it is a new file.
        "-E", f"hash_seed={hash_seed},nodiscard,lazy_itable_init=0,lazy_journal_init=0,"
              "root_owner=0:0",
        "-L", label,
        "-d", source,  # a tar file, or "-" for a tar on stdin
        "-F",  # the target is a regular file, not a block device
        "-q",
        str(image),
        str(geometry.blocks),  # with -b given, fs-size counts blocks
    ]


@functools.cache
def mke2fs_version() -> tuple[int, ...]:
    text = proc.version_of("mke2fs", ["-V"])  # the same cached answer the build key uses
    if text == "missing":
        raise ToolNotFound("mke2fs", "e2fsprogs")
    m = re.search(r"mke2fs (\d+)\.(\d+)(?:\.(\d+))?", text)
    if not m:
        raise BuildError(f"cannot tell the mke2fs version from {text.strip()[:80]!r}",
                         "install e2fsprogs >= 1.47.1")
    return tuple(int(x or 0) for x in m.groups())


def version_error(have: tuple[int, ...]) -> BuildError | None:
    """The error for an mke2fs older than ``MIN_VERSION`` (pure), else None."""
    if have >= MIN_VERSION:
        return None
    return BuildError(
        f"mke2fs {'.'.join(map(str, have))} is too old: kiln needs 1.47.1 or newer "
        "(tar input, SOURCE_DATE_EPOCH)",
        "install e2fsprogs from bookworm-backports: "
        "apt-get install -t bookworm-backports e2fsprogs")


def check_version() -> None:
    err = version_error(mke2fs_version())
    if err is not None:
        raise err


def tool_env(epoch: int) -> dict[str, str]:
    return {
        "MKE2FS_CONFIG": str(CONFIG),
        "SOURCE_DATE_EPOCH": str(epoch),  # every timestamp mke2fs writes, clamped to this
        "E2FSPROGS_FAKE_TIME": str(epoch),  # debugfs and the library's own clock
        "DEBUGFS_PAGER": "__none__",  # proc.run gives tools a pty: never start a pager
    }


def make_ext4(source: Path | Callable[[BinaryIO], None], image: Path, geometry: Geometry, *,
              uuid: str, hash_seed: str, label: str, epoch: int,
              tree: Tree | None = None) -> None:
    """Create ``image`` from a tar: the file ``source``, or what the callable ``source``
    writes into a pipe that mke2fs reads as ``-d -`` (the tar never touches the disk;
    same bytes, measured).

    With ``tree``, the xattrs mke2fs does not import from a tar are applied afterwards
    (without it, only ``security.capability`` reaches the volume).
    """
    check_version()
    fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, geometry.size)
    finally:
        os.close(fd)
    streamed = callable(source)
    argv = mke2fs_argv(image, geometry, source="-" if streamed else str(source), uuid=uuid,
                       hash_seed=hash_seed, label=label)
    try:
        if callable(source):
            _run_streamed(argv, source, env=tool_env(epoch))
        else:
            proc.run("mke2fs", argv, env=tool_env(epoch), timeout=3600)
    except ToolError as e:
        if re.search(r"No space left|Could not allocate block|Could not allocate inode|"
                     r"No free space|Could not allocate", e.stderr_tail):
            more = f"; the content needs at least {_mib(-(-need(tree) // MIB) * MIB)}" \
                if tree is not None else ""
            raise BuildError(f"volume size {_mib(geometry.size)} is too small for the "
                             f"content{more}",
                             "raise size in the recipe, or remove it to size the volume "
                             "automatically") from None
        raise
    if tree is not None:
        apply_xattrs(image, tree, epoch=epoch)


def _run_streamed(argv: list[str], writer: Callable[[BinaryIO], None],
                  env: dict[str, str]) -> None:
    """mke2fs reading stdin from a pipe that ``writer`` fills in a thread.

    The writer's own error (an unreadable file in the image, a full disk) wins over the
    truncated-tar error it causes in mke2fs; a broken pipe in the writer is only the echo
    of mke2fs failing, so mke2fs's error wins then.
    """
    r, w = os.pipe()
    failure: list[BaseException] = []

    def feed() -> None:
        try:
            with os.fdopen(w, "wb") as out:
                writer(out)
        except BrokenPipeError:
            pass
        except BaseException as e:  # re-raised in the caller's thread below
            failure.append(e)

    t = threading.Thread(target=feed, name="tar-writer", daemon=True)
    t.start()
    try:
        with os.fdopen(r, "rb") as inp:
            proc.run("mke2fs", argv, env=env, stdin=inp, timeout=3600)
    except ToolError:
        t.join()
        if failure:
            raise failure[0] from None
        raise
    t.join()
    if failure:
        raise failure[0]


def _xattr_jobs(tree: Tree) -> list[tuple[str, str, bytes]]:
    jobs = []
    for path in sorted(tree):
        e = tree[path]
        if e.link:
            continue
        for name, value in sorted(e.xattrs):
            if name not in TAR_XATTRS:
                if not re.fullmatch(r"[\x21-\x7e]+", name) or '"' in name or "\\" in name:
                    raise BuildError(f"/{path} has an xattr name kiln cannot write: {name!r}",
                                     "remove the xattr from the image")
                jobs.append((path, name, value))
    return jobs


def debugfs_script(jobs: Iterable[tuple[int, str, str]]) -> str:
    """debugfs commands setting each (inode, name, value file); pure, for the argv test."""
    return "".join(f"ea_set -f {vf} <{ino}> {name}\n" for ino, name, vf in jobs)


def apply_xattrs(image: Path, tree: Tree, *, epoch: int) -> None:
    """Set the xattrs mke2fs skipped (every name outside ``TAR_XATTRS``)."""
    jobs = _xattr_jobs(tree)
    if not jobs:
        return
    inodes = ext4.walk(image)
    with tempfile.TemporaryDirectory(prefix="kiln-xattr-") as tmp:
        lines = []
        for i, (path, name, value) in enumerate(jobs):
            vf = Path(tmp) / str(i)
            vf.write_bytes(value)
            lines.append((inodes[path], name, str(vf)))
        script = Path(tmp) / "script"
        script.write_text(debugfs_script(lines))
        res = proc.run("debugfs", ["-w", "-f", str(script), str(image)],
                       env=tool_env(epoch), timeout=600)
    # debugfs reports command failures on stderr but still exits 0.
    errors = [ln for ln in res.stderr.decode("utf-8", "replace").splitlines()
              if ln.strip() and not ln.startswith("debugfs ")]
    if errors:
        raise BuildError(f"debugfs could not set the image's xattrs: {errors[0]}",
                         "all of a file's xattrs must fit in one 4 KiB block next to its inode; "
                         "remove oversized xattrs from the image")
