"""The dm-thin backend's behaviour tests, run for real where device-mapper exists.

Run as root on a machine whose kernel has (or can load) loop and dm-thin-pool: inside a
QEMU guest booted by ``kiln run`` (``tests/e2e/test_dmthin_vm.py``; the guest image carries
this file, the ``helper`` package and pydantic under ``/kiln-tests``) or directly on a
host with thin-pool. It drives the REAL ``builder.pool`` dm-thin backend and checks every
effect from the outside (``dmsetup``, ``losetup``, ``e2fsck``, bytes of block devices):

pool init → import a small ext4 made here with mke2fs → two snapshots (one larger, grown
with resize2fs) → a write to one leaves the base and the sibling unchanged → removal →
bad input → a snapshot creation SIGKILLed at a fault step plus a stray base device, then
reclaim (kiln's leftovers go, bystander devices and loops stay) → a full teardown leaf
first (snapshots, bases, the pool, then the loops) → the pool coming back after it (a
"reboot") → destroy.

Output: progress on stderr, then one line ``KILN-DMTHIN-SUMMARY {json}`` on stdout:
``{"ok": bool, "checks": {name: {"ok": bool, "detail": str}}, "timings": {...}}``.
Exit 0 only if every check passed. ``--child-snapshot`` is the crash helper (internal).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if (HERE / "helper").is_dir():  # the guest image: /kiln-tests/{helper,site-packages}
    sys.path[:0] = [str(HERE), str(HERE / "site-packages")]

import run_helper  # noqa: E402 - after the path set-up above
from guestlib import (  # noqa: E402
    BASE_SIZE,
    BIG_SIZE,
    MIB,
    POOL_SIZE,
    T0,
    TOOL_ENV,
    Checks,
    cat_file,
    dev_size,
    digest,
    dm_create_plain,
    dm_names,
    dm_remove_plain,
    dm_table,
    log,
    loops,
    make_source,
    pool_used,
    sh,
    thin_ids,
)

SUMMARY_MARK = "KILN-DMTHIN-SUMMARY "
EXPECTED_CHECKS = (
    "modules", "pool_init", "import_volume", "snapshot_equals_base", "snapshot_larger_grown",
    "thin_sharing", "pool_status", "write_isolated", "remove_snapshot", "bad_input",
    "crash_leftovers", "crash_reclaim", "bystanders_untouched", "teardown_leaf_first",
    "reactivate", "volume_rm_keeps_snapshot", "destroy",
)
BYSTANDER = "dmthin-test-bystander"


def setup_kernel(checks: Checks) -> None:
    """Loop and dm-thin-pool loaded, device nodes present (devtmpfs)."""
    if not os.path.exists("/dev/null"):
        sh("mount", "-t", "devtmpfs", "devtmpfs", "/dev")
    sh("modprobe", "-a", "loop", "dm-thin-pool")
    targets = sh("dmsetup", "targets")
    names = {line.split()[0] for line in targets.splitlines() if line.strip()}
    checks.expect("modules", {"thin-pool target": "thin-pool" in names,
                              "thin target": "thin" in names,
                              "loop-control": os.path.exists("/dev/loop-control")},
                  f"kernel {os.uname().release}; targets {sorted(names)}")


def thin_id_of_volume(root: Path, volume_id: str) -> int:
    rec = json.loads((root / "pool" / "thin" / "volumes" / f"{volume_id[7:]}.json").read_text())
    return int(rec["thin_id"])


def run_child_snapshot(root: Path, volume_id: str, size: int, fault: str) -> int:
    env = dict(os.environ)
    env["KILN_FAULT_KILL_AT"] = fault
    res = subprocess.run([sys.executable, __file__, "--child-snapshot", str(root), volume_id,
                          str(size)], env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    if res.returncode != -9:
        log(f"child stderr: {res.stderr.strip()[-2000:]}")
    return res.returncode


def scenario(checks: Checks, work: Path, initialized: threading.Event) -> None:
    """Root's loop-backed pool, in-process; ``initialized`` is set once it exists."""
    from builder import helperclient as client
    from builder.pool import destroy_pool, init_pool, open_pool
    from helper.base.errors import KilnError, NotFound
    from helper.storage import dmthin_core as core
    from helper.storage import privileged

    root = work / "root"
    root.mkdir()
    rootkey = core.root_key(str(root))
    mine = f"kiln-{rootkey}-"

    def kiln_devs() -> set[str]:
        return {n for n in dm_names() if n.startswith(mine)}

    def root_loops() -> set[str]:
        return {d for d, f in loops().items() if f.startswith(str(root) + "/")}

    with checks.step("pool_init"):
        pool = init_pool(root, backend="dm-thin", size=POOL_SIZE)
        st = pool.status()
        checks.expect("pool_init", {
            "backend dm-thin": st["backend"] == "dm-thin",
            "thin": st["thin"] is True,
            "capacity": st["capacity"] == POOL_SIZE,
            "pool device": kiln_devs() == {core.pool_name(rootkey)},
            "two loops": len(root_loops()) == 2,
            "thin-pool table": " thin-pool " in dm_table(core.pool_name(rootkey)),
        }, f"status {st}")
    initialized.set()

    with checks.step("import_volume"):
        src, vid, payload = make_source(work, root)
        src_digest = vid[7:]
        pool.import_volume(vid, src)
        used_import = pool.status()["used"]
        tid = thin_id_of_volume(root, vid)
        # A read-only view of the (inactive) base, made by the test, not kiln.
        view = dm_create_plain("dmthin-test-view", core.thin_table(
            f"/dev/mapper/{core.pool_name(rootkey)}", tid, core.sectors_of(BASE_SIZE)),
            readonly=True)
        checks.expect("import_volume", {
            "has_volume": pool.has_volume(vid),
            "base bytes": digest(view) == src_digest,
            "base inactive": kiln_devs() == {core.pool_name(rootkey)},
            "data used": 0 < used_import < BASE_SIZE,
            "one thin device": thin_ids(root, rootkey) == {tid},
        }, f"thin id {tid}, used {used_import}")

    with checks.step("snapshots"):
        s1 = pool.create_snapshot(vid)
        s2 = pool.create_snapshot(vid, size=BIG_SIZE)
        used_snaps = pool.status()["used"]
        s1_digest, s2_digest = digest(s1.path), digest(s2.path)
        checks.expect("snapshot_equals_base", {
            "path": s1.path == f"/dev/mapper/{core.snapshot_name(rootkey, s1.id)}",
            "thin": s1.thin,
            "size": dev_size(s1.path) == BASE_SIZE == s1.size,
            "bytes": s1_digest == src_digest,
            "table": dm_table(core.snapshot_name(rootkey, s1.id)).startswith(
                f"0 {BASE_SIZE // 512} thin "),
        })
        fsck = subprocess.run(["e2fsck", "-f", "-n", s2.path], capture_output=True, text=True,
                              env=TOOL_ENV, check=False)
        info = sh("dumpe2fs", "-h", s2.path)
        fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
        fs_bytes = int(fields["Block count"]) * int(fields["Block size"])
        checks.expect("snapshot_larger_grown", {
            "device size": dev_size(s2.path) == BIG_SIZE == s2.size,
            "ext4 size": fs_bytes == BIG_SIZE,
            "e2fsck clean": fsck.returncode == 0,
            "content": cat_file(s2.path, "/data/payload.bin", work / "mnt") == payload,
            "base untouched": digest(view) == src_digest,
        }, f"ext4 {fs_bytes} bytes, e2fsck {fsck.returncode} {fsck.stdout.strip()[-200:]}")
        checks.expect("thin_sharing", {
            "snapshots add little": used_snaps - used_import < max(used_import // 4, MIB),
        }, f"used after import {used_import}, after 2 snapshots {used_snaps}")
        st = pool.status()
        checks.expect("pool_status", {
            "volumes": st["volumes"] == 1, "snapshots": st["snapshots"] == 2,
            "listed": sorted(s.id for s in pool.list_snapshots()) == sorted([s1.id, s2.id]),
            "thin ids": thin_ids(root, rootkey) == {tid, s1.thin_id, s2.thin_id},
        }, f"{st}")

    with checks.step("write_isolated"):
        mnt = work / "mnt"
        sh("mount", s1.path, str(mnt))
        try:
            (mnt / "data" / "payload.bin").write_bytes(b"changed" * 1000)
            (mnt / "new-file").write_text("only in s1\n")
        finally:
            sh("umount", str(mnt))
        checks.expect("write_isolated", {
            "s1 changed": digest(s1.path) != s1_digest,
            "base unchanged": digest(view) == src_digest,
            "sibling unchanged": digest(s2.path) == s2_digest,
            "s1 has the write": cat_file(s1.path, "/new-file", mnt) == b"only in s1\n",
        })

    with checks.step("remove_snapshot"):
        used_before = pool.status()["used"]
        pool.remove_snapshot(s1.id)
        removed_gone = core.snapshot_name(rootkey, s1.id) not in dm_names()
        try:
            pool.get_snapshot(s1.id)
            lookup = "found"
        except NotFound as e:
            lookup = str(e)
        used_after = pool.status()["used"]
        checks.expect("remove_snapshot", {
            "device gone": removed_gone,
            "record gone": not (root / "pool" / "snapshots" / f"{s1.id}.json").exists(),
            "lookup fails": lookup.startswith(f"no snapshot {s1.id}"),
            "blocks freed": used_after < used_before,
            "sibling kept": core.snapshot_name(rootkey, s2.id) in dm_names(),
            "thin id deleted": thin_ids(root, rootkey) == {tid, s2.thin_id},
        }, f"used {used_before} -> {used_after}")

    with checks.step("bad_input"):
        errs: dict[str, str] = {}
        for what, fn in (
            ("unknown id", lambda: pool.remove_snapshot("nosuchsnap")),
            ("dotdot id", lambda: pool.create_snapshot(vid, snap_id="../x")),
            ("unknown volume", lambda: pool.create_snapshot("sha256:" + "0" * 64)),
            ("smaller", lambda: pool.create_snapshot(vid, size=BASE_SIZE // 2)),
            ("foreign dm name", lambda: privileged.dm_create(root, BYSTANDER, "0 8 zero")),
            ("bad message", lambda: privileged.dm_message(
                root, core.pool_name(rootkey), "release_metadata_snap")),
            # grant: only a snapshot's node goes to the caller, never a base's or the pool's
            ("grant a base", lambda: client.call("dm-create", {
                "name": core.snapshot_name(rootkey, "stolen"), "kind": "thin",
                "pool": core.pool_name(rootkey), "thin_id": tid,
                "sectors": core.sectors_of(BASE_SIZE), "grant": True}, area=root)),
            ("grant the pool", lambda: client.call("dm-create", {
                "name": core.pool_name(rootkey), "kind": "thin-pool", "grant": True},
                area=root)),
        ):
            try:
                fn()
                errs[what] = "no error"
            except (KilnError, ValueError) as e:
                errs[what] = f"{type(e).__name__}: {e}"
        checks.expect("bad_input", {
            "unknown id": errs["unknown id"].startswith("NotFound: no snapshot nosuchsnap"),
            "dotdot id": errs["dotdot id"].startswith("UsageError: invalid snapshot id '../x'"),
            "unknown volume": errs["unknown volume"].startswith(
                "NotFound: volume sha256:000000000000 is not in the pool"),
            "smaller": errs["smaller"].startswith("UsageError: snapshot size"),
            "foreign dm name": errs["foreign dm name"].startswith(
                f"UsageError: refusing device-mapper name '{BYSTANDER}'"),
            "bad message": errs["bad message"].startswith(
                "UsageError: refusing device-mapper message"),
            "grant a base": errs["grant a base"] == f"UsageError: refusing to give thin "
            f"device {tid} to the caller: it holds a base volume",
            "grant the pool": errs["grant the pool"] == "UsageError: refusing to give "
            f"{core.pool_name(rootkey)} to the caller: only snapshot devices are given",
            "nothing half-made": {s.id for s in pool.list_snapshots()} == {s2.id}
            and core.snapshot_name(rootkey, "stolen") not in dm_names(),
        }, json.dumps(errs))

    # Bystanders: a plain device and one with another root's kiln name, both over a loop
    # device whose file is outside the root. Reclaim must leave all three alone.
    outside = work / "outside.img"
    with open(outside, "wb") as f:
        f.truncate(4 * MIB)
    outside_loop = sh("losetup", "--find", "--show", str(outside)).strip()
    other_key = "00000000" if rootkey != "00000000" else "11111111"
    foreign = core.snapshot_name(other_key, "foreign")
    bystanders = {BYSTANDER: dm_create_plain(BYSTANDER, f"0 2048 linear {outside_loop} 0"),
                  foreign: dm_create_plain(foreign, f"0 2048 linear {outside_loop} 2048")}
    tables = {n: dm_table(n) for n in bystanders}

    def bystanders_ok() -> bool:
        return ({n: dm_table(n) if n in dm_names() else "" for n in bystanders} == tables
                and loops().get(outside_loop) == str(outside))

    with checks.step("crash"):
        dm_remove_plain("dmthin-test-view")
        # Each child dies at one fault step; the next child's own reclaim (it opens the
        # pool) must clear the previous one's leftovers before it starts.
        crashes: dict[str, dict[str, Any]] = {}
        for fault in ("snapshot-record", "snapshot-clone", "snapshot-resize"):
            code = run_child_snapshot(root, vid, BIG_SIZE, fault)
            creating = sorted(p.stem for p in (root / "pool" / "snapshots").glob("*.json")
                              if json.loads(p.read_text())["state"] == "creating")
            devs = kiln_devs()
            crashes[fault] = {"code": code, "creating": creating, "devices": sorted(
                n.removeprefix(mine) for n in devs if n.startswith(mine + "snap-"))}
        crashed = crashes["snapshot-resize"]["creating"]
        # An import killed midway leaves its base device active: make one like it.
        vol_dev = core.volume_name(rootkey, vid[7:])
        dm_create_plain(vol_dev, core.thin_table(f"/dev/mapper/{core.pool_name(rootkey)}",
                                                 tid, core.sectors_of(BASE_SIZE)))
        before = kiln_devs()
        used_before = pool_used(rootkey)
        ids = [c["creating"][0] if len(c["creating"]) == 1 else "" for c in crashes.values()]
        s2_dev = "snap-" + s2.id
        checks.expect("crash_leftovers", {
            "children SIGKILLed": [c["code"] for c in crashes.values()] == [-9, -9, -9],
            "one creating record each": all(ids) and len(set(ids)) == 3,
            "record step: no device yet": crashes["snapshot-record"]["devices"] == [s2_dev],
            "clone step: device, previous cleared": crashes["snapshot-clone"]["devices"]
            == sorted([s2_dev, "snap-" + ids[1]]),
            "resize step: device, previous cleared": crashes["snapshot-resize"]["devices"]
            == sorted([s2_dev, "snap-" + ids[2]]),
            "stray base device active": vol_dev in before,
        }, json.dumps(crashes))
        reopened = open_pool(root)  # the next command: reclaims under the pool lock
        assert reopened is not None
        after = kiln_devs()
        used_after = pool_used(rootkey)
        checks.expect("crash_reclaim", {
            "crashed devices gone": not any(core.snapshot_name(rootkey, c) in after
                                            for c in crashed),
            "stray base device gone": vol_dev not in after,
            "records gone": not any((root / "pool" / "snapshots" / f"{c}.json").exists()
                                    for c in crashed),
            "ready snapshot kept": after == {core.pool_name(rootkey),
                                             core.snapshot_name(rootkey, s2.id)},
            "its bytes kept": digest(s2.path) == s2_digest,
            "thin blocks released": used_after < used_before,
            "thin ids released": (left := thin_ids(root, rootkey)) == {tid, s2.thin_id},
        }, f"devices {sorted(after)}; used {used_before} -> {used_after}; ids {left}")
        untouched_after_reclaim = bystanders_ok()

    with checks.step("teardown"):
        # A host crash leaves everything active: a stray base too. Remove it all, the way
        # `pool destroy` and a failed init do, and check the order.
        dm_create_plain(vol_dev, core.thin_table(f"/dev/mapper/{core.pool_name(rootkey)}",
                                                 tid, core.sectors_of(BASE_SIZE)))
        loops_before = root_loops()
        done = privileged.reclaim(root, [])
        ranks = [(core.parse_name(n).rank if core.parse_name(n) else 3)  # type: ignore[union-attr]
                 for n in done]
        checks.expect("teardown_leaf_first", {
            "everything kiln's removed": not kiln_devs(),
            "order snap < vol < pool < loops": ranks == sorted(ranks) and ranks[:3] == [0, 1, 2],
            "loops detached": not root_loops() and set(done[3:]) == loops_before,
            "bystanders": bystanders_ok(),
        }, f"removed in order: {done}")

    with checks.step("reactivate"):
        back = open_pool(root)  # after a "reboot": loops, the pool and s2 come back
        assert back is not None
        checks.expect("reactivate", {
            "devices": kiln_devs() == {core.pool_name(rootkey),
                                       core.snapshot_name(rootkey, s2.id)},
            "snapshot bytes": digest(s2.path) == s2_digest,
            "volume still there": back.has_volume(vid),
        })

    with checks.step("volume_rm"):
        # dm-thin snapshots are independent of their origin: the base may go first.
        back.remove_volume(vid)
        checks.expect("volume_rm_keeps_snapshot", {
            "volume gone": not back.has_volume(vid),
            "record gone": not (root / "pool/thin/volumes" / f"{vid[7:]}.json").exists(),
            "thin id deleted": (left := thin_ids(root, rootkey)) == {s2.thin_id},
            "snapshot bytes": digest(s2.path) == s2_digest,
            "snapshot fsck": subprocess.run(["e2fsck", "-f", "-n", s2.path], env=TOOL_ENV,
                                            capture_output=True, check=False).returncode == 0,
        }, f"thin ids {left}")

    with checks.step("destroy"):
        destroyed = destroy_pool(root, force=True)
        checks.expect("destroy", {
            "destroyed": destroyed,
            "no kiln devices": not kiln_devs(),
            "no loops": not root_loops(),
            "pool dir gone": not (root / "pool").exists(),
            "bystanders": bystanders_ok(),
        })
        checks.expect("bystanders_untouched", {"after reclaim": untouched_after_reclaim,
                                               "after destroy": bystanders_ok()})
    for name in bystanders:
        dm_remove_plain(name)
    sh("losetup", "--detach", outside_loop)


def child_snapshot(root: str, volume_id: str, size: int) -> int:
    """Create one snapshot; KILN_FAULT_KILL_AT decides where this process dies."""
    from builder.pool import open_pool

    pool = open_pool(Path(root))
    assert pool is not None
    pool.create_snapshot(volume_id, size=size)
    return 0


def cleanup(work: Path) -> None:
    """Best effort, after a failure: nothing of this run stays on the machine."""
    from helper.storage import privileged

    with contextlib.suppress(Exception):
        privileged.reclaim(work / "root", [])
    for name in ("dmthin-test-view", BYSTANDER, "kiln-00000000-snap-foreign",
                 "kiln-11111111-snap-foreign"):
        with contextlib.suppress(Exception):
            dm_remove_plain(name)
    with contextlib.suppress(Exception):
        for dev, back in loops().items():
            if back.startswith(str(work) + "/"):
                sh("losetup", "--detach", dev)


def _helper_scenarios(checks: Checks, work: Path, initialized: threading.Event) -> None:
    initialized.wait()
    run_helper.devices_scenario(checks, work)
    run_helper.sudo_scenario(checks, work, f'[pool]\ndirectory = "{work / "helper"}"\n')


def _guarded(checks: Checks, what: str, fn: Any, *args: Any) -> None:
    """Run a scenario in a thread; a failure becomes a failed check, like main's."""
    try:
        fn(*args)
    except Exception:
        checks.record(f"aborted-{what}", False, traceback.format_exc()[-3000:])


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="scratch directory (default: a tmpfs mounted at /run/kiln-dmthin)")
    ap.add_argument("--child-snapshot", nargs=3, metavar=("ROOT", "VOLUME", "SIZE"))
    ap.add_argument("--no-helper-scenarios", action="store_true",
                    help="in the guest, run root's scenario only (to time the others)")
    args = ap.parse_args(argv)
    if args.child_snapshot:
        root, vid, size = args.child_snapshot
        return child_snapshot(root, vid, int(size))
    checks = Checks()
    work: Path = args.workdir or Path("/run/kiln-dmthin")
    # The guest run (no --workdir) also runs the helper-path scenarios: they write
    # /etc/kiln, /etc/sudoers.d and /opt/kiln, which only a throwaway guest may get.
    guest = args.workdir is None and not args.no_helper_scenarios
    expected = EXPECTED_CHECKS + (run_helper.CHECKS if guest else ())
    mounted = False
    try:
        with checks.step("setup"):
            if args.workdir is None:
                work.mkdir(parents=True, exist_ok=True)
                # 0755: the sudo scenario's user keeps its kiln root in here. 1g (pages are
                # only used as written, well under 512m): the helper refuses a sudo caller's
                # pool files beyond the free space less 5 %, and root's pool shares this fs.
                sh("mount", "-t", "tmpfs", "-o", "size=1g,mode=0755", "kiln-dmthin",
                   str(work))
                mounted = True
            setup_kernel(checks)
        with checks.step("import"):
            import builder.pool  # noqa: F401 - timed: pydantic's import is slow under TCG
        initialized = threading.Event()
        if guest:
            # The helper-path scenarios run on the second vCPU next to root's (kiln-helper
            # start-ups take seconds each under TCG). The operator-devices config must not
            # be seen by another pool's init, so they start once root's pool exists (no
            # later step of root's asks dm-info).
            helper_side = threading.Thread(target=_guarded, args=(
                checks, "helper", _helper_scenarios, checks, work, initialized))
            helper_side.start()
        try:
            scenario(checks, work, initialized)
        finally:
            initialized.set()
            if guest:
                helper_side.join()
    except Exception:  # every failure becomes a failed check
        checks.record("aborted", False, traceback.format_exc()[-3000:])
        cleanup(work)
    finally:
        if mounted:
            with contextlib.suppress(Exception):
                sh("umount", str(work))
    missing = [c for c in expected if c not in checks.results]
    ok = not missing and all(r["ok"] for r in checks.results.values())
    summary = {"ok": ok, "missing": missing, "checks": checks.results,
               "timings": checks.timings, "kernel": os.uname().release,
               "total": round(time.monotonic() - T0, 3)}
    print(SUMMARY_MARK + json.dumps(summary, sort_keys=True), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
