"""Real capability probes: can this host do X right now?

Each probe tries the real thing on a scratch object and reports ``Probe(ok, detail)``.
They drive ``kiln doctor``, the automatic choices (pool backend, accelerator) and the test
suite's markers, so none of them decides by uid or by the presence of a file alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import json
import mmap
import os
import select
import stat
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from builder import proc
from helper.base import fileops
from helper.base.errors import KilnError


@dataclass(frozen=True)
class Probe:
    ok: bool
    detail: str


@functools.cache
def can_mknod() -> Probe:
    """Creating a character device node works (root, or CAP_MKNOD)."""
    with tempfile.TemporaryDirectory() as d:
        try:
            os.mknod(os.path.join(d, "null"), stat.S_IFCHR | 0o600, os.makedev(1, 3))
            os.chown(os.path.join(d, "null"), 1, 1)
        except OSError as e:
            return Probe(False, f"mknod/chown refused: {e.strerror}")
    return Probe(True, "mknod and chown work")


@functools.cache
def loop_devices() -> Probe:
    """A loop device can be attached to a file and detached again."""
    with tempfile.TemporaryDirectory() as d:
        img = Path(d) / "probe.img"
        with open(img, "wb") as f:
            f.truncate(1 << 20)
        try:
            res = proc.run("losetup", ["--find", "--show", str(img)], timeout=20)
        except KilnError as e:
            return Probe(False, f"losetup failed: {e.message}")
        dev = res.text.strip()
        with contextlib.suppress(KilnError):
            proc.run("losetup", ["--detach", dev], timeout=20)
    return Probe(True, f"attached and detached {dev}")


@functools.cache
def dm_thin() -> Probe:
    """The kernel's device-mapper offers the thin-pool target."""
    try:
        res = proc.run("dmsetup", ["targets"], timeout=20)
    except KilnError as e:
        return Probe(False, f"dmsetup targets failed: {e.message}")
    if any(line.split()[:1] == ["thin-pool"] for line in res.text.splitlines()):
        return Probe(True, "thin-pool target available")
    return Probe(False, "device-mapper has no thin-pool target (modprobe dm-thin-pool)")


def reflink(directory: Path) -> Probe:
    """``directory``'s filesystem can clone a file (FICLONE)."""
    why = fileops.probe_reflink(directory)
    if why is not None:
        return Probe(False, f"FICLONE on {directory} refused: {why}")
    return Probe(True, f"FICLONE works on {directory}")


# --- KVM: can a guest actually run here? --------------------------------------------------
#
# Opening /dev/kvm proves little: on some hosts (this project's CI, a paravirtual "PVM"
# kvm) every ioctl works, SeaBIOS and a kernel's real-mode setup code run, and then the
# kernel never gets anywhere, because guest code that is not PVM-aware is *emulated* one
# instruction at a time (about 1 µs each: ~100x slower than QEMU's TCG). So the probe does
# what a booting kernel does and times it:
#
# 1. start a vCPU in 32-bit protected mode with paging off (the Linux 32-bit boot protocol
#    state) and the host's supported CPUID (without it EFER.LME is refused);
# 2. the guest builds identity page tables, enables PAE, sets EFER.LME, turns paging on
#    and far-jumps into a 64-bit code segment, as the kernel's startup_32 does;
# 3. in 64-bit mode it reports with ``out 0x10`` (value 0x42), runs a 1M-iteration loop,
#    reports again (0x43) and halts.
#
# Native execution runs the loop in about a millisecond; the probe demands it finish within
# ``_LOOP_BUDGET`` seconds (a 100x margin both ways). All of it runs in a forked child
# (``proc.fork``) that is killed after the timeout, so a guest that spins cannot hang the
# caller.

_KVMIO = 0xAE
KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_GET_SUPPORTED_CPUID = 0xC008AE05  # _IOWR(KVMIO, 0x05, struct kvm_cpuid2)
KVM_CREATE_VCPU = 0xAE41
KVM_SET_USER_MEMORY_REGION = 0x4020AE46  # _IOW(KVMIO, 0x46, 32-byte region)
KVM_SET_TSS_ADDR = 0xAE47
KVM_RUN = 0xAE80
KVM_SET_REGS = 0x4090AE82  # _IOW(KVMIO, 0x82, struct kvm_regs: 144 bytes)
KVM_GET_SREGS = 0x8138AE83  # _IOR(KVMIO, 0x83, struct kvm_sregs: 312 bytes)
KVM_SET_SREGS = 0x4138AE84
KVM_SET_CPUID2 = 0x4008AE90
KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
_EXIT_NAMES = {0: "UNKNOWN", 2: "IO", 5: "HLT", 6: "MMIO", 8: "SHUTDOWN (triple fault)",
               9: "FAIL_ENTRY", 17: "INTERNAL_ERROR"}

