"""Two real guests on a kiln network: QEMU TCG boots of the busybox image, each on a tap the
helper made inside a network namespace this test creates.

Guest A has its own VM namespace (isolation = netns: the guest holds 172.16.0.2, reached at
its lease through NAT in that namespace), guest B sits on the bridge (isolation = none). Both
are put on the network by ``runner.network.attach`` (what ``kiln run --net tap`` calls) and
taken off by ``detach``; the argv is ``runner.vmm.qemuargv.argv`` with the ``TapNic`` it gives, and
QEMU starts in its ``spawn_netns`` (``helper.net.host.join_netns``). Proven from outside: each
guest's agent configured eth0 from the settings on its disk (a cold Firecracker run's
transport) with the MAC kiln derived, the
guests ping each other, a process in the test namespace fetches a page from each guest's
busybox httpd directly and through a port forward, and the teardown leaves the namespace as
it was. Nothing touches the host's own
namespace; no traffic leaves the test's namespaces.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from builder.root import Root
from builder.source import RegistryOptions
from helper.net import core as nc
from helper.net import host as net
from runner import guest_init, kernel, network
from runner.guest_init import agentbin, channel
from runner.vmm import qemuargv
from tests.support.images import busybox_layout
from tests.support.net import ROOT_A, UID, assert_host_clean, call, caller, cfg, ns, snapshot, vm_id
from tests.support.timing import limit

pytestmark = [pytest.mark.root, pytest.mark.slow]
__all__ = ["ns"]  # the fixture, shared with test_net_ops

HTTP = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(b"GET /index.html HTTP/1.0\\r\\n\\r\\n")
data = b""
while chunk := s.recv(4096):
    data += chunk
print(data.decode().split("\\r\\n\\r\\n", 1)[-1].strip())
"""


