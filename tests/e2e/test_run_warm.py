"""Warm start for real (QEMU microvm, TCG here, as root: ``-runas``, ``-chroot``,
``-sandbox``): `kiln warm create` saves a booted guest, `kiln run --warm` restores clones
of it that get the run's settings over the control channel — output, exit code, the
host's time, fresh random state, their own disks — and a warm image never outlives its
inputs or a killed creation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from builder import warm
from builder.root import Root
from builder.source import RegistryOptions
from tests.support.images import busybox_layout
from tests.support.run import KILN, clock_skew, vmms
from tests.support.timing import limit

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="kiln's full hardening is root's")]


def kiln(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KILN, "--root", str(root), *args], capture_output=True,
                          text=True, check=False, timeout=limit(180),
                          stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(root with a copy pool and a warm image of the busybox volume, volume id)."""
    from builder.pipeline import build
    from builder.pool import init_pool

    root = tmp_path_factory.mktemp("warm") / "root"
    init_pool(Root(root).ensure().path, backend="copy")
    vol = build(Root(root), f"oci:{busybox_layout()}:1", RegistryOptions()).volume
    res = kiln(root, "warm", "create", vol.id[7:19], "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["volume"] == vol.id
    assert doc["memory_mib"] == 512
    assert doc["vmm"] == "qemu"
    return root, vol.id[7:19]


def test_output_exit_code_and_a_restore_not_a_boot(world: tuple[Path, str]) -> None:
    root, vol = world
    res = kiln(root, "run", "--warm", "--name", "w-exit", vol, "--", "sh", "-c",
               "echo out; echo err >&2; exit 7")
    assert (res.returncode, res.stdout) == (7, "out\n"), res.stderr
    assert res.stderr == "err\n"  # no "making one", no fallback warning
    rec = next(r for r in json.loads(kiln(root, "ps", "-a", "--json").stdout)
               if r["name"] == "w-exit")
    assert rec["exit_code"] == 7
    ls = json.loads(kiln(root, "warm", "ls", "--json").stdout)
    assert [i["memory_mib"] for i in ls] == [512]


def test_clock_is_the_hosts(world: tuple[Path, str]) -> None:
    """A restored guest's clock is set from the host's, not the snapshot's age."""
    root, vol = world
    assert clock_skew(root, ["--warm", "--rm", vol]) < 1.0


def test_clones_differ_and_keep_their_writes(world: tuple[Path, str]) -> None:
    root, vol = world
    script = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; ls /{} 2>&1; true"
    one = kiln(root, "run", "--warm", "--rm", vol, "--", "sh", "-c",
               "echo mine >/written-by-one && " + script.format("written-by-one"))
    two = kiln(root, "run", "--warm", "--rm", vol, "--", "sh", "-c",
               script.format("written-by-one"))
    assert one.returncode == two.returncode == 0, (one.stderr, two.stderr)
    r1, ls1, *_ = one.stdout.split("\n")
    r2, ls2, *_ = two.stdout.split("\n")
    assert len(r1) == len(r2) == 64
    assert r1 != r2
    assert ls1 == "/written-by-one"
    assert "No such file" in ls2
    image = warm.list_images(Root(root))[0]
    disk = warm.image_dir(Root(root), image.id) / warm.DISK
    found = subprocess.run(["debugfs", "-R", "stat /written-by-one", str(disk)],
                           capture_output=True, text=True, check=False)
    assert "File not found" in found.stderr


def test_clones_map_the_images_memory_read_only(world: tuple[Path, str]) -> None:
    """A clone's QEMU holds the image's memory file read-only and maps it private: what
    the guest writes (here 16 MiB into its tmpfs) is the clone's own copy, and the file
    — every later clone's memory — stays as it was saved."""
    import hashlib

    root, vol = world
    image = next(i for i in warm.list_images(Root(root)) if i.memory_mib == 512)
    mem = warm.image_dir(Root(root), image.id) / warm.MEM
    assert mem.stat().st_size == 512 << 20
    assert mem.stat().st_blocks * 512 < 160 << 20  # sparse: the zero blocks are holes
    before = hashlib.sha256(mem.read_bytes()).hexdigest()
    res = kiln(root, "run", "--warm", "--detach", "--name", "w-mem", vol, "--", "sh", "-c",
               "head -c 16777216 /dev/urandom >/dev/shm/fill && echo filled && sleep 600")
    assert res.returncode == 0, res.stderr
    try:
        deadline = time.monotonic() + limit(60)
        while "filled" not in kiln(root, "logs", "w-mem").stdout:
            assert time.monotonic() < deadline, kiln(root, "logs", "w-mem").stdout
            time.sleep(0.2)
        [pid] = vmms(root).values()
        maps = [line.split()[1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
                if line.endswith(str(mem))]
        assert maps == ["rw-p"], maps  # private: the guest's writes never reach the file
        modes = [int(Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text().split("flags:")[1]
                     .split()[0], 8) & os.O_ACCMODE
                 for fd in Path(f"/proc/{pid}/fd").iterdir()
                 if os.readlink(fd) == str(mem)]
        assert modes == [os.O_RDONLY], modes
    finally:
        kiln(root, "stop", "w-mem")
        kiln(root, "rm", "w-mem")
    assert hashlib.sha256(mem.read_bytes()).hexdigest() == before
    res = kiln(root, "run", "--warm", "--rm", vol, "--", "sh", "-c", "ls /dev/shm; echo ok")
    assert (res.returncode, res.stdout) == (0, "ok\n"), res.stderr


def test_other_memory_makes_its_own_image(world: tuple[Path, str]) -> None:
    root, vol = world
    res = kiln(root, "run", "--warm", "--rm", "--memory", "256M", vol, "--", "echo", "hi")
    assert (res.returncode, res.stdout) == (0, "hi\n"), res.stderr
    assert "no warm image" in res.stderr
    assert "making one" in res.stderr
    mems = sorted(i["memory_mib"] for i in json.loads(kiln(root, "warm", "ls", "--json").stdout))
    assert mems == [256, 512]
    again = kiln(root, "run", "--warm", "--rm", "--memory", "256M", vol, "--", "echo", "hi")
    assert again.returncode == 0
    assert "making one" not in again.stderr


def test_a_failed_restore_boots_cold(world: tuple[Path, str], tmp_path: Path) -> None:
    root, vol = world
    res = kiln(root, "warm", "create", "--cpus", "2", vol, "--json")
    assert res.returncode == 0, res.stderr
    state = warm.image_dir(Root(root), json.loads(res.stdout)["id"]) / warm.STATE
    with open(state, "r+b") as f:
        f.truncate(4096)  # a torn state: QEMU refuses it
    res = kiln(root, "run", "--warm", "--rm", "--cpus", "2", vol, "--", "echo", "cold")
    assert (res.returncode, res.stdout) == (0, "cold\n"), res.stderr
    assert res.stderr.count("\n") == 1
    assert "booting cold" in res.stderr


def test_sigkill_during_create_leaves_nothing_gc_keeps(tmp_path: Path,
                                                       world: tuple[Path, str]) -> None:
    root, vol = world
    before = {i.id for i in warm.list_images(Root(root))}
    p = subprocess.Popen([*KILN, "--root", str(root), "warm", "create", "--memory", "384M",
                          vol], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + limit(60)
    while not vmms(root) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert vmms(root), "QEMU never started"
    time.sleep(1.0)  # mid-boot
    p.send_signal(signal.SIGKILL)
    p.wait()
    res = kiln(root, "gc")
    assert res.returncode == 0, res.stderr
    assert not vmms(root)  # the reaper killed the orphaned QEMU
    assert os.listdir(Path(root) / "tmp") == []
    assert {i.id for i in warm.list_images(Root(root))} == before
    assert list(Path(root, "warm").glob(".*")) == []
    # the killed creation's VM (a --rm run) and its snapshot are gone; w-exit's stay
    vms = json.loads(kiln(root, "ps", "-a", "--json").stdout)
    assert [r["name"] for r in vms] == ["w-exit"]
    snaps = json.loads(kiln(root, "snapshot", "ls", "--json").stdout)
    assert [s["id"] for s in snaps] == [vms[0]["snapshot"]]


def test_two_creations_of_one_key_make_one_image(world: tuple[Path, str]) -> None:
    root, vol = world
    procs = [subprocess.Popen([*KILN, "--root", str(root), "warm", "create", "--memory",
                               "320M", vol], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=limit(180)) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    ids = sorted(out.split()[0] for out, _ in outs)
    assert ids[0] == ids[1]
    assert sum("already there" in out for out, _ in outs) == 1
    ls = json.loads(kiln(root, "warm", "ls", "--json").stdout)
    assert [i["id"] for i in ls if i["memory_mib"] == 320] == [ids[0]]
    assert kiln(root, "warm", "rm", ids[0][:12]).stdout == ids[0] + "\n"


def test_stdin_and_network_options_work_on_one_device_set(world: tuple[Path, str]) -> None:
    """One warm image serves -i or not and --net none or user: the stdin port and the NIC
    are always there (docs/warm.md, "The device set")."""
    root, vol = world
    run = [*KILN, "--root", str(root), "run", "--warm", "--rm"]
    piped = subprocess.run([*run, "-i", vol, "--", "cat"], input="piped in\n",
                           capture_output=True, text=True, timeout=limit(120), check=False)
    assert (piped.returncode, piped.stdout) == (0, "piped in\n"), piped.stderr
    closed = subprocess.run([*run, vol, "--", "cat"], input="not for the guest\n",
                            capture_output=True, text=True, timeout=limit(120), check=False)
    assert (closed.returncode, closed.stdout) == (0, ""), closed.stderr  # /dev/null
    net = kiln(root, "run", "--warm", "--rm", "--net", "user", vol, "--", "sh", "-c",
               "ip addr show eth0 | grep -o 'inet [0-9./]*'; ip route | grep default")
    assert net.returncode == 0, net.stderr
    assert net.stdout.split("\n")[:2] == ["inet 10.0.2.15/24",
                                          "default via 10.0.2.2 dev eth0 "]
    assert "making one" not in piped.stderr + closed.stderr + net.stderr


def test_refusals_are_said_plainly(world: tuple[Path, str]) -> None:
    root, vol = world
    # (Firecracker takes --warm now; in a root without its [tools] it is refused as for a
    # cold run, before anything is booted or saved.)
    for extra, said in ((["--init", "image"], "--warm needs kiln's init"),
                        (["--vmm", "firecracker"], "firecracker is not configured")):
        res = kiln(root, "run", "--warm", *extra, vol)
        assert res.returncode == 125
        assert said in res.stderr
    assert kiln(root, "run", "--vmm", "firecracker", vol).stderr == res.stderr  # as cold


def test_the_cap_prunes_the_oldest_image(tmp_path: Path) -> None:
    """Three images under a KILN_WARM_MAX that holds two: the third's creation removes the
    first (the oldest) and says so; `kiln warm ls` shows the two newest."""
    from builder.pipeline import build
    from builder.pool import init_pool

    root = tmp_path / "root"
    init_pool(Root(root).ensure().path, backend="copy")
    vol = build(Root(root), f"oci:{busybox_layout()}:1", RegistryOptions()).volume.id[7:19]
    made: list[dict[str, int | str]] = []
    cap = 4 << 30
    for cpus in (1, 2, 3):
        res = subprocess.run([*KILN, "--root", str(root), "warm", "create", "--memory", "256M",
                              "--cpus", str(cpus), vol, "--json"], capture_output=True,
                             text=True, check=False, timeout=limit(180),
                             env={**os.environ, "KILN_WARM_MAX": str(cap)})
        assert res.returncode == 0, res.stderr
        made.append(json.loads(res.stdout))
        if cpus < 3:
            assert "removed" not in res.stderr
        if cpus == 2:  # room for two of these, not three
            sizes = [int(m["bytes"]) for m in made]
            cap = sum(sizes) + max(sizes) // 2
    first, second, third = (str(m["id"]) for m in made)
    assert f"kiln: removed warm image {first[:12]}" in res.stderr
    assert int(made[1]["bytes"]) + int(made[2]["bytes"]) <= cap
    ls = kiln(root, "warm", "ls")
    assert ls.returncode == 0, ls.stderr
    assert second[:12] in ls.stdout
    assert third[:12] in ls.stdout
    assert first[:12] not in ls.stdout
    listed = json.loads(kiln(root, "warm", "ls", "--json").stdout)
    assert sorted(i["id"] for i in listed) == sorted([second, third])
    assert not warm.image_dir(Root(root), first).exists()


def test_volume_rm_takes_its_warm_images(world: tuple[Path, str]) -> None:
    """Last: removes the module's volume."""
    root, vol = world
    assert warm.list_images(Root(root))
    res = kiln(root, "volume", "rm", vol)
    assert res.returncode == 0, res.stderr
    assert warm.list_images(Root(root)) == []
