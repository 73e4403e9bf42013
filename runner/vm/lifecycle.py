"""The VM lifecycle: run (foreground or detached), stop, rm, logs, ps — the same for every
VMM; what differs is the VMM's driver (``runner.vmm.driver``), given by
``runner.vmm.choice``.

``run`` in order, each host resource recorded before it exists (runner/vm/state.py):

1. validate; pick the VMM and its driver, which refuses what its VMM cannot do; reconcile
   (runner/vm/reaper.py); ``--net tap``: the network's preflight (refusals here leave
   nothing); resolve SOURCE to a volume (building it, cache permitting); open the pool
   ("no pool: run `kiln pool init`"); kernel + initrd;
2. INSERT the record (state ``creating``: snapshot id = VM id, VM directory, uid, the
   network objects, and what the driver reserves: the cgroups, Firecracker's jail);
3. the VM directory, the snapshot, kiln's init injected into it; ``driver.prepare``: the
   VMM's own files, the cgroups, the tap (``runner.vm.resources``), how the VMM starts;
4. ``--detach``: fork the owner (setsid) which does the rest; the parent prints the id
   once the VM runs (a warm one restored: a failed restore is the parent's
   ``WarmFailed``, so ``runner.vm.warmrun`` boots cold and says so on kiln's stderr);
5. ``driver.own``: launch (pid recorded, state ``running``), relay the workload's output
   to kiln's stdout/stderr, honour ``--timeout``, Ctrl-C/SIGTERM and ``kiln stop``
   (graceful first), the VMM's own teardown;
6. the outcome (``runner.vm.spec.outcome``, pure) → ``exited``/``failed``; cgroups and
   network released (``vmres.release``); with ``--rm`` the snapshot, the directory and
   the record go too.

Every end path releases: the owner at exit, a failed setup (``_abandon``), ``stop`` (the
driver's stop; it returns once the owner's teardown is done, or does it itself),
``remove`` (``reaper.discard``, which keeps the record while the network cannot be
released), and the reaper for a dead owner.

Exit codes: the workload's; 124 when --timeout fired; 125 when kiln or the VMM failed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from builder import proc
from builder.root import Root
from helper.base.errors import KilnError, NotFound, UsageError
from runner.vm import reaper
from runner.vm import resources as vmres
from runner.vm.spec import RunOptions, VMFiles, WarmPlan, outcome
from runner.vm.state import (
    LIVE,
    State,
    VMRecord,
    alive,
    host_name,
    new_vm_id,
    proc_start_time,
    root_key,
)
from runner.vmm import choice as vmmchoice
from runner.vmm import process as supervise
from runner.vmm.driver import Boot, Driver
from runner.vmm.qemuargv import forwards_of
from runner.vmm.qemuwarm import WarmFailed
from runner.volref import resolve_volume

if TYPE_CHECKING:
    from builder.pool.base import Pool
    from builder.store import Volume
    from runner.guest_init import Workload

__all__ = ["RunOptions", "logs", "ps", "remove", "resolve_volume", "run", "stop"]

log = logging.getLogger("kiln.vm")
_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$")
_WARM_FAILED = b"warm:"  # a detached owner's restore failed: the reason follows


def run(root: Root, source: str, opts: RunOptions, registry_opts: Any,
        *, on_ready: Callable[[str], None] | None = None, warm: WarmPlan | None = None
        ) -> int:
    """``kiln run``'s exit code; ``warm``: save or restore (``runner.vm.warmrun``)."""
    from builder.pool import open_pool
    from runner import guest_init, kernel

    t_entry = time.monotonic()
    root.ensure()
    _check(opts)
    vmm, vmm_reason, fc_cfg = vmmchoice.pick(root, opts.vmm)
    driver = vmmchoice.driver_for(root, vmm, fc_cfg)
    driver.check(opts)
    forwards = forwards_of(opts.publish)
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
    boot_files = kernel.boot_files(root.path / "kernels", opts.kernel, opts.initrd)
    vm_id = new_vm_id()
    host = host_name(root_key(root.path), vm_id)  # its name in host-wide places
    work = _workload(volume.meta.get("config") or {}, opts, vm_id)
    files = VMFiles(st.vms_dir / vm_id)
    reserved = driver.reserve(host, opts, intent)
    spec_doc = {"source": source, "cpus": opts.cpus, "memory": opts.memory, "init": opts.init,
                "kernel": str(boot_files.kernel), "initrd": str(boot_files.initrd),
                "net": opts.net, "argv": list(work.argv) if work else [],
                "vmm_reason": vmm_reason, "warm": warm.mode if warm else ""}
    rec = st.create(vm_id=vm_id, name=opts.name, vmm=vmm, volume=volume.id,
                    snapshot=reaper.snapshot_id(vm_id), vm_dir=files.dir,
                    cgroups=list(reserved.cgroups.dirs), want_uid=reserved.want_uid,
                    auto_remove=opts.rm, spec=spec_doc, uid_range=reserved.uid_range,
                    fc=reserved.doc,
                    net=vmres.net_record(vm_id, intent) if intent is not None else None)
    st.update(vm_id, reason=vmm_reason)  # what `kiln ps` says until the VM ends
    try:
        disk = _make_disk(root, pool, volume, files, rec.snapshot, opts, work, warm=warm)
        boot = Boot(host, files, boot_files.kernel, boot_files.initrd, disk,
                    guest_init.INIT_PATH if work else "/sbin/init", opts, forwards, intent,
                    vmres.UidPicker(reserved.uid_range), work, warm)
        launch = driver.prepare(st, rec, boot, reserved)
    except BaseException as e:
        _abandon(root, st, driver, rec, f"setup failed: {e}")
        raise
    log.debug("kiln overhead before the VMM: %.0f ms", (time.monotonic() - t_entry) * 1e3)

    def body(own_st: State, ready_fd: int | None) -> int:
        return _own(root, own_st, driver, launch, rec, opts, ready_fd=ready_fd)

    if not opts.detach:
        return body(st, None)
    try:
        return _detach(root, st, rec, files, body, on_ready)
    finally:
        driver.close(launch)  # the owner has its own copy


