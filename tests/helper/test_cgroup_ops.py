"""kiln-helper's cgroup ops for a sudo caller, in-process: ``helper.main.serve`` (exit code,
stdout, stderr exactly as the installed binary prints them) on real cgroups, with real
processes of other uids (``setpriv``). Whose a cgroup is comes from the claim the helper
writes at ``cgroup-create``; ``cgroup-attach`` moves only the caller's own processes.
Every refusal leaves the cgroup trees and every process's membership as they were."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helper import cgattach, config
from helper import cgroup as cg
from helper.base.errors import Conflict
from helper.main import serve
from tests.support.timing import limit

pytestmark = pytest.mark.root
ME, OTHER = 61_235, 61_236  # the caller and another user (no account needed: setpriv)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[dict[str, Any]]:
    parent = f"kilnctest{secrets.token_hex(4)}"
    cfg = config.parse(f'[pool]\ndirectory = "{tmp_path}/pool"\n\n[jails]\n'
                       f'cgroup_parent = "{parent}"\n'.encode())
    procs: list[subprocess.Popen[bytes]] = []
    audit: list[tuple[int, str, str]] = []
    yield {"cfg": cfg, "parent": parent, "procs": procs, "audit": audit}
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            p.kill()
        p.wait()
    ccfg = cg.CgroupConfig(parent=parent)
    lay = cg.layout(ccfg)
    for version, mnt in [(2, lay.v2), *((1, m) for m in lay.v1.values())]:
        if mnt is None or not (mnt / parent).is_dir():
            continue
        for d in (mnt / parent).iterdir():
            if d.is_dir():
                cg.cgroup_kill(ccfg, d.name, version)
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(mnt / parent)


def call(w: dict[str, Any], uid: int, op: str, req: dict[str, Any] | str) -> tuple[int, str]:
    """(exit code, stderr line); the stdout line is checked to match."""
    payload = (req if isinstance(req, str) else json.dumps(req)).encode()
    code, out, err = serve(op, payload, w["cfg"], uid, uid,
                           log=lambda u, o, r: w["audit"].append((u, o, r)))
    assert ("error" in json.loads(out)) == (code != 0)
    return code, err


def spawn(w: dict[str, Any], *setpriv: str) -> int:
    """A ``sleep`` (not a shell: dash drops a setuid-style euid) under ``setpriv``."""
    p = subprocess.Popen(["setpriv", *setpriv, "--", "/bin/sleep", "60"])
    w["procs"].append(p)
    deadline = time.monotonic() + limit(5)
    while Path(f"/proc/{p.pid}/comm").read_text() != "sleep\n":  # setpriv has switched
        assert time.monotonic() < deadline
        time.sleep(0.005)
    return p.pid


def as_user(uid: int) -> tuple[str, ...]:
    return (f"--reuid={uid}", f"--regid={uid}", "--clear-groups")


def membership(pid: int) -> str:
    return Path(f"/proc/{pid}/cgroup").read_text()


def host_cgroups(parent: str) -> list[str]:
    """Every directory under kiln's test parent, and the top of every hierarchy."""
    out: list[str] = []
    for hier in Path("/sys/fs/cgroup").iterdir():
        if hier.is_dir() and not hier.is_symlink():
            out += sorted(str(p) for p in hier.iterdir() if p.is_dir())
            for dirpath, dirnames, _ in os.walk(hier / parent):
                out += sorted(os.path.join(dirpath, n) for n in dirnames)
    return sorted(out)


def versions() -> list[int]:
    """Versions a sudo caller can get a cgroup of: memory and pids limits are required."""
    lay = cg.layout(cg.CgroupConfig())
    v2 = set((lay.v2 / "cgroup.controllers").read_text().split()) if lay.v2 else set()
    return [v for v, ok in ((1, {"cpu", "freezer", "memory", "pids"} <= set(lay.v1)),
                            (2, {"memory", "pids"} <= v2)) if ok]


def limits(version: int) -> dict[str, Any]:
    lay = cg.layout(cg.CgroupConfig())
    have = set()
    if version == 2 and lay.v2 is not None:
        have = set((lay.v2 / "cgroup.controllers").read_text().split())
    out: dict[str, Any] = {"memory_bytes": 1 << 28}  # required of a sudo caller
    if version == 1 or "cpu" in have:
        out["cpus"] = 0.5
    return out


