"""The KVM probe: bounded in time, structured, and honest about emulated 'KVM'."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import pytest

from builder import probes
from tests.support.timing import limit

KNOWN_FAILURES = ("guest code is emulated", "guest failed at", "did not finish within",
                  "KVM API version", "OSError", "PermissionError", "FileNotFoundError")


def test_kvm_probe_returns_quickly_with_a_verdict() -> None:
    t0 = time.monotonic()
    result = probes.kvm_probe()
    assert time.monotonic() - t0 < limit(5)
    assert isinstance(result, probes.Probe)
    if result.ok:
        assert result.detail.startswith("guest entered 64-bit mode and ran natively")
    elif os.path.exists("/dev/kvm"):
        assert any(k in result.detail for k in KNOWN_FAILURES), result.detail


def test_kvm_is_cached() -> None:
    assert probes.kvm() is probes.kvm()


def test_missing_device() -> None:
    result = probes.kvm_probe("/nonexistent/kvm")
    assert result == probes.Probe(False, "/nonexistent/kvm does not exist (no KVM: enable "
                                         "virtualization, modprobe kvm_intel or kvm_amd)")


def test_not_a_kvm_device_fails_cleanly() -> None:
    result = probes.kvm_probe("/dev/null")
    assert not result.ok
    assert result.detail == "OSError: [Errno 25] Inappropriate ioctl for device"


@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm")
def test_timeout_kills_the_child() -> None:
    before = set(_zombie_children())  # another test's (this process runs them all)
    t0 = time.monotonic()
    result = probes.kvm_probe(timeout=0.001)
    assert time.monotonic() - t0 < limit(2)
    assert result.ok is False
    assert result.detail.startswith("guest did not finish within 0.001 s")
    assert set(_zombie_children()) - before == set()  # the killed child was reaped


def _zombie_children() -> list[int]:
    """Our children in state Z (read from /proc; never reaps anyone else's children)."""
    pids: list[int] = []
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            pids += [int(p) for p in (task / "children").read_text().split()]
    zombies = []
    for pid in pids:
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                zombies.append(pid)
    return zombies


def test_guest_code_layout() -> None:
    """The absolute addresses baked into the guest code match where things are."""
    code = probes._GUEST_CODE
    base = probes._ENTRY
    assert code.index(b"\xea\x64\x10\x00\x00\x08\x00") + 7 == 0x1064 - base  # ljmp target
    assert code[0x1080 - base:0x1088 - base] == bytes(8)  # GDT null descriptor
    assert code[0x1098 - base:] == b"\x17\x00\x80\x10\x00\x00"  # GDTR -> 0x1080, 3 entries
    assert code.count(b"\xb9\x00\x00\x10\x00") == 1  # loop count = _LOOPS
    assert probes._LOOPS == 0x100000
    assert len(code) < probes._GUEST_MEM - base
