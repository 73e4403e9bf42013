"""VM records: one SQLite database under the root (``ROOT/vms.db``).

Every host resource a VM uses is written into its record **before** it is created: the
snapshot id, the VM directory, the cgroup paths and the uid come with the first INSERT
(state ``creating``), the VMM pid right after the fork (and the VMM carries ``-name
kiln-<host name>`` so a crash between fork and that UPDATE is still attributable). Firecracker
VMs also name their jail, API socket and cgroup version in ``fc`` (a JSON document whose
``step`` is the driver step about to run), and take their uid from the jails' range.
``--net tap`` VMs name their network objects in ``net`` (step ``recorded`` before the
helper makes any, ``attached`` with the address, ``released`` once they are gone) and take
their uid from the helper's range too (it owns their tap). A record
names its owner (the ``kiln run`` process, by pid and start time, so pid reuse cannot
fool the reaper); the reaper fails VMs whose owner died and reclaims their resources.

Host names. cgroups, Firecracker jails and VMM processes are host-wide, so the name kiln gives
a VM there is ``host_name(root_key(ROOT), vm_id)``: 8 characters of lowercase base32 of the
sha256 of the root's real path, then the 12-character VM id (20 characters of [a-z2-7]: a
valid jail id and kiln-helper VM id). A root's reaper acts only on names carrying its own
key (``vm_of_host``), so two roots on one host never reap each other's VMs.

States: creating → running → exited | failed. ``exit_code`` and ``reason`` are set when a
VM leaves ``running``. WAL mode and a busy timeout let concurrent kiln commands share it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import secrets
import sqlite3
import time
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from helper.base import fileops
from helper.base.errors import Conflict, NotFound, UsageError

STATES = ("creating", "running", "exited", "failed")
LIVE = ("creating", "running")
# steps of the ``net`` document: recorded (objects may be being made) → attached → released
NET_RECORDED, NET_ATTACHED, NET_RELEASED = "recorded", "attached", "released"
UID_BASE = 820000  # per-VM uids for the QEMU process (as root): [UID_BASE, +UID_COUNT)
UID_COUNT = 65536
_VM_ID = re.compile(r"^[a-z2-7]{12}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS vms (
    id TEXT PRIMARY KEY,
    name TEXT UNIQUE,
    state TEXT NOT NULL,
    exit_code INTEGER,
    reason TEXT NOT NULL DEFAULT '',
    vmm TEXT NOT NULL,
    volume TEXT NOT NULL,
    snapshot TEXT NOT NULL,
    dir TEXT NOT NULL,
    cgroups TEXT NOT NULL DEFAULT '[]',
    uid INTEGER,
    pid INTEGER,
    pid_start INTEGER,
    owner_pid INTEGER,
    owner_start INTEGER,
    auto_remove INTEGER NOT NULL DEFAULT 0,
    spec TEXT NOT NULL DEFAULT '{}',
    fc TEXT NOT NULL DEFAULT '{}',
    net TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    started REAL,
    finished REAL
);
CREATE TABLE IF NOT EXISTS orphans (
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    first_seen REAL NOT NULL,
    PRIMARY KEY (kind, name)
);
"""


@dataclass(frozen=True)
class VMRecord:
    id: str
    name: str | None
    state: str
    exit_code: int | None
    reason: str
    vmm: str
    volume: str
    snapshot: str
    dir: str
    cgroups: str  # JSON array of cgroup directories
    uid: int | None
    pid: int | None
    pid_start: int | None
    owner_pid: int | None
    owner_start: int | None
    auto_remove: int
    spec: str  # JSON
    fc: str  # JSON: the Firecracker jail, API socket, cgroup version, last step ({} for QEMU)
    created: float
    started: float | None
    finished: float | None
    net: str = "{}"  # JSON: --net tap's objects and address, and their step ({}: none)

    @property
    def cgroup_dirs(self) -> list[str]:
        return list(json.loads(self.cgroups))

    @property
    def fc_doc(self) -> dict[str, Any]:
        doc = json.loads(self.fc or "{}")
        return doc if isinstance(doc, dict) else {}

    @property
    def net_doc(self) -> dict[str, Any]:
        doc = json.loads(self.net or "{}")
        return doc if isinstance(doc, dict) else {}

    @property
    def net_held(self) -> bool:
        """The record names network objects that may exist (recorded, not yet released)."""
        doc = self.net_doc
        return bool(doc) and doc.get("step") != NET_RELEASED

    def summary(self) -> dict[str, Any]:
        """The object ``kiln ps --json`` prints (``ip``: the VM's address on the kiln
        network while it holds one, else null)."""
        doc = self.net_doc
        return {"id": self.id, "name": self.name, "state": self.state,
                "exit_code": self.exit_code, "reason": self.reason, "vmm": self.vmm,
                "volume": self.volume, "snapshot": self.snapshot, "pid": self.pid,
                "created": self.created,
                "vmm_reason": str(json.loads(self.spec or "{}").get("vmm_reason", "")),
                "ip": doc.get("ip") if doc.get("step") == NET_ATTACHED else None}


