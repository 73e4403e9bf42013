"""In-guest scenarios of the dm-thin backend beyond root's loop-backed pool (guest only:
they write /etc/kiln, /etc/sudoers.d and /opt/kiln, which a real host must not get).

Operator devices (as root, in-process through ``builder.helperclient``): two loop devices over
files OUTSIDE the kiln root are named in the trusted config (``/etc/kiln/test-config.toml``,
root-owned 0644): pool init takes them (capacity = the data device, the table names their
major:minor, no loop files under the root, the claim names the root), snapshots are
isolated, destroy leaves both attached to the same files and unheld; hostile configs (a
regular file, a mounted device, a device held by another dm device, a missing one) are
refused with exact errors and nothing half-made, once through the real ``kiln-helper``
entry point as a subprocess.

Sudo caller: a user made here (``useradd``) with a sudoers rule for exactly
``/opt/kiln/bin/kiln-helper`` (a ``python3 -I`` entry point over /kiln-tests) runs the
backend in its own process: every privileged step goes ``sudo -n kiln-helper OP``. The
helper's audit log shows which ops ran, in order; the snapshot's device nodes belong to
the user (who grows its ext4 and writes it directly), the pool's do not, the base is
unchanged, and destroy leaves nothing of the user's area.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
from pathlib import Path
from typing import Any

from guestlib import (
    BASE_SIZE,
    BIG_SIZE,
    MIB,
    POOL_SIZE,
    TOOL_ENV,
    Checks,
    digest,
    dm_create_plain,
    dm_names,
    dm_remove_plain,
    dm_table,
    log,
    loops,
    make_source,
    sh,
    thin_ids,
)

HERE = Path(__file__).resolve().parent
CONFIG = Path("/etc/kiln/test-config.toml")
HELPER = Path("/opt/kiln/bin/kiln-helper")
AUDIT = Path("/var/log/kiln-helper/audit.log")
USER = "kilnuser"
CHECKS = ("devices_pool_init", "devices_snapshot_isolated", "devices_destroy_keeps_devices",
          "devices_hostile_config", "devices_hostile_entry_point", "sudo_create",
          "sudo_grant", "sudo_destroy")
MARK = b"written by the VMM's user\n" * 100


def write_config(text: str) -> None:
    CONFIG.parent.mkdir(mode=0o755, exist_ok=True)
    tmp = CONFIG.with_name(".test-config.tmp")
    tmp.write_text(text)
    tmp.chmod(0o644)
    os.replace(tmp, CONFIG)


def install_helper() -> None:
    """The helper's entry point as install-helper makes it, over the guest's copy of
    ``helper`` and pydantic (root-owned, like the whole image)."""
    HELPER.parent.mkdir(parents=True, exist_ok=True)
    HELPER.write_text("#!/usr/bin/python3 -I\nimport sys\n\n"
                      f"sys.path[:0] = [{str(HERE)!r}, {str(HERE / 'site-packages')!r}]\n"
                      "from helper.main import main\n\nraise SystemExit(main())\n")
    HELPER.chmod(0o755)


def devno(dev: str) -> str:
    rdev = os.stat(dev).st_rdev
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def holders(dev: str) -> list[str]:
    return os.listdir(f"/sys/block/{Path(dev).name}/holders")


def sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


# -- operator devices --------------------------------------------------------------------


def devices_scenario(checks: Checks, work: Path) -> None:
    from builder.pool import destroy_pool, init_pool
    from helper.base.errors import KilnError
    from helper.storage import dmthin_core as core

    devs = work / "opdevs"
    devs.mkdir()
    data_img, meta_img = sparse(devs / "data.img", 64 * MIB), sparse(devs / "meta.img", 8 * MIB)
    data_dev = sh("losetup", "--find", "--show", str(data_img)).strip()
    meta_dev = sh("losetup", "--find", "--show", str(meta_img)).strip()
    claim_dir = work / "helper-op"
    claim = claim_dir / "thin-devices.json"

    def config(data: str, meta: str) -> None:
        write_config(f'[pool]\ndirectory = "{claim_dir}"\ndata_device = "{data}"\n'
                     f'metadata_device = "{meta}"\n')

    def attached() -> bool:
        table = loops()
        return table.get(data_dev) == str(data_img) and table.get(meta_dev) == str(meta_img)

    config(data_dev, meta_dev)
    root = work / "oproot"
    root.mkdir()
    rootkey = core.root_key(str(root))
    mine = f"kiln-{rootkey}-"
    with checks.step("devices_pool_init"):
        pool = init_pool(root, backend="dm-thin")
        st = pool.status()
        table = dm_table(core.pool_name(rootkey)).split()
        checks.expect("devices_pool_init", {
            "backend": st["backend"] == "dm-thin",
            "capacity = data device": st["capacity"] == 64 * MIB,
            "reason names the devices": st["reason"].endswith(
                f"on the operator's devices {data_dev} (data) and {meta_dev} (metadata)"),
            "table over them": table[2:5] == ["thin-pool", devno(meta_dev), devno(data_dev)],
            "no loop under the root": not any(f.startswith(str(root) + "/")
                                              for f in loops().values()),
            "held by the pool": len(holders(data_dev)) == 1 == len(holders(meta_dev)),
            "claimed": json.loads(claim.read_text()) == {"area": str(root)},
            "source recorded": json.loads((root / "pool/thin/pool.json").read_text())
            == {"source": "devices", "data": data_dev, "metadata": meta_dev},
        }, f"status {st}; table {table}")

    with checks.step("devices_snapshot_isolated"):
        src, vid, _ = make_source(work, root, "-op")
        pool.import_volume(vid, src)
        s1, s2 = pool.create_snapshot(vid), pool.create_snapshot(vid)
        tid = int(json.loads((root / "pool/thin/volumes" / f"{vid[7:]}.json").read_text())
                  ["thin_id"])
        view = dm_create_plain("dmthin-test-opview", core.thin_table(
            f"/dev/mapper/{core.pool_name(rootkey)}", tid, core.sectors_of(BASE_SIZE)),
            readonly=True)
        mnt = work / "opmnt"
        mnt.mkdir()
        sh("mount", s1.path, str(mnt))
        try:
            (mnt / "new-file").write_text("only in s1\n")
        finally:
            sh("umount", str(mnt))
        ids = thin_ids(root, rootkey, meta_dev)
        checks.expect("devices_snapshot_isolated", {
            "s1 changed": digest(s1.path) != vid[7:],
            "s2 unchanged": digest(s2.path) == vid[7:],
            "base unchanged": digest(view) == vid[7:],
            "thin ids on the metadata device": ids == {tid, s1.thin_id, s2.thin_id},
        }, f"thin ids {ids}")
        dm_remove_plain("dmthin-test-opview")

    with checks.step("devices_destroy"):
        pool.reclaim()  # a reclaim with the pool up: the devices stay
        after_reclaim = attached() and len(holders(data_dev)) == 1
        destroy_pool(root, force=True)
        checks.expect("devices_destroy_keeps_devices", {
            "kept through reclaim": after_reclaim,
            "pool devices gone": not any(n.startswith(mine) for n in dm_names()),
            "both still attached to the same files": attached(),
            "no holders": holders(data_dev) == [] == holders(meta_dev),
            "sizes unchanged": os.stat(data_img).st_size == 64 * MIB
            and os.stat(meta_img).st_size == 8 * MIB,
            "claim released": not claim.exists(),
            "pool dir gone": not (root / "pool").exists(),
        })

    with checks.step("devices_hostile"):
        plain = sparse(devs / "plain.img", 64 * MIB)
        mounted_dev = sh("losetup", "--find", "--show",
                         str(sparse(devs / "mounted.img", 16 * MIB))).strip()
        sh("mkfs.ext4", "-q", mounted_dev)
        opmnt = work / "opmounted"
        opmnt.mkdir()
        sh("mount", mounted_dev, str(opmnt))
        held_dev = sh("losetup", "--find", "--show",
                      str(sparse(devs / "held.img", 16 * MIB))).strip()
        dm_create_plain("dmthin-test-holder", f"0 2048 linear {held_dev} 0")
        held_by = holders(held_dev)
        missing = "/dev/kiln-test-missing"
        cases = {
            "regular file": ((str(plain), meta_dev), f"[pool] data_device {plain} is not a "
                             "block device (it is a regular file)"),
            "mounted": ((mounted_dev, meta_dev), f"[pool] data_device {mounted_dev} is "
                        f"mounted at {opmnt}"),
            "held": ((data_dev, held_dev), f"[pool] metadata_device {held_dev} is in use "
                     f"(held by {', '.join(held_by)})"),
            "missing": ((data_dev, missing), f"[pool] metadata_device {missing} does not "
                        "exist"),
        }
        bad_root = work / "badroot"
        bad_root.mkdir()
        got: dict[str, str] = {}
        clean: dict[str, bool] = {}
        for what, ((data, meta), _) in cases.items():
            config(data, meta)
            try:
                init_pool(bad_root, backend="dm-thin")
                got[what] = "no error"
            except KilnError as e:
                got[what] = f"{type(e).__name__}: {e.message}"
            left = {"pool directory": (bad_root / "pool").exists(), "claim": claim.exists(),
                    "dm devices": [n for n in dm_names()
                                   if n.startswith(f"kiln-{core.root_key(str(bad_root))}-")],
                    "loops not as they were": not attached()}
            clean[what] = not any(left.values())
            if not clean[what]:  # which part: a failure here must say it
                got[f"{what}: left"] = json.dumps(left)
        checks.expect("devices_hostile_config", {
            **{what: got[what] == f"UsageError: {msg}" for what, (_, msg) in cases.items()},
            **{f"{what}: nothing half-made": ok for what, ok in clean.items()},
        }, json.dumps(got))

        # The same refusal through the real entry point, as a subprocess (root, no sudo).
        install_helper()
        config(mounted_dev, meta_dev)
        area_key = core.root_key(str(claim_dir / "users" / "0"))
        res = subprocess.run([str(HELPER), "dm-create"], input=json.dumps(
            {"name": core.pool_name(area_key), "kind": "thin-pool", "source": "devices",
             "fresh": True}), capture_output=True, text=True, env=TOOL_ENV, check=False)
        want = cases["mounted"][1]
        checks.expect("devices_hostile_entry_point", {
            "exit 1": res.returncode == 1,
            "stderr": res.stderr.strip() == f"kiln-helper: {want} (fix [pool] in {CONFIG}, "
            "or free the device)",
            "json": json.loads(res.stdout)["error"]["message"] == want,
            "metadata device untouched": holders(meta_dev) == [] and attached(),
        }, f"exit {res.returncode}: {res.stderr.strip()}")
        dm_remove_plain("dmthin-test-holder")
        sh("umount", str(opmnt))
        for dev in (mounted_dev, held_dev, data_dev, meta_dev):
            sh("losetup", "--detach", dev)
    CONFIG.unlink()


# -- a sudo caller ---------------------------------------------------------------------------


def audit_lines() -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in AUDIT.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def ops_since(start: int, uid: int) -> list[str]:
    """``op`` or ``op: outcome`` (when not ok) of the helper calls ``uid`` made."""
    return [e["op"] if e["outcome"] == "ok" else f"{e['op']}: {e['outcome']}"
            for e in audit_lines()[start:] if e["uid"] == uid]


class UserRun:
    """This program's user half as ``uid`` (no capabilities, no groups), in one process
    that stops between its two phases so the root side can look at the devices."""

    def __init__(self, uid: int, gid: int, *args: str) -> None:
        self.proc = subprocess.Popen(
            ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--",
             sys.executable, str(HERE / "run_helper.py"), *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**TOOL_ENV, "HOME": "/"}, cwd="/")

    def phase(self) -> dict[str, Any]:
        """The next phase's JSON line (and let the user side go on)."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        try:
            return dict(json.loads(line))
        except ValueError:
            return {"error": f"no result: {line!r}"}

    def go_on(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def finish(self) -> int:
        _, err = self.proc.communicate(timeout=600)
        for line in err.strip().splitlines()[-20:]:
            log(f"  user: {line}")
        return self.proc.returncode


def sudo_scenario(checks: Checks, work: Path, config_text: str) -> None:
    """The user's whole flow through sudo. Runs next to the root scenario (its own area
    key, its own loops); ``config_text`` is the helper config both share."""
    from helper.storage import dmthin_core as core

    with checks.step("sudo_setup"):
        sh("useradd", "--no-create-home", "--shell", "/bin/sh", "--user-group", USER)
        pw = pwd.getpwnam(USER)
        install_helper()
        rule = Path("/etc/sudoers.d/kiln-helper")
        rule.write_text(f"{USER} ALL=(root) NOPASSWD: {HELPER}\n"
                        f"Defaults!{HELPER} closefrom_override\n")
        rule.chmod(0o440)
        sh("visudo", "-cf", str(rule))
        write_config(config_text)
        home = work / "user"
        home.mkdir()
        src, vid, _ = make_source(work, home, "-user")
        for p in (home, src):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        root = home / "root"
        area = work / "helper" / "users" / str(pw.pw_uid)
        key = core.root_key(str(area))
        start = len(audit_lines())

    with checks.step("sudo_create"):
        user = UserRun(pw.pw_uid, pw.pw_gid, str(root), vid, str(src))
        out = user.phase()
        ops = ops_since(start, pw.pw_uid)
        snap = out.get("snapshot", {})
        name = core.snapshot_name(key, snap.get("id", "x"))
        node = os.stat(f"/dev/mapper/{name}") if name in dm_names() else None
        dm_node = f"/dev/dm-{os.minor(node.st_rdev)}" if node else ""
        pool_node = os.stat(f"/dev/mapper/{core.pool_name(key)}")
        files = [area / "pool/thin/data.img", area / "pool/thin/meta.img"]
        checks.expect("sudo_create", {
            "user side ok": "error" not in out,
            "ops, in order": ops == ["area", "dm-info", "dm-create", "dm-import",
                                     "dm-message", "dm-create"],
            "devices carry the area's key": {n for n in dm_names() if n.startswith(
                f"kiln-{key}-")} == {core.pool_name(key), name},
            "pool files root-owned 0600 in the area": all(
                (os.stat(f).st_uid, os.stat(f).st_mode & 0o777) == (0, 0o600) for f in files),
            "loops over them": sorted(f for f in loops().values()
                                      if f.startswith(str(area) + "/")) == sorted(map(str, files)),
            "records in the user's root": (root / "pool/thin/volumes" / f"{vid[7:]}.json")
            .stat().st_uid == pw.pw_uid,
        }, f"ops {ops}; {json.dumps(out)[:1500]}")
        base_view = dm_create_plain("dmthin-test-uview", core.thin_table(
            f"/dev/mapper/{core.pool_name(key)}", int(out.get("base_thin_id", 0)),
            core.sectors_of(BASE_SIZE)), readonly=True) if "error" not in out else ""
        checks.expect("sudo_grant", {
            "snapshot node is the user's, 0600": node is not None
            and (node.st_uid, node.st_gid, node.st_mode & 0o777) == (pw.pw_uid, pw.pw_gid,
                                                                       0o600),
            "so is /dev/dm-N": bool(dm_node) and os.stat(dm_node).st_uid == pw.pw_uid,
            "pool node stays root's": pool_node.st_uid == 0,
            "user grew the ext4 (resize2fs on its node)": out.get("ext4_bytes") == BIG_SIZE,
            "the user's write landed": node is not None and _read_at(
                f"/dev/mapper/{name}", BIG_SIZE - MIB, len(MARK)) == MARK,
            "user cannot open the pool": out.get("pool_open") == "EACCES",
            "base unchanged": bool(base_view) and digest(base_view) == vid[7:],
        }, f"node {node}")
        if base_view:
            dm_remove_plain("dmthin-test-uview")

    with checks.step("sudo_destroy"):
        start = len(audit_lines())
        user.go_on()
        out = user.phase()
        code = user.finish()
        ops = ops_since(start, pw.pw_uid)
        checks.expect("sudo_destroy", {
            "user side ok": code == 0 and "error" not in out,
            "ops, in order": ops == ["dm-remove", "thin-clear"],
            "snapshot's thin id deleted with its device": out.get("snapshots_left") == [],
            "no devices of the area": not any(n.startswith(f"kiln-{key}-") for n in dm_names()),
            "no loops of the area": not any(f.startswith(str(area) + "/")
                                            for f in loops().values()),
            "pool files gone": not any(f.exists() for f in files),
            "user's pool dir gone": not (root / "pool").exists(),
        }, f"exit {code}; ops {ops}; {json.dumps(out)[:800]}")


def _read_at(path: str, offset: int, n: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return os.pread(fd, n, offset)
    finally:
        os.close(fd)


# -- the user's half (runs as the unprivileged user) -----------------------------------------


def user_create(root: Path, volume_id: str, src: Path) -> tuple[Any, dict[str, Any]]:
    from builder import helperclient as client
    from builder.pool import init_pool
    from helper.storage import dmthin_core as core

    root.mkdir()
    pool = init_pool(root, backend="dm-thin", size=POOL_SIZE)
    pool.import_volume(volume_id, src)
    snap = pool.create_snapshot(volume_id, size=BIG_SIZE)
    info = sh("dumpe2fs", "-h", snap.path)  # as this user: its own device node
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    out: dict[str, Any] = {"snapshot": snap.summary(), "uid": os.getuid(),
                           "ext4_bytes": int(fields["Block count"]) * int(fields["Block size"])}
    fd = os.open(snap.path, os.O_RDWR)  # what the VMM does
    try:
        os.pwrite(fd, MARK, BIG_SIZE - MIB)
        os.fsync(fd)
    finally:
        os.close(fd)
    key = core.root_key(str(client.area(root)))
    try:
        os.close(os.open(f"/dev/mapper/{core.pool_name(key)}", os.O_RDONLY))
        out["pool_open"] = "opened"
    except PermissionError:
        out["pool_open"] = "EACCES"
    rec = json.loads((root / "pool/thin/volumes" / f"{volume_id[7:]}.json").read_text())
    out["base_thin_id"] = rec["thin_id"]
    return snap.id, out


def user_destroy(root: Path, snap_id: str) -> dict[str, Any]:
    from builder.pool import destroy_pool, open_pool

    pool = open_pool(root)
    assert pool is not None
    pool.remove_snapshot(snap_id)
    left = [s.id for s in pool.list_snapshots()]
    return {"snapshots_left": left, "destroyed": destroy_pool(root)}


def user_main(root: Path, volume_id: str, src: Path) -> int:
    try:
        snap_id, out = user_create(root, volume_id, src)
    except Exception as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        raise
    print(json.dumps(out), flush=True)
    sys.stdin.readline()  # the root side has looked
    try:
        print(json.dumps(user_destroy(root, snap_id)), flush=True)
    except Exception as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        raise
    return 0


if __name__ == "__main__":
    if (HERE / "helper").is_dir():
        sys.path[:0] = [str(HERE), str(HERE / "site-packages")]
    sys.exit(user_main(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])))
