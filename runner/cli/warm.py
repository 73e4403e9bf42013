"""``kiln warm create|ls|rm`` (registered on ``runner.cli.cli``): warm images, the saved
booted VMs that ``kiln run --warm`` starts from (docs/warm.md; the work is in
``runner.vm.warmrun`` and ``builder.warm``)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import click

from builder.units import format_size, parse_size
from runner.cli.common import (
    Ctx,
    machine_options,
    pass_ctx,
    print_json,
    print_table,
    registry_options,
)


@click.group()
def warm() -> None:
    """Warm images: a VM booted once and saved, for `kiln run --warm`."""


@warm.command("create")
@click.argument("source")
@machine_options
@click.option("--vmm", type=click.Choice(["auto", "qemu", "firecracker"]), default="auto",
              show_default=True, help="the VMM whose warm image to make (as kiln run's)")
@click.option("--net", type=click.Choice(["none", "user", "tap"]), default="none",
              show_default=True, help="the --net of the runs it is for (Firecracker keeps one "
              "image per network mode; QEMU's one image serves every --net)")
@click.option("--json", "as_json", is_flag=True, help="print the image as JSON")
@registry_options
@pass_ctx
def warm_create(ctx: Ctx, source: str, cpus: int, memory: str, disk_size: str | None,
                kernel: Path | None, initrd: Path | None, vmm: str, net: str, as_json: bool,
                tls_verify: bool, no_tls_verify: bool, authfile: Path | None) -> None:
    """Boot SOURCE to kiln init's ready point and save it as a warm image (QEMU, or
    Firecracker through its snapshot API): the one `kiln run --warm` with the same --vmm,
    --cpus, --memory, --disk-size, --kernel and --initrd restores (Firecracker: and the
    same --net; a --net tap image is saved on the kiln network).

    The oldest other images are then removed to keep their total under $KILN_WARM_MAX
    (default 4G)."""
    from builder.source import RegistryOptions
    from runner.vm import warmrun
    from runner.vm.spec import RunOptions

    opts = RunOptions(vmm=vmm, cpus=cpus, memory=parse_size(memory, "--memory"),
                      disk_size=parse_size(disk_size, "--disk-size") if disk_size else None,
                      kernel=kernel, initrd=initrd, net=net)
    reg = RegistryOptions(tls_verify=tls_verify and not no_tls_verify,
                          authfile=authfile.absolute() if authfile else None)
    rec, made = warmrun.create(ctx.root, source, opts, reg,
                               say=lambda line: click.echo(line, err=True))
    if as_json:
        print_json(rec.as_json())
    else:
        click.echo(rec.id if made else f"{rec.id} (already there)")


@warm.command("ls")
@click.option("--json", "as_json", is_flag=True, help="print a JSON array")
@pass_ctx
def warm_ls(ctx: Ctx, as_json: bool) -> None:
    """List warm images."""
    from builder import warm as store

    rows = store.list_images(ctx.root)
    if as_json:
        print_json([r.as_json() for r in rows])
        return
    print_table(("ID", "VOLUME", "VMM", "MEMORY", "CPUS", "SIZE", "CREATED"), [
        (r.id[:12], r.volume[7:19], r.vmm, f"{r.memory_mib}M", str(r.cpus),
         format_size(r.bytes),
         dt.datetime.fromtimestamp(r.created).strftime("%Y-%m-%d %H:%M")) for r in rows])


@warm.command("rm")
@click.argument("ids", metavar="ID...", nargs=-1, required=True)
@pass_ctx
def warm_rm(ctx: Ctx, ids: tuple[str, ...]) -> None:
    """Remove warm images (an ID prefix of `kiln warm ls` will do when unique)."""
    from builder import warm as store
    from helper.base.errors import NotFound, UsageError

    have = [r.id for r in store.list_images(ctx.root)]
    for ref in ids:
        hits = [i for i in have if i.startswith(ref.lower())] if ref else []
        if not hits:
            raise NotFound(f"no warm image {ref}", "list them with `kiln warm ls`")
        if len(hits) > 1:
            raise UsageError(f"warm image id {ref} is ambiguous", "give more of the id")
        store.remove(ctx.root, hits[0])
        click.echo(hits[0])
