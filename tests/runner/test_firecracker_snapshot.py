"""Warm start on the real Firecracker 1.12.1 under its jailer: kiln's snapshot bodies
(``runner.vmm.fcsnapshot``) are answered with state or file errors, never a
deserialisation error, and a jailed save → restore round trip works at the VMM level.

The guest does not boot on these machines (no usable KVM), but Firecracker's own state
machine runs: InstanceStart, pause, snapshot/create, and snapshot/load into a fresh jail.
Every test ends with nothing left (``assert_gone``).
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest

from helper.jail import jailer as jail
from runner.vmm import fcapi as fc
from runner.vmm import fcsnapshot as fcs
from tests.runner import test_firecracker_real as real
from tests.runner.test_fcsnapshot import check_against_spec
from tests.support.firecracker import load_swagger

pytestmark = [pytest.mark.firecracker, pytest.mark.root]

# The real tests' fixtures: the pinned binaries, the cloud kernel, a fresh jail config.
binaries = real.binaries
kernel_files = real.kernel_files
env = real.env

# Answers of serde to a body it cannot take: none of these may ever come back.
DESERIALISATION = ("unknown field", "missing field", "invalid type", "unknown variant",
                   "Invalid request body", "deserializing", "too many fields")
NOT_STARTED = "The requested operation is not supported before starting the microVM."
LOAD_ERROR = ("Load snapshot error: Failed to restore from snapshot: Failed to get snapshot "
              "state from file: Failed to load snapshot state from file: ")


def answer(vm: fc.FirecrackerVM, r: fcs.ApiRequest) -> tuple[int, str | None]:
    """(status, fault_message) for a request checked against 1.12.1's definition first."""
    check_against_spec(load_swagger(), r)
    status, data = vm.client(timeout=30.0).request(r.method, r.path, r.body)
    fault = data.get("fault_message") if isinstance(data, dict) else None
    assert not any(m in (fault or "") for m in DESERIALISATION), fault
    return status, fault


def test_pause_and_snapshot_create_on_a_configured_vm_are_state_errors(
        env: jail.JailConfig, kernel_files: dict[str, Path]) -> None:
    vm = real.make_vm(env, kernel_files, "fcsnapa")
    try:
        vm.launch()
        vm.configure()
        for r in (fcs.vm_state_request("Paused"), fcs.vm_state_request("Resumed"),
                  fcs.snapshot_create_request(f"/{fcs.STATE}", f"/{fcs.MEM}")):
            assert answer(vm, r) == (400, NOT_STARTED), r
        with pytest.raises(fc.ApiError) as e:
            vm.pause()
        assert e.value.message == f"Firecracker refused PATCH /vm (400): {NOT_STARTED}"
        with pytest.raises(fc.ApiError) as e:
            vm.snapshot_create(f"/{fcs.STATE}", f"/{fcs.MEM}")
        assert e.value.message == \
            f"Firecracker refused PUT /snapshot/create (400): {NOT_STARTED}"
        # The markers are real: a field 1.12.1 lacks is a deserialisation error.
        bad = {**fcs.snapshot_load_request("/s", "/m").body, "vsock_override": {}}
        status, data = vm.client().request("PUT", "/snapshot/load", bad)
        assert status == 400
        assert "unknown field `vsock_override`, expected one of `snapshot_path`, " \
            "`mem_file_path`, `mem_backend`, `enable_diff_snapshots`, `resume_vm`, " \
            "`network_overrides`" in data["fault_message"]
        assert any(m in data["fault_message"] for m in DESERIALISATION)
        assert vm.client().get("/")["state"] == "Not started"  # nothing changed
        assert not (vm.chroot / fcs.STATE).exists()
        pid = vm.pid
    finally:
        vm.destroy()
    real.assert_gone(env, vm, pid)


def _saved_files(env: jail.JailConfig, state: bytes, mem: bytes) -> tuple[Path, Path]:
    """A warm image's two files as the caller keeps them: its own, 0600."""
    d = env.sources[0] / "warm"
    d.mkdir(mode=0o700, exist_ok=True)
    paths = (d / "vm.state", d / "vm.mem")
    for p, data in zip(paths, (state, mem), strict=True):
        p.write_bytes(data)
        p.chmod(0o600)
    return paths