def _check(opts: RunOptions) -> None:
    if opts.name is not None and not _NAME.fullmatch(opts.name):
        raise UsageError(f"invalid VM name {opts.name!r}",
                         "use letters, digits, _ . - (up to 63), starting with a letter/digit")
    if opts.cpus < 1 or opts.memory < (64 << 20):
        raise UsageError("a VM needs at least 1 cpu and 64M of memory",
                         "raise --cpus / --memory")


def _workload(config: dict[str, Any], opts: RunOptions, vm_id: str) -> Workload | None:
    """What kiln's init runs (None with ``--init image``: the image's /sbin/init decides)."""
    from runner import guest_init

    if opts.init == "kiln":
        return guest_init.workload(config, command=opts.command, entrypoint=opts.entrypoint,
                                   env=opts.env, workdir=opts.workdir, user=opts.user,
                                   hostname=opts.name.lower().replace("_", "-").replace(
                                       ".", "-") if opts.name else vm_id)
    if opts.command or opts.entrypoint is not None:
        what = "a command" if opts.command else "--entrypoint"
        raise UsageError(f"{what} cannot be given with --init image",
                         "the image's /sbin/init decides what runs")
    return None


def _make_disk(root: Root, pool: Pool, volume: Volume, files: VMFiles, snap_id: str,
               opts: RunOptions, work: Workload | None, *,
               warm: WarmPlan | None = None) -> Path:
    """The VM directory and its files, then the snapshot with kiln's init and agent
    injected. The workload goes to the driver, which sends it over the control channel
    (``runner.guest_init.channel``) — or, a cold Firecracker run, writes it onto the
    snapshot (``guest_init.write_settings``: with eth0 from its lease, taken later). A warm
    restore's snapshot is a clone of the warm image's disk (kiln's init is on it already)."""
    from builder.warm import clone_file
    from runner import guest_init
    from runner.guest_init import agentbin

    files.dir.parent.mkdir(exist_ok=True)
    files.dir.mkdir(mode=0o700)
    files.chroot.mkdir(mode=0o500)
    for p in (files.console, files.stdout, files.stderr, files.status):
        p.touch(mode=0o600)
    if not pool.has_volume(volume.id):
        pool.import_volume(volume.id, volume.path)
    snap = pool.create_snapshot(volume.id, snap_id=snap_id, size=opts.disk_size)
    if warm is not None and warm.mode == "restore":
        clone_file(warm.disk, Path(snap.path))
        return Path(snap.path)
    if work is not None:
        agent = agentbin.ensure_agent(root.path / "kernels", scratch=root.tmp)
        guest_init.inject(Path(snap.path), work, scratch=root.tmp, agent=agent)
    return Path(snap.path)