def free_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid  # reaped: nothing has it (pid_max wraps far later than this test)


def thread_of(w: dict[str, Any], uid: int) -> int:
    """A non-leader thread id of a process of ``uid``."""
    script = ("import threading, time, sys\n"
              "threading.Thread(target=lambda: (print(threading.get_native_id(), "
              "flush=True), time.sleep(60)), daemon=True).start()\ntime.sleep(60)\n")
    p = subprocess.Popen(["setpriv", *as_user(uid), "--", "/usr/bin/python3", "-c", script],
                         stdout=subprocess.PIPE, text=True)
    w["procs"].append(p)  # type: ignore[arg-type]
    assert p.stdout is not None
    return int(p.stdout.readline())


@pytest.mark.parametrize("version", versions())
def test_attach_moves_only_the_callers_own_process_into_its_own_cgroup(
        world: dict[str, Any], version: int) -> None:
    w, parent = world, world["parent"]
    assert call(w, ME, "cgroup-create", {"vm": "mine", "version": version,
                                         "limits": limits(version)}) == (0, "")
    assert call(w, OTHER, "cgroup-create", {"vm": "theirs", "version": version,
                                       "limits": limits(version)}) == (0, "")
    mine = spawn(w, *as_user(ME))
    assert call(w, ME, "cgroup-attach", {"vm": "mine", "version": version, "pid": mine}) \
        == (0, "")
    dirs = cg.vm_dirs(cg.CgroupConfig(parent=parent), "mine", version)
    joined = [d for d in dirs if d.is_dir()]
    assert joined
    assert all(mine in cg._pids(d) for d in joined)
    assert f"/{parent}/mine\n" in membership(mine)

    theirs = spawn(w, *as_user(OTHER))
    roots = spawn(w)
    half = spawn(w, f"--ruid={ME}")  # real uid the caller's, effective root (a setuid run)
    thread = thread_of(w, ME)
    gone = free_pid()
    watched = [mine, theirs, roots, half]
    before = (host_cgroups(parent), [membership(p) for p in watched])
    hint = "only your own processes can join your VM's cgroup"
    malformed = "(see `kiln-helper --list`)"
    cases: list[tuple[str, dict[str, Any] | str, int, str]] = [
        ("cgroup-attach", {"vm": "mine", "version": version, "pid": theirs}, 1,
         f"refusing process {theirs}: it is not uid {ME}'s ({hint})"),
        ("cgroup-attach", {"vm": "mine", "version": version, "pid": roots}, 1,
         f"refusing process {roots}: it is not uid {ME}'s ({hint})"),
        ("cgroup-attach", {"vm": "mine", "version": version, "pid": half}, 1,
         f"refusing process {half}: it is not uid {ME}'s ({hint})"),
        ("cgroup-attach", {"vm": "mine", "version": version, "pid": thread}, 1,
         f"{thread} is not a process id (give a process (not thread) id)"),
        ("cgroup-attach", {"vm": "mine", "version": version, "pid": gone}, 1,
         f"no process {gone}"),
        ("cgroup-attach", {"vm": "theirs", "version": version, "pid": mine}, 1,
         f"refusing cgroup theirs: uid {ME} did not create it (kiln-helper acts only on "
         "cgroups its caller made (cgroup-create))"),
        ("cgroup-kill", {"vm": "theirs", "version": version}, 1,
         f"refusing cgroup theirs: uid {ME} did not create it (kiln-helper acts only on "
         "cgroups its caller made (cgroup-create))"),
        ("cgroup-attach", {"vm": "nosuchvm", "version": version, "pid": mine}, 1,
         "VM nosuchvm has no cgroup (create it first (cgroup-create))"),
        ("cgroup-attach", {"vm": "mine", "version": version, "pid": 1}, 2,
         f"malformed cgroup-attach request: pid: Input should be greater than or equal to 2 "
         f"{malformed}"),
        ("cgroup-attach", {"vm": "mine", "version": version, "pid": -mine}, 2,
         f"malformed cgroup-attach request: pid: Input should be greater than or equal to 2 "
         f"{malformed}"),
        ("cgroup-attach", {"vm": "mine", "version": version, "pid": 4_194_305}, 2,
         "malformed cgroup-attach request: pid: Input should be less than or equal to "
         f"4194304 {malformed}"),
        ("cgroup-attach", {"vm": "mine", "version": version, "pid": str(mine)}, 2,
         f"malformed cgroup-attach request: pid: Input should be a valid integer {malformed}"),
        ("cgroup-attach", {"vm": "../mine", "version": version, "pid": mine}, 2,
         "malformed cgroup-attach request: vm: String should match pattern "
         f"'^[a-z2-7]{{1,32}}$' {malformed}"),
        ("cgroup-attach", {"vm": "mine", "version": 3, "pid": mine}, 2,
         f"malformed cgroup-attach request: version: Input should be 1 or 2 {malformed}"),
        ("cgroup-attach", {"vm": "mine", "version": version, "pid": mine, "cgroup": "/"}, 2,
         f"malformed cgroup-attach request: cgroup: Extra inputs are not permitted "
         f"{malformed}"),
        ("cgroup-attach", '{"vm": "mine", "version": 1, "pid": 12, "pid": 1}', 2,
         f"malformed cgroup-attach request: pid: Input should be greater than or equal to 2 "
         f"{malformed}"),
    ]
    for op, req, code, message in cases:
        assert call(w, ME, op, req) == (code, f"kiln-helper: {message}"), (op, req)
    assert (host_cgroups(parent), [membership(p) for p in watched]) == before
    assert all(Path(f"/proc/{p}").exists() for p in (theirs, roots))

    # The caller's own kill: its process dies, its cgroup and its claim go.
    res = serve("cgroup-kill", json.dumps({"vm": "mine", "version": version}).encode(),
                w["cfg"], ME, ME, log=lambda *a: None)
    assert res[0] == 0
    assert json.loads(res[1])["killed"] == [mine]
    assert not any(d.exists() for d in dirs)
    assert not (w["cfg"].area(ME) / "cgroups" / "mine").exists()
    assert call(w, ME, "cgroup-kill", {"vm": "mine", "version": version}) == \
        (1, "kiln-helper: VM mine has no cgroup")
    assert Path(f"/proc/{theirs}").exists()
    ran = [(u, op, r.split(":")[0]) for u, op, r in w["audit"]]
    assert (ME, "cgroup-attach", "ok") in ran
    assert (ME, "cgroup-attach", "malformed") in ran


