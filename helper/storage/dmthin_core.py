"""The pure parts of the dm-thin backend: names, table lines, messages, id allocation,
metadata sizing, status parsing and the reclaim order. No I/O here; property-tested in
``tests/helper/test_dmthin_core.py``.

Names. Every device kiln creates is called ``kiln-<rootkey>-<kind>[-<id>]`` where
``rootkey`` is 8 hex digits of the sha256 of the kiln root's path (two roots on one host
never share a device) and kind is ``pool``, ``vol-<64 hex>`` or ``snap-<[a-z2-7]{1,32}>``.
Anything else is not kiln's, and reclaim never touches it.

Reclaim order. From a ``dmsetup ls`` + ``dmsetup table`` listing, remove this root's
devices that are not in ``keep``: snapshots first, then base volumes, then the pool, and
within that a device always before anything its table references (the dependency order
the kernel enforces anyway: a device in use cannot be removed). A device that a kept
device depends on is never removed.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

PREFIX = "kiln-"
SECTOR = 512
THIN_ID_LIMIT = 1 << 24  # dm-thin device ids are 24 bits
DEFAULT_BLOCK_SECTORS = 128  # 64 KiB data blocks: fine-grained sharing between snapshots

_ROOTKEY = r"[0-9a-f]{8}"
_SNAP_ID = r"[a-z2-7]{1,32}"
_NAME_RE = re.compile(
    rf"^kiln-(?P<root>{_ROOTKEY})-(?:(?P<pool>pool)|vol-(?P<vol>[0-9a-f]{{64}})"
    rf"|snap-(?P<snap>{_SNAP_ID}))$"
)
_DEVNO_RE = re.compile(r"^(\d+):(\d+)$")
_LS_RE = re.compile(r"^(?P<name>\S+)\s+\((?P<maj>\d+)(?::|,\s*)(?P<min>\d+)\)\s*$")


@dataclass(frozen=True)
class DmName:
    """A parsed kiln device name."""

    rootkey: str
    kind: str  # "pool" | "vol" | "snap"
    ident: str  # volume hex, snapshot id, or "" for the pool

    @property
    def rank(self) -> int:
        """Removal rank: snapshots (0) before base volumes (1) before the pool (2)."""
        return {"snap": 0, "vol": 1, "pool": 2}[self.kind]


def root_key(root_path: str) -> str:
    """8 hex digits naming a kiln root in device names."""
    return hashlib.sha256(root_path.encode()).hexdigest()[:8]


def parse_name(name: str) -> DmName | None:
    """The kiln name's parts, or None for a name kiln did not make."""
    m = _NAME_RE.fullmatch(name)
    if m is None:
        return None
    if m.group("pool"):
        return DmName(m.group("root"), "pool", "")
    if m.group("vol"):
        return DmName(m.group("root"), "vol", m.group("vol"))
    return DmName(m.group("root"), "snap", m.group("snap"))


def pool_name(rootkey: str) -> str:
    return _checked(f"{PREFIX}{rootkey}-pool")


def volume_name(rootkey: str, volume_hex: str) -> str:
    return _checked(f"{PREFIX}{rootkey}-vol-{volume_hex}")


def snapshot_name(rootkey: str, snap_id: str) -> str:
    return _checked(f"{PREFIX}{rootkey}-snap-{snap_id}")


def _checked(name: str) -> str:
    if parse_name(name) is None:
        raise ValueError(f"not a valid kiln device name: {name!r}")
    return name


# -- tables and messages ----------------------------------------------------------------