def _own(root: Root, st: State, driver: Driver[Any], launch: Any, rec: VMRecord,
         opts: RunOptions, *, ready_fd: int | None) -> int:
    """The driver runs the VM to its end; the outcome is recorded and the VM's resources
    released here. ``ready_fd`` (a detached owner): "ok" once the VM runs."""
    def ready() -> None:
        if ready_fd is not None:
            os.write(ready_fd, b"ok")
            os.close(ready_fd)

    try:
        end = driver.own(st, launch, relay=ready_fd is None, ready=ready)
    except BaseException as e:
        _abandon(root, st, driver, rec, f"the VMM did not start: {e}")
        if isinstance(e, WarmFailed) and opts.init == "kiln":  # the caller boots cold
            with contextlib.suppress(KilnError, OSError):
                remove(root, rec.id, st=st)
        raise
    out = outcome(end.status_text, end.vmm_code, timed_out=end.timed_out,
                  stopped=end.stopped, own_init=opts.init == "image",
                  console_tail=end.console_tail, vmm_tail=end.vmm_tail)
    st.finish(rec.id, out.state, out.exit_code, out.reason)
    vmres.release(root, st, rec)
    if opts.rm:
        remove(root, rec.id, st=st)
    return out.kiln_exit


def _abandon(root: Root, st: State, driver: Driver[Any], rec: VMRecord, reason: str) -> None:
    """Setup failed: the record says why; resources go (all of them with --rm)."""
    st.finish(rec.id, "failed", None, reason)
    vmres.release(root, st, rec)
    try:
        driver.teardown(rec)
    except (KilnError, OSError) as e:
        log.warning("VM %s: %s", rec.id, e)
    if rec.auto_remove:
        with contextlib.suppress(KilnError, OSError):
            remove(root, rec.id, st=st)


