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
from pathlib import Path
from typing import Any

import pytest

from builder.demoimage import make_busybox_image
from tests.support.oci import User, give_to, run_as
from tests.support.sudo import (
    BASE,
    GOOD_CONFIG,
    TEST_CONFIG,
    _audit_len,
    _ops_ran,
    _write_config,
    helper_as,
    host_state,
    kiln_as,
    loop_table,
)

pytestmark = pytest.mark.root


# -- hostile requests through sudo ---------------------------------------------------------

HOSTILE_SUDO: list[tuple[str, Any, int]] = [
    ("pool-create", {"image": "../../../../etc/shadow", "size": 1 << 28, "fs": "btrfs"}, 2),
    ("pool-mount", {"mountpoint": "/etc"}, 2),
    ("pool-mount", {}, 1),  # no pool
    ("pool-umount", {}, 1),
    ("snapshot-create", {"volume": "sha256:" + "0" * 64, "snapshot": "-f"}, 2),
    ("snapshot-remove", {"snapshot": "nosuch"}, 1),
    ("loop-attach", {"image": "pool/pool.img"}, 2),  # no such op any more
    ("loop-detach", {"device": "/dev/loop0"}, 2),
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
    ("volume-import", {"volume": "sha256:" + "0" * 64, "fd": 3}, 1),
    ("area", {"extra": True}, 2),
    ("area", "not json", 2),
    ("--version", {}, 2),
    ("mount", {}, 2),
]


@pytest.mark.slow
def test_hostile_requests_through_sudo_change_nothing(sudo_user: User) -> None:
    helper_as(sudo_user, "area", {})  # the area exists before the snapshot is taken
    helper_as(sudo_user, "cgroup-kill", {"vm": "nosuchvm", "version": 2})  # and the lock
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
    for user in (sudo_user, None):  # both areas exist before the snapshot is taken
        helper_as(user, "area", {})
    env = {"PYTHONPATH": str(evil), "PATH": f"{evil}:/usr/bin:/bin",
           "LD_PRELOAD": str(evil / "evil.so"), "PYTHONSTARTUP": str(evil / "pydantic.py"),
           "PYTHONHOME": str(evil)}
    before = host_state()
    for user in (sudo_user, None):  # through sudo, and run by root with the env kept
        res = helper_as(user, "reclaim", {"keep": []}, env=env)  # runs losetup
        assert res.returncode == 0, res.stderr
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
        assert helper_as(sudo_user, "loop-detach", {"device": dev}).returncode == 2
        assert helper_as(sudo_user, "reclaim", {}).returncode == 0
        assert host_state() == before
        assert (dev, str(img)) in loop_table()
    finally:
        subprocess.run(["losetup", "--detach", dev], check=False)


# -- the whole flow as an ordinary user -------------------------------------------------------



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
    assert (vol_file.stat().st_uid, vol_file.stat().st_mode & 0o777) == (0, 0o400)
    snap = json.loads(kiln_as(user, root, "snapshot", "create", vol, "--json").stdout)
    assert snap["path"] == f"{area}/pool/fs/snapshots/{snap['id']}.ext4"
    st_snap = os.stat(snap["path"])  # cloned by the helper, handed to the user
    assert (st_snap.st_uid, st_snap.st_mode & 0o777, st_snap.st_nlink) == (user.uid, 0o600, 1)

    # No directory of the area is the user's: nothing can be planted or linked there.
    snaps = area / "pool" / "fs" / "snapshots"
    before = host_state()
    assert run_as(user, ["ln", "-s", "/etc", str(snaps / "evil")], check=False).returncode
    assert run_as(user, ["ln", snap["path"], str(snaps / "hard.ext4")],
                  check=False).returncode
    fd_lie = helper_as(user, "volume-import", {"volume": vol, "fd": 3})
    assert fd_lie.returncode == 1  # no fd 3 passed
    assert host_state() == before

    kiln_as(user, root, "snapshot", "rm", snap["id"])
    assert not os.path.exists(snap["path"])
    kiln_as(user, root, "pool", "destroy")
    assert not (area / "pool" / "pool.img").exists()
    assert not any(str(area) in m for m in host_state()["mounts"])
    ran = _ops_ran(user.uid, start)
    ok = [op for op, outcome in ran if outcome == "ok"]
    for op in ("area", "pool-create", "volume-import", "snapshot-create", "snapshot-remove",
               "pool-destroy"):
        assert op in ok, ran
    assert ok.index("pool-create") < ok.index("volume-import") < ok.index("snapshot-create") \
        < ok.index("snapshot-remove") < ok.index("pool-destroy")
