"""Run-stage helpers: the `kiln` command in-process from this checkout, and a root's VMMs."""

from __future__ import annotations

import sys
from pathlib import Path

from runner.vm.reaper import scan_vmms
from runner.vm.state import root_key, vm_of_host

KILN = [sys.executable, "-c",
        "from runner.cli import cli; cli(prog_name='kiln')"]


def vmms(root: Path) -> dict[str, int]:
    """VM id → QEMU pid of ``root``'s VMs."""
    key = root_key(root)
    return {vm: pid for name, pid in scan_vmms().items()
            if (vm := vm_of_host(name, key)) is not None}
