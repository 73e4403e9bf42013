"""`kiln run --warm` with the run options of issue #14, each held against a cold run of the
same command (real QEMU TCG boots, as root): `--timeout`, `--name`, `--detach` (with `kiln
logs`/`stop`, and a failed restore that falls back to a cold boot), `-p` on `--net user`,
`--kernel`/`--initrd`/`--disk-size` selecting their own warm image (the same value the same
image), and `--net tap`: two clones at once, each with its own MAC, address, hostname,
machine id and forward, the configured name servers in resolv.conf — as a cold VM on the
same network — and `-i` with it, output and exit code as cold. (The rest — output, `-i`,
`--net user`, `--rm`, clones' disks and random state, a failed foreground restore — is
tests/e2e/test_run_warm.py.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from builder import warm
from builder.localregistry import free_port
from builder.root import Root
from helper.net import core as nc
from tests.support.cli import KILN, kiln, wait_for
from tests.support.netrun import GATEWAY, SUBNET, Net, fetch, netns_env, world
from tests.support.run import forwarded_reply
from tests.support.timing import limit

pytestmark = [pytest.mark.slow, pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="kiln's full hardening is root's")]
__all__ = ["netns_env", "world"]  # the fixtures, from tests.support.netrun

COLD: tuple[str, ...] = ()
WARM = ("--warm",)


@pytest.fixture(scope="module")
def warmed(world: tuple[Path, str]) -> tuple[Path, str]:
    """``world`` with the warm image of the default settings made."""
    root, vol = world
    kiln(root, "warm", "create", vol)
    return root, vol


def run(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return kiln(root, "run", *args, check=False)


def images(root: Path) -> set[str]:
    return {i.id for i in warm.list_images(Root(root))}


def records(root: Path) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in json.loads(kiln(root, "ps", "--all", "--json").stdout)}


def stdout_of(root: Path, vm: str) -> str:
    return (root / "vms" / vm / "stdout").read_text(errors="replace")


def test_timeout_exits_124_with_the_output_so_far(warmed: tuple[Path, str]) -> None:
    """As a cold run (tests/e2e/test_run_boot.py: 124, the VM gone): here the restored guest
    prints first, and that output comes back."""
    root, vol = warmed
    after = str(limit(1.5))  # the restore must reach the echo first, on a busy machine too
    hot = run(root, *WARM, "--rm", "--timeout", after, vol, "--", "sh", "-c",
              "echo started; exec sleep 1000")
    assert (hot.returncode, hot.stdout, hot.stderr) == (124, "started\n", ""), hot.stderr


def test_name_is_the_hostname_and_taken_names_are_refused_alike(
        warmed: tuple[Path, str]) -> None:
    root, vol = warmed
    for mode in (COLD, WARM):
        res = run(root, *mode, "--rm", "--name", "Web_1", vol, "--", "hostname")
        assert (res.returncode, res.stdout, res.stderr) == (0, "web-1\n", ""), mode
    held = run(root, "--warm", "--name", "taken", vol, "--", "true")
    assert held.returncode == 0, held.stderr
    cold, hot = (run(root, *mode, "--name", "taken", vol, "--", "true") for mode in (COLD, WARM))
    assert cold.returncode == hot.returncode == 125
    assert hot.stderr == cold.stderr
    assert "a VM named 'taken' already exists" in cold.stderr
    kiln(root, "rm", "taken")


def _detached(root: Path, mode: tuple[str, ...], name: str, vol: str) -> str:
    res = run(root, *mode, "--detach", "--name", name, vol, "--", "sh", "-c",
              f"echo started-{name}; exec sleep 1000")
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    vm = res.stdout.strip()
    assert res.stdout == vm + "\n"
    return vm


def test_detach_logs_stop_exit_code(warmed: tuple[Path, str]) -> None:
    root, vol = warmed
    ends = []
    for mode, name in ((COLD, "dcold"), (WARM, "dwarm")):
        vm = _detached(root, mode, name, vol)
        said = f"started-{name}\n"
        wait_for(f"{name}'s output", lambda: said in kiln(root, "logs", vm).stdout)  # noqa: B023
        assert records(root)[vm]["state"] == "running"
        stop = kiln(root, "stop", name)
        assert stop.stdout == vm + "\n"
        rec = records(root)[vm]
        ends.append((rec["state"], rec["exit_code"]))
        kiln(root, "rm", vm)
    assert ends == [("exited", 143), ("exited", 143)]  # SIGTERM to the workload


def test_a_failed_restore_with_detach_boots_cold(warmed: tuple[Path, str]) -> None:
    """The warning reaches `kiln run -d`'s own stderr, the id its stdout, and the failed
    restore's VM is gone."""
    root, vol = warmed
    made = json.loads(kiln(root, "warm", "create", "--cpus", "2", vol, "--json").stdout)
    with open(warm.image_dir(Root(root), made["id"]) / warm.STATE, "r+b") as f:
        f.truncate(4096)  # a torn state: QEMU refuses it
    before = set(records(root))
    res = run(root, "--warm", "--cpus", "2", "--detach", "--name", "fallback", vol, "--",
              "sh", "-c", "echo cold-detached; exec sleep 1000")
    assert res.returncode == 0, res.stderr
    vm = res.stdout.strip()
    assert res.stdout == vm + "\n"
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("kiln: warning: the warm restore failed (")
    assert lines[0].endswith("); booting cold")
    wait_for("the cold VM's output", lambda: stdout_of(root, vm) == "cold-detached\n")
    assert set(records(root)) - before == {vm}  # the failed restore left no record
    assert records(root)[vm]["state"] == "running"
    kiln(root, "stop", "--timeout", "1", vm)
    kiln(root, "rm", vm)
    kiln(root, "warm", "rm", made["id"])