_COLS = [f.name for f in fields(VMRecord)]


def new_vm_id() -> str:
    """12 characters of lowercase base32 ([a-z2-7]): 60 random bits."""
    return base64.b32encode(secrets.token_bytes(10)).decode().lower()[:12]


ROOT_KEY_LEN = 8
_HOST_NAME_LEN = ROOT_KEY_LEN + 12


def root_key(root_dir: Path | str) -> str:
    """The root's tag in host-wide names (pure but for resolving symlinks): 8 characters of
    lowercase base32 of the sha256 of its real absolute path (40 bits)."""
    path = os.path.realpath(root_dir).encode()
    return base64.b32encode(hashlib.sha256(path).digest()).decode().lower()[:ROOT_KEY_LEN]


def host_name(key: str, vm_id: str) -> str:
    """A VM's name in host-wide places: its cgroup leaf, jail id, ``-name kiln-…``."""
    return key + vm_id


def vm_of_host(name: str, key: str) -> str | None:
    """The VM id a host-wide name gives for the root of ``key``; None when the name is
    not one of that root's (another root's, or not kiln's)."""
    if len(name) != _HOST_NAME_LEN or not name.startswith(key) or len(key) != ROOT_KEY_LEN:
        return None
    vm_id = name[ROOT_KEY_LEN:]
    return vm_id if _VM_ID.fullmatch(vm_id) else None


def proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks), None if no such process."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    try:
        return int(data.rsplit(b")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def alive(pid: int | None, start: int | None) -> bool:
    """The process ``pid`` exists and is the one that started at ``start`` (no pid reuse)."""
    if not pid:
        return False
    st = proc_start_time(pid)
    if st is None:
        return False
    if start is not None and st != start:
        return False
    # a zombie (exited, not yet reaped) counts as dead
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != b"Z"


JAILS_MARK = ".jails"  # in ROOT/vms: this root has set up a Firecracker jail


def mark_jails(root_dir: Path) -> None:
    """Note, durably and before its first jail exists, that this root uses Firecracker:
    the reaper looks for orphaned jails only then (loading the jails' configuration costs
    ~20 ms of every other command)."""
    vms = root_dir / "vms"
    mark = vms / JAILS_MARK
    if mark.exists():
        return
    vms.mkdir(parents=True, exist_ok=True)
    fd = os.open(mark, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fileops.fsync_dir(vms)


def uses_jails(root_dir: Path, recs: list[VMRecord]) -> bool:
    """Whether this root may have Firecracker jails (its mark, or a record of one)."""
    return (root_dir / "vms" / JAILS_MARK).exists() or any(r.vmm == "firecracker"
                                                            for r in recs)


class State:
    """The VM database of one root."""

    def __init__(self, root_dir: Path) -> None:
        self.path = root_dir / "vms.db"
        self.vms_dir = root_dir / "vms"
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        with contextlib.suppress(sqlite3.OperationalError):
            self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=30000")
        self._db.executescript(_SCHEMA)
        cols = {r[1] for r in self._db.execute("PRAGMA table_info(vms)")}
        # columns newer than the database (the Firecracker driver's, --net tap's)
        for col in ("fc", "net"):
            if col not in cols:
                with contextlib.suppress(sqlite3.OperationalError):  # a racing kiln added it
                    self._db.execute(f"ALTER TABLE vms ADD COLUMN {col} TEXT NOT NULL "
                                     "DEFAULT '{}'")

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- reading ----------------------------------------------------------------------

    def _row(self, row: sqlite3.Row) -> VMRecord:
        return VMRecord(**{c: row[c] for c in _COLS})

    def all(self) -> list[VMRecord]:
        rows = self._db.execute("SELECT * FROM vms ORDER BY created").fetchall()
        return [self._row(r) for r in rows]

    def get(self, vm_id: str) -> VMRecord | None:
        row = self._db.execute("SELECT * FROM vms WHERE id = ?", (vm_id,)).fetchone()
        return self._row(row) if row else None

    def find(self, ref: str) -> VMRecord:
        """A VM by id, unique id prefix, or name."""
        ref = ref.strip()
        if not ref:
            raise UsageError("empty VM id", "give a VM id or name (see `kiln ps --all`)")
        row = self._db.execute("SELECT * FROM vms WHERE id = ? OR name = ?",
                               (ref, ref)).fetchone()
        if row:
            return self._row(row)
        rows = self._db.execute("SELECT * FROM vms WHERE id LIKE ? ESCAPE '\\'",
                                (_like_prefix(ref),)).fetchall()
        if len(rows) == 1:
            return self._row(rows[0])
        if len(rows) > 1:
            raise Conflict(f"VM id {ref!r} is ambiguous", "give more characters of the id")
        raise NotFound(f"no VM {ref!r}", "list VMs with `kiln ps --all`")

    # -- writing ----------------------------------------------------------------------

    def create(self, *, vm_id: str, name: str | None, vmm: str, volume: str, snapshot: str,
               vm_dir: Path, cgroups: list[str], want_uid: bool, auto_remove: bool,
               spec: dict[str, Any], uid_range: tuple[int, int] = (UID_BASE, UID_COUNT),
               fc: dict[str, Any] | None = None,
               net: dict[str, Any] | None = None) -> VMRecord:
        """Insert a ``creating`` record naming every resource the VM will use.

        ``uid_range`` (first, count): where the VM's uid comes from (Firecracker and
        ``--net tap``: the helper's configured range); ``fc``: the Firecracker jail, socket
        and cgroup version; ``net``: the network objects (step ``recorded``)."""
        owner = os.getpid()
        with self.tx() as db:
            if name is not None and db.execute("SELECT 1 FROM vms WHERE name = ?",
                                               (name,)).fetchone():
                raise Conflict(f"a VM named {name!r} already exists",
                               f"remove it (`kiln rm {name}`) or choose another --name")
            uid = self._free_uid(db, *uid_range) if want_uid else None
            db.execute(
                "INSERT INTO vms (id, name, state, vmm, volume, snapshot, dir, cgroups, uid,"
                " owner_pid, owner_start, auto_remove, spec, fc, net, created)"
                " VALUES (?, ?, 'creating', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (vm_id, name, vmm, volume, snapshot, str(vm_dir), json.dumps(cgroups), uid,
                 owner, proc_start_time(owner), int(auto_remove), json.dumps(spec),
                 json.dumps(fc or {}), json.dumps(net or {}), time.time()))
        rec = self.get(vm_id)
        assert rec is not None
        return rec

    def _free_uid(self, db: sqlite3.Connection, first: int = UID_BASE,
                  count: int = UID_COUNT, avoid: AbstractSet[int] = frozenset()) -> int:
        """A uid of the range no live VM of this root holds. The scan starts at a random
        offset: other callers (other users, other roots) draw from the same range and the
        helper refuses a uid another caller's VM holds, so first-free would collide."""
        used = {r[0] for r in db.execute(
            "SELECT uid FROM vms WHERE uid IS NOT NULL AND state IN ('creating', 'running')")}
        used |= avoid
        start = secrets.randbelow(count)
        for i in range(count):
            uid = first + (start + i) % count
            if uid not in used:
                return uid
        raise Conflict("no free VM uid", "stop some VMs first")

    def reassign_uid(self, vm_id: str, uid_range: tuple[int, int],
                     avoid: AbstractSet[int]) -> VMRecord:
        """Record another uid for a VM whose uid the helper refused (another caller's VM
        holds it): free in this root, not in ``avoid``. Recorded before it is used, like
        the first."""
        with self.tx() as db:
            uid = self._free_uid(db, *uid_range, avoid=avoid)
            db.execute("UPDATE vms SET uid = ? WHERE id = ?", (uid, vm_id))
        rec = self.get(vm_id)
        if rec is None:
            raise NotFound(f"no VM {vm_id}", "it was removed meanwhile")
        return rec

    def update(self, vm_id: str, **values: Any) -> None:
        bad = set(values) - set(_COLS)
        if bad:
            raise ValueError(f"unknown VM columns {sorted(bad)}")
        cols = ", ".join(f"{k} = ?" for k in values)
        self._db.execute(f"UPDATE vms SET {cols} WHERE id = ?",  # noqa: S608 - names checked
                         (*values.values(), vm_id))

    def finish(self, vm_id: str, state: str, exit_code: int | None, reason: str) -> None:
        """Move a live VM to exited/failed (a VM already finished keeps its first end)."""
        self._db.execute(
            "UPDATE vms SET state = ?, exit_code = ?, reason = ?, finished = ?"
            " WHERE id = ? AND state IN ('creating', 'running')",
            (state, exit_code, reason, time.time(), vm_id))

    def delete(self, vm_id: str) -> None:
        self._db.execute("DELETE FROM vms WHERE id = ?", (vm_id,))

    # -- the reaper's memory ------------------------------------------------------------

    def seen_orphans(self) -> set[tuple[str, str]]:
        return {(r[0], r[1]) for r in self._db.execute("SELECT kind, name FROM orphans")}

    def set_orphans(self, seen: set[tuple[str, str]]) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM orphans")
            db.executemany("INSERT INTO orphans (kind, name, first_seen) VALUES (?, ?, ?)",
                           [(k, n, time.time()) for k, n in sorted(seen)])


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
