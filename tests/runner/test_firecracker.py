"""Firecracker driver, pure parts: launch plan (exact jailer argv), API bodies validated
against the Firecracker 1.12.1 swagger definitions (tests/data), the /vm/config comparison."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helper.base.errors import UsageError
from helper.cgroup import CgroupConfig, Limits
from helper.jail.jailer import JailConfig, jailer_argv
from runner.vmm import fcapi as fc
from tests.support.firecracker import load_swagger, validate

CFG = JailConfig(
    jailer=Path("/opt/kiln/bin/jailer"),
    firecracker=Path("/opt/kiln/bin/firecracker"),
    chroot_base=Path("/var/lib/kiln/pool/jails"),
    uid_first=900_000,
    uid_count=1000,
    cgroup=CgroupConfig(parent="kiln"),
)


@pytest.fixture(scope="module")
def swagger() -> dict[str, Any]:
    return load_swagger()


# -- the launch plan ----------------------------------------------------------------------


def plan(**kw: Any) -> fc.LaunchPlan:
    args: dict[str, Any] = {
        "vm_id": "abc2", "uid": 900_007, "kernel": Path("/var/lib/kiln/kernels/vmlinux-1"),
        "initrd": Path("/var/lib/kiln/kernels/initrd-1"),
        "rootfs": Path("/var/lib/kiln/pool/fs/snapshots/abc2.ext4"),
    }
    args.update(kw)
    return fc.launch_plan(CFG, **args)


def test_plan_v2_exact_argv() -> None:
    p = plan()
    assert jailer_argv(CFG, p.spec) == [
        "/opt/kiln/bin/jailer",
        "--id", "abc2",
        "--exec-file", "/opt/kiln/bin/firecracker",
        "--uid", "900007",
        "--gid", "900007",
        "--cgroup-version", "2",
        "--parent-cgroup", "kiln/abc2",
        "--chroot-base-dir", "/var/lib/kiln/pool/jails",
        "--new-pid-ns",
        "--", "--api-sock", "/run/api.sock",
    ]
    assert [(i.name, str(i.source), i.writable) for i in p.stage] == [
        ("vmlinux", "/var/lib/kiln/kernels/vmlinux-1", False),
        ("initrd.img", "/var/lib/kiln/kernels/initrd-1", False),
        ("rootfs.ext4", "/var/lib/kiln/pool/fs/snapshots/abc2.ext4", True),
    ]
    assert p.logs == ("firecracker.log",)


def test_plan_v1_with_limits_netns_and_rlimits() -> None:
    p = plan(cgroup_version=1, limits=Limits(cpus=1.5, memory_bytes=256 << 20, pids=128),
             netns="kilnns7", resource_limits=(("no-file", 2048), ("fsize", 1 << 30)),
             rootfs=Path("/dev/mapper/kiln-abc-snap-abc2"))
    assert jailer_argv(CFG, p.spec) == [
        "/opt/kiln/bin/jailer",
        "--id", "abc2",
        "--exec-file", "/opt/kiln/bin/firecracker",
        "--uid", "900007",
        "--gid", "900007",
        "--cgroup-version", "1",
        "--cgroup", "cpu.cfs_period_us=100000",
        "--cgroup", "cpu.cfs_quota_us=150000",
        "--cgroup", "memory.limit_in_bytes=268435456",
        "--cgroup", "pids.max=128",
        "--cgroup", "freezer.state=THAWED",
        "--parent-cgroup", "kiln",
        "--chroot-base-dir", "/var/lib/kiln/pool/jails",
        "--netns", "/run/netns/kilnns7",
        "--resource-limit", "no-file=2048",
        "--resource-limit", "fsize=1073741824",
        "--new-pid-ns",
        "--", "--api-sock", "/run/api.sock",
    ]
    assert p.stage[-1].name == "rootfs"
    assert p.vm.drives[0].path == "/rootfs"


def test_daemonize_flag_placement() -> None:
    from dataclasses import replace

    spec = replace(plan().spec, daemonize=True, new_pid_ns=False)
    assert jailer_argv(CFG, spec)[-4:] == ["--daemonize", "--", "--api-sock", "/run/api.sock"]


@pytest.mark.parametrize(("kw", "message"), [
    ({"vm_id": "ABC"}, "invalid VM id 'ABC'"),
    ({"vm_id": "a" * 33}, f"invalid VM id '{'a' * 33}'"),
    ({"vm_id": "../x"}, "invalid VM id '../x'"),
    ({"vm_id": "-x"}, "invalid VM id '-x'"),
    ({"uid": 0}, "uid 0 is outside the VM range 900000-900999"),
    ({"uid": 1000}, "uid 1000 is outside the VM range 900000-900999"),
    ({"uid": 901_000}, "uid 901000 is outside the VM range 900000-900999"),
    ({"netns": "../../proc/1/ns/net"}, "invalid network namespace name '../../proc/1/ns/net'"),
    ({"resource_limits": (("nproc", 1),)}, "refusing resource limit 'nproc'=1"),
    ({"cgroup_version": 3}, "invalid cgroup version 3"),
])
def test_plan_refuses(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError) as e:
        plan(**kw)
    assert e.value.message == message


def test_spec_refuses_foreign_parent_cgroup_and_odd_cgroup_files() -> None:
    from dataclasses import replace

    spec = plan().spec
    for parent, msg in [("system.slice", "refusing parent cgroup 'system.slice'"),
                        ("kiln/other", "refusing parent cgroup 'kiln/other'"),
                        ("kiln/../x", "invalid cgroup parent 'kiln/../x'")]:
        with pytest.raises(UsageError) as e:
            jailer_argv(CFG, replace(spec, parent_cgroup=parent))
        assert e.value.message == msg
    for f, v in [("cgroup.procs", "1"), ("../cpu.max", "1"), ("cpu.max", "1\n2")]:
        with pytest.raises(UsageError) as e:
            jailer_argv(CFG, replace(spec, cgroups=((f, v),)))
        assert e.value.message == f"refusing cgroup setting {f!r}={v!r}"


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_any_accepted_id_is_base32_lowercase(vm_id: str) -> None:
    try:
        p = plan(vm_id=vm_id)
    except UsageError:
        return
    assert 1 <= len(vm_id) <= 32
    assert set(vm_id) <= set("abcdefghijklmnopqrstuvwxyz234567")
    argv = jailer_argv(CFG, p.spec)
    assert argv[argv.index("--id") + 1] == vm_id
    assert all(not a.startswith("-") or a.startswith("--") for a in argv)


# -- API bodies vs the swagger definitions -------------------------------------------------


def full_config() -> fc.VmConfig:
    return fc.VmConfig(
        kernel="/vmlinux", initrd="/initrd.img", boot_args="console=ttyS0 quiet",
        vcpus=2, mem_mib=384,
        drives=(fc.DriveSpec("rootfs", "/rootfs.ext4", root=True),
                fc.DriveSpec("data", "/data.ext4", read_only=True)),
        nets=(fc.NetSpec("eth0", "kilntap0", "06:00:ac:10:00:02"),),
    )


def test_every_request_validates_against_its_definition(swagger: dict[str, Any]) -> None:
    reqs = fc.api_requests(full_config())
    assert [(r.method, r.path, r.definition) for r in reqs] == [
        ("PUT", "/logger", "Logger"),
        ("PUT", "/boot-source", "BootSource"),
        ("PUT", "/machine-config", "MachineConfiguration"),
        ("PUT", "/drives/rootfs", "Drive"),
        ("PUT", "/drives/data", "Drive"),
        ("PUT", "/network-interfaces/eth0", "NetworkInterface"),
    ]
    for r in reqs:
        validate(swagger, r.definition, r.body)
        # The path exists in the spec with a PUT taking a body of that definition.
        template = r.path.rsplit("/", 1)[0] + "/{" + ("drive_id" if "drives" in r.path else
                                                       "iface_id") + "}" \
            if r.path.count("/") == 2 else r.path
        op = swagger["paths"][template]["put"]
        body_param = next(p for p in op["parameters"] if p["in"] == "body")
        assert body_param["schema"]["$ref"] == f"#/definitions/{r.definition}"
    for action in ("InstanceStart", "SendCtrlAltDel"):
        validate(swagger, "InstanceActionInfo", {"action_type": action})


def test_validation_is_not_vacuous(swagger: dict[str, Any]) -> None:
    with pytest.raises(jsonschema.ValidationError) as e:
        validate(swagger, "Drive", {"drive_id": "x", "is_root_device": "yes"})
    assert e.value.message == "'yes' is not of type 'boolean'"
    with pytest.raises(jsonschema.ValidationError) as e:
        validate(swagger, "MachineConfiguration", {"vcpu_count": 0, "mem_size_mib": 1})
    assert e.value.message == "0 is less than the minimum of 1"


def test_expected_config_and_mismatches() -> None:
    vm = full_config()
    exp = fc.expected_vm_config(vm)
    got = json.loads(json.dumps(exp))
    got["drives"][0]["rate_limiter"] = None  # defaults Firecracker adds are ignored
    got["balloon"] = None
    assert fc.config_mismatches(exp, got) == []
    got["machine-config"]["mem_size_mib"] = 128
    del got["boot-source"]["initrd_path"]
    got["drives"].pop()
    assert fc.config_mismatches(exp, got) == [
        "/boot-source/initrd_path: missing",
        "/machine-config/mem_size_mib: sent 384, got 128",
        f"/drives: expected 2 items, got {got['drives']!r}",
    ]


def test_no_endpoint_missing_from_1_12() -> None:
    # 1.12.1 answers 400 to PUT /serial (and has no /pmem, /hotplug); the driver never asks.
    paths = {r.path for r in fc.api_requests(full_config())}
    assert not paths & {"/serial", "/pmem", "/hotplug/memory"}


# -- --net tap: the network interface body -------------------------------------------------


def test_tap_nic_body_validates_and_carries_the_vm_mac(swagger: dict[str, Any]) -> None:
    from helper.net import core as netcore

    p = plan(nets=(fc.NetSpec("eth0", "kt-abcdefghijkl", netcore.mac_for("abcdefghijkl")),))
    req = fc.api_requests(p.vm)[-1]
    assert (req.method, req.path, req.definition) == ("PUT", "/network-interfaces/eth0",
                                                      "NetworkInterface")
    mac = netcore.mac_for("abcdefghijkl")
    assert req.body == {"iface_id": "eth0", "host_dev_name": "kt-abcdefghijkl",
                        "guest_mac": mac}
    validate(swagger, "NetworkInterface", req.body)
    assert fc.expected_vm_config(p.vm)["network-interfaces"] == [req.body]
    # The MAC is the QEMU driver's too: stable, unicast, locally administered.
    assert mac == netcore.mac_for("abcdefghijkl")
    assert int(mac[:2], 16) & 0b11 == 0b10
    with pytest.raises(jsonschema.ValidationError) as e:
        validate(swagger, "NetworkInterface", {"iface_id": "eth0"})
    assert e.value.message == "'host_dev_name' is a required property"


@pytest.mark.parametrize(("nic", "message"), [
    (fc.NetSpec("eth0", "kt-abc/../x", None), "invalid tap name 'kt-abc/../x'"),
    (fc.NetSpec("eth0", "kt-abcdefghijklmn", None), "invalid tap name 'kt-abcdefghijklmn'"),
    (fc.NetSpec("eth0/../x", "kt-abc", None), "invalid interface id 'eth0/../x'"),
    (fc.NetSpec("eth0", "kt-abc", "06:00:AC:10:00:02"),
     "invalid MAC address '06:00:AC:10:00:02'"),
])
def test_network_interface_body_refuses(nic: fc.NetSpec, message: str) -> None:
    with pytest.raises(UsageError) as e:
        fc.network_interface_body(nic)
    assert e.value.message == message
