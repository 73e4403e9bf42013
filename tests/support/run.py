"""Run-stage helpers: the `kiln` command in-process from this checkout, a root's VMMs, the
guest clock's distance from the host's."""

from __future__ import annotations

import select
import socket
import subprocess
import sys
import time
from pathlib import Path

from runner.vm.reaper import scan_vmms
from runner.vm.state import root_key, vm_of_host
from tests.support.timing import limit

KILN = [sys.executable, "-c",
        "from runner.cli import cli; cli(prog_name='kiln')"]


def vmms(root: Path) -> dict[str, int]:
    """VM id → QEMU pid of ``root``'s VMs."""
    key = root_key(root)
    return {vm: pid for name, pid in scan_vmms().items()
            if (vm := vm_of_host(name, key)) is not None}


def clock_skew(root: Path, run_args: list[str]) -> float:
    """Seconds between the host's clock when the workload's output reaches kiln's stdout
    and the guest's at the workload's start: ``kiln run RUN_ARGS -- busybox adjtimex``
    (``adjtimex``: this busybox's ``date`` has no ``%N``)."""
    p = subprocess.Popen([*KILN, "--root", str(root), "run", *run_args, "--", "busybox",
                          "adjtimex"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL, text=True)
    assert p.stdout is not None
    ready, _, _ = select.select([p.stdout], [], [], limit(120))
    host = time.time()
    assert ready, "no output"
    out, err = p.communicate(timeout=limit(60))
    assert p.returncode == 0, err
    got = {k.strip(): int(v) for k, v in (line.split(":", 1) for line in out.splitlines()
                                          if "time.tv_" in line)}
    return abs(host - (got["time.tv_sec"] + got["time.tv_usec"] / 1e6))


def forwarded_reply(port: int, vm: subprocess.Popen[str], want: bytes) -> bytes:
    """What the guest's listener behind ``--net user -p PORT:…`` sends, asked again until
    ``want`` is in it, the VM ended (nothing more will listen) or a busy machine's minute."""
    got = b""
    deadline = time.monotonic() + limit(60)
    while time.monotonic() < deadline and want not in got and vm.poll() is None:
        try:  # slirp accepts before the guest listens, then resets: retry
            with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
                got = c.recv(100)
        except OSError:
            pass
        time.sleep(0.3)
    return got