@pytest.mark.parametrize("version", versions())
def test_a_claim_outlived_by_its_cgroup_grants_nothing(world: dict[str, Any],
                                                       version: int) -> None:
    """A cgroup removed behind the helper's back (root, a reboot) and made again under the
    same name by someone else is not the old claimant's."""
    w = world
    ccfg = cg.CgroupConfig(parent=w["parent"])
    assert call(w, ME, "cgroup-create", {"vm": "reused", "version": version,
                                       "limits": limits(version)})[0] == 0
    cg.cgroup_kill(ccfg, "reused", version)  # root, directly: the claim stays behind
    assert call(w, OTHER, "cgroup-create", {"vm": "reused", "version": version,
                                       "limits": limits(version)})[0] == 0
    theirs = spawn(w, *as_user(OTHER))
    assert call(w, OTHER, "cgroup-attach", {"vm": "reused", "version": version,
                                            "pid": theirs}) == (0, "")
    before = host_cgroups(w["parent"])
    refused = (1, f"kiln-helper: refusing cgroup reused: uid {ME} did not create it "
                  "(kiln-helper acts only on cgroups its caller made (cgroup-create))")
    assert call(w, ME, "cgroup-kill", {"vm": "reused", "version": version}) == refused
    mine = spawn(w, *as_user(ME))
    assert call(w, ME, "cgroup-attach", {"vm": "reused", "version": version,
                                         "pid": mine}) == refused
    assert host_cgroups(w["parent"]) == before
    time.sleep(0.05)
    assert Path(f"/proc/{theirs}").exists()
    assert call(w, OTHER, "cgroup-kill", {"vm": "reused", "version": version}) == (0, "")
    # No cgroup any more: the stale claim is dropped with the NotFound.
    assert call(w, ME, "cgroup-kill", {"vm": "reused", "version": version}) == \
        (1, "kiln-helper: VM reused has no cgroup")
    assert not (w["cfg"].area(ME) / "cgroups" / "reused").exists()


