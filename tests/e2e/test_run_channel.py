"""The control channel for real (QEMU microvm, TCG here): a cold `kiln run` takes its
settings over the kiln.control port — the guest's clock, fresh random state, hostname and
machine id come from the host's SET1 frame, nothing of the workload is on the disk — and
a guest sent a bad frame says so and exits 125 instead of hanging."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from builder.root import Root
from builder.source import RegistryOptions
from runner import guest_init, kernel
from runner.guest_init import agentbin, channel
from runner.vmm import qemuargv
from tests.support.images import busybox_layout
from tests.support.run import KILN, clock_skew
from tests.support.timing import limit

pytestmark = pytest.mark.slow


def kiln(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KILN, "--root", str(root), *args], capture_output=True,
                          text=True, check=False, timeout=limit(120),
                          stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Path]:
    """(root with a copy pool, busybox volume id, the volume's file)."""
    from builder.pipeline import build
    from builder.pool import init_pool

    root = tmp_path_factory.mktemp("chan") / "root"
    init_pool(Root(root).ensure().path, backend="copy")
    vol = build(Root(root), f"oci:{busybox_layout()}:1", RegistryOptions()).volume
    return root, vol.id[7:19], vol.path


def test_clock_comes_from_the_host(world: tuple[Path, str, Path]) -> None:
    """The guest's clock at the workload's start is within 1 s of the host's when that
    output reaches kiln's stdout."""
    root, vol, _ = world
    assert clock_skew(root, ["--rm", vol]) < 1.0


def test_seed_hostname_machine_id_differ_per_run(world: tuple[Path, str, Path]) -> None:
    root, vol, _ = world
    script = ("head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; hostname; "
              "cat /etc/machine-id; ls /.kiln")
    outs = []
    for name in ("chan-one", "chan-two"):
        res = kiln(root, "run", "--name", name, vol, "--", "sh", "-c", script)
        assert res.returncode == 0, res.stderr
        outs.append(res.stdout.split("\n"))
    (r1, h1, m1, *ls1), (r2, h2, m2, *_) = outs
    assert len(r1) == len(r2) == 64
    assert r1 != r2  # fresh seed material each run
    assert (h1, h2) == ("chan-one", "chan-two")
    assert len(m1) == len(m2) == 32
    assert m1 != m2
    assert int(m1, 16) >= 0
    assert [x for x in ls1 if x] == ["agent", "busybox", "init"]  # no config on the disk
    ps = {r["name"]: r for r in json.loads(kiln(root, "ps", "--all", "--json").stdout)}
    snap = root / "pool" / "fs" / "snapshots" / f"{ps['chan-one']['snapshot']}.ext4"
    listing = subprocess.run(["debugfs", "-R", "ls /.kiln", str(snap)], capture_output=True,
                             text=True, check=True).stdout
    assert "config" not in listing
    assert kiln(root, "rm", "chan-one", "chan-two").returncode == 0


def _boot(tmp: Path, volume: Path, *, settings: bytes | None = None, on_cmdline: bool = True
          ) -> tuple[subprocess.Popen[bytes], Path]:
    """A VM booted by hand with kiln's init and agent and — ``settings``, a frame — its
    settings on the disk, as a cold Firecracker run has them (else none there), named on
    the kernel command line (``on_cmdline``) as kiln names them."""
    d = tmp / "vm"
    d.mkdir()
    disk = d / "disk.ext4"
    shutil.copyfile(volume, disk)
    agent = agentbin.ensure_agent(tmp / "cache", scratch=tmp)
    guest_init.inject(disk, guest_init.workload({}, command=["true"], hostname="bad"),
                      agent=agent, scratch=tmp)
    if settings is not None:
        guest_init.write_settings(disk, settings, scratch=tmp)
    for f in ("console.log", "stdout", "stderr", "status", "vmm.log"):
        (d / f).touch(mode=0o600)
    for end in ("in", "out"):
        os.mkfifo(d / f"ctl.{end}", 0o600)
    boot = kernel.boot_files(tmp / "kernels")
    spec = qemuargv.QemuSpec(
        name="kiln-chantest", kernel=boot.kernel, initrd=boot.initrd, disk=disk, cpus=1,
        memory_mib=256, accel="tcg", tsc_khz=qemuargv.host_tsc_khz(),
        console_log=d / "console.log", stdout=d / "stdout", stderr=d / "stderr",
        status=d / "status", control=d / "ctl", init=guest_init.INIT_PATH,
        extra_append=(guest_init.SETTINGS_ARG,) if settings is not None and on_cmdline else (),
        version=qemuargv.qemu_version(Root(tmp / "facts")))
    binary = shutil.which("qemu-system-x86_64")
    assert binary is not None
    with open(d / "vmm.log", "wb") as log:
        proc = subprocess.Popen(qemuargv.argv(spec, binary), stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT)
    return proc, d


def _answer_hello(proc: subprocess.Popen[bytes], d: Path, frame: bytes) -> None:
    """Wait for the guest's HEL1 on the control port (the test fails without it), then
    write ``frame`` as the host's answer."""
    out = os.open(d / "ctl.out", os.O_RDONLY | os.O_NONBLOCK)
    heard, deadline = b"", time.monotonic() + limit(90)
    while len(heard) < 8 and time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(BlockingIOError):
            heard += os.read(out, 8)
        time.sleep(0.02)
    os.close(out)
    assert heard == channel.encode_frame(channel.HELLO, b""), \
        (d / "console.log").read_text() + (d / "stdout").read_text()
    fd = os.open(d / "ctl.in", os.O_WRONLY | os.O_NONBLOCK)
    os.write(fd, frame)
    os.close(fd)


@pytest.mark.parametrize(("frame", "message"), [
    (b"SET1" + (70000).to_bytes(4, "big") + b"x" * 4096,
     "kiln-agent: refused: SET1 frame of 70000 bytes exceeds the limit of 65536 bytes"),
    (b"SETX\0\0\0\x01x", "kiln-agent: refused: unknown frame type 53455458"),
])
def test_bad_frame_ends_the_guest_with_125(world: tuple[Path, str, Path], tmp_path: Path,
                                           frame: bytes, message: str) -> None:
    proc, d = _boot(tmp_path, world[2])
    try:
        _answer_hello(proc, d, frame)
        assert proc.wait(timeout=limit(60)) == 0  # the guest powered off: no hang
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (d / "status").read_text() == "exit 125\n"
    assert (d / "stderr").read_text() == message + "\n"
    assert "kiln-init: no settings from the host" in (d / "console.log").read_text()


def test_settings_on_the_disk_are_read_once_and_removed(world: tuple[Path, str, Path],
                                                        tmp_path: Path) -> None:
    """A cold Firecracker run's transport, booted under QEMU: the same SET1 frame on the
    disk (``/.kiln/settings``, no ``time``) runs the workload as the channel's would, with
    its hostname, machine id, user and workdir; the file is gone before the workload
    starts (the seed in it is not the workload's), and the clock is left as it booted."""
    script = ("echo host=$(hostname) id=$(cat /etc/machine-id) uid=$(id -u) pwd=$(pwd); "
              "ls /.kiln; date +%s")
    w = guest_init.workload({}, command=["sh", "-c", script], hostname="from-disk",
                            user="65534", workdir="/srv/x")
    s = channel.Settings(w, "0123456789abcdef0123456789abcdef")
    frame = channel.encode_settings(s, time_ns=None, seed=os.urandom(channel.SEED_BYTES))
    assert b"time=" not in frame
    proc, d = _boot(tmp_path, world[2], settings=frame)
    try:
        assert proc.wait(timeout=limit(120)) == 0, (d / "console.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (d / "status").read_text() == "exit 0\n", (d / "console.log").read_text()
    lines = (d / "stdout").read_text().splitlines()
    assert lines[0] == "host=from-disk id=0123456789abcdef0123456789abcdef uid=65534 pwd=/srv/x"
    assert lines[1:-1] == ["agent", "busybox", "init"]  # settings: read, then removed
    assert abs(int(lines[-1]) - time.time()) < limit(120)  # the boot's own clock (its RTC)


def test_an_images_own_settings_file_is_not_taken_over_the_channel(
        world: tuple[Path, str, Path], tmp_path: Path) -> None:
    """An image that ships /.kiln/settings (a frame running its own command as root) does
    not replace the caller's run: without ``kiln.ctl=file:`` on the kernel command line
    (only a cold Firecracker run has it, and there kiln writes the file over the image's)
    the init takes the control channel, greets the host and leaves the file alone."""
    evil = guest_init.workload({}, command=["sh", "-c", "echo hijacked"], hostname="evil")
    frame = channel.encode_settings(channel.Settings(evil, "e" * 32), time_ns=None,
                                    seed=bytes(channel.SEED_BYTES))
    proc, d = _boot(tmp_path, world[2], settings=frame, on_cmdline=False)
    try:
        _answer_hello(proc, d, channel.encode_settings(channel.Settings(guest_init.workload(
            {}, command=["sh", "-c", "echo mine; ls /.kiln"], hostname="mine"), "f" * 32),
            time_ns=time.time_ns(), seed=os.urandom(channel.SEED_BYTES)))
        assert proc.wait(timeout=limit(60)) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (d / "stdout").read_text().splitlines() == ["mine", "agent", "busybox", "init",
                                                       "settings"]


def test_settings_over_the_limit_are_refused_before_the_boot(
        world: tuple[Path, str, Path]) -> None:
    root, vol, _ = world
    res = kiln(root, "run", "--rm", vol, "--", "echo", "x" * (64 << 10))
    assert res.returncode == 125
    assert "the run's settings cannot be sent to the guest: SET1 frame of 65" in res.stderr
    assert "bytes exceeds the limit of 65536 bytes" in res.stderr
