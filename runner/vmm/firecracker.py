"""Firecracker under ``kiln run``: the VMM choice, the jail config, the run loop, teardown.

``runner.vmm.fcapi`` is the driver (launch plan, API client, privileged ops); this module
wires it into the run core (``runner.vm.lifecycle``):

* **choice**: ``runner.vmm.choice`` (kept apart so a QEMU run need not import this module);
* **resources**: the record names the jail directory, the API socket, the cgroup version
  and directories before any exists (``resources``), all under the VM's host name
  (``runner.vm.state.host_name``: the root's key + the VM id, so the jail id and cgroup leaf
  say which root a VM belongs to); the driver's ``on_step`` then stores
  the step about to run, and the pid is stored as soon as the jailer returns it. A crash
  at any step leaves only recorded things, which ``teardown`` (owner, ``kiln stop``/``rm``,
  the reaper) removes: kill the whole cgroup, then remove the jail (``helper.jail.jailer`` refuses
  a jail with mounts inside or a live Firecracker);
* **I/O**: Firecracker 1.12.1 has one guest channel, the serial console (no virtio-console,
  no ``PUT /serial``), written to the jail's ``console.log``. ``ConsoleSplit`` (pure) turns
  it into kiln's three files: lines between kiln-init's ``starting`` and ``workload exited
  N`` markers are the workload's stdout (kernel messages printed meanwhile land there too:
  the kernel runs ``quiet``, so only warnings), kiln-init's own errors (``kiln: …``) go to
  stderr, everything else to ``console.log`` (``kiln logs``). The exit status is the
  ``workload exited N`` marker; the tty's ``\\r\\n`` becomes ``\\n``. There is no stdin
  (``-i``) and no separate stderr: the workload's stderr is mixed into stdout;
* **stop**: ``SendCtrlAltDel`` (kiln's init sets ``kernel.ctrl-alt-del=0`` once the
  workload runs, so the kernel sends it SIGINT and it SIGTERMs the workload, reports the
  exit and powers off; before that the kernel reboots, which ends the VM; a systemd image
  shuts down), wait up to the grace — or until the guest reported its exit and had
  ``AFTER_MARK`` s to power off — then kill the cgroup. ``kiln
  stop`` asks the owner through a ``stop`` file in the VM directory; if the owner is gone it
  tears down itself.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.root import Root
from builder.store import hash_file
from helper import cgroup as cg
from helper.base.errors import KilnError, NotFound, UidInUse
from helper.jail import jailer as jail
from runner.tempfiles import locked_temp, write_atomic
from runner.vm import resources as vmres
from runner.vm.state import LIVE, State, VMRecord, alive, proc_start_time
from runner.vmm import fcapi as fc
from runner.vmm import process as supervise
from runner.vmm.choice import jail_config

log = logging.getLogger("kiln.vm")

MEMORY_OVERHEAD = 128 << 20  # Firecracker itself (~10 MiB) + the snapshot's page cache (v1)
PIDS_MAX = 128
BOOT_ARGS = ("console=ttyS0 reboot=k panic=1 pci=off quiet random.trust_cpu=on "
             "rootfstype=ext4")  # Firecracker appends root=/dev/vda rw and the mmio devices
START_MARK = "kiln-init: starting "
# "workload exited N" after the workload; "exit N" from kiln-init's finish (without a status
# port it reports there every exit, its own failures 125-127 included)
EXIT_MARK = re.compile(r"^kiln-init: (?:workload exited|exit) (\d+)$")
# kiln-init's own failures (runner/guest_init/init.sh) and the exit status it gives them.
INIT_FAILURES = (
    (re.compile(r"^kiln: .*: executable file not found in \$PATH$"), 127),
    (re.compile(r"^kiln: (unable to find (user|group) |cannot enter working directory |"
                r"no command to run)"), 126),
)
STOP_FILE = "stop"
AFTER_MARK = 2.0  # s: after the exit marker, time for the guest to power off by itself


def ops_for(root_dir: Path) -> fc.PrivOps:
    """The helper's ops: in-process as root (area: the kiln root), through ``sudo
    kiln-helper`` otherwise — the same op functions either way, so root's jails hold their
    VM uids in the helper's ledger too (``helper.vmuids``). They load the jail config from
    the trusted config themselves."""
    from builder.helperclient import HelperOps, area

    return HelperOps(area_dir=area(root_dir))


def cgroup_choice(lay: cg.Layout, v2_controllers: set[str], cpus: int, memory: int
                  ) -> tuple[int, cg.Limits]:
    """(cgroup version, limits) of a VM (pure): v2 when the unified tree has cpu, memory
    and pids; else v1 when those and freezer are mounted (these machines); else v2
    without limits (the cgroup still bounds the teardown)."""
    limits = cg.Limits(cpus=cpus + 0.5, memory_bytes=memory + MEMORY_OVERHEAD, pids=PIDS_MAX)
    if lay.v2 is not None and {"cpu", "memory", "pids"} <= v2_controllers:
        return 2, limits
    if {"cpu", "memory", "pids", "freezer"} <= set(lay.v1):
        return 1, limits
    if lay.v2 is not None:
        return 2, cg.Limits()
    raise KilnError("no usable cgroup hierarchy for a Firecracker VM",
                    "mount cgroup2, or the v1 cpu, memory, pids and freezer controllers")


def host_cgroup_choice(cfg: jail.JailConfig, cpus: int, memory: int) -> tuple[int, cg.Limits]:
    lay = cg.layout(cfg.cgroup)
    ctrls: set[str] = set()
    if lay.v2 is not None:
        with contextlib.suppress(OSError):
            ctrls = set((lay.v2 / "cgroup.controllers").read_text().split())
    return cgroup_choice(lay, ctrls, cpus, memory)


def resources(cfg: jail.JailConfig, host: str, version: int, limits: cg.Limits
              ) -> tuple[dict[str, Any], list[str]]:
    """What the record names before anything exists: (the ``fc`` document, cgroup dirs).
    ``host``: the VM's host name, its jail id and cgroup leaf."""
    jd = jail.jail_dir(cfg, host)
    only = cg.v1_controllers(limits) if version == 1 else None
    dirs = [str(d) for d in cg.vm_dirs(cfg.cgroup, host, version, only)]
    return {"host": host, "jail": str(jd), "api_sock": str(jd / "api.sock"),
            "console": str(jd / "console.log"), "cgroup_version": version,
            "limits": {"cpus": limits.cpus, "memory_bytes": limits.memory_bytes,
                       "pids": limits.pids}, "step": "recorded"}, dirs


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


