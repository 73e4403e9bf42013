"""Firecracker warm start, pure parts: the snapshot requests' exact bodies validated against
the 1.12.1 swagger (and no field it lacks), the restore launch plan, and ``FirecrackerVM``'s
snapshot methods against a recording fake API socket."""

from __future__ import annotations

import http.server
import json
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest

from helper.base.errors import UsageError
from helper.jail.jailer import Staged
from runner.vmm import fcapi as fc
from runner.vmm import fcsnapshot as fcs
from tests.runner.test_firecracker import CFG, plan
from tests.support.firecracker import load_swagger, validate


@pytest.fixture(scope="module")
def swagger() -> dict[str, Any]:
    return load_swagger()


def unknown_fields(swagger: dict[str, Any], definition: str, body: Any, where: str = ""
                   ) -> list[str]:
    """Keys of ``body`` the definition has no property for (the swagger allows extra keys,
    1.12.1 answers "unknown field" to them), nested objects followed through ``$ref``."""
    props: dict[str, Any] = swagger["definitions"][definition].get("properties", {})
    out: list[str] = []
    for k, v in body.items():
        if k not in props:
            out.append(f"{where}/{k}")
        elif isinstance(v, dict) and "$ref" in props[k]:
            out += unknown_fields(swagger, props[k]["$ref"].rsplit("/", 1)[1], v, f"{where}/{k}")
    return out


def check_against_spec(swagger: dict[str, Any], r: fcs.ApiRequest) -> None:
    validate(swagger, r.definition, r.body)
    assert unknown_fields(swagger, r.definition, r.body) == []
    op = swagger["paths"][r.path][r.method.lower()]
    body_param = next(p for p in op["parameters"] if p["in"] == "body")
    assert body_param["schema"]["$ref"] == f"#/definitions/{r.definition}"


def test_exact_bodies_validate_against_1_12_1(swagger: dict[str, Any]) -> None:
    reqs = [fcs.vm_state_request("Paused"), fcs.vm_state_request("Resumed"),
            fcs.snapshot_create_request("/vm.state", "/vm.mem"),
            fcs.snapshot_load_request("/vm.state", "/vm.mem")]
    assert [(r.method, r.path, r.body, r.definition) for r in reqs] == [
        ("PATCH", "/vm", {"state": "Paused"}, "Vm"),
        ("PATCH", "/vm", {"state": "Resumed"}, "Vm"),
        ("PUT", "/snapshot/create", {"snapshot_type": "Full", "snapshot_path": "/vm.state",
                                     "mem_file_path": "/vm.mem"}, "SnapshotCreateParams"),
        ("PUT", "/snapshot/load", {"snapshot_path": "/vm.state",
                                   "mem_backend": {"backend_type": "File",
                                                   "backend_path": "/vm.mem"},
                                   "enable_diff_snapshots": False, "resume_vm": False},
         "SnapshotLoadParams"),
    ]
    for r in reqs:
        check_against_spec(swagger, r)


def test_1_12_1_definitions_lack_the_later_fields(swagger: dict[str, Any]) -> None:
    load = swagger["definitions"]["SnapshotLoadParams"]["properties"]
    assert set(load) == {"snapshot_path", "mem_file_path", "mem_backend",
                         "enable_diff_snapshots", "resume_vm", "network_overrides"}
    assert unknown_fields(swagger, "SnapshotLoadParams", {
        "snapshot_path": "/s", "vsock_override": {}, "clock_realtime": True,
        "mem_backend": {"backend_type": "File", "backend_path": "/m", "x": 1}}) == [
        "/vsock_override", "/clock_realtime", "/mem_backend/x"]


def test_validation_is_not_vacuous(swagger: dict[str, Any]) -> None:
    for definition, body, message in [
        ("Vm", {"state": "Running"}, "'Running' is not one of ['Paused', 'Resumed']"),
        ("SnapshotCreateParams", {"snapshot_path": "/s"},
         "'mem_file_path' is a required property"),
        ("SnapshotLoadParams", {"mem_backend": {"backend_type": "File", "backend_path": "/m"}},
         "'snapshot_path' is a required property"),
        ("SnapshotLoadParams", {"snapshot_path": "/s",
                                "mem_backend": {"backend_type": "file", "backend_path": "/m"}},
         "'file' is not one of ['File', 'Uffd']"),
    ]:
        with pytest.raises(jsonschema.ValidationError) as e:
            validate(swagger, definition, body)
        assert e.value.message == message


