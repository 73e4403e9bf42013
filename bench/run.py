"""`kiln run` against the bare QEMU command, in one run (medians).

Measured, each ``--repeat`` times, on the busybox demo image in a copy pool under a
temporary root:

* ``kiln``: the whole ``kiln run --rm VOLUME -- echo KILN-MARKER`` process, from its start
  to the marker on its stdout;
* ``bare``: ``qemu-system-x86_64 -M microvm`` by hand (../shared/qemu.md's command line,
  with qboot as the firmware, as QEMU 7.2 had it and kiln gives it)
  with the same kernel, the same (minimal) initrd and a copy of a kiln snapshot (kiln's
  init and agent in it, the workload's settings on it as a cold Firecracker run has them,
  so the same workload prints the same marker on its stdout port);
* ``bare-tuned``: the same bare command with kiln's kernel command line
  (``runner.vmm.qemuargv.kernel_cmdline``: ``pci=off``, ``random.trust_cpu=on`` and, under TCG,
  ``cryptomgr.notests``): kiln/bare-tuned is what kiln's own work costs, apart from the
  boot it chose;
* ``to-exec``: kiln's own time from process start to the VMM's fork+exec (from the two
  processes' start times in /proc: 10 ms resolution) — target < 500 ms;
* ``in-process``: from the CLI entry (``cli.main``, modules already imported) to the VMM
  spawn, in this process — target < 100 ms;
* ``warm create``: the whole ``kiln warm create VOLUME`` process (the volume booted to its
  init's ready point and saved: docs/warm.md), its image removed before each — target ≤
  cold ``kiln`` + 1 s;
* ``kiln --warm``: the whole ``kiln run --warm --rm VOLUME -- echo KILN-MARKER`` process
  to the marker, restored from that image — targets ≤ 0.5 s and kiln/kiln --warm ≥ 5;
  the image's allocated size (``kiln warm ls --json``) — target ≤ 100 MB for 512M;
* ``in-process restore``: from the CLI entry (modules imported) to the restored guest
  running (QEMU's ``cont`` answered), in this process;
* ``sudo kiln`` / ``sudo kiln --warm`` (``bench/sudorun.py``; root only, skipped with
  ``--no-sudo``): the same two whole processes as an ordinary user through ``sudo
  kiln-helper`` (its own root, a reflink pool, QEMU as the user).

Target for the ratio kiln/bare: ≤ 1.10 (kiln/bare-tuned is printed beside it, no
target). Usage::

    .venv/bin/python bench/run.py [--repeat 5] [--no-sudo] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import contextlib

from bench.common import Suite, Target, loadavg, machine, ratio, table

MARKER = "KILN-MARKER"
# What the `kiln` console script runs (every command module imported, as for users).
KILN = [sys.executable, "-c", "from runner.cli import main; main()"]
TICK = os.sysconf("SC_CLK_TCK")


def until_marker(argv: list[str], marker: str, timeout: float = 120) -> tuple[float, int]:
    """(seconds from spawn to ``marker`` on stdout, pid); the process is then waited for."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         stdin=subprocess.DEVNULL)
    assert p.stdout is not None
    buf = b""
    seen: float | None = None
    fd = p.stdout.fileno()
    while seen is None and time.perf_counter() - t0 < timeout:
        if select.select([fd], [], [], 1.0)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
            if marker.encode() in buf:
                seen = time.perf_counter() - t0
    try:
        p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:  # never leave a VMM behind
            p.kill()
            p.wait()
    if seen is None:
        raise RuntimeError(f"no {marker} from {argv[:3]}…: {buf[-500:]!r}")
    return seen, p.pid


def start_ticks(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[19])


def kiln_to_exec(root: Path, volume: str) -> float:
    """Seconds from the kiln process's start to its VMM's start (both from /proc)."""
    from runner.vm.reaper import scan_vmms

    p = subprocess.Popen([*KILN, "--root", str(root), "run", "--rm", volume, "--", "true"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         stdin=subprocess.DEVNULL)
    kiln_start = start_ticks(p.pid)
    vmm_start = None
    while vmm_start is None and p.poll() is None:
        for pid in scan_vmms().values():
            try:
                if int(Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1]
                       .split()[1]) == p.pid:
                    vmm_start = start_ticks(pid)
            except (OSError, ValueError):
                continue
        time.sleep(0.005)
    p.wait()
    if vmm_start is None:
        raise RuntimeError("did not see kiln's VMM")
    return (vmm_start - kiln_start) / TICK