_GUEST_MEM = 0x10000  # 64 KiB at guest-physical 0
_ENTRY = 0x1000
_LOOPS = 0x100000
_LOOP_BUDGET = 0.1  # seconds for _LOOPS iterations; native takes ~0.001

# Guest code, loaded at 0x1000 (assembled with GNU as; bytes, then the instruction).
_GUEST_CODE = b"".join([
    # .code32 -- flat protected mode, paging off
    b"\xbf\x00\x20\x00\x00",          # mov $0x2000, %edi
    b"\x31\xc0",                      # xor %eax, %eax
    b"\xb9\x00\x0c\x00\x00",          # mov $3072, %ecx
    b"\xf3\xab",                      # rep stosl          (zero 0x2000-0x4fff)
    b"\xc7\x05\x00\x20\x00\x00\x03\x30\x00\x00",  # movl $0x3003, 0x2000  PML4[0] -> PDPT
    b"\xc7\x05\x00\x30\x00\x00\x03\x40\x00\x00",  # movl $0x4003, 0x3000  PDPT[0] -> PD
    b"\xc7\x05\x00\x40\x00\x00\x83\x00\x00\x00",  # movl $0x83, 0x4000    PD[0]: 2M page at 0
    b"\x0f\x01\x15\x98\x10\x00\x00",  # lgdt 0x1098
    b"\x0f\x20\xe0",                  # mov %cr4, %eax
    b"\x83\xc8\x20",                  # or $0x20, %eax     (PAE)
    b"\x0f\x22\xe0",                  # mov %eax, %cr4
    b"\xb8\x00\x20\x00\x00",          # mov $0x2000, %eax
    b"\x0f\x22\xd8",                  # mov %eax, %cr3
    b"\xb9\x80\x00\x00\xc0",          # mov $0xc0000080, %ecx  (EFER)
    b"\x0f\x32",                      # rdmsr
    b"\x0d\x00\x01\x00\x00",          # or $0x100, %eax    (LME)
    b"\x0f\x30",                      # wrmsr
    b"\x0f\x20\xc0",                  # mov %cr0, %eax
    b"\x0d\x01\x00\x00\x80",          # or $0x80000001, %eax  (PG|PE)
    b"\x0f\x22\xc0",                  # mov %eax, %cr0
    b"\xea\x64\x10\x00\x00\x08\x00",  # ljmp $0x08, $0x1064
    # .code64 (0x1064)
    b"\x66\xb8\x10\x00",              # mov $0x10, %ax
    b"\x8e\xd8",                      # mov %eax, %ds
    b"\x8e\xc0",                      # mov %eax, %es
    b"\x8e\xd0",                      # mov %eax, %ss
    b"\xb0\x42",                      # mov $0x42, %al
    b"\xe6\x10",                      # out %al, $0x10     (checkpoint: in 64-bit mode)
    b"\xb9\x00\x00\x10\x00",          # mov $0x100000, %ecx
    b"\xff\xc9",                      # 1: dec %ecx
    b"\x75\xfc",                      # jnz 1b
    b"\xb0\x43",                      # mov $0x43, %al
    b"\xe6\x10",                      # out %al, $0x10     (loop done)
    b"\xf4",                          # hlt
    b"\x00\x00\x00\x00\x00\x00\x00\x00",  # (0x1080) GDT: null
    b"\xff\xff\x00\x00\x00\x9a\xaf\x00",  # 0x08: 64-bit code
    b"\xff\xff\x00\x00\x00\x92\xcf\x00",  # 0x10: data
    b"\x17\x00\x80\x10\x00\x00",      # (0x1098) GDTR: limit 23, base 0x1080
])


