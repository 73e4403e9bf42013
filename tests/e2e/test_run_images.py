"""`kiln run` of images other than the busybox one (real QEMU microvm boots, TCG here):
the Debian minbase image pulled from a registry by reference, and `--init image` booting
an image's own /sbin/init. Checked from the outside, through the real command: stdout,
exit codes, `kiln logs`, `kiln ps`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from builder.localregistry import LocalRegistry
from builder.root import Root
from builder.source import RegistryOptions
from tests.support.oci import make_layout, mkdir, reg, symlink

KILN = [sys.executable, "-c",
        "from runner.cli import cli; cli(prog_name='kiln')"]
MARKER = "image-init-marker-5f2c"
# The image's own PID 1: says hello on the console (its stdout is the console the kernel
# gave it), then powers the VM off the way an init does once its work is done.
IMAGE_INIT = f"""#!/bin/sh
/bin/busybox mount -t proc proc /proc
echo "{MARKER}: pid $$"
/bin/busybox sync
echo o >/proc/sysrq-trigger
/bin/busybox sleep 10
""".encode()


def kiln(root: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KILN, "--root", str(root), *args], capture_output=True,
                          text=True, check=False, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """(a root with a copy pool, the volume id of an image whose /sbin/init is a script
    that powers off, that of one whose /sbin/init exits 3 instead)."""
    from builder.pipeline import build
    from builder.pool import init_pool

    base = tmp_path_factory.mktemp("run-images")
    root = base / "root"
    init_pool(Root(root).ensure().path, backend="copy")
    layout = make_layout(base / "own-init", [[
        mkdir("bin"),
        reg("bin/busybox", Path("/bin/busybox").read_bytes(), mode=0o755),
        symlink("bin/sh", "busybox"),
        mkdir("sbin"),
        reg("sbin/init", IMAGE_INIT, mode=0o755),
        mkdir("proc"),
        mkdir("sys"),
        mkdir("dev"),
    ]], tag="1")
    volume = build(Root(root), f"oci:{layout.path}:1", RegistryOptions()).volume
    exiting = make_layout(base / "exiting-init", [[
        mkdir("bin"),
        reg("bin/busybox", Path("/bin/busybox").read_bytes(), mode=0o755),
        symlink("bin/sh", "busybox"),
        mkdir("sbin"),
        reg("sbin/init", b"#!/bin/sh\necho init-exits-now\nexit 3\n", mode=0o755),
    ]], tag="1")
    bad = build(Root(root), f"oci:{exiting.path}:1", RegistryOptions()).volume
    return root, volume.id[7:19], bad.id[7:19]


@pytest.mark.slow
def test_debian_minbase_runs_cat_os_release(world: tuple[Path, str, str],
                                            registry: LocalRegistry) -> None:
    """By reference from a registry: `kiln run` builds the volume (cache permitting),
    then boots it with kiln's init."""
    from tests.support.images import push_debian

    root, _, _ = world
    ref = push_debian(registry.address)
    res = kiln(root, "run", "--rm", "--no-tls-verify", ref, "--", "cat", "/etc/os-release",
               timeout=900)
    assert res.returncode == 0, res.stderr
    assert "VERSION_CODENAME=bookworm\n" in res.stdout
    assert 'ID=debian\n' in res.stdout
    assert "kiln-init" not in res.stdout  # init messages stay on the console


@pytest.mark.slow
def test_init_image_boots_the_images_own_init(world: tuple[Path, str, str]) -> None:
    """What `--init image` promises (docs/run.md): the image's /sbin/init is PID 1; exit
    code 0 when it powers off cleanly. kiln has no workload there: the init's output is
    console output, so it is in `kiln logs`, and kiln's stdout stays empty."""
    root, volume, _ = world
    res = kiln(root, "run", "--init", "image", "--name", "own-init", "--timeout", "120",
               volume)
    assert (res.returncode, res.stdout) == (0, ""), res.stderr
    rec = next(r for r in json.loads(kiln(root, "ps", "--all", "--json").stdout)
               if r["name"] == "own-init")
    assert (rec["state"], rec["exit_code"], rec["reason"]) == \
        ("exited", 0, "the guest powered off")
    logs = kiln(root, "logs", "own-init").stdout
    assert f"{MARKER}: pid 1" in logs.replace("\r", "").splitlines()  # it ran as PID 1
    assert "kiln-init" not in logs  # and kiln's init did not run at all
    assert kiln(root, "rm", "own-init").returncode == 0


def test_init_image_refuses_a_command(world: tuple[Path, str, str]) -> None:
    root, volume, _ = world
    res = kiln(root, "run", "--rm", "--init", "image", volume, "--", "echo", "hi")
    assert res.returncode == 125
    assert "error: a command cannot be given with --init image" in res.stderr


@pytest.mark.slow
def test_init_image_whose_init_exits_is_a_failure(world: tuple[Path, str, str]) -> None:
    """PID 1 exiting is a kernel panic, not a power-off: kiln must not say exit 0."""
    root, _, bad = world
    res = kiln(root, "run", "--rm", "--init", "image", "--timeout", "120", bad)
    assert res.returncode == 125, res.stderr