def _in_process(root: Path, run_args: list[str], module: Any, name: str, *,
                after: bool) -> float:
    """Seconds from ``cli.main``'s entry (modules already imported) to a call of
    ``module.name`` — as it starts, or with ``after`` once it returned — in this process."""
    from runner.cli import cli

    marks: list[float] = []
    real = getattr(module, name)

    def timed(*a: object, **kw: object) -> object:
        if not after:
            marks.append(time.perf_counter())
        result = real(*a, **kw)
        if after:
            marks.append(time.perf_counter())
        return result

    setattr(module, name, timed)
    try:
        t0 = time.perf_counter()
        with contextlib.suppress(SystemExit):
            cli.main(["--root", str(root), "run", *run_args],
                     prog_name="kiln", standalone_mode=False)
    finally:
        setattr(module, name, real)
    return marks[0] - t0


def in_process(root: Path, volume: str) -> float:
    """Seconds from ``cli.main``'s entry to ``supervise.spawn``, in this process."""
    from runner.vmm import process as supervise

    return _in_process(root, ["--rm", volume, "--", "true"], supervise, "spawn", after=False)


def in_process_restore(root: Path, volume: str) -> float:
    """Seconds from ``cli.main``'s entry to the restored guest running, in this process."""
    from runner.vmm import qemuwarm

    return _in_process(root, ["--warm", "--rm", volume, "--", "true"], qemuwarm, "restore",
                       after=True)


