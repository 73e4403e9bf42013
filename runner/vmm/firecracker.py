"""The Firecracker driver (``runner.vmm.driver.Driver``): a VM's jail, launch, console,
supervision, stop and teardown under ``kiln run``.

``runner.vmm.fcapi`` is one VM's mechanics (launch plan, API client, privileged ops); this
module wires it into the run core (``runner.vm.lifecycle``). ``runner.vmm.choice`` picks
Firecracker (``--vmm firecracker``, or ``auto`` when configured and KVM runs a guest) and
gives this driver; a QEMU run never imports this module.

* **check**: no ``--net user`` and no ``-i`` (stdin) yet;
* **reserve**: the record names the jail directory, the API socket, the cgroup version
  and directories (``runner.vm.cgroup.firecracker_plan``) before any exists
  (``jail_doc``), all under the VM's host name (``runner.vm.state.host_name``: the root's
  key + the VM id, so the jail id and cgroup leaf say which root a VM belongs to), and a
  uid from the jails' range; the launch's ``on_step`` then stores the step about to run,
  and the pid is stored as soon as the jailer returns it. A crash at any step leaves only
  recorded things, which ``teardown`` (owner, ``kiln stop``/``rm``, the reaper) removes:
  kill the whole cgroup, then remove the jail (``helper.jail.jailer`` refuses a jail with
  mounts inside or a live Firecracker);
* **prepare**: the ELF kernel and the initrd in kiln's kernel cache (``boot_kernel``: the
  jail hard-links them), the VM on the kiln network first with ``--net tap`` (the jailer
  then starts Firecracker in the tap's namespace, ``--netns``), the launch plan;
* **own**: jailer launch, API configuration checked against ``GET /vm/config``,
  InstanceStart, supervision by cgroup (``run_vm``); a VM uid another caller's jail holds
  is given up for another;
* **I/O**: the jail's serial console split into kiln's three files
  (``runner.vmm.fcconsole``);
* **stop**: ``SendCtrlAltDel`` (kiln's init sets ``kernel.ctrl-alt-del=0`` as it starts
  the workload or the agent that will, so the kernel sends it SIGINT and it SIGTERMs that
  child, reports the exit and powers off; before that the kernel reboots, which ends the
  VM; a systemd image shuts down), wait up to the grace — or until the guest reported
  its exit and had ``AFTER_MARK`` s to power off — then kill the cgroup. ``kiln stop``
  asks the owner through a ``stop`` file in the VM directory; if the owner is gone it
  tears down itself.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.root import Root
from builder.store import hash_file
from helper import cgroup as cg
from helper.base.errors import KilnError, NotFound, UidInUse, UsageError
from helper.jail import jailer as jail
from runner import guest_init
from runner.tempfiles import locked_temp, write_atomic
from runner.vm import cgroup as vmcgroup
from runner.vm import resources as vmres
from runner.vm.spec import RunOptions, VMFiles, WarmFacts, WarmPlan
from runner.vm.state import LIVE, State, VMRecord, alive, mark_jails, proc_start_time
from runner.vmm import fcapi as fc
from runner.vmm import process as supervise
from runner.vmm.driver import Boot, Ended, Reservation
from runner.vmm.fcconsole import Channels, vmm_exit_code

log = logging.getLogger("kiln.vm")

BOOT_ARGS = ("console=ttyS0 reboot=k panic=1 pci=off quiet random.trust_cpu=on "
             "rootfstype=ext4")  # Firecracker appends root=/dev/vda rw and the mmio devices
STOP_FILE = "stop"
AFTER_MARK = 2.0  # s: after the exit marker, time for the guest to power off by itself


def ops_for(root_dir: Path) -> fc.PrivOps:
    """The helper's ops: in-process as root (area: the kiln root), through ``sudo
    kiln-helper`` otherwise — the same op functions either way, so root's jails hold their
    VM uids in the helper's ledger too (``helper.vmuids``). They load the jail config from
    the trusted config themselves."""
    from builder.helperclient import HelperOps, area

    return HelperOps(area_dir=area(root_dir))


def jail_doc(cfg: jail.JailConfig, host: str, vcg: vmcgroup.VMCgroups) -> dict[str, Any]:
    """The record's ``fc`` document, before anything exists. ``host``: the VM's host name,
    its jail id and cgroup leaf."""
    jd = jail.jail_dir(cfg, host)
    limits = vcg.limits
    return {"host": host, "jail": str(jd), "api_sock": str(jd / "api.sock"),
            "console": str(jd / "console.log"), "cgroup_version": vcg.version,
            "limits": {"cpus": limits.cpus, "memory_bytes": limits.memory_bytes,
                       "pids": limits.pids}, "step": "recorded"}


def cached_copy(src: Path, cache_dir: Path, prefix: str) -> Path:
    """``src`` when already under ``cache_dir``, else a copy there named by content hash
    (staging only takes files from kiln's own directories)."""
    if src.resolve().is_relative_to(cache_dir.resolve()):
        return src
    dest = cache_dir / f"{prefix}-{hash_file(src)[7:39]}"
    if not dest.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        with locked_temp(dest) as tmp:
            shutil.copyfile(src, tmp)
            os.chmod(tmp, 0o644)
            os.rename(tmp, dest)
    return dest


def boot_kernel(kernel: Path, initrd: Path, cache_dir: Path) -> tuple[Path, Path]:
    """(ELF vmlinux, initrd), both inside kiln's kernel cache and world-readable, so the
    jail hard-links them."""
    from runner.kernel_elf import ensure_vmlinux

    vmlinux = cached_copy(ensure_vmlinux(kernel, cache_dir), cache_dir, "vmlinux")
    return vmlinux, cached_copy(initrd, cache_dir, "initrd")


# -- the driver ---------------------------------------------------------------------------

@dataclass
class FcLaunch:
    """One Firecracker VM made for a run, and what it is made from again (another uid)."""

    boot: Boot
    vmlinux: Path  # in kiln's kernel cache
    initrd: Path
    rec: VMRecord  # the record it was made for (its uid)
    vm: fc.FirecrackerVM
    settings: Any = None  # warm runs: the guest's settings (channel.Settings), over vsock


class FirecrackerDriver:
    def __init__(self, root: Root, cfg: jail.JailConfig | None = None) -> None:
        self.root = root
        self._cfg = cfg  # pick's; a driver for a record loads it when it needs it

    @property
    def cfg(self) -> jail.JailConfig:
        if self._cfg is None:
            self._cfg = fc.jail_config(self.root.path)
        return self._cfg

    def check(self, opts: RunOptions) -> None:
        if opts.net == "user" or opts.interactive:
            raise UsageError("Firecracker VMs have no --net user and no -i (stdin) yet",
                             "use --vmm qemu for those, or --net tap")

    def warm_facts(self, opts: RunOptions) -> WarmFacts:
        """The warm key's VMM facts; what a Firecracker warm run cannot do yet is refused.
        ``--net tap`` images have a NIC and are saved on the kiln network (``fcwarm``)."""
        from runner.vmm import fcwarm

        self.check(opts)
        devices = fcwarm.devices(opts.net)
        cmdline = " ".join((BOOT_ARGS, f"init={guest_init.INIT_PATH}", *_warm_args()))
        return WarmFacts("firecracker", self.cfg.firecracker, "kvm", "host", devices,
                         cmdline, save_net=opts.net, mem_file=True)

    def reserve(self, host: str, opts: RunOptions, intent: vmres.NetIntent | None
                ) -> Reservation:
        del intent  # the tap belongs to the VM uid: from the jails' range either way
        cfg = self.cfg
        mark_jails(self.root.path)  # before the record names a jail: the reaper looks
        vcg = vmcgroup.firecracker_plan(cfg.cgroup, host, opts.cpus, opts.memory)
        return Reservation(vcg, (cfg.uid_first, cfg.uid_count), want_uid=True,
                           doc=jail_doc(cfg, host, vcg))

    def prepare(self, st: State, rec: VMRecord, boot: Boot, reserved: Reservation
                ) -> FcLaunch:
        del reserved  # the launch plan reads the record's document
        vmlinux, initrd = boot_kernel(boot.kernel, boot.initrd, self.root.path / "kernels")
        vm, rec, settings = self._make(st, rec, boot, vmlinux, initrd)
        return FcLaunch(boot, vmlinux, initrd, rec, vm, settings)

    def _make(self, st: State, rec: VMRecord, boot: Boot, vmlinux: Path, initrd: Path
              ) -> tuple[fc.FirecrackerVM, VMRecord, Any]:
        """The VM for the record's uid: on the kiln network first with ``--net tap`` (which
        may record another uid: ``vmres.retry_uid``), then its launch plan. Returns the
        record it was made for and a warm restore's settings (eth0 from this lease)."""
        from runner.vmm import fcwarm

        vn = None
        if boot.intent is not None:
            vn, rec = vmres.net_attach(self.root, st, rec, boot.intent, boot.picker)
        warm = _warm_launch(boot.warm)
        settings = fcwarm.settings(boot.warm, boot.workload, vn)
        on_disk = settings if boot.warm is None else None  # a cold boot has no channel
        vm = make_vm(self.cfg, ops_for(self.root.path), rec, vmlinux=vmlinux, initrd=initrd,
                     rootfs=boot.disk, cpus=boot.opts.cpus, memory=boot.opts.memory,
                     init=boot.init, nets=(vn.firecracker_nic(),) if vn else (),
                     netns=vn.spawn_netns if vn else None,
                     kernel_args=(*warm["args"], *([guest_init.SETTINGS_ARG] if on_disk else [])),
                     vsock=warm["vsock"], restore=warm["restore"])
        if on_disk is not None:
            guest_init.write_settings(boot.disk, fcwarm.disk_frame(on_disk),
                                      scratch=self.root.tmp)
            return vm, rec, None  # on the disk, not over vsock
        return vm, rec, settings

    def own(self, st: State, launch: FcLaunch, *, relay: bool,
            ready: Callable[[], None]) -> Ended:
        """``run_vm``; when ``jail-stage`` refuses the VM uid (another caller's jail holds
        it), ``run_vm`` has torn the VM down: its network goes too (the tap belongs to that
        uid), another uid is recorded, and the VM is made and launched again."""
        boot, rec, vm, settings = launch.boot, launch.rec, launch.vm, launch.settings
        while True:
            try:
                return run_vm(st, rec.id, boot.files, vm, timeout=boot.opts.timeout,
                              stop_grace=boot.opts.stop_grace, relay=relay, ready=ready,
                              warm=boot.warm, settings=settings)
            except UidInUse as e:
                vmres.release_net(self.root, st, rec.id)
                rec = boot.picker.another(st, rec, e)
                vm, rec, settings = self._make(st, rec, boot, launch.vmlinux, launch.initrd)

    def close(self, launch: FcLaunch) -> None:
        del launch  # the jailer is given paths: the parent holds nothing to drop

    def stop(self, st: State, rec: VMRecord, timeout: float) -> None:
        """Ask the owner (it sends Ctrl-Alt-Del, waits, kills the cgroup and records the
        outcome); without a live owner, tear down here."""
        if alive(rec.owner_pid, rec.owner_start):
            request_stop(Path(rec.dir), timeout)
            deadline = time.monotonic() + timeout + 20.0
            while time.monotonic() < deadline:
                cur = st.get(rec.id)
                if cur is None or cur.state not in LIVE:
                    return
                if not alive(cur.owner_pid, cur.owner_start):
                    break
                time.sleep(0.05)
        self.teardown(rec)
        st.finish(rec.id, "exited", 137, "stopped (forced)")

    def teardown(self, rec: VMRecord) -> None:
        doc = rec.fc_doc
        if not doc:
            return
        try:
            teardown(self.root.path, host_of(rec), int(doc["cgroup_version"]),
                     str(doc["jail"]))
        except KilnError:
            vmcgroup.remove(rec.cgroup_dirs)  # at least nothing keeps running (root or not)
            raise


def _warm_launch(warm: WarmPlan | None) -> dict[str, Any]:
    """What a warm run adds to the launch: the vsock device and ``kiln.ctl=`` (save and
    restore have the same device set: the NIC, when there is one, comes from ``--net
    tap`` either way), the saved files (restore)."""
    if warm is None:
        return {"args": (), "vsock": None, "restore": None}
    from runner.vmm import fcwarm

    restore = (warm.state, warm.mem) if warm.mode == "restore" and warm.mem else None
    return {"args": _warm_args(), "vsock": fcwarm.VSOCK, "restore": restore}


def _warm_args() -> tuple[str, ...]:
    """A warm boot's command line words beyond a cold one's: the vsock channel and the
    warm boot's word (the key's command line and the launch's, one list)."""
    from runner.guest_init import vsock

    return vsock.kernel_arg(), guest_init.WARM_ARG


def make_vm(cfg: jail.JailConfig, ops: fc.PrivOps, rec: VMRecord, *, vmlinux: Path,
            initrd: Path, rootfs: Path, cpus: int, memory: int, init: str,
            nets: tuple[fc.NetSpec, ...] = (), netns: str | None = None,
            kernel_args: tuple[str, ...] = (), vsock: fc.VsockSpec | None = None,
            restore: tuple[Path, Path] | None = None) -> fc.FirecrackerVM:
    """``nets``/``netns``/``kernel_args``: ``--net tap`` (``runner.network.VmNet``): eth0 on
    the VM's tap, the namespace the jailer joins, the guest's ``kiln.ip=``… words;
    ``vsock``/``restore``: warm start (``runner.vmm.fcwarm``)."""
    doc = rec.fc_doc
    version = int(doc["cgroup_version"])
    limits = cg.Limits(**doc["limits"])
    if rec.uid is None:
        raise KilnError(f"VM {rec.id} has no uid", "internal error: create it with want_uid")
    boot_args = " ".join((BOOT_ARGS, f"init={init}", *kernel_args))
    plan = fc.launch_plan(cfg, vm_id=host_of(rec), uid=rec.uid, kernel=vmlinux, initrd=initrd,
                          rootfs=rootfs, boot_args=boot_args, cpus=cpus,
                          mem_mib=memory >> 20, cgroup_version=version, limits=limits,
                          netns=netns, nets=nets, vsock=vsock, restore=restore)
    return fc.FirecrackerVM(cfg, ops, plan)


def _record_step(st: State, vm_id: str, step: str) -> None:
    rec = st.get(vm_id)
    doc = dict(rec.fc_doc) if rec else {}
    doc["step"] = step
    st.update(vm_id, fc=json.dumps(doc))


def request_stop(vm_dir: Path, grace: float) -> None:
    """``kiln stop``: ask the owner to stop the VM (it polls for this file)."""
    write_atomic(vm_dir / STOP_FILE, f"{grace}\n".encode())


def _stop_requested(vm_dir: Path) -> float | None:
    try:
        return max(0.0, float((vm_dir / STOP_FILE).read_text().strip() or 0))
    except (OSError, ValueError):
        return None


def _stop(vm: fc.FirecrackerVM, grace: float, ch: Channels, sigs: supervise.StopSignals
          ) -> None:
    """Ctrl-Alt-Del, wait up to ``grace`` s (a second signal cuts it short), kill."""
    with contextlib.suppress(KilnError):
        vm.client(timeout=2.0).action("SendCtrlAltDel")
    deadline, n = time.monotonic() + grace, sigs.count
    marked: float | None = None
    while vm.running() and time.monotonic() < deadline and sigs.count == n:
        ch.pump()
        if ch.split.exit_code is not None:  # reported; a poweroff may not end the VMM
            marked = marked or time.monotonic()
            if time.monotonic() - marked > AFTER_MARK:
                break
        time.sleep(0.05)
    vm.ops.cgroup_kill(vm.plan.vm_id, vm.plan.spec.cgroup_version)


def run_vm(st: State, vm_id: str, files: VMFiles, vm: fc.FirecrackerVM, *,
           timeout: float | None, stop_grace: float, relay: bool,
           ready: Callable[[], None], warm: WarmPlan | None = None,
           settings: Any = None) -> Ended:
    """Launch, configure, start (or restore), supervise to the end, tear down. Raises
    (after tearing down) when the VM did not start. ``warm`` save: the run ends once the
    guest's state, memory and disk are saved; restore: ``settings`` go out over vsock."""
    ch = Channels(vm.console_log, files.console, files.stdout, files.stderr, relay)
    with supervise.StopSignals() as sigs:
        _start(st, vm_id, files, vm, ch)
        if warm is not None and warm.mode == "save":
            return _save(vm, files, ch, warm, ready)
        ready()
        sender = None
        if settings is not None:
            from runner.guest_init.vsock import VsockSender

            assert vm.vsock is not None
            sender = VsockSender(vm.vsock, settings)
        try:
            timed_out, stopped, killed = _watch(vm, Path(files.dir), ch, sigs, timeout,
                                                stop_grace, sender)
        finally:
            if sender is not None:
                sender.close()
        ch.pump(final=True)
    vmm_tail = _save_log(vm, files.vmm_log)
    with contextlib.suppress(KilnError, OSError):
        vm.destroy()
    code = ch.split.exit_code
    vmm_code = vmm_exit_code(vmm_tail)
    if vmm_code is None:
        vmm_code = -9 if killed else 1
    return Ended(f"exit {code}\n" if code is not None else "", vmm_code, timed_out, stopped,
                 "\n".join(ch.split.seen), vmm_tail)


def _save(vm: fc.FirecrackerVM, files: VMFiles, ch: Channels, warm: WarmPlan,
          ready: Callable[[], None]) -> Ended:
    """A warm save (``runner.vmm.fcwarm``): hello, pause, snapshot, files and disk out;
    the VM is destroyed either way."""
    from runner.vmm import fcwarm

    try:
        fcwarm.save(vm, warm)
    finally:
        ch.pump(final=True)
        _save_log(vm, files.vmm_log)
        with contextlib.suppress(KilnError, OSError):
            vm.destroy()
    ready()
    return Ended("exit 0\n", 0, False, False, "", "")


def _start(st: State, vm_id: str, files: VMFiles, vm: fc.FirecrackerVM, ch: Channels
           ) -> None:
    """Launch, configure and boot — or restore a snapshot and resume it — each step
    recorded first; on failure the VM's console and log are kept and the VM is destroyed
    (a failed restore raises ``WarmFailed``: the run boots cold)."""
    vm.on_step = lambda step: _record_step(st, vm_id, step)
    try:
        if vm.plan.restore:
            _restore(st, vm_id, vm)
        else:
            vm.launch()
            assert vm.pid is not None
            st.update(vm_id, pid=vm.pid, pid_start=proc_start_time(vm.pid))
            vm.configure()
            vm.on_step("start")
            vm.client(timeout=10.0).action("InstanceStart")
    except BaseException:
        ch.pump(final=True)
        _save_log(vm, files.vmm_log)
        with contextlib.suppress(KilnError, OSError):
            vm.destroy()
        raise
    st.update(vm_id, state="running", started=time.time())
    for w in vm.warnings:
        log.warning("%s", w)


def _restore(st: State, vm_id: str, vm: fc.FirecrackerVM) -> None:
    from runner.vmm.qemuwarm import WarmFailed

    try:
        vm.restore(resume=True)  # the guest runs: its agent accepts the host's connection
    except fc.ApiError as e:
        raise WarmFailed(f"Firecracker could not load the warm image: {e.message}") from None
    finally:
        if vm.pid is not None:
            st.update(vm_id, pid=vm.pid, pid_start=proc_start_time(vm.pid))


def _watch(vm: fc.FirecrackerVM, vm_dir: Path, ch: Channels, sigs: supervise.StopSignals,
           timeout: float | None, stop_grace: float, sender: Any = None
           ) -> tuple[bool, bool, bool]:
    """Pump the console until the VM ends, or stop it on --timeout, a signal or ``kiln
    stop``: (timed out, stopped, killed)."""
    started = time.monotonic()
    timed_out = stopped = False
    marked: float | None = None
    while True:
        ch.pump()
        if sender is not None:
            sender.pump()
        if not vm.running():
            return timed_out, stopped, False
        now = time.monotonic()
        if ch.split.exit_code is not None:
            marked = marked or now
            if now - marked > AFTER_MARK:  # reported; a poweroff may not end the VMM
                vm.ops.cgroup_kill(vm.plan.vm_id, vm.plan.spec.cgroup_version)
                return timed_out, stopped, False
        grace: float | None = None
        if timeout is not None and now - started >= timeout:
            timed_out, grace = True, 1.0
        elif sigs.count:
            stopped, grace = True, stop_grace
        elif (asked := _stop_requested(vm_dir)) is not None:
            stopped, grace = True, asked
        if grace is not None:
            _stop(vm, grace, ch, sigs)
            return timed_out, stopped, True
        time.sleep(supervise.tick(now - started))


def _save_log(vm: fc.FirecrackerVM, dest: Path) -> str:
    """Keep Firecracker's log (inside the jail, which goes) in the VM directory."""
    try:
        data = (vm.chroot / fc.LOG).read_bytes()
    except OSError:
        return ""
    with contextlib.suppress(OSError):
        write_atomic(dest, data)
    return data[-4096:].decode("utf-8", "replace")


# -- teardown from anywhere (stop, rm, the reaper) ------------------------------------------

def host_of(rec: VMRecord) -> str:
    """The VM's host name (jail id, cgroup leaf) as its record names it (records from before
    root keys used the bare VM id)."""
    return str(rec.fc_doc.get("host") or rec.id)


def teardown(root_dir: Path, host: str, version: int | None, jail_path: str | None) -> None:
    """Kill the cgroup(s) of the VM with host name ``host`` and remove its jail
    (idempotent). ``version`` None: both."""
    cfg = fc.jail_config(root_dir)
    ops = ops_for(root_dir)
    for v in (1, 2) if version is None else (version,):
        with contextlib.suppress(NotFound):
            ops.cgroup_kill(host, v)
    jd = jail.jail_dir(cfg, host)
    if jail_path is not None and str(jd) != jail_path:
        raise KilnError(f"jail {jail_path} of VM {host} is not under the configured base "
                        f"{cfg.chroot_base}", "remove it by hand after checking for mounts")
    with contextlib.suppress(NotFound):
        ops.jail_remove(host)
