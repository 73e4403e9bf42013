"""Per-VM cgroups: layout parsing, limit files, hostile names, and real create/kill on v1
and v2 (processes really die, directories really go)."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from helper import cgroup as cg
from helper.base.errors import Conflict, UsageError
from tests.support.timing import limit

HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
34 31 0:31 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
UNIFIED = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"


def test_parse_layout_hybrid_and_unified() -> None:
    lay = cg.parse_layout(HYBRID)
    assert lay.v2 == Path("/sys/fs/cgroup/unified")
    assert lay.v1 == {"cpu": Path("/sys/fs/cgroup/cpu"), "memory": Path("/sys/fs/cgroup/memory"),
                      "freezer": Path("/sys/fs/cgroup/freezer"),
                      "pids": Path("/sys/fs/cgroup/pids")}
    assert cg.parse_layout(UNIFIED) == cg.Layout(Path("/sys/fs/cgroup"), {})
    assert cg.parse_layout("garbage\n\n") == cg.Layout(None, {})


def test_limit_files_exact() -> None:
    lim = cg.Limits(cpus=0.5, memory_bytes=512 << 20, pids=100)
    assert cg.limit_files(2, lim) == [("cpu.max", "50000 100000"),
                                      ("memory.max", "536870912"), ("pids.max", "100")]
    assert cg.limit_files(1, lim) == [("cpu.cfs_period_us", "100000"),
                                      ("cpu.cfs_quota_us", "50000"),
                                      ("memory.limit_in_bytes", "536870912"),
                                      ("pids.max", "100")]
    assert cg.v1_controllers(lim) == ["cpu", "memory", "pids", "freezer"]
    assert cg.v1_controllers(cg.Limits()) == ["freezer"]
    assert cg.limit_files(2, cg.Limits()) == []


@pytest.mark.parametrize(("lim", "message"), [
    (cg.Limits(cpus=0), "invalid cpu limit 0"),
    (cg.Limits(memory_bytes=1), "invalid memory limit 1"),
    (cg.Limits(pids=0), "invalid pids limit 0"),
])
def test_limits_refused(lim: cg.Limits, message: str) -> None:
    with pytest.raises(UsageError) as e:
        cg.limit_files(2, lim)
    assert e.value.message == message


HOSTILE_IDS = ["", "a" * 33, "..", "../x", "-a", "a/b", "A", "a\n", "a\x00", "ab1", "аb"]


@pytest.mark.parametrize("vm_id", HOSTILE_IDS)
def test_hostile_ids_refused(vm_id: str) -> None:
    cfg = cg.CgroupConfig(parent="kiln", layout=cg.parse_layout(HYBRID))
    with pytest.raises(UsageError) as e:
        cg.vm_dirs(cfg, vm_id, 2)
    assert e.value.message == f"invalid VM id {vm_id!r}"
    with pytest.raises(UsageError):
        cg.cgroup_kill(cfg, vm_id, 1)


@pytest.mark.parametrize("parent", ["", "/kiln", "kiln/..", "../kiln", "-kiln", "ki ln",
                                    "kiln//x"])
def test_hostile_parents_refused(parent: str) -> None:
    cfg = cg.CgroupConfig(parent=parent, layout=cg.parse_layout(HYBRID))
    with pytest.raises(UsageError) as e:
        cg.vm_dirs(cfg, "abc", 2)
    assert e.value.message == f"invalid cgroup parent {parent!r}"


@given(st.text(max_size=40))
def test_vm_dirs_stay_under_parent(vm_id: str) -> None:
    cfg = cg.CgroupConfig(parent="kiln", layout=cg.parse_layout(HYBRID))
    try:
        dirs = cg.vm_dirs(cfg, vm_id, 1)
    except UsageError:
        return
    for d in dirs:
        assert d.parent.name == "kiln"
        assert d.name == vm_id


def test_symlink_in_cgroup_path_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "kiln").symlink_to(tmp_path / "real")
    cfg = cg.CgroupConfig(parent="kiln", layout=cg.Layout(tmp_path, {}))
    with pytest.raises(UsageError) as e:
        cg.vm_dirs(cfg, "abc", 2)
    assert e.value.message == f"{tmp_path}/kiln is a symlink"


# -- real cgroups -------------------------------------------------------------------------


@pytest.fixture
def parent() -> Iterator[str]:
    name = f"kilntest{secrets.token_hex(4)}"
    yield name
    lay = cg.layout(cg.CgroupConfig())
    for h in [lay.v2, *lay.v1.values()]:
        if h is not None:
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(h / name)


def _spawn_into(dirs: list[Path]) -> subprocess.Popen[bytes]:
    """A shell moved into ``dirs`` that then starts two children: the kill must reach all."""
    p = subprocess.Popen(["/bin/sh", "-c", "read go; sleep 60 & sleep 60 & wait"],
                         stdin=subprocess.PIPE)
    for d in dirs:
        (d / "cgroup.procs").write_text(str(p.pid))
    assert p.stdin is not None
    p.stdin.write(b"go\n")
    p.stdin.close()
    deadline = time.monotonic() + limit(5)
    while len((dirs[0] / "cgroup.procs").read_text().split()) < 3:
        assert time.monotonic() < deadline, "the test shell did not fork"
        time.sleep(0.01)
    return p


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.root
def test_v2_create_kill_remove(parent: str) -> None:
    cfg = cg.CgroupConfig(parent=parent)
    if cg.layout(cfg).v2 is None:
        pytest.skip("no cgroup2 mount")
    dirs = cg.cgroup_create(cfg, "vmone", 2)
    assert dirs == [cg.layout(cfg).v2 / parent / "vmone"]  # type: ignore[operator]
    with pytest.raises(Conflict) as e:
        cg.cgroup_create(cfg, "vmone", 2)
    assert e.value.message == f"cgroup {dirs[0]} already exists"
    p = _spawn_into(dirs)
    pids = cg.cgroup_pids(cfg, "vmone", 2)
    assert p.pid in pids
    assert len(pids) == 3
    killed = cg.cgroup_kill(cfg, "vmone", 2)
    assert killed == pids
    assert p.wait(5) == -9
    assert not any(_alive(x) for x in pids)
    assert not dirs[0].exists()
    assert cg.cgroup_kill(cfg, "vmone", 2) == []  # idempotent


@pytest.mark.root
def test_v2_limits_refused_without_controllers(parent: str) -> None:
    cfg = cg.CgroupConfig(parent=parent)
    lay = cg.layout(cfg)
    if lay.v2 is None or "memory" in (lay.v2 / "cgroup.controllers").read_text().split():
        pytest.skip("needs a cgroup2 hierarchy without the memory controller (hybrid host)")
    with pytest.raises(Conflict) as e:
        cg.cgroup_create(cfg, "vmtwo", 2, cg.Limits(memory_bytes=64 << 20))
    assert e.value.message.startswith("cgroup v2 controller(s) memory not available")
    assert not (lay.v2 / parent / "vmtwo").exists()


@pytest.mark.root
def test_v1_create_with_limits_freeze_kill(parent: str) -> None:
    cfg = cg.CgroupConfig(parent=parent)
    lay = cg.layout(cfg)
    if not {"cpu", "pids", "freezer"} <= set(lay.v1):
        pytest.skip("needs cgroup v1 cpu, pids and freezer hierarchies")
    # No memory limit: moving test processes out of the current memory cgroup is rude.
    dirs = cg.cgroup_create(cfg, "vmthree", 1, cg.Limits(cpus=0.5, pids=64))
    assert dirs == [lay.v1[c] / parent / "vmthree" for c in ("cpu", "pids", "freezer")]
    assert (dirs[0] / "cpu.cfs_quota_us").read_text().strip() == "50000"
    assert (dirs[1] / "pids.max").read_text().strip() == "64"
    p = _spawn_into(dirs)
    pids = cg.cgroup_pids(cfg, "vmthree", 1)
    assert len(pids) == 3
    assert cg.cgroup_kill(cfg, "vmthree", 1) == pids
    assert p.wait(5) == -9
    assert not any(d.exists() for d in dirs)


# -- runner.vm.cgroup: a QEMU VM's cgroups for a caller that is not root ---------------------


def test_vmcgroup_choice() -> None:
    from runner.vm import cgroup as vmcgroup

    hybrid, unified = cg.parse_layout(HYBRID), cg.parse_layout(UNIFIED)
    lim = cg.Limits(cpus=2.5, memory_bytes=1 << 30, pids=vmcgroup.QEMU_PIDS)
    assert vmcgroup.choice(unified, {"cpu", "memory", "pids"}, 2, 1 << 30) == (2, lim)
    assert vmcgroup.choice(hybrid, {"pids"}, 2, 1 << 30) == (1, lim)  # these machines
    assert vmcgroup.choice(unified, {"pids"}, 2, 1 << 30) == (0, cg.Limits())  # no memory
    no_freezer = cg.Layout(None, {"cpu": Path("/c/cpu"), "memory": Path("/c/memory")})
    assert vmcgroup.choice(no_freezer, set(), 1, 1 << 30) == (0, cg.Limits())


@pytest.mark.root
def test_vmcgroup_targets_are_existing_vm_cgroups_only(parent: str, tmp_path: Path) -> None:
    """What teardown hands the helper: (host name, version) of existing VM directories in
    a mounted hierarchy; nothing for other paths or directories already gone."""
    from runner.vm import cgroup as vmcgroup

    cfg = cg.CgroupConfig(parent=parent)
    lay = cg.layout(cfg)
    made: list[Path] = []
    want: set[tuple[str, int]] = set()
    if {"cpu", "freezer"} <= set(lay.v1):
        made += cg.cgroup_create(cfg, "vone", 1, cg.Limits(cpus=1))
        want.add(("vone", 1))
    if lay.v2 is not None:
        made += cg.cgroup_create(cfg, "vtwo", 2)
        want.add(("vtwo", 2))
    (tmp_path / "vthree").mkdir()
    try:
        assert vmcgroup.targets([*map(str, made), str(tmp_path / "vthree"),
                                 str(made[0].parent / "gone")]) == want
    finally:
        for name, version in want:
            cg.cgroup_kill(cfg, name, version)
    assert vmcgroup.targets([str(d) for d in made]) == set()


def test_a_pid_reused_after_listing_is_never_killed(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Review: cgroup-kill read cgroup.procs, then SIGKILLed each number; a member that
    exited in between left its pid to someone else's process, which root then killed.
    Here the first read lists a bystander's pid (as a reused number would be) and the
    membership read after pinning no longer does: the bystander must live."""
    bystander = subprocess.Popen(["sleep", "60"])
    member = subprocess.Popen(["sleep", "60"])
    reads = iter([[bystander.pid, member.pid], [member.pid]])
    monkeypatch.setattr(cg, "_pids", lambda d: next(reads, []))
    try:
        assert cg.kill_members([tmp_path]) == [member.pid]
        assert member.wait(timeout=limit(5)) == -9
        assert bystander.poll() is None
    finally:
        bystander.kill()
        member.kill()
        bystander.wait()
        member.wait()