def warm_create(root: Path, volume: str) -> tuple[float, float]:
    """(seconds of a whole ``kiln warm create``, the image's allocated MB), after removing
    the volume's image so that each create makes one."""
    base = [*KILN, "--root", str(root), "warm"]
    have = json.loads(subprocess.run([*base, "ls", "--json"], capture_output=True, text=True,
                                     check=True).stdout)
    if have:
        subprocess.run([*base, "rm", *(w["id"] for w in have)], check=True,
                       capture_output=True)
    t0 = time.perf_counter()
    out = subprocess.run([*base, "create", "--json", volume], capture_output=True, text=True,
                         check=True).stdout
    took = time.perf_counter() - t0
    return took, json.loads(out)["bytes"] / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--no-sudo", action="store_true", help="skip the sudo-caller rows")
    args = ap.parse_args()

    from builder.demoimage import make_busybox_image
    from builder.pipeline import build
    from builder.pool import init_pool
    from builder.root import Root
    from builder.source import RegistryOptions
    from runner import guest_init, kernel
    from runner.guest_init import agentbin, channel
    from runner.vmm import qemuargv

    # kiln's bytecode, as an installed kiln has it (pip compiles at install; an editable
    # install writes it on first import, unless PYTHONDONTWRITEBYTECODE is set, when every
    # run would recompile the modules changed since: ~130 ms that no user pays).
    repo = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "compileall", "-q",
                    *(str(repo / d) for d in ("builder", "runner", "helper"))], check=True,
                   env={k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"})
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-run-"))
    sudo = contextlib.ExitStack()
    try:
        root = work / "root"
        make_busybox_image(work / "layout", "1")
        init_pool(Root(root).ensure().path, backend="copy")
        vol = build(Root(root), f"oci:{work / 'layout'}:1", RegistryOptions()).volume
        volume = vol.id[7:19]
        boot = kernel.boot_files(root / "kernels")
        # The bare run's disk: a copy of the volume with kiln's init, its agent and the same
        # workload's settings on the disk (a cold Firecracker run's transport: no channel
        # here). The agent removes them as it reads them: each bare boot gets a fresh copy
        # (made before its clock starts).
        pristine, disk = work / "bare.pristine.ext4", work / "bare.ext4"
        shutil.copyfile(vol.path, pristine)
        pristine.chmod(0o644)
        w = guest_init.workload(vol.meta["config"], command=["echo", MARKER], hostname="bare")
        frame = channel.encode_settings(channel.Settings(w, os.urandom(16).hex()),
                                        time_ns=None, seed=os.urandom(channel.SEED_BYTES))
        guest_init.inject(pristine, w, agent=agentbin.ensure_agent(root / "kernels",
                                                                  scratch=work),
                          settings=frame, scratch=work)

        def fresh(argv: list[str]) -> list[str]:
            shutil.copyfile(pristine, disk)
            return argv

        tsc = qemuargv.host_tsc_khz()
        # The same guest channels as kiln's: the workload's stdout on a virtio-serial
        # port (here: QEMU's stdout), its status on another; the console to a file.
        # qboot: microvm's firmware up to QEMU 7.2 and kiln's (10.0 defaults to SeaBIOS)
        bare = ["qemu-system-x86_64", "-M", "microvm", "-bios", "qboot.rom", "-accel", "tcg",
                "-m", "512",
                "-smp", "1", "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
                "-kernel", str(boot.kernel), "-initrd", str(boot.initrd),
                "-chardev", f"file,id=con,path={work / 'console.log'}",
                "-serial", "chardev:con",
                "-drive", f"id=r,file={disk},format=raw,if=none",
                "-device", "virtio-blk-device,drive=r",
                "-device", "virtio-serial-device",
                "-chardev", "file,id=out,path=/dev/stdout",
                "-device", "virtserialport,chardev=out,name=kiln.stdout",
                "-chardev", f"file,id=st,path={work / 'status'}",
                "-device", "virtserialport,chardev=st,name=kiln.status",
                "-append", "console=ttyS0 root=/dev/vda rw panic=-1 quiet "
                f"init=/.kiln/init tsc_early_khz={tsc} {guest_init.SETTINGS_ARG}"]
        # kiln's command line for this guest (TCG, the same init), on the bare command
        tuned = [*bare]
        tuned[tuned.index("-append") + 1] = qemuargv.kernel_cmdline(qemuargv.QemuSpec(
            name="bare", kernel=boot.kernel, initrd=boot.initrd, disk=disk, cpus=1,
            memory_mib=512, accel="tcg", tsc_khz=tsc, console_log=work / "console.log",
            stdout=work / "stdout", stderr=work / "stderr", status=work / "status",
            control=work / "ctl", init="/.kiln/init", extra_append=(guest_init.SETTINGS_ARG,),
            version=(0, 0)))  # only its kernel command line is used
        kiln = [*KILN, "--root", str(root), "run", "--rm", volume, "--", "echo", MARKER]
        warm = [*KILN, "--root", str(root), "run", "--warm", "--rm", volume, "--", "echo",
                MARKER]
        suite = Suite()
        until_marker(kiln, MARKER)  # warm: initrd built, accelerator verdict cached
        as_user = None
        if not args.no_sudo and os.geteuid() == 0:
            from bench.sudorun import sudo_caller

            as_user = sudo.enter_context(sudo_caller())
        image_mb = 0.0
        for _ in range(args.repeat):
            # the image made first: its 70 MB are written back while the cold rows run,
            # as for a user who restores an image made earlier, not the moment before
            took, image_mb = warm_create(root, volume)
            suite["warm create"].add(took)
            suite["bare"].add(until_marker(fresh(bare), MARKER)[0])
            suite["bare-tuned"].add(until_marker(fresh(tuned), MARKER)[0])
            suite["kiln"].add(until_marker(kiln, MARKER)[0])
            suite["to-exec"].add(kiln_to_exec(root, volume))
            suite["in-process"].add(in_process(root, volume))
            suite["kiln --warm"].add(until_marker(warm, MARKER)[0])
            suite["in-process restore"].add(in_process_restore(root, volume))
        # The sudo caller's rounds after root's: the end of a sudo caller's VM (its cgroups,
        # with the memory controller, going away) slows the next boots on this 2-core
        # machine by ~0.3-0.5 s for a while; interleaved, they moved root's figures.
        for _ in range(args.repeat if as_user is not None else 0):
            assert as_user is not None
            suite["sudo kiln"].add(until_marker(as_user(False, MARKER), MARKER)[0])
            suite["sudo kiln --warm"].add(until_marker(as_user(True, MARKER), MARKER)[0])
        sudo.close()  # the user, its sudoers rule, the helper's test pool directory
        med = suite.medians()
        targets = [
            Target("kiln/bare", ratio(med["kiln"], med["bare"]), 1.10, "x"),
            Target("to-exec", med["to-exec"] * 1e3, 500, "ms", strict=True),
            Target("in-process", med["in-process"] * 1e3, 100, "ms", strict=True),
            Target("kiln --warm", med["kiln --warm"], 0.5, "s"),
            Target("warm create - kiln", med["warm create"] - med["kiln"], 1.0, "s"),
            Target("warm image (512M)", image_mb, 100, "MB"),
        ]
        rows = [(n, f"{s.median:.3f}", f"{s.spread[0]:.3f}", f"{s.spread[1]:.3f}")
                for n in suite.names() for s in [suite[n]]]
        print(table(["series (s)", "median", "min", "max"], rows))
        print()
        print(table(["target", "value", "limit", "met"],
                    [(t.name, f"{t.value:.2f} {t.unit}", f"{t.limit:g} {t.unit}",
                      "yes" if t.met else "NO") for t in targets]
                    + [("kiln/bare-tuned", f"{ratio(med['kiln'], med['bare-tuned']):.2f} x",
                        "-", "-"),
                       ("kiln / kiln --warm", f"{ratio(med['kiln'], med['kiln --warm']):.2f} x",
                        ">= 5 x", "yes" if med["kiln"] >= 5 * med["kiln --warm"] else "NO")]
                    + ([("sudo kiln / sudo kiln --warm",
                         f"{ratio(med['sudo kiln'], med['sudo kiln --warm']):.2f} x", "-", "-")]
                       if as_user is not None else [])))
        print(f"\nload average {loadavg()}; accel tcg; kernel {boot.kernel.name}")
        if args.json:
            args.json.write_text(json.dumps({
                "machine": machine(), "series": suite.as_json(),
                "targets": {t.name: {"value": t.value, "limit": t.limit, "met": t.met}
                            for t in targets}}, indent=2))
    finally:
        sudo.close()
        from builder.pool import destroy_pool

        destroy_pool(work / "root", force=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