@pytest.mark.parametrize("path", ["vm.state", "/", "//vm.state", "/a/vm.state", "/../vm",
                                  "/.vm", "/-vm", "/vm state", "/vm\n", "/" + "a" * 65, ""])
def test_paths_are_files_directly_in_the_chroot(path: str) -> None:
    for build in (fcs.snapshot_create_request, fcs.snapshot_load_request):
        with pytest.raises(UsageError):
            build(path, "/vm.mem")
        with pytest.raises(UsageError):
            build("/vm.state", path)


def test_vm_state_refuses_other_states() -> None:
    with pytest.raises(UsageError) as e:
        fcs.vm_state_request("Running")  # type: ignore[arg-type]
    assert e.value.message == "invalid VM state 'Running'"


def test_restore_plan_stages_rootfs_and_snapshot_only() -> None:
    state, mem = Path("/var/lib/kiln/warm/w1/vm.state"), Path("/var/lib/kiln/warm/w1/vm.mem")
    p = plan(restore=(state, mem))
    assert p.restore
    assert [(i.name, str(i.source), i.writable) for i in p.stage] == [
        ("rootfs.ext4", "/var/lib/kiln/pool/fs/snapshots/abc2.ext4", True)]
    # The caller's saved files are copied in through fds (jail-import), never staged.
    assert [(i.name, str(i.source)) for i in p.imports] == [
        ("vm.state", str(state)), ("vm.mem", str(mem))]
    assert p.logs == ("firecracker.log",)
    assert p.spec == plan().spec  # the same jailer launch
    blk = plan(restore=(state, mem), rootfs=Path("/dev/mapper/kiln-abc-snap-abc2"))
    assert [i.name for i in blk.stage] == ["rootfs"]
    assert not plan().restore
    assert plan().imports == ()


