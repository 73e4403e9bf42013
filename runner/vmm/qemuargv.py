"""QEMU's microvm command line (pure) plus the few host facts it needs; the driver that
runs it is ``runner.vmm.qemu``.

``argv(spec)`` is the whole command line (tested exactly). Channels, each its own file so
kiln's stdout carries only the workload's output:

* ``ttyS0`` (the kernel's ``console=``) → ``console.log``: kernel and kiln-init messages;
* virtio-serial ports named ``kiln.stdout`` / ``kiln.stderr`` → ``stdout`` / ``stderr``
  files (plain char devices in the guest: no tty line discipline turning ``\\n`` into
  ``\\r\\n``); ``kiln.status`` → ``status`` (the init writes ``exit N``);
* ``kiln.control`` → FIFOs ``ctl.in``/``ctl.out``: the control channel (frames,
  ``runner.guest_init.channel``): the guest's hello on ``ctl.out``, the run's settings and
  a graceful stop on ``ctl.in``;
* ``kiln.stdin`` → kiln's stdin, only with ``-i`` (warm runs: always, ``null`` without).

Warm start (docs/warm.md): ``QemuSpec.warm`` = save | restore gives the fixed device set
``WARM_DEVICES`` (NIC and stdin port always), a QMP socket, ``file.auto-read-only=off``
on the disk and, to restore, ``-incoming defer``; from QEMU 8.2 (``RAM_FILE``) the guest's
memory is a file (``QemuSpec.ram``): shared while the image is saved, read-only and
private in each clone.

Accelerator: KVM only when ``builder.probes.kvm()`` ran a guest (``kvm_verdict``, cached
per boot under ``ROOT/kernels``: ~0.7 s when KVM is emulated; ``runner.vmm.choice`` asks
the same verdict for ``--vmm auto``); otherwise TCG, and then
``tsc_early_khz=`` with the host's TSC frequency, or microvm boots hang calibrating the TSC
without a PIT/HPET (../shared/qemu.md), and ``cryptomgr.notests`` (the boot-time crypto
self-tests are a sixth of an emulated boot). As root QEMU drops to a per-VM uid (``-runas``),
chroots into an empty directory (``-chroot``; from QEMU 8.1 ``-run-with chroot=``, from
9.1 ``-run-with user=`` too: ``QemuSpec.version``, ``qemu_version``), and runs under seccomp
(``-sandbox on``; privilege elevation must stay allowed because QEMU installs the filter
before it drops root).

Network: ``--net user`` is QEMU's slirp (``-p`` forwards bound to 127.0.0.1); ``--net tap``
opens a kiln tap by name (``ifname=``, made and bridged by the helper; QEMU must start in
the namespace the tap lives in and open it before ``-runas`` drops root) with the VM's MAC,
or — QEMU run by an ordinary user — uses the fd the helper attached (``fd=N``).
The guest's address is not on the kernel command line (a saved state would freeze it):
kiln's init gets it, with the MAC it sets on eth0, over the control channel
(``runner.guest_init.channel``; ``USER_NET`` for slirp).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from builder.root import Root
from helper.base.errors import UsageError
from helper.net.tap import NAME_PATTERN as TAP_PATTERN
from runner.guest_init import WARM_ARG
from runner.tempfiles import write_atomic

BINARY = "qemu-system-x86_64"
# QEMU 8.1 took -chroot into -run-with chroot= (9.0 removed -chroot), 9.1 -runas into
# -run-with user= (10.0 removed -runas)
RUN_WITH_CHROOT = (8, 1)
RUN_WITH_USER = (9, 1)
# QEMU 8.2's memory-backend-file rom=off: a file opened read-only mapped writable
# copy-on-write — a warm image's memory, shared by its clones (docs/warm.md)
RAM_FILE = (8, 2)
SANDBOX_ROOT = "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny"
SANDBOX_USER = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
# --net user: slirp's fixed addresses (address/prefix, gateway, name servers), sent to
# kiln's init over the control channel like a tap's lease
USER_NET = ("10.0.2.15/24", "10.0.2.2", ("10.0.2.3",))
# The device set of every warm-capable run (a saved state restores only into the same
# devices): the disk, the serial ports (stdout, stderr, status, control, stdin) and a NIC —
# without a network a NIC with no backend (the guest's eth0 stays down), without -i a
# stdin port on QEMU's null chardev (the init then uses /dev/null: the settings' stdin=0).
WARM_DEVICES = "qemu-microvm:qboot,blk,vport(stdout,stderr,status,control,stdin),net;v2"
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


@dataclass(frozen=True)
class Forward:
    host: int
    guest: int


@dataclass(frozen=True)
class TapNic:
    """--net tap: a kiln tap (made by the helper, in the namespace QEMU starts in)."""

    ifname: str  # kt-…
    mac: str  # helper.net.core.mac_for(VM id)
    fd: int | None = None  # an fd on the tap the helper opened (QEMU run by a user)


@dataclass(frozen=True)
class QemuSpec:
    """Everything one QEMU process is started with."""

    name: str  # "kiln-<host name>": how the reaper recognises its root's VMMs
    kernel: Path
    initrd: Path
    disk: Path
    cpus: int
    memory_mib: int
    accel: str  # kvm | tcg
    tsc_khz: int | None
    console_log: Path
    stdout: Path
    stderr: Path
    status: Path
    control: Path  # FIFO pair CONTROL.in / CONTROL.out
    init: str  # /.kiln/init, or the image's /sbin/init
    net: str = "none"  # none | user | tap
    tap: TapNic | None = None  # with net = "tap"
    forwards: tuple[Forward, ...] = ()
    interactive: bool = False
    runas: str | None = None  # "UID:GID" when started as root
    chroot: Path | None = None
    extra_append: tuple[str, ...] = field(default_factory=tuple)
    warm: str | None = None  # save | restore: the warm device set (WARM_DEVICES), -qmp
    qmp: Path | None = None  # with warm: QEMU's monitor socket
    version: tuple[int, int] = field(kw_only=True)  # QEMU's (major, minor): qemu_version()
    ram: Path | None = None  # with warm, QEMU >= RAM_FILE: the guest memory's file


def parse_forward(text: str) -> Forward:
    """``-p HOST:GUEST`` (TCP; --net user binds 127.0.0.1:HOST, --net tap forwards the
    kiln network's GATEWAY:HOST)."""
    m = re.fullmatch(r"(\d{1,5}):(\d{1,5})(?:/tcp)?", text)
    if not m or not all(0 < int(p) < 65536 for p in m.groups()):
        raise UsageError(f"invalid port forward {text!r}",
                         "write -p HOST:GUEST with TCP ports 1-65535, e.g. -p 8080:80")
    return Forward(int(m.group(1)), int(m.group(2)))


def parse_tsc_khz(cpuinfo: str, sysfs: str | None = None) -> int | None:
    """The host TSC frequency in kHz (pure): sysfs ``tsc_freq_khz`` when the kernel
    exposes it, else the first ``cpu MHz`` of /proc/cpuinfo when the TSC is invariant
    (``constant_tsc``: the TSC then ticks at that nominal rate)."""
    if sysfs and sysfs.strip().isdigit():
        return int(sysfs.strip())
    flags = re.search(r"^flags\s*:(.*)$", cpuinfo, re.M)
    if flags is None or "constant_tsc" not in flags.group(1).split():
        return None
    mhz = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", cpuinfo, re.M)
    if mhz is None:
        return None
    khz = round(float(mhz.group(1)) * 1000)
    return khz if khz > 0 else None


def host_tsc_khz() -> int | None:
    sysfs = None
    with contextlib.suppress(OSError):
        sysfs = Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz").read_text()
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    return parse_tsc_khz(cpuinfo, sysfs)


def kvm_problem(detail: str) -> str:
    """The KVM probe's finding without its claim that no guest would boot: QEMU boots
    guests without KVM, under TCG (as ``builder.doctor.kvm_problem``; importing the doctor
    here would cost `kiln run`'s start-up)."""
    return re.sub(r"[;:,]?\s*a guest kernel would not boot", "", detail).rstrip(" ;:,")


def kvm_verdict(root: Root) -> tuple[bool, str]:
    """(KVM runs a guest, why not). The probe costs ~0.7 s when KVM is emulated, so the
    verdict is cached for the current boot (keyed by the boot id)."""
    from builder import probes

    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = ""
    cache = root.path / "kernels" / f"kvm-{boot_id}.json"
    if boot_id:
        with contextlib.suppress(OSError, ValueError, KeyError):
            doc = json.loads(cache.read_text())
            return bool(doc["ok"]), kvm_problem(str(doc["reason"]))
    p = probes.kvm()
    verdict = (bool(p.ok), "" if p.ok else kvm_problem(str(p.detail)))
    if boot_id:
        with contextlib.suppress(OSError):
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(cache, json.dumps({"ok": verdict[0], "reason": verdict[1]}).encode())
    return verdict


def parse_version(text: str) -> tuple[int, int]:
    """(major, minor) of ``qemu-system-x86_64 --version``'s first line; (0, 0) when it
    names none (the oldest command line then)."""
    m = re.search(r"version (\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def qemu_version(root: Root) -> tuple[int, int]:
    """The installed QEMU's (major, minor), asked once per binary (``runner.facts``)."""
    from builder import proc
    from runner.facts import FileFacts

    facts = FileFacts(root)
    text = facts.version(Path(proc.which(BINARY)))
    facts.save()
    return parse_version(text)


def host_accel(root: Root) -> str:
    """kvm when the KVM probe runs a guest (cached per boot), else tcg."""
    return "kvm" if kvm_verdict(root)[0] else "tcg"


def kernel_cmdline(spec: QemuSpec) -> str:
    return " ".join([*boot_args(spec.init, spec.accel, spec.tsc_khz, warm=bool(spec.warm)),
                     *spec.extra_append])


def boot_args(init: str, accel: str, tsc_khz: int | None, *, warm: bool = False
              ) -> list[str]:
    """The kernel command line's words (pure; a warm image's key holds them). A warm
    image's boot has the same and ``kiln.warm`` (its agent reads what runs need before
    its hello: ``guest_init.WARM_ARG``). ``init_on_free=1`` (freed pages zeroed, so the
    saved state skips them) made the state 62 MB instead of 87 but cost ``kiln warm
    create`` ~1.3 s of boot under TCG — the kernel zeroes all the memory it frees at boot
    — and no measurable time of a restore (docs/warm.md)."""
    parts = [
        "console=ttyS0",
        "root=/dev/vda",
        "rootfstype=ext4",
        "rw",
        f"init={init}",
        "panic=-1",  # a guest panic reboots, and -no-reboot turns that into an exit
        "reboot=t",
        "quiet",
        "pci=off",  # microvm has no PCI bus: skip probing for one
        # ... and skip the x86 PCI set-up whose "PCI: Fatal: No config space access
        # function found" (KERN_ERR, shown despite quiet and pci=off) would open every log
        "initcall_blacklist=pci_arch_init",
        "random.trust_cpu=on",  # no entropy wait for a workload's first getrandom()
    ]
    if accel == "tcg":
        # The crypto self-tests check the kernel's own crypto code against test vectors at
        # boot: emulated, they are ~0.4 s of a ~2.7 s boot here (initcall_debug:
        # crypto_algapi_init alone 409 ms); under KVM they cost milliseconds and stay on.
        parts.append("cryptomgr.notests")
        if tsc_khz:
            parts.append(f"tsc_early_khz={tsc_khz}")
    if warm:
        parts.append(WARM_ARG)
    return parts


def _chardev_file(cid: str, path: Path) -> list[str]:
    return ["-chardev", f"file,id={cid},path={_opt(path)}"]


def _opt(value: object) -> str:
    """A value inside a QEMU option string: commas are escaped by doubling."""
    return str(value).replace(",", ",,")


def argv(spec: QemuSpec, binary: str = BINARY) -> list[str]:
    """The QEMU command line for ``spec`` (pure)."""
    if spec.accel not in ("kvm", "tcg"):
        raise UsageError(f"unknown accelerator {spec.accel!r}", "use kvm or tcg")
    if spec.net not in ("none", "user", "tap"):
        raise UsageError(f"--net {spec.net} is not supported by the QEMU driver",
                         "use --net none, user or tap")
    if spec.net == "tap":
        _check_tap(spec.tap)
    if spec.forwards and spec.net != "user":
        raise UsageError("-p needs --net user", "add --net user")
    accel = "kvm" if spec.accel == "kvm" else "tcg,tb-size=128"  # TCG: bound the code cache
    args = [
        binary,
        "-name", f"{spec.name},process={spec.name}",  # the reaper finds VMMs by this
        "-machine", "microvm,memory-backend=ram" if spec.ram else "microvm",
        # qboot: the minimal firmware that jumps to the kernel (QEMU 10's default for
        # microvm is SeaBIOS, whose banner and screen resets open every console log)
        "-bios", "qboot.rom",
        "-accel", accel,
        *(["-cpu", "host"] if spec.accel == "kvm" else []),
        "-smp", str(spec.cpus),
        "-m", f"{spec.memory_mib}M",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",  # guest reboot/panic ends the VM
        "-kernel", str(spec.kernel),
        "-initrd", str(spec.initrd),
        "-append", kernel_cmdline(spec),
        *_chardev_file("console", spec.console_log),
        "-serial", "chardev:console",
        # warm: without auto-read-only=off a save under -chroot fails (the disk is reopened
        # read-only by path) and a restore under -runas cannot reopen it read-write
        "-drive", f"id=root,file={_opt(spec.disk)},format=raw,if=none,discard=unmap"
        + (",file.auto-read-only=off" if spec.warm else ""),
        "-device", "virtio-blk-device,drive=root",
        "-device", "virtio-serial-device",
        *_chardev_file("stdout", spec.stdout),
        "-device", "virtserialport,chardev=stdout,name=kiln.stdout",
        *_chardev_file("stderr", spec.stderr),
        "-device", "virtserialport,chardev=stderr,name=kiln.stderr",
        *_chardev_file("status", spec.status),
        "-device", "virtserialport,chardev=status,name=kiln.status",
        # FIFOs CONTROL.in/.out (made by kiln), held open by QEMU: the guest's read
        # blocks until the host writes a frame (a socket would read as EOF at once)
        "-chardev", f"pipe,id=control,path={_opt(spec.control)}",
        "-device", "virtserialport,chardev=control,name=kiln.control",
    ]
    args += _optional_devices(spec)
    if spec.runas is not None:
        args += [*_drop_root(spec), "-sandbox", SANDBOX_ROOT]
    else:
        args += ["-sandbox", SANDBOX_USER]
    return args


def _drop_root(spec: QemuSpec) -> list[str]:
    """Root's QEMU: the per-VM uid and the empty chroot, as this QEMU version spells them."""
    assert spec.runas is not None
    args, run_with = [], []
    if spec.version >= RUN_WITH_USER:
        run_with.append(f"user={spec.runas}")
    else:
        args += ["-runas", spec.runas]
    if spec.chroot is not None and spec.version >= RUN_WITH_CHROOT:
        run_with.insert(0, f"chroot={_opt(spec.chroot)}")
    elif spec.chroot is not None:
        args += ["-chroot", str(spec.chroot)]
    return args + (["-run-with", ",".join(run_with)] if run_with else [])


def _optional_devices(spec: QemuSpec) -> list[str]:
    """The stdin port (-i; warm runs: always), a warm run's monitor, the NIC."""
    args: list[str] = []
    if spec.interactive or spec.warm:
        how = "stdio,id=stdin,signal=off" if spec.interactive else "null,id=stdin"
        args += ["-chardev", how,
                 "-device", "virtserialport,chardev=stdin,name=kiln.stdin"]
    if spec.warm:
        args += _warm_args(spec)
    if spec.net == "user":
        fwd = "".join(f",hostfwd=tcp:127.0.0.1:{f.host}-:{f.guest}" for f in spec.forwards)
        args += ["-netdev", f"user,id=net0{fwd}",
                 "-device", "virtio-net-device,netdev=net0"]
    if spec.net == "tap" and spec.tap is not None:
        # script=no: QEMU runs no ifup script (the helper made and bridged the tap); fd=:
        # the helper attached it and kiln passes the fd (QEMU as a user can't open it)
        how = f"fd={spec.tap.fd}" if spec.tap.fd is not None else \
            f"ifname={spec.tap.ifname},script=no,downscript=no"
        args += ["-netdev", f"tap,id=net0,{how}",
                 "-device", f"virtio-net-device,netdev=net0,mac={spec.tap.mac}"]
    if spec.net == "none" and spec.warm:
        args += ["-device", "virtio-net-device"]  # the warm device set's NIC, unplugged
    return args


def _warm_args(spec: QemuSpec) -> list[str]:
    """A warm-capable run's monitor (save/restore over QMP), and a restore's wait for
    its state (``-incoming defer``: the state comes as an fd, ``migrate-incoming``)."""
    if spec.warm not in ("save", "restore") or spec.qmp is None:
        raise UsageError(f"invalid warm mode {spec.warm!r}", "internal error")
    if spec.ram is not None and spec.version < RAM_FILE:
        raise UsageError(f"QEMU {spec.version[0]}.{spec.version[1]} cannot map a warm "
                         "image's memory file", "internal error")
    args = ["-qmp", f"unix:{_opt(spec.qmp)},server=on,wait=off"]
    if spec.ram is not None:
        # save: the guest's memory is the file (MAP_SHARED: what it holds when QEMU stops
        # is the image's); restore: the file opened read-only, mapped private — each
        # clone's writes are its own copies, its reads the one page cache's
        share = "on" if spec.warm == "save" else "off,readonly=on,rom=off"
        args += ["-object", f"memory-backend-file,id=ram,size={spec.memory_mib}M,"
                 f"mem-path={_opt(spec.ram)},share={share}"]
    return args + (["-incoming", "defer"] if spec.warm == "restore" else [])


def _check_tap(tap: TapNic | None) -> None:
    if tap is None:
        raise UsageError("--net tap needs a tap", "internal error: the helper makes it first")
    if not re.fullmatch(TAP_PATTERN, tap.ifname):
        raise UsageError(f"invalid tap name {tap.ifname!r}",
                         "kiln taps are named kt- + 1-12 characters of a-z and 2-7")
    if tap.fd is not None and not 3 <= tap.fd < 1024:
        raise UsageError(f"invalid tap fd {tap.fd}", "internal error: the helper sends it")
    if not _MAC.fullmatch(tap.mac):
        raise UsageError(f"invalid MAC address {tap.mac!r}", "write six lowercase hex pairs")


def forwards_of(texts: Sequence[str]) -> tuple[Forward, ...]:
    """Every ``-p``; a host port given twice is refused (one listener per port)."""
    out = tuple(parse_forward(t) for t in texts)
    seen: set[int] = set()
    for f in out:
        if f.host in seen:
            raise UsageError(f"host port {f.host} is forwarded twice",
                             "give each -p its own HOST port")
        seen.add(f.host)
    return out