@pytest.mark.parametrize("mode", [COLD, WARM], ids=["cold", "warm"])
def test_publish_on_net_user(warmed: tuple[Path, str], mode: tuple[str, ...]) -> None:
    root, vol = warmed
    port = free_port()
    p = subprocess.Popen([*KILN, "--root", str(root), "run", *mode, "--rm", "--net", "user",
                          "-p", f"{port}:8080", "--timeout", str(int(limit(60))), vol, "--",
                          "sh", "-c", "echo hello-net | nc -l -p 8080; echo served"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         stdin=subprocess.DEVNULL)
    got = forwarded_reply(port, p, b"hello-net")
    out, err = p.communicate(timeout=limit(60))
    assert got == b"hello-net\n"
    assert (p.returncode, out, err) == (0, "served\n", "")


def _made(res: subprocess.CompletedProcess[str]) -> bool:
    assert res.returncode == 0, res.stderr
    return "no warm image" in res.stderr


def test_kernel_initrd_and_disk_size_select_their_own_image(
        warmed: tuple[Path, str], tmp_path: Path) -> None:
    """Another value makes (then reuses) another image; the same value — given explicitly
    or as the default — the same one. The key holds the files' contents, not their paths."""
    from runner import kernel

    root, vol = warmed
    files = kernel.boot_files(root / "kernels")
    first = images(root)
    echo = (vol, "--", "echo", "hi")
    assert not _made(run(root, "--warm", "--rm", "--kernel", str(files.kernel),
                         "--initrd", str(files.initrd), *echo))  # the defaults, named
    moved = tmp_path / "same-kernel"
    shutil.copyfile(files.kernel, moved)
    assert not _made(run(root, "--warm", "--rm", "--kernel", str(moved), *echo))
    assert images(root) == first
    padded = tmp_path / "padded.cpio"  # zeros after a cpio's trailer: the kernel skips them
    padded.write_bytes(files.initrd.read_bytes() + bytes(512))
    other_kernel = tmp_path / "other-kernel"  # the same kernel, other bytes after its image
    other_kernel.write_bytes(files.kernel.read_bytes() + bytes(4096))
    for extra in (("--initrd", str(padded)), ("--kernel", str(other_kernel))):
        res = run(root, "--warm", "--rm", *extra, *echo)
        assert _made(res), extra
        assert res.stdout == "hi\n"
        again = run(root, "--warm", "--rm", *extra, *echo)
        assert (_made(again), again.stdout, again.stderr) == (False, "hi\n", ""), extra
    assert len(images(root)) == len(first) + 2
    # `kiln warm create --disk-size` makes the image such a run restores (none of its own)
    size = (vol, "--", "cat", "/sys/block/vda/size")
    default = run(root, "--rm", *size).stdout
    before_create = images(root)
    made = json.loads(kiln(root, "warm", "create", "--disk-size", "2G", "--initrd",
                           str(padded), vol, "--json").stdout)
    assert images(root) - before_create == {made["id"]}
    cold = run(root, "--rm", "--disk-size", "2G", "--initrd", str(padded), *size)
    hot = run(root, "--warm", "--rm", "--disk-size", "2G", "--initrd", str(padded), *size)
    assert (cold.returncode, hot.returncode, _made(hot)) == (0, 0, False), hot.stderr
    assert cold.stdout == hot.stdout == f"{(2 << 30) // 512}\n" != default
    assert images(root) - before_create == {made["id"]}
    assert not _made(run(root, "--warm", "--rm", *echo))  # the default size: the first image


# -- --net tap: clones at once, each its own on the kiln network ----------------------------

REPORT = """mkdir -p /www
{ hostname; cat /etc/machine-id; cat /sys/class/net/eth0/address
   set -- $(ip -4 -o addr show dev eth0); echo "$4"
   ip route | grep default; grep nameserver /etc/resolv.conf; } >/www/index.html
cat /www/index.html
exec busybox httpd -f -p 80 -h /www"""


def _report(text: str) -> list[str]:
    return text.strip().split("\n")


def test_net_tap_clones_at_once_each_their_own(warmed: tuple[Path, str],
                                               netns_env: Net) -> None:
    root, vol = warmed
    ns = netns_env.ns
    netns_env.configure(dns=["10.231.8.53", "10.231.8.54"])
    before = netns_env.snapshot()
    made = images(root)
    vms = {}
    for i, mode in enumerate((WARM, WARM, COLD)):
        name = f"tap{i}"
        res = run(root, *mode, "--detach", "--net", "tap", "--name", name,
                  "-p", f"{8090 + i}:80", vol, "--", "sh", "-c", REPORT)
        assert res.returncode == 0, res.stderr
        vms[name] = res.stdout.strip()
    assert images(root) == made  # both clones from the one image of these settings
    rows = records(root)
    seen = {}
    for i, (name, vm) in enumerate(vms.items()):
        page = fetch(ns, GATEWAY, 8090 + i, wait=limit(30))  # through its own forward
        ip = rows[vm]["ip"]
        assert _report(page) == [name, *_report(page)[1:2], nc.mac_for(vm), f"{ip}/24",
                                 f"default via {GATEWAY} dev eth0 ",
                                 "nameserver 10.231.8.53", "nameserver 10.231.8.54"], name
        assert fetch(ns, ip, 80, wait=limit(10)) == page  # and at its address
        assert stdout_of(root, vm) == page + "\n"
        seen[name] = _report(page)
    for field in range(4):  # hostname, machine id, MAC, address: no two alike
        assert len({r[field] for r in seen.values()}) == 3, field
    assert all(ip.startswith(SUBNET[:-4]) for ip in (rows[v]["ip"] for v in vms.values()))
    res = kiln(root, "stop", "--timeout", "1", *vms.values())
    assert res.stdout.split() == list(vms.values())
    assert {records(root)[v]["exit_code"] for v in vms.values()} == {143}
    kiln(root, "rm", *vms.values())
    netns_env.drop_bridge(root)
    assert netns_env.snapshot() == before


def test_net_tap_with_stdin_exit_code_and_output_as_cold(warmed: tuple[Path, str],
                                                         netns_env: Net) -> None:
    """``-i`` with ``--net tap``, cold and warm: the stdin port beside the NIC (a warm
    image's device set has both), the workload's output and exit code alike."""
    root, vol = warmed
    netns_env.configure()
    before = netns_env.snapshot()
    cold, hot = (kiln(root, "run", *mode, "-i", "--rm", "--net", "tap", vol, "--", "sh", "-c",
                      "cat; ip -4 -o addr show dev eth0 | grep -c inet; exit 3",
                      check=False, input="piped in\n")
                 for mode in (COLD, WARM))
    assert (cold.returncode, cold.stdout) == (3, "piped in\n1\n"), cold.stderr
    assert (hot.returncode, hot.stdout, hot.stderr) == (3, "piped in\n1\n", cold.stderr)
    netns_env.drop_bridge(root)
    assert netns_env.snapshot() == before