# -- the console (pure) -----------------------------------------------------------------------

@dataclass
class ConsoleSplit:
    """Firecracker's serial console → (console log, workload stdout, workload stderr)."""

    buf: bytes = b""
    in_workload: bool = False
    exit_code: int | None = None
    seen: list[str] = field(default_factory=list)  # the last few console lines (reasons)

    def feed(self, data: bytes, final: bool = False) -> tuple[bytes, bytes, bytes]:
        self.buf += data
        lines = self.buf.split(b"\n")
        self.buf = lines.pop()
        if final and self.buf:
            lines.append(self.buf)
            self.buf = b""
        con, out, err = [], [], []
        for raw in lines:
            line = raw.rstrip(b"\r") + b"\n"  # the tty turns \n into \r\n
            text = line[:-1].decode("utf-8", "replace")
            if text.startswith("kiln-init: "):
                con.append(line)
                if text.startswith(START_MARK):
                    self.in_workload = True
                m = EXIT_MARK.match(text)
                if m:
                    self.exit_code, self.in_workload = int(m.group(1)), False
            elif self.in_workload:
                out.append(line)
            elif code := next((c for rx, c in INIT_FAILURES if rx.match(text)), None):
                err.append(line)
                if self.exit_code is None:
                    self.exit_code = code
            else:
                con.append(line)
                if text.strip():
                    self.seen = [*self.seen[-4:], text.strip()]
        return b"".join(con), b"".join(out), b"".join(err)