def fetch(netns: str, host: str, port: int) -> str:
    res = subprocess.run([sys.executable, "-c", HTTP, host, str(port)], capture_output=True,
                         text=True, timeout=limit(30), check=False,
                         preexec_fn=lambda: net.join_netns(netns))
    return res.stdout.strip() or res.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def guest_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(kernel, kiln's minimal initrd, the busybox volume)."""
    from builder.pipeline import build

    base = tmp_path_factory.mktemp("netboot")
    root = Root(base / "root").ensure()
    volume = build(root, f"oci:{busybox_layout()}:1", RegistryOptions()).volume
    boot = kernel.boot_files(base / "kernels")
    return boot.kernel, boot.initrd, volume.path


def guest_script(name: str, peer: str) -> str:
    """Serve a page, ping the peer until it answers, show eth0, wait to be stopped."""
    return (f"mkdir -p /www && echo hello-from-{name} >/www/index.html && "
            "busybox httpd -p 80 -h /www && "
            f"i=0; until busybox ping -c 1 -W 1 {peer} >/dev/null 2>&1; do i=$((i + 1)); "
            f"[ $i -lt 120 ] || {{ echo ping-failed; exit 1; }}; done; echo ping-ok {peer}; "
            "cat /sys/class/net/eth0/address; ip -4 addr show dev eth0; sleep 600")


class Guest:
    def __init__(self, tmp: Path, name: str, files: tuple[Path, Path, Path],
                 vmnet: network.VmNet, script: str) -> None:
        kern, initrd, volume = files
        self.dir = d = tmp / name
        d.mkdir()
        disk = d / "disk.ext4"
        shutil.copyfile(volume, disk)
        # the settings on the disk, eth0 in them (as a cold Firecracker run has them)
        work = guest_init.workload({}, command=["sh", "-c", script], hostname=name)
        frame = channel.encode_settings(channel.Settings(work, os.urandom(16).hex(),
                                                         vmnet.guest()),
                                        time_ns=None, seed=os.urandom(channel.SEED_BYTES))
        guest_init.inject(disk, work, agent=agentbin.ensure_agent(d / "cache", scratch=d),
                          settings=frame, scratch=d)
        for f in ("console.log", "stdout", "stderr", "status"):
            (d / f).touch(mode=0o600)
        for end in ("in", "out"):
            os.mkfifo(d / f"ctl.{end}", 0o600)
        (d / "empty").mkdir(mode=0o500)
        spec = qemuargv.QemuSpec(
            name=f"kiln-nettest-{name}", kernel=kern, initrd=initrd, disk=disk, cpus=1,
            memory_mib=256, accel="tcg", tsc_khz=qemuargv.host_tsc_khz(),
            console_log=d / "console.log", stdout=d / "stdout", stderr=d / "stderr",
            status=d / "status", control=d / "ctl", init=guest_init.INIT_PATH, net="tap",
            tap=vmnet.qemu_tap(), extra_append=(guest_init.SETTINGS_ARG,),
            runas=f"{UID}:{UID}", chroot=d / "empty",
            version=qemuargv.qemu_version(Root(tmp / "facts")))
        binary = shutil.which("qemu-system-x86_64")
        assert binary is not None
        with open(d / "vmm.log", "wb") as log:
            self.proc = subprocess.Popen(qemuargv.argv(spec, binary),
                                         stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT,
                                         # single-threaded test process: setns is safe
                                         preexec_fn=self._enter(vmnet.spawn_netns))  # noqa: PLW1509

    @staticmethod
    def _enter(netns: str | None) -> Any:
        assert netns is not None  # this test never uses the host's namespace
        return lambda: net.join_netns(netns)

    def stdout(self) -> str:
        return (self.dir / "stdout").read_text(errors="replace")

    def why(self) -> str:
        return "\n".join(f"--- {f}\n" + (self.dir / f).read_text(errors="replace")[-1500:]
                         for f in ("console.log", "stdout", "stderr", "vmm.log"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=limit(30))


@pytest.fixture
def guests() -> Iterator[list[Guest]]:
    started: list[Guest] = []
    yield started
    for g in started:
        g.stop()


def test_two_guests_ping_each_other_and_serve_the_namespace(
        ns: str, guest_files: tuple[Path, Path, Path], guests: list[Guest],
        tmp_path: Path) -> None:
    plain, iso = cfg(ns), cfg(ns, isolation="netns")
    before = snapshot(ns)
    a, b = vm_id(), vm_id()
    va = network.attach(caller(iso), a, ROOT_A, UID, UID,
                        forwards=(qemuargv.Forward(8080, 80),))
    vb = network.attach(caller(plain), b, ROOT_A, UID, UID)
    assert (va.spawn_netns, vb.spawn_netns) == (nc.names(a).netns, ns)

    t0 = time.monotonic()
    guests.append(Guest(tmp_path, "guesta", guest_files, va, guest_script("guesta", vb.ip)))
    guests.append(Guest(tmp_path, "guestb", guest_files, vb, guest_script("guestb", va.ip)))
    ga, gb = guests
    deadline = t0 + 120
    while not all("ping-ok" in (out := g.stdout()) and "inet " in out for g in guests):
        for g in guests:
            assert g.proc.poll() is None, g.why()
            assert "ping-failed" not in g.stdout(), g.why()
        assert time.monotonic() < deadline, ga.why() + gb.why()
        time.sleep(0.2)
    boot_s = time.monotonic() - t0

    # Each agent configured eth0 from the settings on its disk with the MAC kiln derived.
    assert f"ping-ok {vb.ip}\n{nc.mac_for(a)}\n" in ga.stdout()
    assert "inet 172.16.0.2/30" in ga.stdout()  # A's guest address: the same in every VM ns
    assert f"ping-ok {va.ip}\n{nc.mac_for(b)}\n" in gb.stdout()
    assert f"inet {vb.ip}/24" in gb.stdout()
    # A process in the kiln namespace reaches both servers, and A through the forward.
    assert fetch(ns, va.ip, 80) == "hello-from-guesta"
    assert fetch(ns, vb.ip, 80) == "hello-from-guestb"
    assert fetch(ns, plain.net.gateway, 8080) == "hello-from-guesta"

    for g in guests:
        g.stop()
    assert network.detach(caller(iso), a) == ["forward-remove", "netns-delete", "net-release"]
    assert network.detach(caller(plain), b) == ["tap-detach", "net-release"]
    call(plain, "bridge-remove", {})
    assert snapshot(ns) == before
    assert_host_clean(vb.tap, nc.names(a).veth)
    assert boot_s < 60, f"two guests took {boot_s:.1f} s to reach each other"
