"""Firecracker warm start with ``--net tap`` (runner/vmm/fcwarm.py) against the real jailed
1.12.1 on a real kiln network inside a namespace the test creates.

No guest runs here (paravirtual KVM: no hello), so the save is ``fcwarm.save_paused`` on
a started VM whose eth0 is on the save VM's own tap (``runner.network.attach`` through
the helper's ops in-process, ``tests.support.net.caller``); the VM's network goes as a
``--rm`` run's does. Each restore then gets a network of its own the same way, in a fresh
jail whose Firecracker the jailer starts in the tap's namespace, and ``snapshot/load``
moves the saved NIC onto the clone's tap (``network_overrides``). Checked: the load is
accepted and the VM Running, Firecracker in the clone's namespace, two clones at once
with distinct taps, MACs and addresses, the ``SET1`` each clone would be sent carrying
its own MAC, address, gateway and name servers, a load that names no tap or a missing
one refused (why ``--net none`` cannot restore a NIC image: images are per network
mode), and afterwards the namespace, VM namespaces and lease book exactly as before.
The guest's side (it sets that MAC and address, answers on it): the ``kvm`` test in
tests/e2e/test_net_run_fcwarm.py, skipped here.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from helper.jail import jailer as jail
from helper.net import core as nc
from runner import guest_init, network
from runner.guest_init import Workload, channel
from runner.guest_init.channel import GuestNet
from runner.vm.spec import WarmPlan
from runner.vmm import fcapi as fc
from runner.vmm import fcsnapshot as fcs
from runner.vmm import fcwarm
from runner.vmm import firecracker as fcd
from tests.runner import test_firecracker_real as real
from tests.runner.test_channel import decode_settings
from tests.runner.test_firecracker_snapshot import answer
from tests.support.net import ROOT_A, assert_host_clean, caller, cfg, ns, snapshot, vm_id

pytestmark = [pytest.mark.firecracker, pytest.mark.root, pytest.mark.slow]
__all__ = ["ns"]  # the fixture

binaries = real.binaries
kernel_files = real.kernel_files
env = real.env
DNS = ["192.0.2.53"]
WORK = Workload(("echo", "hi"), (("PATH", "/bin"),), "/", "0:0", "clone")


def _plan(env: jail.JailConfig, kernel_files: dict[str, Path], vm: str, uid: int,
          vn: network.VmNet, rootfs: Path, warm: WarmPlan) -> fc.FirecrackerVM:
    """The VM as ``FirecrackerDriver._make`` makes it for a warm run on ``vn``: eth0 on
    the VM's tap, the jailer in its namespace, the warm launch's vsock, command line and
    saved files (no lease words on the command line: the key's is fixed)."""
    w = fcd._warm_launch(warm)
    plan = fc.launch_plan(env, vm_id=vm, uid=uid, kernel=kernel_files["kernel"],
                          initrd=kernel_files["initrd"], rootfs=rootfs, mem_mib=128,
                          boot_args=" ".join((fcd.BOOT_ARGS, f"init={guest_init.INIT_PATH}",
                                              *w["args"])),
                          nets=(vn.firecracker_nic(),), netns=vn.spawn_netns,
                          vsock=w["vsock"], restore=w["restore"])
    return fc.FirecrackerVM(env, real.InProcessOps(env), plan)


def _netns_ino(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def _sent(s: channel.Settings | None) -> dict[str, list[str]]:
    """The ``SET1`` payload the run's ``VsockSender`` would send for ``s``, decoded by the
    tests' own oracle."""
    assert s is not None
    tag, payload, rest = channel.decode_frame(
        channel.encode_settings(s, time_ns=1, seed=bytes(channel.SEED_BYTES)))
    assert (tag, rest) == (channel.SETTINGS, b"")
    return decode_settings(payload)


def _save(env: jail.JailConfig, kernel_files: dict[str, Path], call: network.Call
          ) -> tuple[WarmPlan, str]:
    """A NIC image: a VM on its own tap, started, saved and destroyed; its network taken
    off again (what a ``--rm`` save run's end does). Returns the plan and its tap."""
    work = env.sources[0] / "work"
    work.mkdir(mode=0o700)
    plan = WarmPlan("save", work / "state", work / "disk", work / "mem")
    save = vm_id()
    vn = network.attach(call, save, ROOT_A, real.UID, real.UID)
    vm = _plan(env, kernel_files, "fcwnsave", real.UID, vn, env.sources[0] / "snap.ext4", plan)
    try:
        vm.start()
        assert vm.pid is not None
        assert _netns_ino(vm.pid) == os.stat(f"/run/netns/{vn.spawn_netns}").st_ino
        got = vm.client().get("/vm/config")["network-interfaces"]
        assert [(n["iface_id"], n["host_dev_name"], n["guest_mac"]) for n in got] == [
            ("eth0", vn.tap, vn.mac)]
        fcwarm.save_paused(vm, plan)
        pid = vm.pid
    finally:
        vm.destroy()
    real.assert_gone(env, vm, pid)
    assert network.detach(call, save)[-1] == "net-release"
    return plan, vn.tap


@pytest.mark.parametrize("isolation", ["none", "netns"])
def test_two_restores_of_a_nic_image_get_their_own_taps_and_leases(
        env: jail.JailConfig, kernel_files: dict[str, Path], ns: str, isolation: str) -> None:
    call = caller(cfg(ns, isolation=isolation, dns=DNS))
    before = snapshot(ns)
    plan, save_tap = _save(env, kernel_files, call)
    assert plan.mem is not None
    restore = WarmPlan("restore", plan.state, plan.disk, plan.mem)
    clones: list[tuple[fc.FirecrackerVM, network.VmNet, int]] = []
    nets: list[network.VmNet] = []
    try:
        for i in range(2):  # both run at once
            cid = vm_id()
            vn = network.attach(call, cid, ROOT_A, real.UID + 1 + i, real.UID + 1 + i)
            nets.append(vn)
            disk = env.sources[0] / f"clone{i}.ext4"
            shutil.copyfile(plan.disk, disk)
            vm = _plan(env, kernel_files, "fcwnc" + "ab"[i], real.UID + 1 + i, vn, disk, restore)
            info = vm.restore(resume=True)  # PUT /snapshot/load with network_overrides
            assert info["state"] == "Running"
            assert vm.pid is not None
            clones.append((vm, vn, vm.pid))
            assert _netns_ino(vm.pid) == os.stat(f"/run/netns/{vn.spawn_netns}").st_ino
            assert vm.client().get("/")["state"] == "Running"
            # the guest is told its own eth0: the saved NIC still has the save VM's MAC
            s = fcwarm.settings(restore, WORK, vn)
            assert s is not None
            assert s.net == vn.guest() == GuestNet(nc.mac_for(cid),
                                                   f"{vn.guest_ip}/{vn.prefix}",
                                                   vn.gateway, tuple(DNS))
            sent = _sent(s)
            assert (sent["mac"], sent["ip"], sent["gw"], sent["dns"]) == (
                [vn.mac], [f"{vn.guest_ip}/{vn.prefix}"], [vn.gateway], DNS)
        (_, a, _), (_, b, _) = clones
        assert len({a.tap, b.tap, save_tap}) == 3
        assert a.mac != b.mac
        assert a.ip != b.ip
        if isolation == "none":  # with netns both guests hold 172.16.0.2 behind their veth
            assert a.guest_ip != b.guest_ip
        else:
            assert a.netns != b.netns
    finally:
        for vm, _, pid in clones:
            vm.destroy()
            real.assert_gone(env, vm, pid)
        for vn in nets:
            network.detach(call, vn.vm_id)
    caller(cfg(ns))("bridge-remove", {})
    assert snapshot(ns) == before
    assert_host_clean(save_tap, *(vn.tap for vn in nets))


def test_a_nic_image_does_not_load_without_a_tap(
        env: jail.JailConfig, kernel_files: dict[str, Path], ns: str) -> None:
    """Why ``--net none`` cannot restore an image with a NIC: a load without
    ``network_overrides`` opens the saved tap (gone with the save VM), one naming a tap the
    namespace lacks is refused too; Firecracker ends either way. Hence images per network
    mode (``fcwarm.devices``)."""
    call = caller(cfg(ns))
    before = snapshot(ns)
    plan, save_tap = _save(env, kernel_files, call)
    assert plan.mem is not None
    for taps in ((), (("eth0", "kt-nosuchtap"),)):
        disk = env.sources[0] / "clone.ext4"
        shutil.copyfile(plan.disk, disk)
        rplan = fc.launch_plan(env, vm_id="fcwnbad", uid=real.UID, kernel=kernel_files[
            "kernel"], rootfs=disk, restore=(plan.state, plan.mem), vsock=fcwarm.VSOCK,
            netns=ns)
        vm = fc.FirecrackerVM(env, real.InProcessOps(env), rplan)
        try:
            vm.launch()
            status, fault = answer(vm, fcs.snapshot_load_request(
                f"/{fcs.STATE}", f"/{fcs.MEM}", resume=True, taps=taps))
            assert status == 400
            assert fault is not None
            assert fault.startswith("Load snapshot error: Failed to restore from snapshot:"), \
                fault
            # the saved NIC's tap (the save VM's, gone), or the override's
            name = taps[0][1] if taps else save_tap
            assert f"Open tap device failed: Error while creating ifreq structure: Operation " \
                f"not permitted (os error 1). Invalid TUN/TAP Backend provided by {name}." \
                in fault, fault
            pid = vm.pid
        finally:
            vm.destroy()
        real.assert_gone(env, vm, pid)
    caller(cfg(ns))("bridge-remove", {})
    assert snapshot(ns) == before
    assert_host_clean(save_tap)