def vmm_exit_code(log_text: str) -> int | None:
    """Firecracker's own exit code from its log (``exit_code=N``), if it logged one."""
    found = re.findall(r"exit_code=(\d+)", log_text)
    return int(found[-1]) if found else None


# -- running ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Boot:
    """What every Firecracker VM made for one ``kiln run`` boots (``vm_for``)."""

    vmlinux: Path
    initrd: Path
    rootfs: Path
    cpus: int
    memory: int
    init: str


def vm_for(cfg: jail.JailConfig, root: Root, st: State, rec: VMRecord, boot: Boot,
           intent: vmres.NetIntent | None,
           picker: vmres.UidPicker) -> tuple[fc.FirecrackerVM, VMRecord]:
    """The VM for the record's uid: on the kiln network first with ``--net tap`` (which may
    record another uid: ``vmres.retry_uid``), then its launch plan. Returns the record it
    was made for."""
    vn = None
    if intent is not None:
        vn, rec = vmres.net_attach(root, st, rec, intent, picker)
    vm = make_vm(cfg, ops_for(root.path), rec, vmlinux=boot.vmlinux, initrd=boot.initrd,
                 rootfs=boot.rootfs, cpus=boot.cpus, memory=boot.memory, init=boot.init,
                 nets=(vn.firecracker_nic(),) if vn else (),
                 netns=vn.spawn_netns if vn else None, kernel_args=vn.kernel_args if vn else ())
    return vm, rec


def own_retrying(root: Root, st: State, rec: VMRecord, files: Any, vm: fc.FirecrackerVM,
                 remake: Callable[[State, VMRecord], tuple[fc.FirecrackerVM, VMRecord]],
                 picker: vmres.UidPicker, **kw: Any) -> tuple[Ended, VMRecord]:
    """``own``; when ``jail-stage`` refuses the VM uid (another caller's jail holds it),
    ``own`` has torn the VM down: its network goes too (the tap belongs to that uid),
    another uid is recorded, and the VM is made (``remake``) and launched again."""
    while True:
        try:
            return own(st, rec, files, vm, **kw), rec
        except UidInUse as e:
            vmres.release_net(root, st, rec.id)
            rec = picker.another(st, rec, e)
            vm, rec = remake(st, rec)


def make_vm(cfg: jail.JailConfig, ops: fc.PrivOps, rec: VMRecord, *, vmlinux: Path,
            initrd: Path, rootfs: Path, cpus: int, memory: int, init: str,
            nets: tuple[fc.NetSpec, ...] = (), netns: str | None = None,
            kernel_args: tuple[str, ...] = ()) -> fc.FirecrackerVM:
    """``nets``/``netns``/``kernel_args``: ``--net tap`` (``runner.network.VmNet``): eth0 on
    the VM's tap, the namespace the jailer joins, the guest's ``kiln.ip=``… words."""
    doc = rec.fc_doc
    version = int(doc["cgroup_version"])
    limits = cg.Limits(**doc["limits"])
    if rec.uid is None:
        raise KilnError(f"VM {rec.id} has no uid", "internal error: create it with want_uid")
    boot_args = " ".join((BOOT_ARGS, f"init={init}", *kernel_args))
    plan = fc.launch_plan(cfg, vm_id=host_of(rec), uid=rec.uid, kernel=vmlinux, initrd=initrd,
                          rootfs=rootfs, boot_args=boot_args, cpus=cpus,
                          mem_mib=memory >> 20, cgroup_version=version, limits=limits,
                          netns=netns, nets=nets)
    return fc.FirecrackerVM(cfg, ops, plan)


def _record_step(st: State, vm_id: str, step: str) -> None:
    cur = st.get(vm_id)
    doc = dict(cur.fc_doc) if cur else {}
    doc["step"] = step
    st.update(vm_id, fc=json.dumps(doc))