def _detach(root: Root, st: State, rec: VMRecord, files: VMFiles,
            body: Callable[[State, int | None], int],
            on_ready: Callable[[str], None] | None) -> int:
    """Fork the owner, which runs ``body(its own State, ready fd)``; print the id once it
    wrote "ok" to the ready fd — after a warm restore, so a restore that fails is raised
    here as ``WarmFailed`` (its VM removed by the owner) and the caller can boot cold."""
    # SQLite state must not cross a fork (its locks and WAL index are per process): the
    # owner opens its own connection, the parent reopens one if it needs it.
    st.close()
    r, w = os.pipe()

    def owner() -> int:  # supervises the VMM after `kiln run` has returned
        try:
            own = State(root.path)
            own.update(rec.id, owner_pid=os.getpid(), owner_start=proc_start_time(os.getpid()))
            body(own, w)
            return 0
        except WarmFailed as e:  # the parent boots cold (runner.vm.warmrun): say why
            with contextlib.suppress(OSError):
                os.write(w, _WARM_FAILED + e.message.encode())
            return 1
        except BaseException:  # told to the parent (it prints the record's reason) and kept
            import traceback

            with contextlib.suppress(OSError):
                (files.dir / "owner.log").write_text(traceback.format_exc())
            with contextlib.suppress(OSError):
                os.write(w, b"error")
            return 1

    # Its own session and /dev/null as stdio: it outlives `kiln run -d` and its terminal.
    try:
        proc.fork(owner, new_session=True, null_stdio=True, close_fds=(r,))
    finally:
        os.close(w)
    msg = b""
    while chunk := os.read(r, 256):
        msg += chunk
        if msg.startswith(b"ok"):
            break
    os.close(r)
    if msg.startswith(_WARM_FAILED):  # the owner removed that VM; nothing was printed
        raise WarmFailed(msg[len(_WARM_FAILED):].decode(errors="replace"))
    if not msg.startswith(b"ok"):
        cur = State(root.path).get(rec.id)
        raise KilnError(f"VM {rec.id} failed to start: "
                        f"{cur.reason if cur else 'no record'}", f"see `kiln logs {rec.id}`")
    if on_ready is not None:
        on_ready(rec.id)
    return 0


# -- the other commands --------------------------------------------------------------------

def ps(root: Root, all_vms: bool) -> list[dict[str, Any]]:
    root.ensure()  # a root with no VMs yet (or none at all) lists nothing, not a traceback
    st = State(root.path)
    reaper.reconcile(root, st)
    return [r.summary() for r in st.all() if all_vms or r.state in LIVE]


def stop(root: Root, ref: str, timeout: float = 10.0) -> VMRecord:
    """The VMM's stop (its driver's: graceful first), then the outcome its owner records
    (or this, when the owner is gone); returns once the VM's resources are released (by
    its owner, else here)."""
    st = State(root.path)
    reaper.reconcile(root, st)
    rec = st.find(ref)
    if rec.state not in LIVE:
        return rec
    vm_id = rec.id
    vmmchoice.driver_for(root, rec.vmm).stop(st, rec, timeout)
    _await_outcome(root, st, vm_id)
    cur = st.get(vm_id)
    deadline = time.monotonic() + 30.0  # the owner's teardown: cgroups, network
    while cur is not None and alive(cur.owner_pid, cur.owner_start) and \
            cur.owner_pid != os.getpid() and time.monotonic() < deadline:
        time.sleep(0.05)
        cur = st.get(vm_id)
    if cur is not None and cur.state not in LIVE:
        vmres.release(root, st, cur)  # no-op when the owner did it
    return st.get(vm_id) or rec


def _await_outcome(root: Root, st: State, vm_id: str) -> None:
    """The owner records the outcome: give it a moment (reconciling if it died), else
    record a forced stop here."""
    for _ in range(100):
        cur = st.get(vm_id)
        if cur is None or cur.state not in LIVE:
            return
        if not alive(cur.owner_pid, cur.owner_start):
            reaper.reconcile(root, st)
        time.sleep(0.05)
    cur = st.get(vm_id)
    if cur is not None and cur.state in LIVE:
        st.finish(vm_id, "exited", 137, "stopped (forced)")


def remove(root: Root, ref: str, *, st: State | None = None, force: bool = False) -> str:
    """Remove a finished VM: its snapshot, its files, then its record (leaf first)."""
    st = st or State(root.path)
    rec = st.find(ref)
    vm_id = rec.id
    if rec.state in LIVE and alive(rec.owner_pid, rec.owner_start) and \
            rec.owner_pid != os.getpid():
        if not force:
            raise KilnError(f"VM {vm_id} is {rec.state}", f"stop it first: kiln stop {vm_id}")
        stop(root, vm_id, timeout=0)
    reaper.discard(root, st, rec)
    return vm_id


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