# -- FirecrackerVM against a fake API socket ------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    seen: list[tuple[str, str, Any]]

    def _answer(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(n)) if n else None
        self.seen.append((self.command, self.path, body))
        if self.command == "GET":
            data = json.dumps({"state": "Paused"}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        else:
            self.send_response(204)
            self.end_headers()

    do_GET = do_PUT = do_PATCH = _answer

    def log_message(self, *args: Any) -> None:
        del args

    def address_string(self) -> str:
        return "fake"


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


@pytest.fixture
def fake_api(tmp_path: Path) -> Iterator[tuple[Path, list[tuple[str, str, Any]]]]:
    sock = tmp_path / "api.sock"
    seen: list[tuple[str, str, Any]] = []
    handler = type("H", (_Handler,), {"seen": seen})
    server = _UnixServer(str(sock), handler)
    t = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    t.start()
    yield sock, seen
    server.shutdown()
    server.server_close()


class _FakeOps:
    """PrivOps that launch nothing: the API socket is the fake one."""

    def __init__(self, sock: Path) -> None:
        self.sock = sock
        self.calls: list[str] = []

    def cgroup_create(self, vm_id: str, version: int, limits: Any) -> None:
        self.calls.append("cgroup_create")

    def cgroup_kill(self, vm_id: str, version: int) -> None:
        self.calls.append("cgroup_kill")

    def jail_stage(self, vm_id: str, uid: int, gid: int, items: Any, logs: Any) -> Any:
        self.calls.append(f"jail_stage {[i.name for i in items]}")
        return Staged(Path("/nonexistent"), [])

    def jail_launch(self, spec: Any) -> int:
        self.calls.append("jail_launch")
        return 4242

    def jail_grant_api(self, vm_id: str) -> Path:
        self.calls.append("jail_grant_api")
        return self.sock

    def jail_remove(self, vm_id: str) -> None:
        self.calls.append("jail_remove")

    def jail_grant_vsock(self, vm_id: str) -> Path:
        self.calls.append("jail_grant_vsock")
        return Path("/nonexistent/vsock.sock")

    def jail_import(self, vm_id: str, name: str, source: Path) -> None:
        self.calls.append(f"jail_import {name} {source}")

    def jail_export(self, vm_id: str, name: str, dest: Path) -> int:
        self.calls.append(f"jail_export {name} {dest}")
        return 0

    def jail_export_disk(self, vm_id: str, dest: Path) -> int:
        self.calls.append(f"jail_export_disk {dest}")
        return 0


def test_vm_methods_send_the_built_bodies(
        fake_api: tuple[Path, list[tuple[str, str, Any]]]) -> None:
    sock, seen = fake_api
    vm = fc.FirecrackerVM(CFG, _FakeOps(sock), plan(), sock=sock)
    vm.pause()
    vm.snapshot_create("/vm.state", "/vm.mem")
    vm.resume()
    vm.snapshot_load("/a.state", "/a.mem")
    assert seen == [(r.method, r.path, r.body) for r in [
        fcs.vm_state_request("Paused"), fcs.snapshot_create_request("/vm.state", "/vm.mem"),
        fcs.vm_state_request("Resumed"), fcs.snapshot_load_request("/a.state", "/a.mem")]]


def test_restore_launches_then_sends_only_the_logger_and_the_load(
        fake_api: tuple[Path, list[tuple[str, str, Any]]]) -> None:
    sock, seen = fake_api
    ops = _FakeOps(sock)
    steps: list[str] = []
    vm = fc.FirecrackerVM(CFG, ops, plan(restore=(Path("/w/s"), Path("/w/m"))),
                          on_step=steps.append)
    assert vm.restore() == {"state": "Paused"}
    assert ops.calls == ["cgroup_create", "jail_stage ['rootfs.ext4']",
                         "jail_import vm.state /w/s", "jail_import vm.mem /w/m",
                         "jail_launch", "jail_grant_api"]
    assert steps == ["cgroup", "jail", "launch", "api", "restore"]
    logger = fc.api_requests(vm.plan.vm)[0]
    load = fcs.snapshot_load_request("/vm.state", "/vm.mem")
    assert seen == [("GET", "/", None), ("PUT", "/logger", logger.body),
                    ("PUT", "/snapshot/load", load.body), ("GET", "/", None)]


def test_restore_refuses_a_boot_plan() -> None:
    ops = _FakeOps(Path("/nonexistent"))
    vm = fc.FirecrackerVM(CFG, ops, plan())
    with pytest.raises(UsageError) as e:
        vm.restore()
    assert e.value.message == "VM abc2's plan stages no snapshot"
    assert ops.calls == []  # refused before anything was made



def test_warm_bodies_validate_against_1_12_1(swagger: dict[str, Any]) -> None:
    """A warm run's load resumes at once and moves the NIC onto the clone's tap; the
    control channel's ``PUT /vsock`` (exact bodies, no field 1.12.1 lacks)."""
    load = fcs.snapshot_load_request("/vm.state", "/vm.mem", resume=True,
                                     taps=(("eth0", "kt-abcdefgh"),))
    assert load.body == {
        "snapshot_path": "/vm.state",
        "mem_backend": {"backend_type": "File", "backend_path": "/vm.mem"},
        "enable_diff_snapshots": False, "resume_vm": True,
        "network_overrides": [{"iface_id": "eth0", "host_dev_name": "kt-abcdefgh"}]}
    check_against_spec(swagger, load)
    for o in load.body["network_overrides"]:
        assert unknown_fields(swagger, "NetworkOverride", o) == []
    (vsock,) = [r for r in fc.api_requests(fc.VmConfig(vsock=fc.VsockSpec(3, "/v.sock")))
                if r.path == "/vsock"]
    assert (vsock.method, vsock.body, vsock.definition) == (
        "PUT", {"guest_cid": 3, "uds_path": "/v.sock"}, "Vsock")
    check_against_spec(swagger, vsock)
    with pytest.raises(jsonschema.ValidationError):  # the schema's CID floor is real
        validate(swagger, "Vsock", {"guest_cid": 2, "uds_path": "/v.sock"})
    with pytest.raises(UsageError):
        fcs.snapshot_load_request("/s", "/m", taps=(("eth0", "a/b"),))
    with pytest.raises(UsageError):
        fc.api_requests(fc.VmConfig(vsock=fc.VsockSpec(3, "/run/v.sock")))


def test_vsock_shows_in_the_expected_config() -> None:
    vm = fc.VmConfig(vsock=fc.VsockSpec(3, "/v.sock"))
    assert fc.expected_vm_config(vm)["vsock"] == {"guest_cid": 3, "uds_path": "/v.sock"}
    assert "vsock" not in fc.expected_vm_config(fc.VmConfig())