def thin_pool_table(meta_dev: str, data_dev: str, data_sectors: int,
                    block_sectors: int = DEFAULT_BLOCK_SECTORS) -> str:
    """The thin-pool table line. Block zeroing stays on (no feature args): a guest writing
    part of a newly provisioned block must never read another VM's old data in the rest."""
    if data_sectors <= 0 or data_sectors % block_sectors:
        raise ValueError("data size must be a positive multiple of the block size")
    low_water = max(1, data_sectors // block_sectors // 10)  # dm event at 90 % full
    return f"0 {data_sectors} thin-pool {meta_dev} {data_dev} {block_sectors} {low_water} 0"


def thin_table(pool_dev: str, thin_id: int, sectors: int) -> str:
    """A thin device's table line (a snapshot may be larger than its origin)."""
    _check_id(thin_id)
    if sectors <= 0:
        raise ValueError("a thin device needs a positive size")
    return f"0 {sectors} thin {pool_dev} {thin_id}"


def msg_create_thin(thin_id: int) -> str:
    _check_id(thin_id)
    return f"create_thin {thin_id}"


def msg_create_snap(thin_id: int, origin_id: int) -> str:
    _check_id(thin_id)
    _check_id(origin_id)
    if thin_id == origin_id:
        raise ValueError("a snapshot needs its own id")
    return f"create_snap {thin_id} {origin_id}"


def msg_delete(thin_id: int) -> str:
    _check_id(thin_id)
    return f"delete {thin_id}"


_MSG_RE = re.compile(r"^(?:create_thin \d+|create_snap \d+ \d+|delete \d+)$")


def valid_message(msg: str) -> bool:
    """Only the three messages kiln sends are accepted by the privileged layer."""
    if not _MSG_RE.fullmatch(msg):
        return False
    return all(0 <= int(n) < THIN_ID_LIMIT for n in msg.split()[1:])


def _check_id(thin_id: int) -> None:
    if not 0 <= thin_id < THIN_ID_LIMIT:
        raise ValueError(f"thin device id {thin_id} out of range")


def thin_id_of_table(table: str) -> int | None:
    """The thin id a one-line ``thin`` table maps (``0 LEN thin POOL ID``), else None."""
    parts = table.split()
    if len(parts) != 5 or parts[2] != "thin" or not parts[4].isdigit():
        return None
    thin_id = int(parts[4])
    return thin_id if thin_id < THIN_ID_LIMIT else None


def sectors_of(size: int) -> int:
    """Bytes → 512-byte sectors, rounded up."""
    return -(-size // SECTOR)


def pool_sizes(data_bytes: int, block_sectors: int = DEFAULT_BLOCK_SECTORS) -> tuple[int, int]:
    """(data sectors rounded down to whole blocks, metadata bytes) for a pool of
    ``data_bytes``. Metadata: ~64 bytes per data block (thin_metadata_size's worst case is
    48) plus 4 MiB, between 16 MiB and the format's 16 GiB limit."""
    block_bytes = block_sectors * SECTOR
    blocks = data_bytes // block_bytes
    if blocks < 16:
        raise ValueError("a thin pool needs at least 16 data blocks")
    meta = min(max(blocks * 64 + (4 << 20), 16 << 20), 16 << 30)
    meta -= meta % 4096
    return blocks * block_sectors, meta


# -- thin device id allocation ----------------------------------------------------------


def allocate_id(counter: int, used: Iterable[int]) -> tuple[int, int]:
    """The next free id at or after ``counter`` (wrapping) and the new counter.

    The counter is persisted before the id is used, so an id handed out before a crash is
    never handed out again while the pool may still hold it; ``used`` (ids recorded in
    kiln's state) guards the wrap-around.
    """
    taken = set(used)
    if len(taken) >= THIN_ID_LIMIT:
        raise ValueError("no free thin device id")
    cand = counter % THIN_ID_LIMIT
    while cand in taken:
        cand = (cand + 1) % THIN_ID_LIMIT
    return cand, cand + 1


# -- status ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolUsage:
    used_data_blocks: int
    total_data_blocks: int
    used_meta_blocks: int
    total_meta_blocks: int
    read_only: bool
    needs_check: bool


def parse_pool_status(line: str) -> PoolUsage:
    """Parse ``dmsetup status POOL``: ``0 LEN thin-pool TRANSID UM/TM UD/TD HELD MODE ...``."""
    parts = line.split()
    if len(parts) < 8 or parts[2] != "thin-pool":
        if "Fail" in parts:
            return PoolUsage(0, 0, 0, 0, True, True)
        raise ValueError(f"not a thin-pool status line: {line!r}")
    um, tm = (int(x) for x in parts[4].split("/"))
    ud, td = (int(x) for x in parts[5].split("/"))
    return PoolUsage(ud, td, um, tm, parts[7] != "rw", "needs_check" in parts)


# -- listing and reclaim ----------------------------------------------------------------


@dataclass(frozen=True)
class DmDevice:
    """One device of a ``dmsetup ls`` listing with the devices its table references."""

    name: str
    devno: str  # "major:minor"
    deps: frozenset[str]  # devnos (or /dev paths) its table lines reference


def parse_listing(ls_text: str, table_text: str) -> list[DmDevice]:
    """Combine ``dmsetup ls`` (``name\\t(253:0)``) and ``dmsetup table`` (``name: 0 N target
    args``; one line per segment) into devices with dependencies."""
    devnos: dict[str, str] = {}
    for line in ls_text.splitlines():
        m = _LS_RE.match(line.strip())
        if m:
            devnos[m.group("name")] = f"{m.group('maj')}:{m.group('min')}"
    deps: dict[str, set[str]] = {name: set() for name in devnos}
    for line in table_text.splitlines():
        name, sep, rest = line.partition(": ")
        if not sep or name not in deps:
            continue
        for tok in rest.split()[3:]:
            if _DEVNO_RE.match(tok) or tok.startswith("/dev/"):
                deps[name].add(tok)
    return [DmDevice(n, devnos[n], frozenset(deps[n])) for n in sorted(devnos)]


def _refers(dev: DmDevice, other: DmDevice) -> bool:
    return other.devno in dev.deps or f"/dev/mapper/{other.name}" in dev.deps


def reclaim_plan(devices: Iterable[DmDevice], rootkey: str,
                 keep: Iterable[str] = ()) -> list[str]:
    """Names to remove, in order: this root's kiln devices not kept, dependents first
    (snapshots, then bases, then the pool). Never a non-kiln device, another root's device,
    a kept one, or one that a kept (or foreign) device depends on."""
    devs = list(devices)
    keep_set = set(keep)
    mine = {d.name: d for d in devs
            if (p := parse_name(d.name)) is not None and p.rootkey == rootkey}
    candidates = {n for n in mine if n not in keep_set}
    # Anything that must stay (kept, foreign) pins every device it references, transitively.
    pinned: set[str] = set()
    stack = [d for d in devs if d.name not in candidates]
    while stack:
        d = stack.pop()
        for other in devs:
            if other.name in candidates and other.name not in pinned and _refers(d, other):
                pinned.add(other.name)
                stack.append(other)
    doomed = {n: mine[n] for n in candidates - pinned}
    # Topological order, ties broken by rank then name for a stable plan.
    order: list[str] = []
    remaining = dict(doomed)
    while remaining:
        ready = [d for d in remaining.values()
                 if not any(_refers(o, d) for o in remaining.values() if o is not d)]
        if not ready:  # a cycle cannot happen in dm; fall back to rank order
            ready = list(remaining.values())
        ready.sort(key=lambda d: (_rank(d.name), d.name))
        first = ready[0]
        order.append(first.name)
        del remaining[first.name]
    return order


def _rank(name: str) -> int:
    p = parse_name(name)
    return p.rank if p else 3



def needs_reclaim(names: Iterable[str], rootkey: str, keep: Iterable[str]) -> bool:
    """Whether any of this root's kiln devices in ``names`` is not kept (then the
    privileged reclaim has work; otherwise kiln skips the helper call)."""
    keep_set = set(keep)
    return any((p := parse_name(n)) is not None and p.rootkey == rootkey and n not in keep_set
               for n in names)


# -- the operator's block devices ([pool] data_device / metadata_device) ------------------

MIN_META_BYTES = 2 << 20  # LVM's minimum for thin-pool metadata; smaller is useless
SUPERBLOCK_BYTES = 4096  # a thin-pool's metadata superblock; all zeros = format it anew


@dataclass(frozen=True)
class BlockFacts:
    """What the helper found at a configured device path (``helper.storage.dmdev.block_facts``)."""

    path: str
    kind: str  # "block device" | "regular file" | "directory" | "other file" | "missing"
    devno: str = ""  # "major:minor" of a block device
    size: int = 0  # bytes of a block device
    mounted_at: tuple[str, ...] = ()  # where it (or one of its partitions) is mounted
    holders: tuple[str, ...] = ()  # /sys/class/block/NAME/holders: dm-N, md…
    busy: bool = False  # an O_EXCL open was refused: something holds it exclusively


def device_problem(role: str, facts: BlockFacts, min_bytes: int) -> str | None:
    """Why the device configured as ``role`` cannot hold a thin-pool, or None."""
    where = f"[pool] {role} {facts.path}"
    if facts.kind == "missing":
        return f"{where} does not exist"
    if facts.kind != "block device":
        return f"{where} is not a block device (it is a {facts.kind})"
    if facts.mounted_at:
        return f"{where} is mounted at {facts.mounted_at[0]}"
    if facts.holders:
        return f"{where} is in use (held by {', '.join(facts.holders)})"
    if facts.busy:
        return f"{where} is in use (another program holds it open exclusively)"
    if facts.size < min_bytes:
        return f"{where} is too small: {facts.size} bytes, at least {min_bytes} needed"
    return None


def devices_problem(data: BlockFacts, meta: BlockFacts,
                    block_sectors: int = DEFAULT_BLOCK_SECTORS) -> str | None:
    """Why the configured pair cannot hold a thin-pool, or None. Both must be usable
    block devices, and two different ones."""
    for role, facts, minimum in (("data_device", data, 16 * block_sectors * SECTOR),
                                 ("metadata_device", meta, MIN_META_BYTES)):
        problem = device_problem(role, facts, minimum)
        if problem is not None:
            return problem
    if data.devno == meta.devno:
        return (f"[pool] data_device {data.path} and metadata_device {meta.path} are the "
                f"same device ({data.devno})")
    return None


def device_pool_sectors(data_bytes: int, block_sectors: int = DEFAULT_BLOCK_SECTORS) -> int:
    """The thin-pool's data length on a device of ``data_bytes``: whole blocks only."""
    blocks = data_bytes // (block_sectors * SECTOR)
    if blocks < 16:
        raise ValueError("a thin pool needs at least 16 data blocks")
    return blocks * block_sectors


def claim_problem(claimed_by: str | None, area: str, claimant_exists: bool,
                  fresh: bool) -> str | None:
    """Whether ``area`` may use the operator's devices, given who claimed them last.

    The devices hold one pool for the whole host. ``pool init`` (``fresh``: the metadata
    superblock is zeroed, so no thin id of an earlier pool survives) claims them unless
    another area that still exists holds the claim (its pool may only be down after a
    reboot); a claim whose area is gone is stale. Bringing an existing pool back up (not
    ``fresh``) needs the claim to be this area's own: unclaimed devices may still hold an
    earlier pool's metadata (a crash, an operator's edit), and loading it would hand that
    pool's volumes to whoever asked first."""
    if claimed_by == area:
        return None
    if claimed_by is not None and claimant_exists:
        return f"the [pool] devices hold the pool of {claimed_by}"
    if fresh:
        return None
    if claimed_by is None:
        return ("the [pool] devices are not claimed by this pool: only a new pool (fresh) "
                "may take them, and it formats them")
    return f"the [pool] devices were claimed by {claimed_by}, not by this pool"


def grant_problem(name: str, thin_id: int, base_ids: Iterable[int]) -> str | None:
    """Only a snapshot's device is handed to the caller, never a base or the pool."""
    parsed = parse_name(name)
    if parsed is None or parsed.kind != "snap":
        return f"refusing to give {name} to the caller: only snapshot devices are given"
    if thin_id in set(base_ids):
        return (f"refusing to give thin device {thin_id} to the caller: it holds a base "
                "volume")
    return None
