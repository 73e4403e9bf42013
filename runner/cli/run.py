"""``kiln run``, ``ps``, ``stop``, ``rm``, ``logs`` (registered on ``runner.cli.cli``).

Parse → call one function of ``runner.vm.lifecycle`` → print. ``run`` exits with the workload's
code, 124 on ``--timeout``, 125 when kiln or the VMM failed (any KilnError here).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import click

from builder.units import parse_size
from helper.base.errors import KilnError
from runner.cli.common import (
    Ctx,
    fail,
    machine_options,
    pass_ctx,
    print_json,
    print_table,
    registry_options,
)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source")
@click.argument("command", nargs=-1, metavar="[-- CMD ARG…]")
@click.option("--vmm", type=click.Choice(["auto", "qemu", "firecracker"]), default="auto",
              show_default=True, help="auto: Firecracker when configured and KVM works")
@machine_options
@click.option("--name", default=None, help="a name for the VM (ps, stop, rm, logs)")
@click.option("-e", "--env", "env", multiple=True, metavar="K=V",
              help="set an environment variable (repeatable)")
@click.option("--entrypoint", default=None, metavar="CMD",
              help="replace the image's entrypoint (and its default command: docker's "
              "rule); --entrypoint '' clears it")
@click.option("--workdir", "-w", default=None, help="working directory of the command")
@click.option("--user", "-u", default=None, help="NAME|UID[:GROUP|GID] to run as")
@click.option("--init", "init", type=click.Choice(["kiln", "image"]), default="kiln",
              show_default=True, help="image: boot the image's own /sbin/init")
@click.option("--net", type=click.Choice(["none", "user", "tap"]), default="none",
              show_default=True,
              help="user: QEMU's private NAT (slirp); tap: the kiln network of the trusted "
              "config's [net] (an address per VM, shown by `kiln ps`)")
@click.option("-p", "--publish", multiple=True, metavar="HOST:GUEST",
              help="forward TCP port HOST to the guest's GUEST port (repeatable): --net "
              "user listens on 127.0.0.1:HOST; --net tap forwards the kiln network's "
              "gateway address:HOST (reachable from that network's namespace and guests)")
@click.option("--rm", is_flag=True, help="remove the VM and its snapshot when it exits")
@click.option("-i", "--interactive", is_flag=True, help="connect stdin to the workload")
@click.option("-d", "--detach", is_flag=True, help="run in the background; print the VM id")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="S", help="stop the VM after S seconds (exit 124)")
@click.option("--warm", is_flag=True, help="start from a warm image (QEMU; made first when "
              "none matches): a restore instead of a boot (docs/warm.md)")
@registry_options
@pass_ctx
def run(ctx: Ctx, source: str, command: tuple[str, ...], vmm: str, cpus: int, memory: str,
        disk_size: str | None, kernel: Path | None, initrd: Path | None, name: str | None,
        env: tuple[str, ...], entrypoint: str | None, workdir: str | None, user: str | None,
        init: str, net: str,
        publish: tuple[str, ...], rm: bool, interactive: bool, detach: bool,
        timeout: float | None, warm: bool, tls_verify: bool, no_tls_verify: bool,
        authfile: Path | None) -> None:
    """Boot SOURCE (a volume id, a recipe or an image reference) as a microVM and run its
    workload (or CMD): like `docker run`, exit code included."""
    from builder.source import RegistryOptions
    from runner.vm import lifecycle as vm
    from runner.vm import spec as vmspec

    try:
        if detach and rm:
            raise KilnError("--detach and --rm cannot be combined yet",
                            "remove the VM later with `kiln rm ID`")
        opts = vm.RunOptions(
            vmm=vmm, cpus=cpus, memory=parse_size(memory, "--memory"),
            disk_size=parse_size(disk_size, "--disk-size") if disk_size else None,
            kernel=kernel, initrd=initrd, name=name, env=env, workdir=workdir, user=user,
            init=init, net=net, publish=publish, rm=rm, interactive=interactive,
            detach=detach, timeout=timeout, command=command, entrypoint=entrypoint)
        reg = RegistryOptions(tls_verify=tls_verify and not no_tls_verify,
                              authfile=authfile.absolute() if authfile else None)
        if warm:
            from runner.vm import warmrun

            code = warmrun.run(ctx.root, source, opts, reg, on_ready=click.echo,
                               say=lambda line: click.echo(line, err=True))
        else:
            code = vm.run(ctx.root, source, opts, reg, on_ready=click.echo)
    except KilnError as e:
        e.exit_code = vmspec.EXIT_KILN
        if ctx.debug:
            from runner.cli.common import err_console

            err_console.print_exception()
        fail(e)
    sys.stdout.flush()
    sys.exit(code)


@click.command()
@click.option("--all", "-a", "all_vms", is_flag=True, help="also VMs that have ended")
@click.option("--json", "as_json", is_flag=True, help="print a JSON array")
@pass_ctx
def ps(ctx: Ctx, all_vms: bool, as_json: bool) -> None:
    """List VMs (running ones; --all for every VM)."""
    from runner.vm import lifecycle as vm

    rows = vm.ps(ctx.root, all_vms)
    if as_json:
        print_json(rows)
        return
    print_table(("ID", "NAME", "STATE", "EXIT", "VMM", "VOLUME", "REASON"), [
        (r["id"], r["name"] or "", r["state"],
         "" if r["exit_code"] is None else str(r["exit_code"]), r["vmm"], r["volume"][7:19],
         table_reason(r["reason"])) for r in rows])


def table_reason(reason: str) -> str:
    """REASON in `kiln ps`'s table: the sentence without its parenthesised detail, and
    without "--vmm auto chose VMM: " (the VMM column says it); `--json` has it whole."""
    head = reason.split(" (", 1)[0]
    return re.sub(r"^--vmm \w+ chose [\w-]+: ", "", head)


@click.command()
@click.argument("refs", metavar="ID|NAME...", nargs=-1, required=True)
@click.option("--timeout", "-t", type=click.FloatRange(min=0), default=10.0, show_default=True,
              metavar="S", help="seconds of grace before the VM is killed")
@pass_ctx
def stop(ctx: Ctx, refs: tuple[str, ...], timeout: float) -> None:
    """Stop VMs: SIGTERM to the workload through the guest's init, then kill."""
    from runner.vm import lifecycle as vm

    for ref in refs:
        rec = vm.stop(ctx.root, ref, timeout)
        click.echo(rec.id)


@click.command("rm")
@click.argument("refs", metavar="ID|NAME...", nargs=-1, required=True)
@click.option("--force", "-f", is_flag=True, help="stop running VMs first")
@pass_ctx
def rm_cmd(ctx: Ctx, refs: tuple[str, ...], force: bool) -> None:
    """Remove VMs that have ended: their snapshot, files and record. (Volumes: `kiln
    volume rm`.)"""
    from runner.vm import lifecycle as vm
    from runner.vm import reaper
    from runner.vm.state import State

    st = State(ctx.root.path)
    reaper.reconcile(ctx.root, st)
    for ref in refs:
        click.echo(vm.remove(ctx.root, ref, st=st, force=force))


@click.command()
@click.argument("ref", metavar="ID|NAME")
@click.option("--follow", "-f", is_flag=True, help="keep printing until the VM ends")
@pass_ctx
def logs(ctx: Ctx, ref: str, follow: bool) -> None:
    """Print a VM's console (kernel and init messages), then its workload's output."""
    from runner.vm import lifecycle as vm

    vm.logs(ctx.root, ref, follow=follow)