def _kvm_guest_run(device: str, report: Callable[[str], None]) -> str:
    """Child side: set up the VM, run the guest, return a verdict ``ok:...``/``fail:...``."""

    kvm_fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    api = fcntl.ioctl(kvm_fd, KVM_GET_API_VERSION)
    if api != 12:
        return f"fail:KVM API version {api}, expected 12"
    vm = fcntl.ioctl(kvm_fd, KVM_CREATE_VM, 0)
    # Intel without unrestricted guest needs a TSS area; harmless elsewhere.
    with contextlib.suppress(OSError):
        fcntl.ioctl(vm, KVM_SET_TSS_ADDR, 0x70000000)  # below 2 GiB: the arg is a C int
    mem = mmap.mmap(-1, _GUEST_MEM, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mem[_ENTRY:_ENTRY + len(_GUEST_CODE)] = _GUEST_CODE
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    region = struct.pack("=IIQQQ", 0, 0, 0, _GUEST_MEM, addr)  # slot, flags, gpa, size, hva
    fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION, region)
    vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
    nent = 256
    cpuid = bytearray(struct.pack("=II", nent, 0) + bytes(40 * nent))
    fcntl.ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, cpuid)
    fcntl.ioctl(vcpu, KVM_SET_CPUID2, cpuid)
    run_size = fcntl.ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE)
    run = mmap.mmap(vcpu, run_size, flags=mmap.MAP_SHARED,
                    prot=mmap.PROT_READ | mmap.PROT_WRITE)
    sregs = bytearray(312)
    fcntl.ioctl(vcpu, KVM_GET_SREGS, sregs)
    # struct kvm_segment: base, limit, selector, type, present, dpl, db, s, l, g, avl, ...
    seg = "=QIHBBBBBBBBBB"
    struct.pack_into(seg, sregs, 0, 0, 0xFFFFFFFF, 0x08, 11, 1, 0, 1, 1, 0, 1, 0, 0, 0)  # cs
    for i in range(1, 6):  # ds es fs gs ss
        struct.pack_into(seg, sregs, i * 24, 0, 0xFFFFFFFF, 0x10, 3, 1, 0, 1, 1, 0, 1, 0, 0, 0)
    struct.pack_into("=Q", sregs, 224, 0x11)  # cr0 = PE | ET
    fcntl.ioctl(vcpu, KVM_SET_SREGS, bytes(sregs))
    regs = bytearray(144)
    struct.pack_into("=Q", regs, 16 * 8, _ENTRY)  # rip
    struct.pack_into("=Q", regs, 17 * 8, 0x2)  # rflags (bit 1 is always set)
    fcntl.ioctl(vcpu, KVM_SET_REGS, bytes(regs))
    report("vcpu started in 32-bit protected mode")

    def step() -> tuple[int, int, float]:
        t0 = time.monotonic()
        fcntl.ioctl(vcpu, KVM_RUN, 0)
        took = time.monotonic() - t0
        reason = struct.unpack_from("=I", run, 8)[0]
        value = -1
        if reason == KVM_EXIT_IO:
            _direction, _size, port, _count, offset = struct.unpack_from("=BBHIQ", run, 32)
            value = run[offset] if port == 0x10 else -1
        return reason, value, took

    expected = [(KVM_EXIT_IO, 0x42, "entering 64-bit mode"),
                (KVM_EXIT_IO, 0x43, "a 1M-iteration loop"),
                (KVM_EXIT_HLT, -1, "hlt")]
    for want_reason, want_value, what in expected:
        reason, value, took = step()
        if reason != want_reason or value != want_value:
            name = _EXIT_NAMES.get(reason, str(reason))
            return f"fail:guest failed at {what}: exit {name} (value {value:#x})"
        if want_value == 0x42:
            report("guest entered 64-bit mode")
        if want_value == 0x43 and took > _LOOP_BUDGET:
            return (f"fail:guest code is emulated, not run natively: a 1M-iteration loop "
                    f"took {took:.2f} s (native: ~0.001 s); a guest kernel would not boot")
    return "ok:guest entered 64-bit mode and ran natively (KVM_RUN, IO and HLT exits as expected)"


def kvm_probe(device: str = "/dev/kvm", timeout: float = 3.0) -> Probe:
    """Run a tiny guest on ``device`` in a child process killed after ``timeout`` seconds."""

    if not os.path.exists(device):
        return Probe(False, f"{device} does not exist (no KVM: enable virtualization, "
                            "modprobe kvm_intel or kvm_amd)")
    if not os.access(device, os.R_OK | os.W_OK):
        return Probe(False, f"{device} is not readable and writable by this user "
                            "(add the user to the kvm group)")
    rfd, wfd = os.pipe()

    def guest() -> int:  # in the child: every outcome, errors included, goes to the pipe
        def report(msg: str) -> None:
            os.write(wfd, (json.dumps(msg) + "\n").encode())

        try:
            report(_kvm_guest_run(device, report))
        except BaseException as e:
            report(f"fail:{type(e).__name__}: {e}")
        return 0

    try:
        child = proc.fork(guest, close_fds=(rfd,))
    finally:
        os.close(wfd)
    lines: list[str] = []
    buf = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([rfd], [], [], left)[0]:
                break
            chunk = os.read(rfd, 4096)
            if not chunk:
                break
            buf += chunk
    finally:
        os.close(rfd)
        child.kill()
        child.wait()
    lines = [json.loads(x) for x in buf.decode().splitlines() if x.strip()]
    verdict = next((x for x in reversed(lines) if x.startswith(("ok:", "fail:"))), None)
    if verdict is None:
        last = lines[-1] if lines else "before the vcpu started"
        return Probe(False, f"guest did not finish within {timeout:g} s (last step: {last}); "
                            "guest code is emulated or spins: a guest kernel would not boot")
    ok, _, detail = verdict.partition(":")
    return Probe(ok == "ok", detail)


@functools.cache
def kvm() -> Probe:
    """KVM can run real guest code natively (see the comment above ``_GUEST_CODE``)."""
    return kvm_probe()
