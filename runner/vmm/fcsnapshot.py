"""Firecracker's snapshot API as requests (pure): warm start (issue #14) on Firecracker.

The bodies are 1.12.1's (tests/data/firecracker-api-1.12.1.yaml, checked field by field
against the real binary), not a later release's:

* ``PATCH /vm {"state": "Paused"|"Resumed"}`` (definition ``Vm``);
* ``PUT /snapshot/create`` — a ``Full`` snapshot of a paused VM; ``snapshot_path`` and
  ``mem_file_path`` are files directly in the jail's chroot, which Firecracker (the VM's
  uid) creates there;
* ``PUT /snapshot/load`` — on a fresh Firecracker (nothing configured but the logger):
  the state file and the memory file (``mem_backend`` ``File``: 1.12.1 deprecates
  ``mem_file_path`` here, and refuses both at once), both staged read-only in the chroot;
  ``enable_diff_snapshots`` false (full snapshots only); ``resume_vm`` as asked (kiln's
  warm run resumes at once: the guest must run to accept the host's vsock connection that
  brings its settings). 1.12.1 has no ``vsock_override``, ``clock_realtime``,
  ``track_dirty_pages`` or ``huge_pages`` here (it answers "unknown field"): the restored
  vsock socket keeps its saved path, which is the same name in every jail. It does have
  ``network_overrides`` (iface_id → host_dev_name): a clone's NIC gets its own tap.

A failed load ends the Firecracker process (1.12.1 exits after answering 400), so a
restore that fails is torn down like a launch that failed.

``ApiRequest`` is defined here because ``runner.vmm.fcapi`` (the configuration requests
and the VM's lifecycle, whose ``FirecrackerVM`` sends these) imports this module, and
kiln's modules never import each other both ways.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from helper.base.errors import UsageError
from helper.jail.jailer import StageItem, check_name

IFACE_RE = re.compile(r"^eth[0-9]{1,2}$")
DEV_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}$")  # IFNAMSIZ - 1, no '/' or blanks
STATE = "vm.state"  # the microVM state file, in the chroot
MEM = "vm.mem"  # the guest memory file, in the chroot


@dataclass(frozen=True)
class ApiRequest:
    method: str
    path: str
    body: dict[str, Any]
    definition: str  # the swagger definition the body must validate against


def jail_path(path: str) -> str:
    """``path`` when it names a file directly in the chroot (``/NAME``, a name the jail
    stages), else ``UsageError`` (pure)."""
    name = path[1:] if path.startswith("/") else ""
    if "/" in name or not name:
        raise UsageError(f"invalid path in the jail {path!r}",
                         "name a file directly in the chroot: /NAME")
    check_name(name)
    return path


def check_iface(iface: str) -> str:
    if not IFACE_RE.fullmatch(iface):
        raise UsageError(f"invalid interface id {iface!r}", "use eth0, eth1, …")
    return iface


def check_tap(dev: str) -> str:
    if not DEV_RE.fullmatch(dev):
        raise UsageError(f"invalid tap name {dev!r}",
                         "a network device name of at most 15 characters")
    return dev


def vm_state_request(state: Literal["Paused", "Resumed"]) -> ApiRequest:
    """``PATCH /vm``: pause the vCPUs (before a snapshot) or resume them."""
    if state not in ("Paused", "Resumed"):
        raise UsageError(f"invalid VM state {state!r}", "Paused or Resumed")
    return ApiRequest("PATCH", "/vm", {"state": state}, "Vm")


def snapshot_create_request(snapshot: str, mem: str) -> ApiRequest:
    """``PUT /snapshot/create``: a full snapshot of the paused VM into two chroot files."""
    return ApiRequest("PUT", "/snapshot/create", {
        "snapshot_type": "Full",
        "snapshot_path": jail_path(snapshot),
        "mem_file_path": jail_path(mem),
    }, "SnapshotCreateParams")


def snapshot_load_request(snapshot: str, mem: str, *, resume: bool = False,
                          taps: tuple[tuple[str, str], ...] = ()) -> ApiRequest:
    """``PUT /snapshot/load``: the VM from two staged chroot files, left paused unless
    ``resume``; ``taps`` (iface_id, host_dev_name): the restored NICs' new taps (a clone
    has its own, named after its own VM: ``network_overrides``)."""
    body: dict[str, Any] = {
        "snapshot_path": jail_path(snapshot),
        "mem_backend": {"backend_type": "File", "backend_path": jail_path(mem)},
        "enable_diff_snapshots": False,
        "resume_vm": resume,
    }
    if taps:
        body["network_overrides"] = [
            {"iface_id": check_iface(i), "host_dev_name": check_tap(t)} for i, t in taps]
    return ApiRequest("PUT", "/snapshot/load", body, "SnapshotLoadParams")


def snapshot_items(state: Path, mem: Path) -> tuple[StageItem, StageItem]:
    """The restore launch's saved files, staged read-only as ``/vm.state`` and ``/vm.mem``
    (the memory is mapped private: the guest's writes never reach the file)."""
    return StageItem(STATE, state), StageItem(MEM, mem)
