"""kiln-helper installed for real and called through sudo by an unprivileged user.

Session setup: ``scripts/install-helper`` (idempotent; this is a test machine, so the real
``/opt/kiln`` is used and left installed); ``/etc/kiln/test-config.toml`` (the one config
path the helper honours before ``config.toml``; created here, removed after) points the
helper's ``[pool] directory`` at ``/var/lib/kiln-helper-test``; a temporary sudoers file,
checked with ``visudo -cf``, lets only the test user run only the helper.

Each hostile request must exit 1 or 2 with the host unchanged: loop devices
(``losetup -J -l``), mounts, the top of every cgroup hierarchy, network devices, and the
helper's whole directory tree (names, owners, modes) are compared before and after.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from builder.demoimage import make_busybox_image
from tests.support.oci import User, give_to, run_as

REPO = Path(__file__).resolve().parent.parent
HELPER = "/opt/kiln/bin/kiln-helper"
TEST_CONFIG = Path("/etc/kiln/test-config.toml")
BASE = Path("/var/lib/kiln-helper-test")
AUDIT = Path("/var/log/kiln-helper/audit.log")
GOOD_CONFIG = f"""[pool]
directory = "{BASE}"

[jails]
chroot_base = "{BASE}/jails"
"""

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def installed() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("installing the helper needs root")
    for _ in range(2):  # idempotent: the second run must succeed and change nothing
        subprocess.run([str(REPO / "scripts/install-helper")], check=True,
                       capture_output=True, timeout=300)
    Path("/etc/kiln").mkdir(mode=0o755, exist_ok=True)
    _write_config(GOOD_CONFIG)
    try:
        yield HELPER
    finally:
        TEST_CONFIG.unlink(missing_ok=True)
        _cleanup_base()


def _write_config(text: str, mode: int = 0o644) -> None:
    TEST_CONFIG.unlink(missing_ok=True)
    tmp = TEST_CONFIG.with_name(".test-config.tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.rename(tmp, TEST_CONFIG)


def _cleanup_base() -> None:
    for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
        mp = line.split()[4]
        if mp.startswith(str(BASE) + "/"):
            subprocess.run(["umount", "--lazy", mp], check=False)
    res = subprocess.run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"],
                         capture_output=True, text=True, check=False)
    for d in json.loads(res.stdout or '{"loopdevices": []}')["loopdevices"]:
        if (d.get("back-file") or "").startswith(str(BASE) + "/"):
            subprocess.run(["losetup", "--detach", d["name"]], check=False)
    subprocess.run(["rm", "-rf", "--one-file-system", str(BASE)], check=False)


@pytest.fixture(scope="module")
def sudo_user(unprivileged_user: User, installed: str) -> Iterator[User]:
    rule = Path(f"/etc/sudoers.d/kiln-test-{unprivileged_user.name}")
    tmp = Path(f"/etc/sudoers.d/.kiln-test-{unprivileged_user.name}")
    tmp.write_text(f"{unprivileged_user.name} ALL=(root) NOPASSWD: {HELPER}\n")
    tmp.chmod(0o440)
    subprocess.run(["visudo", "-cf", str(tmp)], check=True, capture_output=True)
    os.rename(tmp, rule)
    try:
        yield unprivileged_user
    finally:
        rule.unlink(missing_ok=True)


def helper_as(user: User | None, op: str, request: dict[str, Any] | str,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed helper: as ``user`` through sudo, or as root directly."""
    payload = request if isinstance(request, str) else json.dumps(request)
    base_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}
    base_env.update(env or {})
    if user is None:
        argv = [HELPER, op]
    else:
        base_env.update({"HOME": str(user.home), "USER": user.name})
        argv = ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups",
                "--", "/usr/bin/sudo", "--non-interactive", HELPER, op]
    return subprocess.run(argv, input=payload, capture_output=True, text=True, timeout=60,
                          env=base_env, cwd="/", check=False)


