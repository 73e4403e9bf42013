"""The QEMU driver (``runner.vmm.driver.Driver``): one VM's QEMU from its files to its end.

* ``reserve``: the cgroups (``runner.vm.cgroup.qemu_plan``: made directly as root, else
  through kiln-helper, and QEMU then runs as the caller: no ``-runas``/``-chroot``,
  ``-sandbox on`` still); a uid when QEMU runs as root (``-runas``) or the VM is on the
  kiln network (the helper's range: the tap belongs to it);
* ``prepare``: the control FIFOs, the cgroups, the tap (``runner.vm.resources``: QEMU as
  root opens it by name inside its namespace; as a user it gets an fd the helper
  attached), the command line (``runner.vmm.qemuargv``), the run's settings for the guest
  (``Boot.workload`` with the network and a fresh machine id);
* ``own``: spawn QEMU into its cgroups (``runner.vmm.process``), record the pid (state
  ``running``), send the settings over the control channel once the guest asks
  (``runner.guest_init.sender``), relay the workload's output files to kiln's
  stdout/stderr, honour ``--timeout`` and Ctrl-C/SIGTERM — a graceful stop through the
  guest's control port (``request_stop``: a ``STP1`` frame), then SIGTERM, then SIGKILL
  of the VMM;
* ``stop`` (``kiln stop``): the same control port, then SIGKILL of the VMM and its cgroups;
  the owner records the outcome;
* warm start (docs/warm.md, ``runner.vmm.qemuwarm``): ``Boot.warm`` = save: the run
  ends once the guest's state and disk are saved; restore: QEMU loads the state
  (``-incoming defer``) and the settings go out at once (``SettingsSender(greeted=)``);
* ``teardown``: nothing — QEMU holds nothing beyond the record's cgroups and network.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from builder.root import Root
from helper.base.errors import UsageError
from runner import guest_init
from runner.guest_init import channel
from runner.guest_init.sender import SEED_BYTES, SettingsSender, send_stop
from runner.vm import cgroup as vmcgroup
from runner.vm import resources as vmres
from runner.vm.spec import RunOptions, VMFiles, WarmFacts, WarmPlan, tail
from runner.vm.state import UID_BASE, UID_COUNT, State, VMRecord, alive, proc_start_time
from runner.vmm import process as supervise
from runner.vmm import qemuargv, qemuwarm
from runner.vmm.driver import Boot, Ended, Reservation

log = logging.getLogger("kiln.vm")


@dataclass(frozen=True)
class QemuLaunch:
    """One QEMU ready to start: its command line and what it inherits."""

    vm_id: str
    argv: list[str]
    files: VMFiles
    opts: RunOptions
    cgroup_dirs: tuple[str, ...]
    nic: vmres.QemuNic | None  # --net tap: the namespace to start in, fds to inherit
    settings: channel.Settings | None = None  # None: the image's own init (--init image)
    warm: WarmPlan | None = None  # save to it, or restore from it (docs/warm.md)
    disk: Path | None = None  # the VM's snapshot (a save copies it)
    ram: qemuwarm.MemoryFd | None = None  # a save's guest memory: kiln's memfd


def request_stop(control: Path, grace: float) -> bool:
    """Ask the guest init to stop the workload: SIGTERM, SIGKILL after ``grace`` s."""
    return send_stop(control, grace)


def guest_settings(w: guest_init.Workload, vm_id: str, net: str,
                   lease: channel.GuestNet | None, stdin: bool | None = None
                   ) -> channel.Settings:
    """What the guest is sent: the workload, a fresh machine id, eth0 (``--net user``:
    slirp's fixed addresses; ``--net tap``: ``lease``, the helper's answer); ``stdin`` for
    warm runs, whose stdin port is always there (None: the port exists only with ``-i``)."""
    guest_net = lease if net == "tap" else None
    if net == "user":
        from helper.net.core import mac_for  # ~90 ms of imports: only when needed

        guest_net = channel.GuestNet(mac_for(vm_id), *qemuargv.USER_NET)
    s = channel.Settings(w, secrets.token_hex(16), guest_net, stdin)
    try:  # refused now, before the boot, rather than when the guest asks
        channel.encode_settings(s, time_ns=time.time_ns(), seed=bytes(SEED_BYTES))
    except channel.FrameError as e:
        raise UsageError(f"the run's settings cannot be sent to the guest: {e}",
                         "shorten the command and environment: together they must fit "
                         "in 64 KiB") from None
    return s


def _close(nic: vmres.QemuNic | None, ram: qemuwarm.MemoryFd | None = None) -> None:
    for fd in nic.keep_fds if nic else ():
        with contextlib.suppress(OSError):
            os.close(fd)
    if ram is not None:
        ram.close()


class QemuDriver:
    def __init__(self, root: Root) -> None:
        self.root = root

    def check(self, opts: RunOptions) -> None:
        del opts  # QEMU does everything kiln run offers

    def warm_facts(self, opts: RunOptions) -> WarmFacts:
        """The warm key's VMM facts: the binary (its version counts), the accelerator and
        CPU model (a state saved under KVM does not load under TCG), the device set."""
        del opts  # every option is carried by a warm run's fixed device set
        from builder import proc
        from runner import guest_init

        accel = qemuargv.host_accel(self.root)
        cmdline = qemuargv.boot_args(guest_init.INIT_PATH, accel, qemuargv.host_tsc_khz(),
                                     warm=True)
        ram_file = qemuargv.qemu_version(self.root) >= qemuargv.RAM_FILE
        return WarmFacts("qemu", Path(proc.which(qemuargv.BINARY)), accel,
                         "host" if accel == "kvm" else "qemu64",
                         qemuargv.WARM_DEVICES + (";ram-file" if ram_file else ""),
                         " ".join(cmdline), mem_file=ram_file)

    def reserve(self, host: str, opts: RunOptions, intent: vmres.NetIntent | None
                ) -> Reservation:
        uids = intent.uid_range if intent is not None else (UID_BASE, UID_COUNT)
        return Reservation(vmcgroup.qemu_plan(host, opts.cpus, opts.memory), uids,
                           want_uid=os.geteuid() == 0 or intent is not None)

    def prepare(self, st: State, rec: VMRecord, boot: Boot, reserved: Reservation
                ) -> QemuLaunch:
        files, opts = boot.files, boot.opts
        # the guest's control port (qemuargv: ``-chardev pipe``), where ``request_stop`` writes
        os.mkfifo(f"{files.control}.in", 0o600)
        os.mkfifo(f"{files.control}.out", 0o600)
        nic: vmres.QemuNic | None = None
        ram: qemuwarm.MemoryFd | None = None
        try:
            if boot.warm is not None and boot.warm.mem is not None and \
                    boot.warm.mode == "save":
                # a restore maps the image's file; a save's memory is a memfd, written
                # into the image after (qemuwarm.MemoryFd says why)
                ram = qemuwarm.MemoryFd(opts.memory)
            for w in vmcgroup.create(reserved.cgroups):
                log.warning("%s (limits not applied)", w)
            if boot.intent is not None:
                vmnet, rec = vmres.net_attach(self.root, st, rec, boot.intent, boot.picker)
                nic = vmres.qemu_nic(self.root, vmnet)
            as_root = os.geteuid() == 0
            spec = qemuargv.QemuSpec(
                name=f"kiln-{boot.host}", kernel=boot.kernel, initrd=boot.initrd,
                disk=boot.disk, cpus=opts.cpus, memory_mib=opts.memory >> 20,
                accel=qemuargv.host_accel(self.root), tsc_khz=qemuargv.host_tsc_khz(),
                console_log=files.console, stdout=files.stdout, stderr=files.stderr,
                status=files.status, control=files.control, init=boot.init, net=opts.net,
                tap=nic.tap if nic else None,
                forwards=boot.forwards if opts.net == "user" else (),
                interactive=opts.interactive,
                runas=f"{rec.uid}:{rec.uid}" if as_root and rec.uid is not None else None,
                chroot=files.chroot if as_root else None,
                warm=boot.warm.mode if boot.warm else None,
                qmp=files.dir / "qmp.sock" if boot.warm else None,
                version=qemuargv.qemu_version(self.root),
                ram=_ram_path(boot.warm, ram))
            work = boot.workload
            settings = guest_settings(work, rec.id, opts.net, nic.guest if nic else None,
                                      opts.interactive if boot.warm else None) if work else None
            return QemuLaunch(rec.id, qemuargv.argv(spec), files, opts,
                              tuple(rec.cgroup_dirs), nic, settings, boot.warm, boot.disk,
                              ram)
        except BaseException:
            _close(nic, ram)
            raise

    def close(self, launch: QemuLaunch) -> None:
        _close(launch.nic, launch.ram)

    def own(self, st: State, launch: QemuLaunch, *, relay: bool,
            ready: Callable[[], None]) -> Ended:
        files, opts, nic = launch.files, launch.opts, launch.nic
        with supervise.StopSignals() as sigs:
            try:
                pid = supervise.spawn(launch.argv, log_path=files.vmm_log,
                                      cgroup_dirs=launch.cgroup_dirs,
                                      stdin=0 if opts.interactive else None,
                                      attach=vmcgroup.attacher(launch.cgroup_dirs),
                                      netns=nic.netns if nic else None,
                                      keep_fds=(*(nic.keep_fds if nic else ()),
                                                *_ram_fds(launch)))
            except BaseException:
                _close(None, launch.ram)
                raise
            finally:
                _close(nic)  # QEMU holds the tap now (the memfd: the save writes it out)
            st.update(launch.vm_id, pid=pid, pid_start=proc_start_time(pid), state="running",
                      started=time.time())
            sender = SettingsSender(files.control, launch.settings,
                                    greeted=launch.warm is not None) \
                if launch.settings is not None else None
            try:
                if launch.warm is not None:
                    # a restore's settings go into the FIFO before `cont`: the guest reads
                    # them as it resumes, not a tick later
                    _warm_step(pid, launch, sender.pump if sender is not None else None)
                    if launch.warm.mode == "save":
                        ready()
                        return Ended("exit 0", 0, False, False, "", "")  # saved: QEMU quit
                ready()
                relays = ([supervise.Relay(files.stdout, 1), supervise.Relay(files.stderr, 2)]
                          if relay else [])
                code, timed_out, stopped = _supervise(pid, files, opts, sigs, relays, sender)
            finally:
                if sender is not None:
                    sender.close()
        return Ended(tail(files.status, 256), code, timed_out, stopped,
                     tail(files.console), tail(files.vmm_log))

    def stop(self, st: State, rec: VMRecord, timeout: float) -> None:
        del st  # the owner records the outcome (the lifecycle waits for it)
        request_stop(VMFiles(Path(rec.dir)).control, timeout)
        deadline = time.monotonic() + timeout + 3.0
        while time.monotonic() < deadline and alive(rec.pid, rec.pid_start):
            time.sleep(0.05)
        if alive(rec.pid, rec.pid_start):
            assert rec.pid is not None
            supervise.kill_vmm(rec.pid, signal.SIGKILL)
            vmcgroup.remove(rec.cgroup_dirs)

    def teardown(self, rec: VMRecord) -> None:
        del rec  # nothing beyond the record's cgroups and network


def _ram_path(warm: WarmPlan | None, ram: qemuwarm.MemoryFd | None) -> Path | None:
    """The guest memory's file: a save's memfd (inherited at its number), a restore's
    image file; None without one (a cold run, a full-stream image)."""
    if ram is not None and ram.fd is not None:
        return Path(f"/proc/self/fd/{ram.fd}")
    return warm.mem if warm is not None and warm.mode == "restore" else None


def _ram_fds(launch: QemuLaunch) -> tuple[int, ...]:
    return () if launch.ram is None or launch.ram.fd is None else (launch.ram.fd,)


def _warm_step(pid: int, launch: QemuLaunch, before_cont: Callable[[], None] | None) -> None:
    """Save (boot to the hello, pause, copy the disk, write the state, quit) or restore
    (load the state, ``before_cont``, continue); on failure QEMU is killed and
    ``WarmFailed`` raised."""
    plan, qmp = launch.warm, launch.files.dir / "qmp.sock"
    assert plan is not None
    assert launch.disk is not None
    try:
        if plan.mode == "save":
            qemuwarm.save(pid, qmp, launch.files.control, launch.disk, plan)
        else:
            qemuwarm.restore(pid, qmp, plan, before_cont=before_cont)
    except BaseException:
        _close(None, launch.ram)
        with contextlib.suppress(OSError):
            supervise.kill_vmm(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        raise
    if plan.mode == "save":  # QEMU quit: reaped here, never killed after this
        try:
            code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            if code != 0:
                raise qemuwarm.WarmFailed(f"QEMU exited {code} after the save")
            if launch.ram is not None and launch.ram.fd is not None and plan.mem is not None:
                qemuwarm.write_memory(launch.ram.fd, plan.mem)
        finally:
            _close(None, launch.ram)


def _supervise(pid: int, files: VMFiles, opts: RunOptions, sigs: supervise.StopSignals,
               relays: list[supervise.Relay], sender: SettingsSender | None
               ) -> tuple[int | None, bool, bool]:
    """Wait for QEMU to exit, sending the guest its settings, relaying output and acting
    on --timeout and signals: the control port first (never inside a settings frame being
    written), SIGTERM after the grace (+3 s), SIGKILL 2 s later. (exit code, timed out,
    stopped)."""
    started = time.monotonic()
    timed_out = stopped = stop_sent = False
    force_at: float | None = None
    pending: float | None = None  # the grace of a stop not written yet
    code: int | None = None
    handled = 0
    while True:
        got, wstatus = os.waitpid(pid, os.WNOHANG)
        if sender is not None and not got:
            sender.pump()
        for rl in relays:
            rl.pump()
        if got:
            code = os.waitstatus_to_exitcode(wstatus)
            break
        now = time.monotonic()
        want_stop = False
        if opts.timeout is not None and not timed_out and now - started >= opts.timeout:
            timed_out = want_stop = True
        if sigs.count > handled:
            handled = sigs.count
            if stopped:  # a second Ctrl-C: no more grace
                force_at = now
            stopped = want_stop = True
        if want_stop and not stop_sent:
            pending = 1.0 if timed_out else opts.stop_grace
            force_at = now + pending + 3.0
        if pending is not None and not (sender is not None and sender.writing):
            stop_sent = request_stop(files.control, pending)
            pending = None
        if force_at is not None and now >= force_at:
            supervise.kill_vmm(pid, signal.SIGTERM if now - force_at < 2 else signal.SIGKILL)
        time.sleep(supervise.tick(now - started))
    for rl in relays:
        rl.pump()
    return code, timed_out, stopped
