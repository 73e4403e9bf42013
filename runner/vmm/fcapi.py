"""Firecracker's pure launch plan, API client (HTTP over AF_UNIX), one VM's lifecycle.

Flow of ``FirecrackerVM.start`` (each step announced through ``on_step`` *before* it
creates anything, so the state layer can record the resource first):

1. ``cgroup``  — the VM's cgroup(s) with cpu/memory/pids limits (``helper.cgroup``);
2. ``jail``    — stage the chroot: kernel, initrd, rootfs file or block node, log file;
3. ``launch``  — the jailer (``--new-pid-ns``) drops to the VM's uid/gid and execs
   Firecracker, whose serial console goes to ``console.log`` beside the chroot;
4. ``api``     — the API socket is handed to us (hard link, 0600, our uid alone);
5. ``configure`` — logger, boot-source, machine-config, drives, network interfaces; each
   body is what ``api_requests`` (pure) builds, and ``GET /vm/config`` must then show
   exactly what was sent (``config_mismatches``) — a silently ignored field is an error;
6. ``InstanceStart``.

Warm start (``runner.vmm.fcsnapshot``'s requests): ``pause``, ``snapshot_create`` (files in
the chroot), ``export`` (out of the jail through the helper: ``jail-export``), ``resume``;
``restore`` launches a plan made with ``launch_plan(restore=…)`` (the rootfs staged, the
state and memory files copied in through fds before the launch: ``jail-import``; no kernel)
through steps 1-4, sends the logger alone (``snapshot/load`` is refused after any boot
resource), loads the snapshot (moving NICs onto the clone's taps) and leaves the VM paused
or resumes it. A plan with ``vsock`` has its control channel's socket handed over
(``jail-grant-vsock``) once Firecracker bound it: after ``configure``, or the load.

Stop: ``SendCtrlAltDel``, wait for the cgroup to empty, then kill the whole cgroup
(Firecracker is detached from us, so signalling one pid is not enough). Destroy: kill the
cgroup, remove the jail (the helper refuses while mounts remain).

Privileged steps go through ``PrivOps`` (``kiln run``: ``builder.helperclient.HelperOps``, the
helper's ops (tests drive the helper's jail functions in-process: tests/support/firecracker.py),
for tests of the driver itself) and never take a path to run. Only endpoints the
1.12.1 binary has are used (no ``PUT /serial``: the console is Firecracker's stdout).
``jail_config`` reads the jails' settings from the trusted config (the same the helper
uses). ``kiln run``'s side — the record, the console, stop and teardown — is the driver,
``runner.vmm.firecracker``.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from helper import cgroup as cg
from helper.base.errors import NotFound, UsageError
from helper.cgroup import Limits
from helper.jail import jailer as jail
from helper.jail.jailer import JailConfig, JailSpec, Staged, StageItem
from runner.vmm import fcsnapshot as fcs
from runner.vmm.fcclient import ApiClient, ApiError

__all__ = ["ApiClient", "ApiError"]  # re-exported: callers know them as fcapi's
from runner.vmm.fcsnapshot import ApiRequest

KERNEL = "vmlinux"
INITRD = "initrd.img"
ROOTFS = "rootfs.ext4"
ROOT_BLOCK = "rootfs"
LOG = "firecracker.log"
DEFAULT_BOOT_ARGS = "console=ttyS0 reboot=k panic=1 pci=off"
NO_LIMITS = Limits()


# -- pure: VM configuration → API requests ---------------------------------------------


@dataclass(frozen=True)
class DriveSpec:
    drive_id: str
    path: str  # inside the chroot, e.g. "/rootfs.ext4"
    root: bool = False
    read_only: bool = False
    cache_type: str = "Unsafe"  # guest flushes are not forwarded: snapshots are disposable
    io_engine: str = "Sync"


@dataclass(frozen=True)
class NetSpec:
    iface_id: str
    host_dev_name: str  # a tap in the VM's network namespace, owned by the VM's uid
    guest_mac: str | None = None


_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def network_interface_body(n: NetSpec) -> dict[str, Any]:
    """The ``PUT /network-interfaces/{iface_id}`` body (swagger ``NetworkInterface``)."""
    fcs.check_iface(n.iface_id)
    fcs.check_tap(n.host_dev_name)
    body: dict[str, Any] = {"iface_id": n.iface_id, "host_dev_name": n.host_dev_name}
    if n.guest_mac is not None:
        if not _MAC.fullmatch(n.guest_mac):
            raise UsageError(f"invalid MAC address {n.guest_mac!r}",
                             "write six lowercase hex pairs")
        body["guest_mac"] = n.guest_mac
    return body


@dataclass(frozen=True)
class VsockSpec:
    """The hybrid vsock device (``runner.guest_init.vsock``): the guest's CID and the Unix
    socket Firecracker binds in the chroot."""

    guest_cid: int
    uds_path: str  # "/NAME": directly in the chroot


@dataclass(frozen=True)
class VmConfig:
    kernel: str = f"/{KERNEL}"
    initrd: str | None = f"/{INITRD}"
    boot_args: str = DEFAULT_BOOT_ARGS
    vcpus: int = 1
    mem_mib: int = 256
    smt: bool = False
    drives: tuple[DriveSpec, ...] = ()
    nets: tuple[NetSpec, ...] = ()
    log_path: str | None = f"/{LOG}"
    log_level: str = "Info"
    vsock: VsockSpec | None = None  # the control channel (docs/run.md)


def api_requests(vm: VmConfig) -> list[ApiRequest]:
    """The configuration requests for ``vm``, in order (logger first: it logs the rest)."""
    reqs: list[ApiRequest] = []
    if vm.log_path is not None:
        reqs.append(ApiRequest("PUT", "/logger", {
            "log_path": vm.log_path,
            "level": vm.log_level,
            "show_level": True,
            "show_log_origin": False,
        }, "Logger"))
    boot: dict[str, Any] = {"kernel_image_path": vm.kernel, "boot_args": vm.boot_args}
    if vm.initrd is not None:
        boot["initrd_path"] = vm.initrd
    reqs.append(ApiRequest("PUT", "/boot-source", boot, "BootSource"))
    reqs.append(ApiRequest("PUT", "/machine-config", {
        "vcpu_count": vm.vcpus,
        "mem_size_mib": vm.mem_mib,
        "smt": vm.smt,
        "track_dirty_pages": False,
        "huge_pages": "None",
    }, "MachineConfiguration"))
    for d in vm.drives:
        reqs.append(ApiRequest("PUT", f"/drives/{d.drive_id}", {
            "drive_id": d.drive_id,
            "path_on_host": d.path,
            "is_root_device": d.root,
            "is_read_only": d.read_only,
            "cache_type": d.cache_type,
            "io_engine": d.io_engine,
        }, "Drive"))
    for n in vm.nets:
        reqs.append(ApiRequest("PUT", f"/network-interfaces/{n.iface_id}",
                               network_interface_body(n), "NetworkInterface"))
    if vm.vsock is not None:
        reqs.append(ApiRequest("PUT", "/vsock", {
            "guest_cid": vm.vsock.guest_cid,
            "uds_path": fcs.jail_path(vm.vsock.uds_path),
        }, "Vsock"))
    return reqs


def expected_vm_config(vm: VmConfig) -> dict[str, Any]:
    """What ``GET /vm/config`` must contain after ``api_requests(vm)`` (pure).

    The logger is write-only in 1.12.1 (``/vm/config`` reports ``null``), so it is not
    compared; everything else must match field for field."""
    by_path = {r.path: r.body for r in api_requests(vm)}
    got = {
        "boot-source": by_path["/boot-source"],
        "machine-config": by_path["/machine-config"],
        "drives": [by_path[f"/drives/{d.drive_id}"] for d in vm.drives],
        "network-interfaces": [by_path[f"/network-interfaces/{n.iface_id}"]
                               for n in vm.nets],
    }
    if vm.vsock is not None:
        got["vsock"] = by_path["/vsock"]
    return got


def config_mismatches(expected: Any, got: Any, where: str = "") -> list[str]:
    """Every place ``got`` differs from ``expected`` (dict keys of ``got`` not in
    ``expected`` are defaults Firecracker fills in, and ignored) (pure)."""
    if isinstance(expected, dict):
        if not isinstance(got, dict):
            return [f"{where or '/'}: expected an object, got {got!r}"]
        out: list[str] = []
        for k, v in expected.items():
            if k not in got:
                out.append(f"{where}/{k}: missing")
            else:
                out += config_mismatches(v, got[k], f"{where}/{k}")
        return out
    if isinstance(expected, list):
        if not isinstance(got, list) or len(got) != len(expected):
            return [f"{where}: expected {len(expected)} items, got {got!r}"]
        return [m for i, (e, g) in enumerate(zip(expected, got, strict=True))
                for m in config_mismatches(e, g, f"{where}[{i}]")]
    return [] if expected == got else [f"{where}: sent {expected!r}, got {got!r}"]


# -- pure: the launch plan ----------------------------------------------------------------


@dataclass(frozen=True)
class LaunchPlan:
    vm_id: str
    spec: JailSpec
    limits: Limits
    stage: tuple[StageItem, ...]
    logs: tuple[str, ...]
    vm: VmConfig
    restore: bool = False  # imports a snapshot (``fcsnapshot.snapshot_items``), no kernel
    imports: tuple[StageItem, ...] = ()  # files copied in by fd (``PrivOps.jail_import``)


def launch_plan(cfg: JailConfig, *, vm_id: str, uid: int, kernel: Path, rootfs: Path,
                initrd: Path | None = None, boot_args: str = DEFAULT_BOOT_ARGS,
                cpus: int = 1, mem_mib: int = 256, cgroup_version: int = 2,
                limits: Limits = NO_LIMITS, netns: str | None = None,
                taps: Sequence[str] = (), nets: Sequence[NetSpec] = (),
                read_only_root: bool = False,
                resource_limits: tuple[tuple[str, int], ...] = (),
                restore: tuple[Path, Path] | None = None,
                vsock: VsockSpec | None = None) -> LaunchPlan:
    """Everything needed to launch one VM, decided up front (pure apart from validation).

    ``uid`` doubles as gid. ``rootfs``: a snapshot file, or ``/dev/mapper/…`` (dm-thin).
    ``nets`` (``runner.network``'s tap and MAC) or bare ``taps`` (no MAC) become eth0, eth1, ….
    ``restore``: (state, memory) of a snapshot, staged instead of the kernel and initrd
    (the rootfs keeps its name: the saved drive's path). ``vsock``: the control channel's
    device (a restore brings the saved one back: its socket is bound at the load)."""
    cg.check_vm_id(vm_id)
    block = str(rootfs).startswith("/dev/mapper/")
    root_name = ROOT_BLOCK if block else ROOTFS
    stage = [StageItem(KERNEL, kernel)]
    if initrd is not None:
        stage.append(StageItem(INITRD, initrd))
    stage.append(StageItem(root_name, rootfs, writable=not read_only_root))
    imports: tuple[StageItem, ...] = ()
    if restore is not None:  # the caller's files: copied in through fds (a sudo caller's
        stage, imports = [stage[-1]], fcs.snapshot_items(*restore)  # are not stageable)
    if cgroup_version == 2:
        # Limits go in through cgroup-create; the jailer only moves into P/ID.
        cgroups: tuple[tuple[str, str], ...] = ()
        parent = f"{cfg.cgroup.parent}/{vm_id}"
    else:
        # The jailer joins each v1 hierarchy it is given a file for: freezer too (teardown
        # freezes it to kill without a race; the helper allows exactly THAWED there).
        cgroups = (*cg.limit_files(1, limits), ("freezer.state", "THAWED"))
        parent = cfg.cgroup.parent
    spec = JailSpec(jail_id=vm_id, uid=uid, gid=uid, cgroup_version=cgroup_version,
                    cgroups=cgroups, parent_cgroup=parent, netns=netns,
                    resource_limits=resource_limits, daemonize=False, new_pid_ns=True)
    jail.check_spec(cfg, spec)
    vm = VmConfig(
        initrd=f"/{INITRD}" if initrd is not None else None,
        boot_args=boot_args, vcpus=cpus, mem_mib=mem_mib,
        drives=(DriveSpec("rootfs", f"/{root_name}", root=True, read_only=read_only_root),),
        nets=tuple(nets) or tuple(NetSpec(f"eth{i}", t) for i, t in enumerate(taps)),
        vsock=vsock,
    )
    return LaunchPlan(vm_id, spec, limits, tuple(stage), (LOG,), vm, restore is not None,
                      imports)


# -- the jail configuration ----------------------------------------------------------------


def jail_config(root_dir: Path) -> JailConfig:
    """The jail configuration from the trusted config (``helper.config``): the same one
    kiln-helper uses. Raises when a tool is missing or untrusted."""
    from helper import config as hconfig  # pydantic: only where a Firecracker VM is asked for

    c = hconfig.load()
    firecracker = Path(c.tool("firecracker"))  # the one named when both are missing
    cfg = JailConfig(
        jailer=Path(c.tool("jailer")), firecracker=firecracker,
        chroot_base=c.chroot_base, uid_first=c.uid_first, uid_count=c.uid_count,
        sources=(root_dir, *c.sources), cgroup=cg.CgroupConfig(parent=c.cgroup_parent))
    return jail.check_config(cfg)


# -- privileged operations ------------------------------------------------------------


class PrivOps(Protocol):
    """The privileged steps (kiln-helper ops of issue #5)."""

    def cgroup_create(self, vm_id: str, version: int, limits: Limits) -> None: ...
    def cgroup_kill(self, vm_id: str, version: int) -> None: ...
    def jail_stage(self, vm_id: str, uid: int, gid: int, items: Sequence[StageItem],
                   logs: Sequence[str]) -> Staged: ...
    def jail_launch(self, spec: JailSpec) -> int: ...
    def jail_grant_api(self, vm_id: str) -> Path: ...
    def jail_remove(self, vm_id: str) -> None: ...
    def jail_grant_vsock(self, vm_id: str) -> Path: ...
    def jail_import(self, vm_id: str, name: str, source: Path) -> None: ...
    def jail_export(self, vm_id: str, name: str, dest: Path) -> int: ...
    def jail_export_disk(self, vm_id: str, dest: Path) -> int: ...


# -- the driver ---------------------------------------------------------------------------


@dataclass
class FirecrackerVM:
    """One VM's lifecycle. ``on_step(name)`` runs before each resource is created."""

    cfg: JailConfig
    ops: PrivOps
    plan: LaunchPlan
    on_step: Callable[[str], None] = lambda _step: None
    pid: int | None = None
    sock: Path | None = None
    vsock: Path | None = None  # the control channel's socket, once granted
    warnings: list[str] = field(default_factory=list)

    @property
    def console_log(self) -> Path:
        return jail.jail_dir(self.cfg, self.plan.vm_id) / "console.log"

    @property
    def chroot(self) -> Path:
        return jail.chroot(self.cfg, self.plan.vm_id)

    def client(self, timeout: float = 5.0) -> ApiClient:
        if self.sock is None:
            raise ApiError(f"VM {self.plan.vm_id} has no API socket yet", "start it first")
        return ApiClient(self.sock, timeout)

    def launch(self) -> dict[str, Any]:
        """Steps 1-4: cgroup, jail, jailer, socket. Returns ``GET /``."""
        p = self.plan
        self.on_step("cgroup")
        self.ops.cgroup_create(p.vm_id, p.spec.cgroup_version, p.limits)
        self.on_step("jail")
        staged = self.ops.jail_stage(p.vm_id, p.spec.uid, p.spec.gid, p.stage, p.logs)
        self.warnings += staged.warnings
        for item in p.imports:  # into the jail before the jailer hands it to the VM
            self.ops.jail_import(p.vm_id, item.name, item.source)
        self.on_step("launch")
        self.pid = self.ops.jail_launch(p.spec)
        self.on_step("api")
        self.sock = self.ops.jail_grant_api(p.vm_id)
        return self.client().wait_ready()

    def configure(self) -> dict[str, Any]:
        """Step 5: send every request, then check ``GET /vm/config`` shows them all."""
        self.on_step("configure")
        c = self.client()
        for r in api_requests(self.plan.vm):
            c.call(r.method, r.path, r.body)
        got: dict[str, Any] = c.get("/vm/config")
        bad = config_mismatches(expected_vm_config(self.plan.vm), got)
        if bad:
            raise ApiError(f"Firecracker did not take the configuration: {'; '.join(bad)}",
                           "the binary may be older than kiln expects (1.12)")
        if self.plan.vm.vsock is not None:  # bound by PUT /vsock
            self.vsock = self.ops.jail_grant_vsock(self.plan.vm_id)
        return got

    def start(self) -> None:
        """Launch, configure and boot (``InstanceStart``)."""
        self.launch()
        self.configure()
        self.on_step("start")
        self.client(timeout=10.0).action("InstanceStart")

    def send(self, req: ApiRequest, timeout: float = 5.0) -> None:
        """One request; ``ApiError`` unless Firecracker answers 2xx."""
        self.client(timeout).call(req.method, req.path, req.body)

    def pause(self) -> None:
        self.send(fcs.vm_state_request("Paused"))

    def resume(self) -> None:
        self.send(fcs.vm_state_request("Resumed"))

    def snapshot_create(self, snapshot: str, mem: str) -> None:
        """A full snapshot of the paused VM into chroot files (it writes all guest memory)."""
        self.send(fcs.snapshot_create_request(snapshot, mem), timeout=120.0)

    def snapshot_load(self, snapshot: str, mem: str, *, resume: bool = False,
                      taps: tuple[tuple[str, str], ...] = ()) -> None:
        """Load staged chroot files into a fresh Firecracker; the VM stays paused unless
        ``resume``. On an error Firecracker exits (1.12.1): destroy the VM."""
        self.send(fcs.snapshot_load_request(snapshot, mem, resume=resume, taps=taps),
                  timeout=30.0)

    def restore(self, *, resume: bool = False) -> dict[str, Any]:
        """Steps 1-4 of a restore plan, the logger, ``snapshot/load`` (the plan's NICs onto
        their taps): a paused VM (``resume`` runs it). Returns ``GET /``."""
        if not self.plan.restore:
            raise UsageError(f"VM {self.plan.vm_id}'s plan stages no snapshot",
                             "make it with launch_plan(restore=(state, memory))")
        self.launch()
        self.on_step("restore")
        for r in api_requests(self.plan.vm):
            if r.path == "/logger":
                self.send(r)
        taps = tuple((n.iface_id, n.host_dev_name) for n in self.plan.vm.nets)
        self.snapshot_load(f"/{fcs.STATE}", f"/{fcs.MEM}", resume=resume, taps=taps)
        if self.plan.vm.vsock is not None:  # the saved device's socket, bound by the load
            self.vsock = self.ops.jail_grant_vsock(self.plan.vm_id)
        info: dict[str, Any] = self.client().get("/")
        return info

    def running(self) -> bool:
        return bool(cg.cgroup_pids(self.cfg.cgroup, self.plan.vm_id,
                                   self.plan.spec.cgroup_version))

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the VM to exit; whether it did."""
        deadline = time.monotonic() + timeout
        while self.running():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self, timeout: float = 5.0) -> bool:
        """Ctrl-Alt-Del, wait up to ``timeout`` s, then kill the cgroup. Whether the guest
        went by itself."""
        clean = False
        if self.sock is not None and self.running():
            try:
                self.client(timeout=2.0).action("SendCtrlAltDel")
                clean = self.wait(timeout)
            except ApiError:
                clean = False  # not started, or already gone: the kill below settles it
        self.ops.cgroup_kill(self.plan.vm_id, self.plan.spec.cgroup_version)
        return clean

    def destroy(self) -> None:
        """Kill everything and remove the jail (idempotent)."""
        self.ops.cgroup_kill(self.plan.vm_id, self.plan.spec.cgroup_version)
        with contextlib.suppress(NotFound):
            self.ops.jail_remove(self.plan.vm_id)
