"""The VM lifecycle: run (foreground or detached), stop, rm, logs, ps.

``run`` in order, each host resource recorded before it exists (runner/vm/state.py):

1. reconcile (runner/vm/reaper.py); ``--net tap``: the network's preflight (refusals here
   leave nothing); resolve SOURCE to a volume (building it, cache permitting); open the
   pool ("no pool: run `kiln pool init`"); kernel + initrd;
2. INSERT the record (state ``creating``: snapshot id = VM id, VM directory, cgroups, uid,
   the network objects);
3. the VM directory, the snapshot, kiln's init injected into it, the cgroups, the tap
   (``runner.vm.resources``);
4. ``--detach``: fork the owner (setsid) which does the rest; the parent prints the id;
5. spawn QEMU (pid recorded, state ``running``), relay the workload's output files to
   kiln's stdout/stderr, honour ``--timeout`` and Ctrl-C/SIGTERM (graceful stop through the
   guest's control port, then SIGTERM/SIGKILL of the VMM);
6. the outcome (``runner.vm.spec.outcome``, pure) → ``exited``/``failed``; cgroups and
   network released (``vmres.release``); with ``--rm`` the snapshot, the directory and
   the record go too.

Every end path releases: the owner at exit, a failed setup (``_abandon``), ``stop`` (it
returns once the owner's teardown is done, or does it itself), ``remove`` (which keeps the
record while the network cannot be released), and the reaper for a dead owner.

Cgroups: ``runner.vm.cgroup`` (directly as root; else through kiln-helper, and QEMU runs
as the caller: no ``-runas``/``-chroot``, ``-sandbox on`` still). Network: ``runner.vm.resources``
(QEMU as root opens the tap by name inside its namespace; as a user it gets an fd the
helper attached).

Firecracker (``--vmm firecracker``, or ``auto`` when configured and KVM runs a guest):
steps 1-4 are the same except that the record also names the jail, the API socket and the
jail's cgroups (no QEMU cgroups); step 5 is ``runner.vmm.firecracker.own`` (jailer launch — into
the tap's namespace with ``--netns`` —, API configuration checked against ``GET
/vm/config``, InstanceStart, supervision by cgroup).

Exit codes: the workload's; 124 when --timeout fired; 125 when kiln or the VMM failed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from builder.root import Root, rmtree
from helper.base.errors import KilnError, NotFound, UsageError
from runner.vm import cgroup as vmcgroup
from runner.vm import resources as vmres
from runner.vm.spec import RunOptions, VMFiles, outcome, tail
from runner.vm.state import (
    LIVE,
    UID_BASE,
    UID_COUNT,
    State,
    VMRecord,
    alive,
    host_name,
    new_vm_id,
    proc_start_time,
    root_key,
)
from runner.vmm import process as supervise
from runner.vmm import qemu
from runner.volref import resolve_volume

__all__ = ["RunOptions", "logs", "ps", "remove", "resolve_volume", "run", "stop"]

log = logging.getLogger("kiln.vm")
_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$")


def run(root: Root, source: str, opts: RunOptions, registry_opts: Any,
        *, on_ready: Callable[[str], None] | None = None) -> int:
    """``kiln run``: returns the exit code kiln should exit with."""
    from builder.pool import open_pool
    from runner import guest_init, kernel
    from runner.vm import reaper
    from runner.vmm import choice as vmmchoice

    t_entry = time.monotonic()
    root.ensure()
    if opts.name is not None and not _NAME.fullmatch(opts.name):
        raise UsageError(f"invalid VM name {opts.name!r}",
                         "use letters, digits, _ . - (up to 63), starting with a letter/digit")
    if opts.cpus < 1 or opts.memory < (64 << 20):
        raise UsageError("a VM needs at least 1 cpu and 64M of memory",
                         "raise --cpus / --memory")
    vmm, vmm_reason, fc_cfg = vmmchoice.pick(root, opts.vmm)
    is_fc = fc_cfg is not None and vmm == "firecracker"
    if is_fc and (opts.net == "user" or opts.interactive):
        raise UsageError("Firecracker VMs have no --net user and no -i (stdin) yet",
                         "use --vmm qemu for those, or --net tap")
    forwards = qemu.forwards_of(opts.publish)
    if forwards and opts.net == "none":
        raise UsageError("-p needs --net tap or --net user", "add --net tap (or --net user)")
    st = State(root.path)
    reaper.reconcile(root, st)
    # --net tap: refused (no [net], overlapping subnet, …) before anything is recorded
    intent = vmres.net_preflight(root, forwards) if opts.net == "tap" else None
    volume = resolve_volume(root, source, registry_opts)
    pool = open_pool(root.path)
    if pool is None:
        raise NotFound("no pool: run `kiln pool init`",
                       "`kiln pool init` picks a backend for this host")
    boot = kernel.boot_files(root.path / "kernels", opts.kernel, opts.initrd)
    vm_id = new_vm_id()
    host = host_name(root_key(root.path), vm_id)  # its name in host-wide places
    work = None
    if opts.init == "kiln":
        work = guest_init.workload(volume.meta.get("config") or {}, command=opts.command,
                                   entrypoint=opts.entrypoint,
                                   env=opts.env, workdir=opts.workdir, user=opts.user,
                                   hostname=opts.name.lower().replace("_", "-").replace(
                                       ".", "-") if opts.name else vm_id)
    elif opts.command or opts.entrypoint is not None:
        what = "a command" if opts.command else "--entrypoint"
        raise UsageError(f"{what} cannot be given with --init image",
                         "the image's /sbin/init decides what runs")
    files = VMFiles(st.vms_dir / vm_id)
    as_root = os.geteuid() == 0
    vcg = vmcgroup.NONE if is_fc else \
        vmcgroup.plan(host, opts.cpus, opts.memory + supervise.MEMORY_OVERHEAD)
    cg_dirs, fc_doc = list(vcg.dirs), None
    uids = intent.uid_range if intent is not None else (UID_BASE, UID_COUNT)
    if is_fc:
        from runner.vmm import (
            firecracker as fcdriver,  # only now: a QEMU run never imports the driver
        )

        version, limits = fcdriver.host_cgroup_choice(fc_cfg, opts.cpus, opts.memory)
        fc_doc, cg_dirs = fcdriver.resources(fc_cfg, host, version, limits)
        uids = (fc_cfg.uid_first, fc_cfg.uid_count)
    spec_doc = {"source": source, "cpus": opts.cpus, "memory": opts.memory,
                "kernel": str(boot.kernel), "initrd": str(boot.initrd), "init": opts.init,
                "net": opts.net, "argv": list(work.argv) if work else [],
                "vmm_reason": vmm_reason}
    rec = st.create(vm_id=vm_id, name=opts.name, vmm=vmm, volume=volume.id,
                    snapshot=reaper.snapshot_id(vm_id), vm_dir=files.dir, cgroups=cg_dirs,
                    want_uid=as_root or is_fc or intent is not None, auto_remove=opts.rm,
                    spec=spec_doc, uid_range=uids, fc=fc_doc,
                    net=vmres.net_record(vm_id, intent) if intent is not None else None)
    st.update(rec.id, reason=vmm_reason)  # what `kiln ps` says until the VM ends
    picker = vmres.UidPicker(uids)  # where another uid comes from if the helper refuses it
    try:
        files.dir.parent.mkdir(exist_ok=True)
        files.dir.mkdir(mode=0o700)
        files.chroot.mkdir(mode=0o500)
        for p in (files.console, files.stdout, files.stderr, files.status):
            p.touch(mode=0o600)
        if not is_fc:
            os.mkfifo(f"{files.control}.in", 0o600)
            os.mkfifo(f"{files.control}.out", 0o600)
        if not pool.has_volume(volume.id):
            pool.import_volume(volume.id, volume.path)
        snap = pool.create_snapshot(volume.id, snap_id=rec.snapshot, size=opts.disk_size)
        guest_init.inject(Path(snap.path), work, scratch=root.tmp)
        if is_fc:
            vmlinux, initrd = fcdriver.boot_kernel(boot.kernel, boot.initrd,
                                                   root.path / "kernels")
            fboot = fcdriver.Boot(vmlinux, initrd, Path(snap.path), opts.cpus, opts.memory,
                                  guest_init.INIT_PATH if work else "/sbin/init")

            def remake(s: State, r: VMRecord) -> tuple[Any, VMRecord]:
                return fcdriver.vm_for(fc_cfg, root, s, r, fboot, intent, picker)

            fvm, rec = remake(st, rec)
            log.debug("kiln overhead before the VMM: %.0f ms",
                      (time.monotonic() - t_entry) * 1e3)
    except BaseException as e:
        _abandon(root, st, rec, f"setup failed: {e}")
        raise
    if is_fc:
        def body(own_st: State, ready_fd: int | None) -> int:
            return _own_fc(root, own_st, rec, files, (fvm, remake, picker), opts,
                           ready_fd=ready_fd)

        return _detach(root, st, rec, files, body, on_ready) if opts.detach else body(st, None)
    nic: vmres.QemuNic | None = None
    try:
        for w in vmcgroup.create(vcg):
            log.warning("%s (limits not applied)", w)
        if intent is not None:
            vmnet, rec = vmres.net_attach(root, st, rec, intent, picker)
            nic = vmres.qemu_nic(root, vmnet)
        tsc = qemu.host_tsc_khz()
        accel = _accel(root)
        spec = qemu.QemuSpec(
            name=f"kiln-{host}", kernel=boot.kernel, initrd=boot.initrd,
            disk=Path(snap.path), cpus=opts.cpus, memory_mib=opts.memory >> 20, accel=accel,
            tsc_khz=tsc, console_log=files.console, stdout=files.stdout, stderr=files.stderr,
            status=files.status, control=files.control,
            init=guest_init.INIT_PATH if work else "/sbin/init", net=opts.net,
            tap=nic.tap if nic else None, forwards=forwards if opts.net == "user" else (),
            interactive=opts.interactive,
            runas=f"{rec.uid}:{rec.uid}" if as_root and rec.uid is not None else None,
            chroot=files.chroot if as_root else None)
        argv = qemu.argv(spec)
        log.debug("kiln overhead before the VMM: %.0f ms", (time.monotonic() - t_entry) * 1e3)
    except BaseException as e:
        _close(nic)
        _abandon(root, st, rec, f"setup failed: {e}")
        raise
    if opts.detach:
        def qbody(own_st: State, ready_fd: int | None) -> int:
            return _own(root, own_st, rec, files, argv, opts, relay=False, ready_fd=ready_fd,
                        nic=nic)

        try:
            return _detach(root, st, rec, files, qbody, on_ready)
        finally:
            _close(nic)  # the owner has its own copy
    return _own(root, st, rec, files, argv, opts, relay=True, nic=nic)


def _close(nic: vmres.QemuNic | None) -> None:
    for fd in nic.keep_fds if nic else ():
        with contextlib.suppress(OSError):
            os.close(fd)


def _accel(root: Root) -> str:
    """kvm when the KVM probe runs a guest (cached per boot), else tcg."""
    from runner.vmm import choice as vmmchoice

    return "kvm" if vmmchoice.kvm_verdict(root)[0] else "tcg"


def _own_fc(root: Root, st: State, rec: VMRecord, files: VMFiles, made: tuple[Any, Any, Any],
            opts: RunOptions, *, ready_fd: int | None) -> int:
    """Run a Firecracker VM to its end (runner.vmm.firecracker) and record the outcome. ``made``:
    the VM, how to make it again for another uid, the uids refused so far."""
    from runner.vmm import firecracker as fcdriver

    def ready() -> None:
        if ready_fd is not None:
            os.write(ready_fd, b"ok")
            os.close(ready_fd)

    try:
        end, rec = fcdriver.own_retrying(
            root, st, rec, files, *made, timeout=opts.timeout, stop_grace=opts.stop_grace,
            relay=ready_fd is None, ready=ready)
    except BaseException as e:
        _abandon(root, st, rec, f"the VMM did not start: {e}")
        raise
    out = outcome(end.status_text, end.vmm_code, timed_out=end.timed_out,
                  stopped=end.stopped, own_init=opts.init == "image",
                  console_tail=end.console_tail, vmm_tail=end.vmm_tail)
    st.finish(rec.id, out.state, out.exit_code, out.reason)
    vmres.release(root, st, rec)
    if opts.rm:
        remove(root, rec.id, st=st)
    return out.kiln_exit


def _abandon(root: Root, st: State, rec: VMRecord, reason: str) -> None:
    """Setup failed: the record says why; resources go (all of them with --rm)."""
    st.finish(rec.id, "failed", None, reason)
    vmres.release(root, st, rec)
    if rec.vmm == "firecracker":
        from runner.vmm import firecracker as fcdriver

        try:
            fcdriver.teardown_record(root.path, rec)
        except (KilnError, OSError) as e:
            log.warning("VM %s: %s", rec.id, e)
    if rec.auto_remove:
        with contextlib.suppress(KilnError, OSError):
            remove(root, rec.id, st=st)


def _detach(root: Root, st: State, rec: VMRecord, files: VMFiles,
            body: Callable[[State, int | None], int],
            on_ready: Callable[[str], None] | None) -> int:
    """Fork the owner, which runs ``body(its own State, ready fd)``; print the id once it
    wrote "ok" to the ready fd."""
    # SQLite state must not cross a fork (its locks and WAL index are per process): the
    # owner opens its own connection, the parent reopens one if it needs it.
    st.close()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the owner: supervises the VMM after `kiln run` has returned
        os.close(r)
        code = 1
        try:
            os.setsid()
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            own = State(root.path)
            own.update(rec.id, owner_pid=os.getpid(), owner_start=proc_start_time(os.getpid()))
            body(own, w)
            code = 0
        except BaseException:  # the owner must always reach os._exit
            import traceback

            with contextlib.suppress(OSError):
                (files.dir / "owner.log").write_text(traceback.format_exc())
            with contextlib.suppress(OSError):
                os.write(w, b"error")
        finally:
            os._exit(code)
    os.close(w)
    msg = b""
    while chunk := os.read(r, 256):
        msg += chunk
        if msg.startswith(b"ok"):
            break
    os.close(r)
    if not msg.startswith(b"ok"):
        cur = State(root.path).get(rec.id)
        raise KilnError(f"VM {rec.id} failed to start: "
                        f"{cur.reason if cur else 'no record'}", f"see `kiln logs {rec.id}`")
    if on_ready is not None:
        on_ready(rec.id)
    return 0


def _own(root: Root, st: State, rec: VMRecord, files: VMFiles, argv: list[str],
         opts: RunOptions, *, relay: bool, ready_fd: int | None = None,
         nic: vmres.QemuNic | None = None) -> int:
    """Spawn the VMM and supervise it to the end; record the outcome."""
    with supervise.StopSignals() as sigs:
        try:
            pid = supervise.spawn(argv, log_path=files.vmm_log, cgroup_dirs=rec.cgroup_dirs,
                                  stdin=0 if opts.interactive else None,
                                  attach=vmcgroup.attacher(rec.cgroup_dirs),
                                  netns=nic.netns if nic else None,
                                  keep_fds=nic.keep_fds if nic else ())
        except BaseException as e:
            _abandon(root, st, rec, f"the VMM did not start: {e}")
            raise
        finally:
            _close(nic)  # QEMU holds the tap now
        st.update(rec.id, pid=pid, pid_start=proc_start_time(pid), state="running",
                  started=time.time())
        if ready_fd is not None:
            os.write(ready_fd, b"ok")
            os.close(ready_fd)
        relays = ([supervise.Relay(files.stdout, 1), supervise.Relay(files.stderr, 2)]
                  if relay else [])
        started = time.monotonic()
        timed_out = stopped = False
        stop_sent = False
        force_at: float | None = None
        code: int | None = None
        handled = 0
        while True:
            got, wstatus = os.waitpid(pid, os.WNOHANG)
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
                grace = 1.0 if timed_out else opts.stop_grace
                stop_sent = supervise.request_stop(files.control, grace)
                force_at = now + grace + 3.0
            if force_at is not None and now >= force_at:
                supervise.kill_vmm(pid, signal.SIGTERM if now - force_at < 2 else
                                   signal.SIGKILL)
            time.sleep(0.02)
        for rl in relays:
            rl.pump()
    out = outcome(tail(files.status, 256), code, timed_out=timed_out, stopped=stopped,
                  own_init=opts.init == "image", console_tail=tail(files.console),
                  vmm_tail=tail(files.vmm_log))
    st.finish(rec.id, out.state, out.exit_code, out.reason)
    vmres.release(root, st, rec)
    if opts.rm:
        remove(root, rec.id, st=st)
    return out.kiln_exit


# -- the other commands --------------------------------------------------------------------

def ps(root: Root, all_vms: bool) -> list[dict[str, Any]]:
    from runner.vm import reaper

    root.ensure()  # a root with no VMs yet (or none at all) lists nothing, not a traceback
    st = State(root.path)
    reaper.reconcile(root, st)
    return [r.summary() for r in st.all() if all_vms or r.state in LIVE]


def stop(root: Root, ref: str, timeout: float = 10.0) -> VMRecord:
    """Graceful stop (the guest's control port), then SIGKILL of the VMM and its cgroup;
    returns once the VM's resources are released (by its owner, else here)."""
    from runner.vm import reaper

    st = State(root.path)
    reaper.reconcile(root, st)
    rec = st.find(ref)
    if rec.state not in LIVE:
        return rec
    if rec.vmm == "firecracker":
        from runner.vmm import firecracker as fcdriver

        fcdriver.stop(root, st, rec, timeout)
    else:
        _stop_qemu(root, st, rec, timeout)
    cur = st.get(rec.id)
    deadline = time.monotonic() + 30.0  # the owner's teardown: cgroups, network
    while cur is not None and alive(cur.owner_pid, cur.owner_start) and \
            cur.owner_pid != os.getpid() and time.monotonic() < deadline:
        time.sleep(0.05)
        cur = st.get(rec.id)
    if cur is not None and cur.state not in LIVE:
        vmres.release(root, st, cur)  # no-op when the owner did it
    return st.get(rec.id) or rec


def _stop_qemu(root: Root, st: State, rec: VMRecord, timeout: float) -> None:
    from runner.vm import reaper

    files = VMFiles(Path(rec.dir))
    supervise.request_stop(files.control, timeout)
    deadline = time.monotonic() + timeout + 3.0
    while time.monotonic() < deadline and _vmm_alive(rec):
        time.sleep(0.05)
    if _vmm_alive(rec):
        assert rec.pid is not None
        supervise.kill_vmm(rec.pid, signal.SIGKILL)
        vmcgroup.remove(rec.cgroup_dirs)
    # the owner records the outcome; give it a moment, else record it here
    for _ in range(100):
        cur = st.get(rec.id)
        if cur is None or cur.state not in LIVE:
            break
        if not alive(cur.owner_pid, cur.owner_start):
            reaper.reconcile(root, st)
        time.sleep(0.05)
    cur = st.get(rec.id)
    if cur is not None and cur.state in LIVE:
        st.finish(rec.id, "exited", 137, "stopped (forced)")


def _vmm_alive(rec: VMRecord) -> bool:
    return alive(rec.pid, rec.pid_start)


def remove(root: Root, ref: str, *, st: State | None = None, force: bool = False) -> str:
    """Remove a finished VM: its snapshot, its files, then its record (leaf first)."""
    from builder.pool import open_pool

    st = st or State(root.path)
    rec = st.find(ref)
    if rec.state in LIVE and alive(rec.owner_pid, rec.owner_start) and \
            rec.owner_pid != os.getpid():
        if not force:
            raise KilnError(f"VM {rec.id} is {rec.state}", f"stop it first: kiln stop {rec.id}")
        stop(root, rec.id, timeout=0)
    vmres.release_net(root, st, rec.id)  # raises: the record stays, saying what is held
    if rec.vmm == "firecracker":
        from runner.vmm import firecracker as fcdriver

        fcdriver.teardown_record(root.path, rec)  # the jail holds a link to the snapshot
    pool = open_pool(root.path)
    if pool is not None:
        with contextlib.suppress(NotFound):
            pool.remove_snapshot(rec.snapshot)
    vmcgroup.remove(rec.cgroup_dirs)
    rmtree(Path(rec.dir))
    st.delete(rec.id)
    return rec.id


def logs(root: Root, ref: str, *, follow: bool) -> None:
    """The console (kernel + init messages), then the workload's stdout and stderr."""
    st = State(root.path)
    rec = st.find(ref)
    files = VMFiles(Path(rec.dir))
    relays = [supervise.Relay(files.console, 1), supervise.Relay(files.stdout, 1),
              supervise.Relay(files.stderr, 2)]
    while True:
        for rl in relays:
            rl.pump()
        cur = st.get(rec.id)
        if not follow or cur is None or cur.state not in LIVE:
            break
        time.sleep(0.1)
    for rl in relays:
        rl.pump()
