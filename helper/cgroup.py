"""Per-VM cgroups, cgroup v1 and v2: create with limits, kill everything inside, remove.

Privileged (runs as root inside kiln-helper; ops ``cgroup-create`` and ``cgroup-kill``),
so stdlib only and every argument validated: VM ids are ``[a-z2-7]{1,32}``, the parent is a
trusted relative cgroup path from config, and a VM's cgroup is always
``<hierarchy>/<parent>/<id>`` — a caller can never name another cgroup.

Layout. ``parse_layout`` (pure) reads mountinfo: the cgroup2 mount (``/sys/fs/cgroup`` on a
unified host, ``/sys/fs/cgroup/unified`` on a hybrid one like these machines) and the v1
mount of each controller. On v2 the VM's cgroup gets ``cpu.max``/``memory.max``/``pids.max``
(after enabling those controllers in the parent's ``cgroup.subtree_control``); the jailer
is then told ``--parent-cgroup <parent>/<id>`` with no ``--cgroup``, so it only moves in.
On v1 a directory is made in every controller the limits need plus ``freezer`` (teardown
needs it), and the same files go to the jailer as ``--cgroup`` so it joins each.

Kill. v2: ``cgroup.kill`` (Linux ≥ 5.14), else freeze + SIGKILL every pid + thaw. v1:
``freezer.state=FROZEN`` (no fork can race us), SIGKILL every pid of every controller
directory, ``THAWED`` (frozen tasks die on thaw). Then wait until empty and rmdir.

Attach (``cgroup-attach``): ``helper.cgattach``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from helper.base.errors import Conflict, NotFound, UsageError

VM_ID_RE = re.compile(r"^[a-z2-7]{1,32}$")
_PARENT_PART_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_MOUNTINFO = "/proc/self/mountinfo"
V1_CONTROLLERS = ("cpu", "memory", "pids", "freezer")


@dataclass(frozen=True)
class Layout:
    """Where the hierarchies are mounted: ``v2`` (cgroup2) and ``v1`` controller → mount."""

    v2: Path | None
    v1: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class CgroupConfig:
    """Trusted configuration (from /etc/kiln/config.toml via the helper's config)."""

    parent: str = "kiln"  # relative cgroup path all VM cgroups live under
    layout: Layout | None = None  # None: detect from /proc/self/mountinfo


@dataclass(frozen=True)
class Limits:
    """Resource limits of one VM. ``cpus`` may be fractional (a CFS quota)."""

    cpus: float | None = None
    memory_bytes: int | None = None
    pids: int | None = None


CFS_PERIOD_US = 100_000


# -- validation and pure cores ------------------------------------------------------------


def check_vm_id(vm_id: str) -> str:
    if not isinstance(vm_id, str) or not VM_ID_RE.fullmatch(vm_id):
        raise UsageError(f"invalid VM id {vm_id!r}", "VM ids are 1-32 characters of a-z and 2-7")
    return vm_id


def check_parent(parent: str) -> str:
    parts = parent.split("/")
    if not parent or not all(_PARENT_PART_RE.fullmatch(p) for p in parts):
        raise UsageError(f"invalid cgroup parent {parent!r}",
                         "use a relative path of [a-z0-9_.-] names, e.g. 'kiln'")
    return parent


def check_limits(limits: Limits) -> Limits:
    if limits.cpus is not None and not 0.01 <= limits.cpus <= 1024:
        raise UsageError(f"invalid cpu limit {limits.cpus}", "give between 0.01 and 1024 cpus")
    if limits.memory_bytes is not None and not (1 << 24) <= limits.memory_bytes <= (1 << 44):
        raise UsageError(f"invalid memory limit {limits.memory_bytes}",
                         "give between 16 MiB and 16 TiB")
    if limits.pids is not None and not 1 <= limits.pids <= 4_194_304:
        raise UsageError(f"invalid pids limit {limits.pids}", "give between 1 and 4194304")
    return limits


def limit_files(version: int, limits: Limits) -> list[tuple[str, str]]:
    """The cgroup files (name, value) that apply ``limits`` under cgroup ``version`` (pure)."""
    check_limits(limits)
    out: list[tuple[str, str]] = []
    if limits.cpus is not None:
        quota = round(limits.cpus * CFS_PERIOD_US)
        if version == 2:
            out.append(("cpu.max", f"{quota} {CFS_PERIOD_US}"))
        else:
            out.append(("cpu.cfs_period_us", str(CFS_PERIOD_US)))
            out.append(("cpu.cfs_quota_us", str(quota)))
    if limits.memory_bytes is not None:
        out.append(("memory.max" if version == 2 else "memory.limit_in_bytes",
                    str(limits.memory_bytes)))
    if limits.pids is not None:
        out.append(("pids.max", str(limits.pids)))
    return out


def controllers(files: Iterable[tuple[str, str]]) -> list[str]:
    """Controllers named by cgroup files, in first-seen order (``cpu.max`` → ``cpu``)."""
    seen: list[str] = []
    for name, _ in files:
        c = name.split(".", 1)[0]
        if c not in seen:
            seen.append(c)
    return seen


def v1_controllers(limits: Limits) -> list[str]:
    """The v1 hierarchies a VM joins: those its limits need, plus freezer for the kill."""
    cs = controllers(limit_files(1, limits))
    return [*cs, "freezer"] if "freezer" not in cs else cs


def parse_layout(mountinfo: str) -> Layout:
    """Hierarchy mounts from /proc/self/mountinfo text (pure). First mount of each wins."""
    v2: Path | None = None
    v1: dict[str, Path] = {}
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 3:
            continue
        mnt = Path(_unescape(fields[4]))
        if rfields[0] == "cgroup2" and v2 is None:
            v2 = mnt
        elif rfields[0] == "cgroup":
            for opt in rfields[2].split(","):
                if opt in V1_CONTROLLERS and opt not in v1:
                    v1[opt] = mnt
    return Layout(v2, v1)


def _unescape(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def layout(cfg: CgroupConfig) -> Layout:
    if cfg.layout is not None:
        return cfg.layout
    with open(_MOUNTINFO) as f:
        return parse_layout(f.read())


# -- paths --------------------------------------------------------------------------------


def _no_symlinks(root: Path, rel: Iterable[str]) -> Path:
    """``root/rel...`` with every existing component below ``root`` checked not a symlink."""
    cur = root
    for part in rel:
        cur = cur / part
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            raise UsageError(f"{cur} is a symlink", "cgroup paths never contain symlinks")
    return cur


def vm_dirs(cfg: CgroupConfig, vm_id: str, version: int,
            only: Iterable[str] | None = None) -> list[Path]:
    """The VM's cgroup directories: one on v2; one per v1 controller (``only``: these)."""
    check_vm_id(vm_id)
    parent = check_parent(cfg.parent).split("/")
    lay = layout(cfg)
    if version == 2:
        if lay.v2 is None:
            raise NotFound("no cgroup2 hierarchy is mounted", "mount cgroup2 or use v1")
        return [_no_symlinks(lay.v2, [*parent, vm_id])]
    if version != 1:
        raise UsageError(f"invalid cgroup version {version!r}", "use 1 or 2")
    names = list(only) if only is not None else list(V1_CONTROLLERS)
    dirs = [_no_symlinks(lay.v1[c], [*parent, vm_id]) for c in names if c in lay.v1]
    return list(dict.fromkeys(dirs))  # controllers co-mounted in one hierarchy: one dir


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return os.read(fd, 1 << 20).decode()
    finally:
        os.close(fd)


def _pids(d: Path) -> list[int]:
    try:
        return [int(x) for x in _read(d / "cgroup.procs").split()]
    except FileNotFoundError:
        return []


# -- operations ---------------------------------------------------------------------------


def cgroup_create(cfg: CgroupConfig, vm_id: str, version: int,
                  limits: Limits = Limits()) -> list[Path]:
    """Create the VM's cgroup(s) and apply ``limits``; returns the directories made.

    An existing cgroup of that VM is a Conflict (a record must never be reused)."""
    check_vm_id(vm_id)
    files = limit_files(version, check_limits(limits))
    if version == 2:
        dirs = vm_dirs(cfg, vm_id, 2)
        lay = layout(cfg)
        assert lay.v2 is not None
        need = controllers(files)
        if need:
            have = _read(lay.v2 / "cgroup.controllers").split()
            missing = [c for c in need if c not in have]
            if missing:
                raise Conflict(f"cgroup v2 controller(s) {', '.join(missing)} not available "
                               f"at {lay.v2}", "use cgroup v1 for limits on this host, or "
                               "enable the controllers in the unified hierarchy")
    else:
        need = v1_controllers(limits)
        lay = layout(cfg)
        absent = [c for c in need if c not in lay.v1]
        if absent:
            raise Conflict(f"cgroup v1 controller(s) {', '.join(absent)} not mounted",
                           "mount them or use cgroup v2")
        dirs = vm_dirs(cfg, vm_id, 1, need)
    for d in dirs:
        if d.exists():
            raise Conflict(f"cgroup {d} already exists", "remove the old VM first (kiln rm)")
    made: list[Path] = []
    try:
        _make(cfg, version, need, files, dirs, made)
    except BaseException:
        for d in reversed(made):  # all or nothing: no half-made VM cgroup stays behind
            with contextlib.suppress(OSError):
                os.rmdir(d)
        raise
    return dirs


def _make(cfg: CgroupConfig, version: int, need: list[str], files: list[tuple[str, str]],
          dirs: list[Path], made: list[Path]) -> None:
    for d in dirs:
        make_leaf(cfg, d, version, need)
        made.append(d)
        for name, value in files:
            if version == 2 or (d / name).exists():  # v1: each file in its own hierarchy
                _write(d / name, value)


def make_leaf(cfg: CgroupConfig, d: Path, version: int, need: list[str]) -> None:
    """mkdir ``<hierarchy>/<parent>/<leaf>`` (the parent chain as needed, v2: ``need``
    enabled on the way). FileExistsError when the leaf exists: it is never reused."""
    hierarchy = d.parents[len(cfg.parent.split("/"))]
    cur = hierarchy
    for part in cfg.parent.split("/"):
        if version == 2 and need:  # a child gets a controller only via its parent
            _enable(cur, need)
        cur = cur / part
        with contextlib.suppress(FileExistsError):
            os.mkdir(cur, 0o755)
    if version == 2 and need:
        _enable(cur, need)
    os.mkdir(d, 0o755)


def _enable(d: Path, need: list[str]) -> None:
    enabled = _read(d / "cgroup.subtree_control").split()
    add = " ".join(f"+{c}" for c in need if c not in enabled)
    if add:
        _write(d / "cgroup.subtree_control", add)


def cgroup_pids(cfg: CgroupConfig, vm_id: str, version: int) -> list[int]:
    """Every pid in the VM's cgroup(s) (sorted, unique)."""
    return sorted({p for d in vm_dirs(cfg, vm_id, version) for p in _pids(d)})


def cgroup_exists(cfg: CgroupConfig, vm_id: str, version: int) -> bool:
    return any(d.is_dir() for d in vm_dirs(cfg, vm_id, version))


def cgroup_kill(cfg: CgroupConfig, vm_id: str, version: int, *, timeout: float = 10.0,
                remove: bool = True) -> list[int]:
    """Kill every process in the VM's cgroup(s), wait until empty, then rmdir them.

    Returns the pids signalled (v2 with cgroup.kill: those present just before). Missing
    cgroups are fine (idempotent). Raises Conflict when processes survive ``timeout``."""
    dirs = [d for d in vm_dirs(cfg, vm_id, version) if d.is_dir()]
    killed: list[int] = []
    freezer: Path | None = None
    if version == 2:
        for d in dirs:
            killed += _pids(d)
            if (d / "cgroup.kill").exists():
                _write(d / "cgroup.kill", "1")
            else:  # Linux < 5.14
                killed += _freeze_kill(d, "cgroup.freeze", "1", "0", [d])
    else:
        fz = [d for d in vm_dirs(cfg, vm_id, 1, ["freezer"]) if d.is_dir()]
        freezer = fz[0] if fz else None
        if freezer is not None:
            killed += _freeze_kill(freezer, "freezer.state", "FROZEN", "THAWED", dirs)
        else:
            killed += kill_members(dirs)
    deadline = time.monotonic() + timeout
    while True:
        left = [p for d in dirs for p in _pids(d)]
        # cgroup.procs empties before the last thread is gone; v2 says so in cgroup.events.
        if not left and not any(_populated(d) for d in dirs):
            break
        if time.monotonic() > deadline:
            raise Conflict(f"processes {left} survived killing cgroup {vm_id}",
                           "they may be stuck in the kernel (D state); retry later")
        if version == 1 and freezer is None:  # a fork may have raced us
            kill_members(dirs)
        time.sleep(0.02)
    if remove:
        for d in dirs:
            _rmdir_tree(d, deadline)
    return sorted(set(killed))


def _populated(d: Path) -> bool:
    try:
        return "populated 1" in _read(d / "cgroup.events")
    except FileNotFoundError:  # v1 has no cgroup.events
        return False


_PIDFD_BATCH = 256  # pidfds open at once (the helper's open-file limit is >= 1024)


def kill_members(dirs: list[Path]) -> list[int]:
    """SIGKILL every process in the cgroups ``dirs``; the pids signalled.

    A pid read from ``cgroup.procs`` may belong to someone else by the time it is signalled
    (the process exited, the number was reused). So each is pinned by a pidfd first, the
    membership read again after, and the signal sent through the pidfd: if that process
    still lives when signalled it held the number all along, so the second read was about
    it; if it died, the signal fails (ESRCH) and nothing else is hit."""
    pids = sorted({p for d in dirs for p in _pids(d)})
    killed: list[int] = []
    for i in range(0, len(pids), _PIDFD_BATCH):
        fds: dict[int, int] = {}
        try:
            for pid in pids[i:i + _PIDFD_BATCH]:
                with contextlib.suppress(OSError):
                    fds[pid] = os.pidfd_open(pid)
            members = {p for d in dirs for p in _pids(d)}
            for pid, fd in fds.items():
                if pid in members:
                    with contextlib.suppress(OSError):  # ESRCH: it exited meanwhile
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
                        killed.append(pid)
        finally:
            for fd in fds.values():
                os.close(fd)
    return killed


def _freeze_kill(ctl: Path, fname: str, frozen: str, thawed: str, dirs: list[Path]) -> list[int]:
    """Freeze via ``ctl/fname``, SIGKILL every pid in ``dirs``, thaw; returns the pids."""
    _write(ctl / fname, frozen)
    deadline = time.monotonic() + 5
    # v1 passes through FREEZING; v2 reports completion in cgroup.events ("frozen 1").
    while time.monotonic() < deadline:
        if fname == "freezer.state" and _read(ctl / fname).strip() == "FROZEN":
            break
        if fname == "cgroup.freeze" and "frozen 1" in _read(ctl / "cgroup.events"):
            break
        time.sleep(0.01)
    pids = kill_members(dirs)  # frozen tasks cannot exit; pinned anyway (FREEZING, timeout)
    _write(ctl / fname, thawed)  # frozen tasks only die once thawed
    return pids


def _rmdir_tree(d: Path, deadline: float) -> None:
    """rmdir ``d`` and any child cgroups, deepest first (cgroupfs dirs hold no files).

    rmdir says EBUSY while a killed task is still exiting (a vCPU thread leaving KVM_RUN):
    retry until ``deadline``."""
    subdirs = [os.path.join(sub, n) for sub, names, _ in os.walk(d, topdown=False)
               for n in names]
    for path in [*subdirs, str(d)]:
        while True:
            try:
                os.rmdir(path)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise Conflict(f"cannot remove cgroup {path}: {e.strerror}",
                                   "a process is still exiting; retry in a moment") from None
                time.sleep(0.02)



def remove_dirs(dirs: list[Path], *, timeout: float = 10.0) -> None:
    """SIGKILL what is left in ``dirs`` (cgroups the helper made for a jail), wait until they
    are empty, rmdir them (children first)."""
    deadline = time.monotonic() + timeout
    live = [d for d in dirs if d.is_dir()]
    while left := [p for d in live for p in _pids(d)]:
        if time.monotonic() > deadline:
            raise Conflict(f"processes {left} survived killing {live[0]}",
                           "they may be stuck in the kernel (D state); retry later")
        kill_members(live)
        time.sleep(0.02)
    for d in live:
        _rmdir_tree(d, deadline)