@pytest.mark.parametrize(("state", "fault"), [
    (b"", LOAD_ERROR + "Snapshot file is smaller than CRC length."),
    (b"not a firecracker snapshot\n" * 200, LOAD_ERROR + "CRC64 validation failed: "),
])
def test_snapshot_load_of_a_bad_state_file_is_a_file_error(
        env: jail.JailConfig, kernel_files: dict[str, Path], state: bytes, fault: str) -> None:
    vm = real.make_vm(env, kernel_files, "fcsnapb",
                      restore=_saved_files(env, state, b"\0" * 65536))
    try:
        vm.launch()
        # Staged read-only for the VM: root's private copies its gid reads (the caller's
        # 0600 files are never chowned or linked).
        for name in (fcs.STATE, fcs.MEM):
            st = os.stat(vm.chroot / name)
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_nlink) == \
                (0, real.UID, 0o440, 1), name
        assert not (vm.chroot / fc.KERNEL).exists()  # a restore stages no kernel
        logger = fc.api_requests(vm.plan.vm)[0]
        assert answer(vm, logger) == (204, None)
        status, got = answer(vm, fcs.snapshot_load_request(f"/{fcs.STATE}", f"/{fcs.MEM}"))
        assert status == 400
        assert got is not None
        assert got.startswith(fault), got
        assert got[len(fault):].isdigit() if fault.endswith(": ") else got == fault
        assert vm.wait(10.0)  # 1.12.1 exits after a failed load
        pid = vm.pid
    finally:
        vm.destroy()
    real.assert_gone(env, vm, pid)


def test_restore_raises_the_load_error(env: jail.JailConfig,
                                       kernel_files: dict[str, Path]) -> None:
    vm = real.make_vm(env, kernel_files, "fcsnapc", restore=_saved_files(env, b"", b""))
    try:
        with pytest.raises(fc.ApiError) as e:
            vm.restore()
        assert e.value.message == ("Firecracker refused PUT /snapshot/load (400): "
                                   f"{LOAD_ERROR}Snapshot file is smaller than CRC length.")
        pid = vm.pid
    finally:
        vm.destroy()
    real.assert_gone(env, vm, pid)


def _save(env: jail.JailConfig, kernel_files: dict[str, Path], out: Path) -> dict[str, Any]:
    """Start a VM, refuse an unpaused snapshot, pause, snapshot into the chroot; copy the
    files and the disk out (the caller's, 0600) and tear the VM down."""
    vm = real.make_vm(env, kernel_files, "fcsnapd", mem_mib=128)
    try:
        vm.start()
        create = fcs.snapshot_create_request(f"/{fcs.STATE}", f"/{fcs.MEM}")
        assert answer(vm, create) == (400, "Create snapshot error: Cannot save the microVM "
                                      "state: Operation not allowed: save/restore "
                                      "unavailable while running")
        vm.pause()
        assert vm.client().get("/")["state"] == "Paused"
        # A file error (the jailer's /run is a directory), and the VM stays paused.
        assert answer(vm, fcs.snapshot_create_request("/run", f"/{fcs.MEM}")) == (
            400, "Create snapshot error: Cannot perform open on the snapshot backing file: "
            "Is a directory (os error 21)")
        vm.snapshot_create(f"/{fcs.STATE}", f"/{fcs.MEM}")
        files = {}
        for name in (fcs.STATE, fcs.MEM):
            st = os.stat(vm.chroot / name)
            assert (st.st_uid, st.st_gid) == (real.UID, real.UID), name  # Firecracker's
            files[name] = out / name
            shutil.copyfile(vm.chroot / name, files[name])
            files[name].chmod(0o600)
        assert os.path.getsize(files[fcs.MEM]) == 128 << 20
        info: dict[str, Any] = vm.client().get("/vm/config")
        pid = vm.pid
    finally:
        vm.destroy()
    real.assert_gone(env, vm, pid)
    disk = env.sources[0] / "restored.ext4"  # the disk copy paired with the state
    shutil.copyfile(env.sources[0] / "snap.ext4", disk)
    return {"state": files[fcs.STATE], "mem": files[fcs.MEM], "disk": disk, "config": info}


def test_jailed_save_and_restore_round_trip(env: jail.JailConfig,
                                            kernel_files: dict[str, Path]) -> None:
    out = env.sources[0] / "warm"
    out.mkdir(mode=0o700)
    saved = _save(env, kernel_files, out)
    plan = fc.launch_plan(env, vm_id="fcsnape", uid=real.UID, kernel=kernel_files["kernel"],
                          rootfs=saved["disk"], restore=(saved["state"], saved["mem"]))
    vm = fc.FirecrackerVM(env, real.InProcessOps(env), plan)
    steps: list[str] = []
    vm.on_step = steps.append
    try:
        assert vm.restore()["state"] == "Paused"
        assert steps == ["cgroup", "jail", "launch", "api", "restore"]
        assert vm.client().get("/vm/config")["machine-config"]["mem_size_mib"] == 128
        vm.resume()
        assert vm.client().get("/")["state"] == "Running"
        pid = vm.pid
    finally:
        vm.destroy()
    real.assert_gone(env, vm, pid)
