"""What a VM run is given and what it ends with: ``RunOptions``, the VM directory's files
(``VMFiles``), a warm run's ``WarmPlan``, and the ``outcome`` (pure) — the record's end
state and ``kiln run``'s exit code — from the guest's status report and the VMM's exit
(``runner.vmm.driver.Ended``). Which VMM runs it: ``runner.vmm.choice``.

Exit codes: the workload's; 124 when --timeout fired; 125 when kiln or the VMM failed;
137 when a stop had to kill the guest.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

EXIT_TIMEOUT = 124
EXIT_KILN = 125


@dataclass(frozen=True)
class RunOptions:
    vmm: str = "auto"
    cpus: int = 1
    memory: int = 512 << 20
    disk_size: int | None = None
    kernel: Path | None = None
    initrd: Path | None = None
    name: str | None = None
    env: tuple[str, ...] = ()
    workdir: str | None = None
    user: str | None = None
    init: str = "kiln"  # kiln | image
    net: str = "none"
    publish: tuple[str, ...] = ()
    rm: bool = False
    interactive: bool = False
    detach: bool = False
    timeout: float | None = None
    command: tuple[str, ...] = ()
    entrypoint: str | None = None  # None: the image's; "": none
    stop_grace: float = 10.0


@dataclass(frozen=True)
class WarmPlan:
    """Warm start (docs/warm.md) for one run: ``save`` boots to the guest's hello and
    saves its state to ``state`` and its disk to ``disk``; ``restore`` starts from them
    (the VM's own snapshot is a clone of ``disk``)."""

    mode: str  # save | restore
    state: Path
    disk: Path
    mem: Path | None = None  # the guest's memory apart from its state (WarmFacts.mem_file)


@dataclass(frozen=True)
class WarmFacts:
    """What a warm key takes from the VMM (``Driver.warm_facts``): its name, the binary
    whose version counts, the accelerator, the CPU model, the device set and the kernel
    command line a warm-capable boot gets; and how the saving VM is networked (QEMU's
    NIC needs no backend to be saved, Firecracker's a tap: ``runner.vmm.fcwarm``)."""

    vmm: str
    binary: Path
    accel: str
    cpu_model: str
    devices: str
    cmdline: str
    save_net: str = "none"  # the --net of the VM a warm image is saved from
    mem_file: bool = False  # the guest's memory saved as a file beside the state (MEM)


@dataclass(frozen=True)
class Outcome:
    state: str  # exited | failed
    exit_code: int | None
    reason: str
    kiln_exit: int


def outcome(status_text: str, vmm_code: int | None, *, timed_out: bool, stopped: bool,
            own_init: bool, console_tail: str = "", vmm_tail: str = "") -> Outcome:
    """What a finished VM's record says and what ``kiln run`` exits with (pure)."""
    m = re.search(r"^exit (\d+)\s*$", status_text, re.M)
    if m:
        code = int(m.group(1))
        if timed_out:
            return Outcome("exited", code, "timed out (--timeout)", EXIT_TIMEOUT)
        return Outcome("exited", code, "stopped" if stopped else "", code)
    if timed_out:
        return Outcome("exited", None, "timed out (--timeout)", EXIT_TIMEOUT)
    if stopped:
        return Outcome("exited", 137, "stopped (forced)", 137)
    if vmm_code == 0 and own_init:
        if "Kernel panic" in console_tail:
            # With panic=-1 and -no-reboot a panic ends QEMU with status 0 too: an image's
            # own init that exits is a failure, not a power-off.
            panic = next(line for line in console_tail.splitlines() if "Kernel panic" in line)
            return Outcome("failed", None, f"the guest kernel panicked: {panic.strip()}",
                           EXIT_KILN)
        return Outcome("exited", 0, "the guest powered off", 0)
    if vmm_code == 0:
        why = console_tail.strip().splitlines()[-1] if console_tail.strip() else "no output"
        return Outcome("failed", None,
                       f"the guest stopped without reporting an exit status: {why}", EXIT_KILN)
    why = vmm_tail.strip().splitlines()[-1] if vmm_tail.strip() else "no message"
    what = f"signal {-vmm_code}" if vmm_code is not None and vmm_code < 0 else \
        f"exit {vmm_code}"
    return Outcome("failed", None, f"the VMM ended ({what}): {why}", EXIT_KILN)


def tail(path: Path, size: int = 4096) -> str:
    """The last ``size`` bytes of a file as text ("" when unreadable)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


@dataclass(frozen=True)
class VMFiles:
    dir: Path

    @property
    def console(self) -> Path:
        return self.dir / "console.log"

    @property
    def stdout(self) -> Path:
        return self.dir / "stdout"

    @property
    def stderr(self) -> Path:
        return self.dir / "stderr"

    @property
    def status(self) -> Path:
        return self.dir / "status"

    @property
    def control(self) -> Path:
        return self.dir / "ctl"

    @property
    def vmm_log(self) -> Path:
        return self.dir / "vmm.log"

    @property
    def chroot(self) -> Path:
        return self.dir / "empty"