def test_create_refuses_an_existing_cgroup_and_claims_nothing(world: dict[str, Any]) -> None:
    w = world
    version = versions()[0]
    assert call(w, OTHER, "cgroup-create", {"vm": "taken", "version": version,
                                       "limits": limits(version)})[0] == 0
    code, err = call(w, ME, "cgroup-create", {"vm": "taken", "version": version,
                                       "limits": limits(version)})
    assert code == 1
    assert err.startswith("kiln-helper: cgroup /sys/fs/cgroup/")
    assert err.endswith(f"/{w['parent']}/taken already exists (remove the old VM first "
                        "(kiln rm))")
    assert not (w["cfg"].area(ME) / "cgroups" / "taken").exists()


# -- the post-move check (fault injection: these races cannot be timed from outside) --------


def _lines(pid: int) -> dict[str, str]:
    return {ln.split(":", 2)[1]: ln.split(":", 2)[2]
            for ln in membership(pid).splitlines()}


@pytest.mark.parametrize("version", versions())
def test_a_process_that_changes_owner_while_moving_goes_back(
        world: dict[str, Any], version: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked as the caller's, then (a setuid exec in the window) not: it returns to
    exactly the cgroups it was in, and the attach is refused."""
    w = world
    ccfg = cg.CgroupConfig(parent=w["parent"])
    dirs = cg.cgroup_create(ccfg, "flip", version)
    mine = spawn(w, *as_user(ME))
    for d in cg.cgroup_create(ccfg, "home", version):  # somewhere that is not a root
        (d / "cgroup.procs").write_text(str(mine))
    before = _lines(mine)
    assert f"/{w['parent']}/home" in before.values()
    real, calls = cgattach._uids, []

    def uids(procfd: int) -> list[int]:
        calls.append(1)
        # checked before pinning and again once pinned; then the setuid exec shows
        return real(procfd) if len(calls) <= 2 else [ME, 0, 0, 0]

    monkeypatch.setattr(cgattach, "_uids", uids)
    with pytest.raises(Conflict) as e:
        cgattach.cgroup_attach(ccfg, "flip", version, mine, ME)
    assert e.value.message == f"process {mine} changed owner while joining the cgroup"
    assert _lines(mine) == before
    assert all(cg._pids(d) == [] for d in dirs)


@pytest.mark.parametrize("version", versions())
def test_a_pid_that_may_have_been_reused_is_taken_out_again(
        world: dict[str, Any], version: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pinned process died in the window (so the number written may name a newer,
    foreign process): whatever holds that number leaves the VM's cgroup for the
    hierarchy root, and the attach is refused."""
    w = world
    ccfg = cg.CgroupConfig(parent=w["parent"])
    dirs = cg.cgroup_create(ccfg, "reuse", version)
    victim = spawn(w, *as_user(OTHER))  # stands for the newer process with that number
    real, calls = cgattach._alive, []

    def alive(pidfd: int) -> bool:
        calls.append(1)
        return real(pidfd) if len(calls) <= 2 else False  # before and once pinned

    monkeypatch.setattr(cgattach, "_alive", alive)
    with pytest.raises(Conflict) as e:
        cgattach.cgroup_attach(ccfg, "reuse", version, victim, OTHER)
    assert e.value.message == f"process {victim} exited while joining the cgroup"
    assert all(cg._pids(d) == [] for d in dirs)
    lines = _lines(victim)
    moved = [k for k in lines if (k == "" if version == 2 else "freezer" in k.split(","))]
    assert moved
    assert all(lines[k] == "/" for k in moved)


# -- security review: limits, the claim cap, pinning the pid, taps ----------------------------


def test_a_sudo_callers_cgroup_needs_a_memory_limit_and_claims_are_capped(
        world: dict[str, Any]) -> None:
    w = world
    code, err = call(w, ME, "cgroup-create", {"vm": "nolimit", "version": 1})
    assert (code, err) == (1, "kiln-helper: refusing cgroup nolimit: no memory limit (a sudo "
                           "caller's VM cgroup needs limits.memory_bytes)")
    claims_dir = w["cfg"].pool_dir / "users" / str(ME) / "cgroups"
    claims_dir.mkdir(parents=True, exist_ok=True)
    for i in range(w["cfg"].limits.cgroups):  # [limits] cgroups, 64 by default
        (claims_dir / f"held{i}").write_text("{}")
    code, err = call(w, ME, "cgroup-create", {"vm": "onemore", "version": 1,
                                              "limits": {"memory_bytes": 1 << 28}})
    assert (code, err) == (1, f"kiln-helper: refusing cgroup onemore: uid {ME} already holds "
                           "64 VM cgroups (at most 64) (remove VMs you no longer need (kiln rm))")
    assert all("onemore" not in d for d in host_cgroups(w["parent"]))


_PARENT = ("import os, subprocess, sys, time\n"
           "p = subprocess.Popen(['/bin/sleep', '60'])\nprint(p.pid, flush=True)\n"
           "sys.stdin.readline()\nos.kill(p.pid, 9)\ntime.sleep(0.3)\n"
           "print(os.waitpid(p.pid, os.WNOHANG)[0], flush=True)\n"
           "sys.stdin.readline()\nprint(os.waitpid(p.pid, 0)[0], flush=True)\n")


def test_a_pinned_pid_cannot_be_reaped_so_its_number_cannot_be_reused() -> None:
    """While the helper holds the pid (ptrace seize), the process dying leaves a zombie its
    parent cannot reap — the number stays taken — until the helper lets go."""
    parent = subprocess.Popen(["/usr/bin/python3", "-c", _PARENT], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert parent.stdin is not None
    assert parent.stdout is not None
    try:
        child = int(parent.stdout.readline())
        with cgattach.pinned(child):
            parent.stdin.write("kill\n")
            parent.stdin.flush()
            assert parent.stdout.readline() == "0\n"  # WNOHANG: nothing to reap
            state = [ln for ln in Path(f"/proc/{child}/status").read_text().splitlines()
                     if ln.startswith("State:")]
            assert state == ["State:\tZ (zombie)"]
        parent.stdin.write("reap\n")
        parent.stdin.flush()
        assert parent.stdout.readline() == f"{child}\n"
    finally:
        parent.kill()
        parent.wait()


def test_pinning_reports_a_missing_or_already_traced_process(world: dict[str, Any]) -> None:
    from helper.base.errors import NotFound

    gone = free_pid()
    with pytest.raises(NotFound) as e, cgattach.pinned(gone):
        pass
    assert e.value.message == f"no process {gone}"
    pid = spawn(world)
    with cgattach.pinned(pid), pytest.raises(Conflict) as c, cgattach.pinned(pid):
        pass
    assert c.value.message == (f"cannot pin process {pid}: it is exiting, already traced, "
                               "or may not be traced")
    assert Path(f"/proc/{pid}/status").read_text().count("TracerPid:\t0") == 1  # let go


def _tap(name: str, alias: str | None) -> None:
    subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap"], check=True)
    if alias is not None:
        subprocess.run(["ip", "link", "set", name, "alias", alias], check=True)


def test_tap_delete_only_by_the_tags_uid_and_no_bare_taps_for_sudo_callers(
        world: dict[str, Any]) -> None:
    w = world
    theirs, bare, mine = (f"kt-{secrets.token_hex(3).translate(str.maketrans('0189', 'abcd'))}"
                          for _ in range(3))
    _tap(theirs, f"kiln vm=vmb root=aaaaaaaa uid={OTHER}")
    _tap(bare, None)
    _tap(mine, f"kiln vm=vma root=aaaaaaaa uid={ME}")
    try:
        assert call(w, ME, "tap-delete", {"name": theirs}) == (
            1, f"kiln-helper: refusing tap {theirs}: it belongs to uid {OTHER} (only its "
               "owner removes it)")
        assert call(w, ME, "tap-delete", {"name": bare}) == (
            1, f"kiln-helper: refusing tap {bare}: kiln did not tag it (only root deletes an "
               "untagged tap)")
        assert Path(f"/sys/class/net/{theirs}").exists()
        assert Path(f"/sys/class/net/{bare}").exists()
        assert call(w, ME, "tap-delete", {"name": mine}) == (0, "")
        assert not Path(f"/sys/class/net/{mine}").exists()
        assert call(w, ME, "tap-create", {"name": "kt-squat", "uid": 900_001,
                                          "gid": 900_001}) == (
            1, f"kiln-helper: refusing tap-create from uid {ME}: only root creates bare taps "
               "(a VM's tap comes from tap-attach (kiln run --net tap))")
        assert not Path("/sys/class/net/kt-squat").exists()
    finally:
        for n in (theirs, bare, mine):
            subprocess.run(["ip", "link", "del", n], capture_output=True, check=False)