@dataclass
class Channels:
    """Copies the jail's console.log into the VM's console/stdout/stderr files."""

    src: Path
    console: Path
    stdout: Path
    stderr: Path
    relay: bool
    split: ConsoleSplit = field(default_factory=ConsoleSplit)
    pos: int = 0

    def pump(self, final: bool = False) -> None:
        try:
            with open(self.src, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except OSError:
            data = b""
        self.pos += len(data)
        if not data and not final:
            return
        con, out, err = self.split.feed(data, final)
        for path, chunk, fd in ((self.console, con, None), (self.stdout, out, 1),
                                (self.stderr, err, 2)):
            if not chunk:
                continue
            with open(path, "ab") as f:
                f.write(chunk)
            if self.relay and fd is not None:
                with contextlib.suppress(BrokenPipeError):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]


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


@dataclass(frozen=True)
class Ended:
    status_text: str  # "exit N" when the guest reported, else ""
    vmm_code: int | None
    timed_out: bool
    stopped: bool
    console_tail: str
    vmm_tail: str


def own(st: State, rec: VMRecord, files: Any, vm: fc.FirecrackerVM, *, timeout: float | None,
        stop_grace: float, relay: bool, ready: Callable[[], None]) -> Ended:
    """Launch, configure, start, supervise to the end, tear down. Raises (after tearing
    down) when the VM did not start."""
    ch = Channels(vm.console_log, files.console, files.stdout, files.stderr, relay)
    with supervise.StopSignals() as sigs:
        vm.on_step = lambda step: _record_step(st, rec.id, step)
        try:
            vm.launch()
            assert vm.pid is not None
            st.update(rec.id, pid=vm.pid, pid_start=proc_start_time(vm.pid))
            vm.configure()
            vm.on_step("start")
            vm.client(timeout=10.0).action("InstanceStart")
        except BaseException:
            ch.pump(final=True)
            _save_log(vm, files.vmm_log)
            with contextlib.suppress(KilnError, OSError):
                vm.destroy()
            raise
        st.update(rec.id, state="running", started=time.time())
        for w in vm.warnings:
            log.warning("%s", w)
        ready()
        started = time.monotonic()
        timed_out = stopped = killed = False
        marked: float | None = None
        while True:
            ch.pump()
            if not vm.running():
                break
            now = time.monotonic()
            if ch.split.exit_code is not None:
                marked = marked or now
                if now - marked > AFTER_MARK:  # reported; a poweroff may not end the VMM
                    vm.ops.cgroup_kill(vm.plan.vm_id, vm.plan.spec.cgroup_version)
                    break
            grace: float | None = None
            if timeout is not None and now - started >= timeout:
                timed_out, grace = True, 1.0
            elif sigs.count:
                stopped, grace = True, stop_grace
            elif (asked := _stop_requested(Path(files.dir))) is not None:
                stopped, grace = True, asked
            if grace is not None:
                _stop(vm, grace, ch, sigs)
                killed = True
                break
            time.sleep(0.02)
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
    cfg = jail_config(root_dir)
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


def stop(root: Root, st: State, rec: VMRecord, timeout: float) -> VMRecord:
    """Ask the owner (it sends Ctrl-Alt-Del, waits, kills the cgroup and records the
    outcome); without a live owner, tear down here."""
    if alive(rec.owner_pid, rec.owner_start):
        request_stop(Path(rec.dir), timeout)
        deadline = time.monotonic() + timeout + 20.0
        while time.monotonic() < deadline:
            cur = st.get(rec.id)
            if cur is None or cur.state not in LIVE:
                return cur or rec
            if not alive(cur.owner_pid, cur.owner_start):
                break
            time.sleep(0.05)
    teardown_record(root.path, rec)
    st.finish(rec.id, "exited", 137, "stopped (forced)")
    return st.get(rec.id) or rec


def teardown_record(root_dir: Path, rec: VMRecord) -> None:
    doc = rec.fc_doc
    if rec.vmm != "firecracker" or not doc:
        return
    try:
        teardown(root_dir, host_of(rec), int(doc["cgroup_version"]), str(doc["jail"]))
    except KilnError:
        from runner.vm import cgroup as vmcgroup

        vmcgroup.remove(rec.cgroup_dirs)  # at least nothing keeps running (root or not)
        raise