def _tree(root: Path) -> list[tuple[str, int, int, int]]:
    out: list[tuple[str, int, int, int]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in sorted(dirnames + filenames):
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            out.append((p, st.st_mode, st.st_uid, st.st_size if not os.path.isdir(p) else 0))
    return sorted(out)


def _cgroup_tops() -> list[str]:
    out: list[str] = []
    for hier in Path("/sys/fs/cgroup").iterdir():
        if hier.is_dir():
            out += sorted(str(p) for p in hier.iterdir() if p.is_dir())
    return out


# Other test runs (pytest tmp dirs, benchmarks) attach and mount under /tmp concurrently;
# what they do there is not ours to compare. The foreign-loop test checks its own device.
_CONCURRENT = ("/tmp/",)


def loop_table() -> list[tuple[str, str]]:
    out = subprocess.run(["losetup", "-J", "-l"], capture_output=True, text=True,
                         check=False).stdout
    devs = json.loads(out)["loopdevices"] if out.strip() else []
    return sorted((d["name"], d.get("back-file") or "") for d in devs)


def host_state() -> dict[str, Any]:
    loops = [x for x in loop_table() if not x[1].startswith(_CONCURRENT)]
    mounts = sorted(mp for mp in (line.split()[4] for line in
                                  Path("/proc/self/mountinfo").read_text().splitlines())
                    if not mp.startswith(_CONCURRENT))
    return {"loops": loops, "mounts": mounts, "cgroups": _cgroup_tops(),
            "net": sorted(os.listdir("/sys/class/net")), "base": _tree(BASE),
            "etc": _tree(Path("/etc/kiln"))}


def _ops_ran(uid: int, since: int) -> list[tuple[str, str]]:
    lines = AUDIT.read_text().splitlines()[since:]
    recs = [json.loads(x) for x in lines]
    return [(r["op"], r["outcome"].split(":")[0]) for r in recs if r["uid"] == uid]


def _audit_len() -> int:
    return len(AUDIT.read_text().splitlines()) if AUDIT.exists() else 0


# -- hostile requests through sudo ---------------------------------------------------------

HOSTILE_SUDO: list[tuple[str, Any, int]] = [
    ("loop-attach", {"image": "../../../../etc/shadow"}, 2),
    ("loop-attach", {"image": "/etc/shadow"}, 2),
    ("loop-attach", {"image": "-f"}, 2),
    ("loop-attach", {"image": "pool\u2024img"}, 2),
    ("loop-attach", {"image": "a\nb"}, 2),
    ("loop-attach", '{"image": "a\\u0000b"}', 2),
    ("loop-attach", {"image": "nothing-here.img"}, 1),
    ("loop-detach", {"device": "/dev/loop0"}, 1),  # not backed by the caller's area
    ("loop-detach", {"device": "/dev/sda"}, 2),
    ("dm-remove", {"name": "vg0-root"}, 2),
    ("dm-remove", {"name": "kiln-00000000-pool"}, 1),  # another area's name
    ("cgroup-kill", {"vm": "systemslice", "version": 2}, 1),  # no such VM cgroup
    ("cgroup-kill", {"vm": "../../system.slice", "version": 2}, 2),
    ("cgroup-attach", {"vm": "nosuchvm", "version": 1, "pid": 2}, 1),  # no such VM cgroup
    ("cgroup-attach", {"vm": "nosuchvm", "version": 1, "pid": 1}, 2),  # never pid 1
    ("cgroup-attach", {"vm": "nosuchvm", "version": 1, "pid": 2, "path": "/"}, 2),
    ("jail-remove", {"vm": "nosuchjail"}, 1),
    ("jail-remove", {"vm": "a" * 33}, 2),
    ("tap-delete", {"name": "lo"}, 2),
    ("tap-delete", {"name": "kt-nosuch"}, 1),
    ("tap-create", {"name": "kt-uidzero", "uid": 0, "gid": 0}, 2),
    ("reclaim", {"keep": ["../x"]}, 2),
    ("volume-import", {"volume": "sha256:" + "0" * 64, "fd": 3, "directory": "pool"}, 1),
    ("area", {"extra": True}, 2),
    ("area", "not json", 2),
    ("--version", {}, 2),
    ("mount", {}, 2),
]


def test_hostile_requests_through_sudo_change_nothing(sudo_user: User) -> None:
    helper_as(sudo_user, "area", {})  # the area exists before the snapshot is taken
    before = host_state()
    for op, req, code in HOSTILE_SUDO:
        res = helper_as(sudo_user, op, req)
        assert res.returncode == code, (op, req, res.stdout, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert res.stderr.startswith("kiln-helper: ")
        assert "error" in json.loads(res.stdout)
    after = host_state()
    assert {k: v for k, v in after.items() if v != before[k]} == {}


def test_environment_injection_is_ignored(sudo_user: User, tmp_path: Path) -> None:
    evil = sudo_user.scratch / "evil"
    (evil / "helper").mkdir(parents=True, exist_ok=True)
    marker = sudo_user.scratch / "pwned"
    for f in (evil / "helper" / "__init__.py", evil / "pydantic.py"):
        f.write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    (evil / "losetup").write_text(f"#!/bin/sh\ntouch {marker}\n")
    (evil / "losetup").chmod(0o755)
    give_to(sudo_user, evil)
    helper_as(None, "area", {})  # root's area exists before the snapshot is taken
    env = {"PYTHONPATH": str(evil), "PATH": f"{evil}:/usr/bin:/bin",
           "LD_PRELOAD": str(evil / "evil.so"), "PYTHONSTARTUP": str(evil / "pydantic.py"),
           "PYTHONHOME": str(evil)}
    before = host_state()
    for user in (sudo_user, None):  # through sudo, and run by root with the env kept
        res = helper_as(user, "loop-detach", {"device": "/dev/loop0"}, env=env)
        assert res.returncode == 1, res.stderr
        assert "is not backed by a file under" in res.stderr
        assert not marker.exists()
    assert host_state() == before


# -- config trust -------------------------------------------------------------------------------


def test_config_trust_through_the_binary(installed: str) -> None:
    fake_dir = BASE / "tools"
    fake_dir.mkdir(parents=True, exist_ok=True)
    fake = fake_dir / "losetup"
    fake.write_bytes(Path("/usr/sbin/losetup").read_bytes())
    fake.chmod(0o755)
    os.chown(fake, 65534, 65534)
    cases = [
        (GOOD_CONFIG, 0o664, "refusing config /etc/kiln/test-config.toml: not a root-owned "
         "regular file writable only by root"),
        (GOOD_CONFIG + f'\n[tools]\nlosetup = "{fake}"\n', 0o644,
         f"refusing tool {fake}: not a root-owned regular file writable only by root"),
        (GOOD_CONFIG + '\n[tools]\nlosetup = "/usr/sbin/dmsetup"\n', 0o644,
         "tool losetup = '/usr/sbin/dmsetup' must be an absolute path named 'losetup'"),
    ]
    try:
        for text, mode, message in cases:
            _write_config(text, mode)
            res = helper_as(None, "loop-detach", {"device": "/dev/loop0"})
            assert res.returncode == 1
            assert message in res.stderr, res.stderr
        _write_config(GOOD_CONFIG)
        target = Path("/etc/kiln/.real-test-config.toml")
        os.rename(TEST_CONFIG, target)
        TEST_CONFIG.symlink_to(target)
        res = helper_as(None, "area", {})
        assert res.returncode == 1
        assert "refusing config /etc/kiln/test-config.toml: it is a symlink" in res.stderr
        TEST_CONFIG.unlink()
        target.unlink()
    finally:
        _write_config(GOOD_CONFIG)
    assert helper_as(None, "area", {}).returncode == 0


# -- real objects ----------------------------------------------------------------------------


def test_tap_create_and_delete(sudo_user: User) -> None:
    name = f"kt-{os.getpid() % 100000:x}".replace("0", "a").replace("1", "b")[:15]
    name = "kt-" + "".join(c if c in "abcdefghijklmnopqrstuvwxyz234567" else "z"
                           for c in name[3:])
    net = Path("/sys/class/net") / name
    try:
        # A sudo caller makes taps only through tap-attach (tagged, on the kiln bridge): a
        # bare tap could take the name another user's VM tap needs.
        refused = helper_as(sudo_user, "tap-create", {"name": name, "uid": 900123,
                                                      "gid": 900124})
        assert refused.returncode == 1
        assert f"refusing tap-create from uid {sudo_user.uid}: only root creates" in refused.stderr
        assert not net.exists()
        res = helper_as(None, "tap-create", {"name": name, "uid": 900123, "gid": 900124})
        assert res.returncode == 0, res.stderr
        assert (net / "tun_flags").exists()
        assert (net / "owner").read_text().strip() == "900123"
        assert (net / "group").read_text().strip() == "900124"
        again = helper_as(None, "tap-create", {"name": name, "uid": 900123, "gid": 900124})
        assert again.returncode == 1
        assert "already exists" in again.stderr
        # An untagged tap is nobody's: a sudo caller cannot delete it; root can.
        untagged = helper_as(sudo_user, "tap-delete", {"name": name})
        assert untagged.returncode == 1
        assert f"refusing tap {name}: kiln did not tag it" in untagged.stderr
        assert net.exists()
        assert helper_as(None, "tap-delete", {"name": name}).returncode == 0
        assert not net.exists()
        assert helper_as(None, "tap-delete", {"name": name}).returncode == 1
    finally:
        if net.exists():
            subprocess.run(["ip", "link", "delete", name], check=False)


@pytest.mark.loop
def test_foreign_loop_device_is_not_detached(sudo_user: User, tmp_path: Path) -> None:
    img = tmp_path / "foreign.img"
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    dev = subprocess.run(["losetup", "--find", "--show", str(img)], capture_output=True,
                         text=True, check=True).stdout.strip()
    try:
        before = host_state()
        res = helper_as(sudo_user, "loop-detach", {"device": dev})
        assert res.returncode == 1
        assert f"{dev} is not backed by a file under {BASE}/users/{sudo_user.uid}" in res.stderr
        assert helper_as(sudo_user, "reclaim", {}).returncode == 0
        assert host_state() == before
        assert (dev, str(img)) in loop_table()
    finally:
        subprocess.run(["losetup", "--detach", dev], check=False)


# -- the whole flow as an ordinary user -------------------------------------------------------


def kiln_as(user: User, root: Path, *args: str,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    code = ("import runpy, sys; sys.argv[0] = 'kiln'; "
            "runpy.run_module('runner', run_name='__main__')")
    return run_as(user, [sys.executable, "-c", code, "--root", str(root), *args],
                  cwd=Path("/"), check=check, timeout=300)


@pytest.mark.loop
@pytest.mark.slow
def test_build_pool_snapshot_flow_through_the_helper(sudo_user: User) -> None:
    user = sudo_user
    layout = user.scratch / "layout"
    if not layout.exists():
        make_busybox_image(layout, "1")
        give_to(user, layout)
    root = user.scratch / "root"
    start = _audit_len()
    vol = json.loads(kiln_as(user, root, "build", f"oci:{layout}:1", "--json").stdout)["id"]
    st = json.loads(kiln_as(user, root, "pool", "init", "--backend", "reflink", "--size",
                            "512M", "--json").stdout)
    assert (st["backend"], st["fs"], st["volumes"]) == ("reflink", "btrfs", 1)
    area = BASE / "users" / str(user.uid)
    vol_file = area / "pool" / "fs" / "volumes" / f"{vol[7:]}.ext4"
    assert (vol_file.stat().st_uid, vol_file.stat().st_mode & 0o777) == (0, 0o444)
    snap = json.loads(kiln_as(user, root, "snapshot", "create", vol, "--json").stdout)
    assert snap["path"] == f"{area}/pool/fs/snapshots/{snap['id']}.ext4"
    assert os.stat(snap["path"]).st_uid == user.uid  # cloned by the user, unprivileged

    # Planted links inside the one directory of the area the user may write.
    snaps = area / "pool" / "fs" / "snapshots"
    run_as(user, ["ln", "-s", "/etc", str(snaps / "evil")])
    run_as(user, ["ln", snap["path"], str(snaps / "hard.ext4")])
    before = host_state()
    for req, msg in [
        ({"image": "pool/fs/snapshots/evil/shadow"}, "is a symlink or passes through one"),
        ({"image": "pool/fs/snapshots/hard.ext4"}, "is not owned by uid 0"),
    ]:
        res = helper_as(user, "loop-attach", req)
        assert res.returncode == 1
        assert msg in res.stderr
    fd_lie = helper_as(user, "volume-import", {"volume": vol, "fd": 3,
                                               "directory": "pool/fs/snapshots"})
    assert fd_lie.returncode == 1  # no fd 3 passed (and that directory is the user's)
    assert host_state() == before
    run_as(user, ["rm", "-f", str(snaps / "evil"), str(snaps / "hard.ext4")])

    kiln_as(user, root, "snapshot", "rm", snap["id"])
    assert not os.path.exists(snap["path"])
    kiln_as(user, root, "pool", "destroy")
    assert not (area / "pool" / "pool.img").exists()
    assert not any(str(area) in m for m in host_state()["mounts"])
    ran = _ops_ran(user.uid, start)
    ok = [op for op, outcome in ran if outcome == "ok"]
    for op in ("area", "pool-image", "loop-attach", "pool-mount", "volume-import",
               "pool-remove"):
        assert op in ok, ran
    assert ok.index("pool-image") < ok.index("loop-attach") < ok.index("pool-mount") \
        < ok.index("volume-import") < ok.index("pool-remove")
