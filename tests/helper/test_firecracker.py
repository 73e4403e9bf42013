"""Firecracker through kiln-helper: an unprivileged user drives the real v1.12.1 jailer.

The user runs ``runner.vmm.fcapi.FirecrackerVM`` with ``builder.helperclient.HelperOps``: every
privileged step (cgroup-create, jail-stage, jail-launch, jail-grant-api, cgroup-kill,
jail-remove) goes through ``sudo kiln-helper``; the API round-trip happens as the user, on
the socket the helper granted. Guests do not boot here (no usable KVM), so this stops
after the configuration round-trip, like tests/runner/test_firecracker_real.py.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.firecracker import BIN_DIR, helper_config, helper_kernel
from tests.support.oci import User, run_as
from tests.support.sudo import BASE, _audit_len, _ops_ran, _write_config, cgroup_parent

pytestmark = [pytest.mark.firecracker, pytest.mark.root]


@pytest.fixture
def fc_config(sudo_user: User) -> Iterator[dict[str, str]]:
    src = BASE / "src"
    vmlinux = helper_kernel(src)
    # A writable disk is only the caller's own snapshot, shaped as the pool makes it:
    # <area>/pool/fs/snapshots/<id>.ext4, the caller's, 0600, in root-owned 0711 directories.
    snaps = BASE / "users" / str(sudo_user.uid) / "pool/fs/snapshots"
    snaps.mkdir(mode=0o711, parents=True, exist_ok=True)
    for d in (snaps, snaps.parent, snaps.parent.parent):
        d.chmod(0o711)
    snaps.parent.parent.parent.chmod(0o755)  # the area, as the helper makes it
    snap = snaps / f"{''.join(secrets.choice('abcdefgh') for _ in range(8))}.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "fchelper", str(snap), "32M"], check=True)
    os.chown(snap, sudo_user.uid, sudo_user.gid)
    snap.chmod(0o600)
    try:
        with cgroup_parent("kilnhtest") as parent:
            _write_config(helper_config(src, parent))
            yield {"kernel": str(vmlinux), "rootfs": str(snap), "parent": parent,
                   "base": str(BASE / "jails")}
    finally:
        snap.unlink(missing_ok=True)


SCRIPT = """
import json, sys
from pathlib import Path
from helper import cgroup as cg
from builder import helperclient as client
from helper.jail import jailer as jail
from runner.vm import cgroup as vmcgroup
from runner.vmm import fcapi as fc
a = json.loads(sys.argv[1])
cfg = jail.JailConfig(jailer=Path(a["bin"]) / "jailer",
                      firecracker=Path(a["bin"]) / "firecracker",
                      chroot_base=Path(a["base"]), sources=(Path(a["rootfs"]).parent,),
                      cgroup=cg.CgroupConfig(parent=a["parent"]))
# The cgroup version and limits kiln itself would use (a sudo caller's need a memory limit).
version, limits = vmcgroup.host_firecracker_choice(cfg.cgroup, 1, 256 << 20)
plan = fc.launch_plan(cfg, vm_id=a["vm"], uid=900321, kernel=Path(a["kernel"]),
                      rootfs=Path(a["rootfs"]), cgroup_version=version, limits=limits)
vm = fc.FirecrackerVM(cfg, client.HelperOps(), plan)
try:
    info = vm.launch()
    got = vm.configure()
    sock = vm.sock
    pid = vm.pid
finally:
    vm.destroy()
print(json.dumps({"info": info, "config": got, "sock": str(sock), "pid": pid}))
"""


@pytest.mark.slow
def test_jail_ops_through_the_helper_with_the_real_binaries(
        sudo_user: User, fc_config: dict[str, str]) -> None:
    vm_id = "h" + "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz234567") for _ in range(9))
    start = _audit_len()
    res = run_as(sudo_user, [sys.executable, "-c", SCRIPT, json.dumps(
        {**fc_config, "bin": str(BIN_DIR), "vm": vm_id})], cwd=Path("/"))
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["info"]["state"] == "Not started"
    assert out["config"]["machine-config"]["vcpu_count"] == 1
    assert out["config"]["drives"][0]["path_on_host"] == "/rootfs.ext4"
    assert out["sock"] == f"{fc_config['base']}/firecracker/{vm_id}/api.sock"
    assert not Path(f"/proc/{out['pid']}/exe").exists()
    assert not (BASE / "jails" / "firecracker" / vm_id).exists()
    ran = [op for op, outcome in _ops_ran(sudo_user.uid, start) if outcome == "ok"]
    assert ran == ["cgroup-create", "jail-stage", "jail-launch", "jail-grant-api",
                   "cgroup-kill", "jail-remove"]
