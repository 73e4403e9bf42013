"""Warm start on Firecracker (runner/vmm/fcwarm.py) with the real jailed 1.12.1.

Here no guest runs (paravirtual KVM), so the hello cannot come; ``fcwarm.save_paused`` —
everything of a save after the hello — runs for real on a started VM with the vsock
device: pause, disk copy, ``snapshot/create`` into the chroot, both files out of the jail
(``jail_export``: new files of the caller, 0600), then a fresh jail gets them back in
(``jail_import``: root's 0440 copies), loads them and resumes. Nothing fakes a guest. The
whole ``kiln warm create`` / ``kiln run --warm`` path boots a guest: the ``kvm`` tests at
the end, skipped where the probe fails.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from helper.jail import jailer as jail
from runner.guest_init import vsock
from runner.vm.spec import WarmPlan
from runner.vmm import fcapi as fc
from runner.vmm import fcsnapshot as fcs
from runner.vmm import fcwarm
from tests.runner import test_firecracker_real as real
from tests.runner import test_run_firecracker as fcrun
from tests.runner.test_firecracker_snapshot import answer

pytestmark = [pytest.mark.firecracker, pytest.mark.root]

binaries = real.binaries
kernel_files = real.kernel_files
env = real.env
world = fcrun.world  # a kiln root, its pool and volume, the trusted test config
kiln = fcrun.kiln


def test_vsock_device_is_configured_granted_and_speaks_firecrackers_handshake(
        env: jail.JailConfig, kernel_files: dict[str, Path]) -> None:
    vm = real.make_vm(env, kernel_files, "fcwarma", vsock=fcwarm.VSOCK)
    try:
        vm.launch()
        got = vm.configure()  # PUT /vsock accepted (204), then shown as sent
        assert got["vsock"] == {"guest_cid": 3, "uds_path": "/v.sock"} | \
            {k: v for k, v in got["vsock"].items() if k not in ("guest_cid", "uds_path")}
        assert vm.vsock == jail.jail_dir(env, "fcwarma") / "vsock.sock"
        st, inner = os.lstat(vm.vsock), os.lstat(vm.chroot / vsock.UDS)
        assert stat.S_ISSOCK(st.st_mode)
        assert (st.st_ino, st.st_uid, stat.S_IMODE(st.st_mode)) == (inner.st_ino, 0, 0o600)
        vm.client(timeout=10.0).action("InstanceStart")
        # Firecracker's side of the handshake, for real: it takes the connection and the
        # CONNECT line, and forwards it to the guest — which never runs here, so no "OK"
        # and no close comes (a running guest without a listener answers with a reset and
        # Firecracker closes): the client gives an attempt RETRY_AFTER s, then retries.
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(1.0)
        s.connect(str(vm.vsock))
        s.sendall(f"CONNECT {vsock.PORT}\n".encode())
        with pytest.raises(TimeoutError):
            s.recv(64)
        s.close()
        sender = vsock.VsockSender(vm.vsock, None)
        for _ in range(20):
            sender.pump()
            time.sleep(0.02)
        assert (sender.heard, sender.failed) == (False, None)
        sender.close()
        pid = vm.pid
    finally:
        vm.destroy()
    real.assert_gone(env, vm, pid)


def test_save_paused_export_import_load_resume(env: jail.JailConfig,
                                               kernel_files: dict[str, Path]) -> None:
    work = env.sources[0] / "work"
    work.mkdir(mode=0o700)
    plan = WarmPlan("save", work / "state", work / "disk", work / "mem")
    vm = real.make_vm(env, kernel_files, "fcwarmb", mem_mib=128, vsock=fcwarm.VSOCK)
    try:
        vm.start()
        fcwarm.save_paused(vm, plan)
        assert vm.client().get("/")["state"] == "Paused"
        pid = vm.pid
    finally:
        vm.destroy()
    real.assert_gone(env, vm, pid)
    for p in (plan.state, plan.mem, plan.disk):
        st = os.stat(p)
        assert (st.st_uid, stat.S_IMODE(st.st_mode), st.st_nlink) == (0, 0o600, 1), p
    assert plan.mem is not None
    assert os.path.getsize(plan.mem) == 128 << 20
    assert plan.disk.read_bytes() == (env.sources[0] / "snap.ext4").read_bytes()
    clone = env.sources[0] / "clone.ext4"
    shutil.copyfile(plan.disk, clone)
    rplan = fc.launch_plan(env, vm_id="fcwarmc", uid=real.UID, kernel=kernel_files["kernel"],
                           rootfs=clone, restore=(plan.state, plan.mem), vsock=fcwarm.VSOCK)
    vm2 = fc.FirecrackerVM(env, real.InProcessOps(env), rplan)
    try:
        info = vm2.restore(resume=True)
        assert info["state"] == "Running"
        for name in (fcs.STATE, fcs.MEM):
            st = os.stat(vm2.chroot / name)
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, real.UID, 0o440)
        assert vm2.vsock is not None
        assert stat.S_ISSOCK(os.lstat(vm2.vsock).st_mode)  # the saved device, rebound
        pid = vm2.pid
    finally:
        vm2.destroy()
    real.assert_gone(env, vm2, pid)


def test_load_with_resume_and_network_overrides_is_a_file_error(
        env: jail.JailConfig, kernel_files: dict[str, Path]) -> None:
    d = env.sources[0] / "bad"
    d.mkdir(mode=0o700)
    (d / "s").write_bytes(b"")
    (d / "m").write_bytes(b"")
    vm = real.make_vm(env, kernel_files, "fcwarmd", restore=(d / "s", d / "m"))
    try:
        vm.launch()
        status, fault = answer(vm, fcs.snapshot_load_request(
            f"/{fcs.STATE}", f"/{fcs.MEM}", resume=True, taps=(("eth0", "kt-nosuchtap"),)))
        assert status == 400
        assert fault is not None
        assert fault.startswith("Load snapshot error: Failed to restore from snapshot:"), fault
        pid = vm.pid
    finally:
        vm.destroy()
    real.assert_gone(env, vm, pid)


# -- the whole path: needs a guest (KVM) --------------------------------------------------------



@pytest.mark.kvm
@pytest.mark.slow
def test_warm_create_and_run_echo(world: dict[str, Any]) -> None:
    """`kiln warm create --vmm firecracker` boots to the hello over vsock and saves;
    `kiln run --warm --vmm firecracker -- echo X` restores it, sends SET1 over vsock and
    the workload's output comes back; the image's files are 0600."""
    root = world["root"]
    made = kiln(root, "warm", "create", "--vmm", "firecracker", "--memory", "256M", "--json",
                world["volume"], timeout=300)
    assert made.returncode == 0, made.stderr
    rec = json.loads(made.stdout)
    assert rec["vmm"] == "firecracker"
    d = root / "warm" / rec["id"]
    for name in ("state", "mem", "disk", "warm.json"):
        assert stat.S_IMODE(os.stat(d / name).st_mode) == 0o600, name
    res = kiln(root, "run", "--warm", "--rm", "--vmm", "firecracker", "--memory", "256M",
               world["volume"], "--", "echo", "X", timeout=300)
    assert (res.returncode, res.stdout) == (0, "X\n"), res.stderr
    assert "booting cold" not in res.stderr
    assert "making one" not in res.stderr
