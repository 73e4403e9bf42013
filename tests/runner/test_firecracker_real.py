"""The Firecracker driver against the real v1.12.1 jailer and firecracker binaries.

Binaries come from scripts/fetch-firecracker.sh (session fixture; skipped with its reason
when the fetch fails). A guest cannot run on these machines (paravirtual KVM), so boots
are only tested where ``builder.probes.kvm()`` passes; everything up to InstanceStart —
jailer launch, API configuration round-trip, stop and teardown — runs for real here.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from helper import cgroup as cg
from helper.base.errors import Conflict
from helper.jail import jailer as jail
from runner.kernel_elf import ensure_vmlinux
from runner.vmm import fcapi as fc
from tests.support.firecracker import BIN_DIR, InProcessOps, load_swagger, validate
from tests.support.timing import limit

REPO = Path(__file__).resolve().parents[2]
UID = 900_321
CALLER = 900_777  # an unprivileged controller in some tests

pytestmark = [pytest.mark.firecracker, pytest.mark.root]


@pytest.fixture(scope="session")
def binaries() -> Path:
    return BIN_DIR


@pytest.fixture(scope="session")
def kernel_files(binaries: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    del binaries
    bz = sorted(glob.glob("/boot/vmlinuz-*-cloud-amd64"))
    if not bz:
        pytest.skip("no /boot/vmlinuz-*-cloud-amd64 (apt-get install linux-image-cloud-amd64)")
    d = tmp_path_factory.mktemp("fc-kernels")
    vmlinux = ensure_vmlinux(Path(bz[-1]), d)
    initrd = d / "initrd.img"
    shutil.copy(bz[-1].replace("vmlinuz", "initrd.img"), initrd)  # same fs as the jails
    initrd.chmod(0o644)
    return {"kernel": vmlinux, "initrd": initrd, "dir": d}


@pytest.fixture
def env(kernel_files: dict[str, Path]) -> Iterator[jail.JailConfig]:
    """A jail config in a fresh /tmp directory (searchable by other users, like the real
    jail base; same filesystem as the kernels: staging hard-links), its own cgroup parent."""
    tmp_path = Path(f"/tmp/kiln-fctest-{secrets.token_hex(4)}")
    tmp_path.mkdir(mode=0o755)
    pool = tmp_path / "pool"
    pool.mkdir()
    (tmp_path / "jails").mkdir()
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "fctest", str(pool / "snap.ext4"), "32M"],
                   check=True)
    parent = f"kilntest{secrets.token_hex(4)}"
    cfg = jail.JailConfig(
        jailer=BIN_DIR / "jailer", firecracker=BIN_DIR / "firecracker",
        chroot_base=tmp_path / "jails", uid_first=900_000, uid_count=1000,
        sources=(pool, kernel_files["dir"]), cgroup=cg.CgroupConfig(parent=parent))
    yield cfg
    lay = cg.layout(cfg.cgroup)
    for h in [lay.v2, *lay.v1.values()]:
        if h is not None and (h / parent).is_dir():
            for vm in (h / parent).iterdir():
                if vm.is_dir():  # a failed test: kill what it left
                    cg.cgroup_kill(cfg.cgroup, vm.name, 2 if h == lay.v2 else 1)
            os.rmdir(h / parent)
    shutil.rmtree(tmp_path)


def make_vm(cfg: jail.JailConfig, kernel_files: dict[str, Path], vm_id: str,
            **kw: Any) -> fc.FirecrackerVM:
    plan = fc.launch_plan(cfg, vm_id=vm_id, uid=UID, kernel=kernel_files["kernel"],
                          initrd=kernel_files["initrd"], rootfs=cfg.sources[0] / "snap.ext4",
                          **kw)
    return fc.FirecrackerVM(cfg, InProcessOps(cfg), plan)


def assert_gone(cfg: jail.JailConfig, vm: fc.FirecrackerVM, pid: int | None) -> None:
    assert pid is not None
    assert not Path(f"/proc/{pid}/exe").exists() or not os.path.exists(f"/proc/{pid}/root")
    with contextlib.suppress(FileNotFoundError):
        assert Path(f"/proc/{pid}/stat").read_text().split()[2] in ("Z", "X")
    assert not cg.cgroup_exists(cfg.cgroup, vm.plan.vm_id, vm.plan.spec.cgroup_version)
    assert not jail.jail_dir(cfg, vm.plan.vm_id).exists()


def test_launch_configure_roundtrip_and_teardown(env: jail.JailConfig,
                                                 kernel_files: dict[str, Path]) -> None:
    vm = make_vm(env, kernel_files, "fcone", cpus=2, mem_mib=192)
    steps: list[str] = []
    vm.on_step = steps.append
    try:
        info = vm.launch()
        assert info == {"id": "fcone", "state": "Not started", "vmm_version": "1.12.1",
                        "app_name": "Firecracker"}
        assert vm.pid is not None
        status = Path(f"/proc/{vm.pid}/status").read_text()
        assert f"Uid:\t{UID}\t{UID}\t{UID}\t{UID}" in status  # dropped to the VM's uid
        assert cg.cgroup_pids(env.cgroup, "fcone", 2) == [vm.pid]
        # Its root is the chroot (pivot_root: /proc/PID/root reads "/", so compare inodes).
        assert os.stat(f"/proc/{vm.pid}/root/firecracker.log").st_ino == \
            os.stat(vm.chroot / "firecracker.log").st_ino
        # Every request is schema-valid, answered 2xx, and shows up in GET /vm/config.
        swagger = load_swagger()
        client = vm.client()
        for r in fc.api_requests(vm.plan.vm):
            validate(swagger, r.definition, r.body)
            status_code, _ = client.request(r.method, r.path, r.body)
            assert 200 <= status_code < 300, r
        got = client.get("/vm/config")
        assert fc.config_mismatches(fc.expected_vm_config(vm.plan.vm), got) == []
        assert got["machine-config"]["vcpu_count"] == 2
        assert got["drives"][0]["path_on_host"] == "/rootfs.ext4"
        assert vm.configure() == got  # the driver's own check passes on the same config
        assert steps == ["cgroup", "jail", "launch", "api", "configure"]
        # 1.12.1 lacks PUT /serial: the driver must never depend on it.
        code, body = client.request("PUT", "/serial", {"serial_out_path": "/x"})
        assert code == 400
        assert "Invalid request method and/or path" in body["fault_message"]
        console = vm.console_log.read_text()
        assert "Running Firecracker v1.12.1" in console
        log = (vm.chroot / "firecracker.log").read_text()
        assert "Successfully started microvm" not in log  # not started yet
        with pytest.raises(Conflict) as e:
            jail.jail_remove(env, "fcone")
        assert e.value.message == "jail fcone still runs Firecracker"
        pid = vm.pid
    finally:
        vm.destroy()
    assert_gone(env, vm, pid)


@pytest.mark.slow
def test_instance_start_stop_kills_the_cgroup(env: jail.JailConfig,
                                              kernel_files: dict[str, Path]) -> None:
    vm = make_vm(env, kernel_files, "fctwo")
    t0 = time.monotonic()
    try:
        vm.start()  # launch + configure + InstanceStart (10 s client timeout)
        assert vm.client().get("/")["state"] == "Running"
        pid = vm.pid
        assert pid is not None
        vm.stop(timeout=1.0)  # Ctrl-Alt-Del reaches no guest here; the cgroup kill does
        assert not vm.running()
    finally:
        vm.destroy()
    assert_gone(env, vm, pid)
    assert time.monotonic() - t0 < limit(20)


def test_cgroup_v1_launch_and_freezer_kill(env: jail.JailConfig,
                                           kernel_files: dict[str, Path]) -> None:
    lay = cg.layout(env.cgroup)
    if not {"cpu", "pids", "freezer"} <= set(lay.v1):
        pytest.skip("needs cgroup v1 cpu, pids and freezer hierarchies")
    vm = make_vm(env, kernel_files, "fcthree", cgroup_version=1,
                 limits=cg.Limits(cpus=1, pids=256))
    try:
        vm.launch()
        for c in ("cpu", "pids", "freezer"):
            d = lay.v1[c] / env.cgroup.parent / "fcthree"
            assert vm.pid in [int(x) for x in (d / "cgroup.procs").read_text().split()], c
        assert (lay.v1["pids"] / env.cgroup.parent / "fcthree/pids.max").read_text() == "256\n"
        vm.configure()
        pid = vm.pid
    finally:
        vm.destroy()
    assert_gone(env, vm, pid)


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"kilnfct{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "tuntap", "add", "dev", "kfctap0", "mode", "tap",
                    "user", str(UID), "group", str(UID)], check=True)
    yield name
    subprocess.run(["ip", "netns", "delete", name], check=False)


def test_network_interface_in_a_netns(env: jail.JailConfig, kernel_files: dict[str, Path],
                                      netns: str) -> None:
    vm = make_vm(env, kernel_files, "fcfour", netns=netns, taps=["kfctap0"])
    assert jail.jailer_argv(env, vm.plan.spec)[-6:-3] == ["--netns", f"/run/netns/{netns}",
                                                          "--new-pid-ns"]
    try:
        vm.launch()
        assert os.stat(f"/proc/{vm.pid}/ns/net").st_ino == os.stat(f"/run/netns/{netns}").st_ino
        got = vm.configure()
        assert got["network-interfaces"][0]["host_dev_name"] == "kfctap0"
        validate(load_swagger(), "NetworkInterface", fc.api_requests(vm.plan.vm)[-1].body)
        pid = vm.pid
    finally:
        vm.destroy()
    assert_gone(env, vm, pid)


def _connect_as(uid: int, gid: int, path: Path) -> str:
    """In a forked child with uid/gid: GET / over ``path``; returns the state or errno."""
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # never returns
        os.close(r)
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            out = fc.ApiClient(path, 2).get("/")["state"]
        except BaseException as e:
            out = f"error {type(e).__name__}: {e}"
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    os.waitpid(child, 0)
    with os.fdopen(r) as f:
        return f.read()


def test_api_socket_belongs_to_the_caller_only(env: jail.JailConfig,
                                               kernel_files: dict[str, Path]) -> None:
    plan = fc.launch_plan(env, vm_id="fcfive", uid=UID, kernel=kernel_files["kernel"],
                          rootfs=env.sources[0] / "snap.ext4")
    ops = InProcessOps(env, caller_uid=CALLER, caller_gid=CALLER)
    vm = fc.FirecrackerVM(env, ops, plan)
    try:
        vm.launch()
        assert vm.sock is not None
        assert _connect_as(CALLER, CALLER, vm.sock) == "Not started"
        other = _connect_as(CALLER + 1, CALLER + 1, vm.sock)
        assert other.startswith("error ApiError: Firecracker API GET / failed: [Errno 13]")
        inside = _connect_as(CALLER, CALLER, vm.chroot / "run/api.sock")
        assert "[Errno 13]" in inside  # the chroot itself stays 0700 to the VM
        pid = vm.pid
    finally:
        vm.destroy()
    assert_gone(env, vm, pid)


def test_launch_failure_reports_the_jailer_error(env: jail.JailConfig,
                                                 kernel_files: dict[str, Path]) -> None:
    vm = make_vm(env, kernel_files, "fcsix")
    vm.ops.cgroup_create("fcsix", 2, cg.Limits())
    vm.ops.jail_stage("fcsix", UID, UID, vm.plan.stage, vm.plan.logs)
    # Ask the jailer for a v1 controller file under --cgroup-version 2 it cannot set.
    spec = replace(vm.plan.spec, cgroups=(("pids.max", "10"),), parent_cgroup=None)
    try:
        with pytest.raises(Exception) as e:
            jail.jail_launch(env, spec)
        assert "jailer failed" in str(e.value)
    finally:
        vm.destroy()
    assert not jail.jail_dir(env, "fcsix").exists()


@pytest.mark.kvm
@pytest.mark.slow
def test_boot_to_marker(env: jail.JailConfig, kernel_files: dict[str, Path]) -> None:
    """Only where KVM runs a guest: the kernel boots far enough to print its banner."""
    vm = make_vm(env, kernel_files, "fcboot", boot_args="console=ttyS0 reboot=k panic=-1 "
                 "pci=off rdinit=/bin/kiln-no-such-init")
    try:
        vm.start()
        deadline = time.monotonic() + limit(30)
        while time.monotonic() < deadline:
            if "Linux version" in vm.console_log.read_text(errors="replace"):
                break
            time.sleep(0.2)
        assert "Linux version" in vm.console_log.read_text(errors="replace")
    finally:
        vm.destroy()

