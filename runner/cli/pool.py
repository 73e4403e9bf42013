"""``kiln pool …`` and ``kiln snapshot …`` (registered on ``runner.cli.cli``).

Parse → call one function of ``builder.pool`` → print. The pool itself (backends, crash
rules, privileged steps) lives in ``helper/pool``; see docs/pool.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from builder.units import format_size, parse_size
from helper.base.errors import KilnError, NotFound
from runner.cli.common import Ctx, out_console, pass_ctx, print_json, print_table

if TYPE_CHECKING:  # builder.pool is imported by the commands that use it: start-up time
    from builder.pool.base import Pool


def _no_pool() -> NotFound:
    return NotFound("no pool: run `kiln pool init`",
                    "`kiln pool init` picks a backend for this host "
                    "(or choose one: --backend dm-thin|reflink|copy)")


def _open(ctx: Ctx) -> Pool:
    from builder.pool import open_pool

    ctx.root.ensure()
    pool = open_pool(ctx.root.path)
    if pool is None:
        raise _no_pool()
    return pool


@click.group()
def pool() -> None:
    """Create, inspect and remove the volume pool that snapshots are made in."""


@pool.command("init")
@click.option("--backend", type=click.Choice(["auto", "dm-thin", "reflink", "copy"]),
              default="auto", show_default=True,
              help="auto: dm-thin where the kernel has thin-pool, else reflink")
@click.option("--size", default=None, metavar="SIZE",
              help="size of the loop-backed pool image or thin data [default: 20G]")
@click.option("--fs", type=click.Choice(["btrfs", "xfs"]), default=None,
              help="reflink: always use a loop-mounted image with this filesystem")
@click.option("--json", "as_json", is_flag=True, help="print the pool status as JSON")
@pass_ctx
def pool_init(ctx: Ctx, backend: str, size: str | None, fs: str | None, as_json: bool) -> None:
    """Create the pool (re-running is fine) and import every existing volume into it."""
    from builder.pool import init_pool, open_pool
    from builder.store import Store

    ctx.root.ensure()
    nbytes = parse_size(size, "--size") if size else None
    existed = open_pool(ctx.root.path) is not None
    p = init_pool(ctx.root.path, backend=backend, size=nbytes, fs=fs)
    imported = 0
    for vol in Store(ctx.root).list():
        if not p.has_volume(vol.id):
            p.import_volume(vol.id, vol.path)
            imported += 1
    st = p.status()
    if as_json:
        print_json({**st, "created": not existed, "imported": imported})
        return
    verb = "pool exists" if existed else "created pool"
    out_console.print(f"{verb}: [bold]{st['backend']}[/] ({'thin' if st['thin'] else 'not thin'})"
                      f" at {st['path']}")
    out_console.print(f"  why: {st['reason']}")
    out_console.print(f"  imported {imported} volume(s); {st['volumes']} in the pool")


@pool.command("destroy")
@click.option("--force", is_flag=True, help="also remove every snapshot")
@pass_ctx
def pool_destroy(ctx: Ctx, force: bool) -> None:
    """Remove the pool: its snapshots (with --force), unmount, detach, delete.
    Base volumes stay in the store."""
    from builder.pool import destroy_pool

    ctx.root.ensure()
    if not destroy_pool(ctx.root.path, force=force):
        raise _no_pool()
    click.echo("pool destroyed")


@pool.command("status")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@pass_ctx
def pool_status(ctx: Ctx, as_json: bool) -> None:
    """Backend, whether snapshots are thin, capacity and use, counts."""
    st = _open(ctx).status()
    if as_json:
        print_json(st)
        return
    out_console.print(f"backend    {st['backend']} ({'thin' if st['thin'] else 'not thin'})")
    out_console.print(f"why        {st['reason']}")
    out_console.print(f"path       {st['path']}")
    out_console.print(f"used       {format_size(st['used'])} of {format_size(st['capacity'])}")
    out_console.print(f"volumes    {st['volumes']}")
    out_console.print(f"snapshots  {st['snapshots']}")


@click.group()
def snapshot() -> None:
    """Private writable copies of base volumes (what a VM boots from)."""


@snapshot.command("create")
@click.argument("volume_ref", metavar="VOLUME")
@click.option("--size", default=None, metavar="SIZE",
              help="grow the snapshot's ext4 to SIZE (at least the volume's size)")
@click.option("--json", "as_json", is_flag=True, help="print the snapshot as JSON")
@pass_ctx
def snapshot_create(ctx: Ctx, volume_ref: str, size: str | None, as_json: bool) -> None:
    """Snapshot VOLUME (an id or a prefix of 4+ hex digits) into the pool."""
    from builder.store import Store

    nbytes = parse_size(size, "--size") if size else None
    store = Store(ctx.root)
    vol = store.get(volume_ref)
    p = _open(ctx)
    if not p.has_volume(vol.id):
        p.import_volume(vol.id, vol.path)
    snap = p.create_snapshot(vol.id, size=nbytes)
    store.touch(vol.id)
    if as_json:
        print_json(snap.summary())
        return
    thin = "thin" if snap.thin else "not thin: a full copy"
    out_console.print(f"snapshot [bold]{snap.id}[/] of {vol.id[:19]} "
                      f"({format_size(snap.size)}, {thin})")
    out_console.print(f"  path: {snap.path}")


@snapshot.command("ls")
@click.option("--json", "as_json", is_flag=True, help="print a JSON array")
@pass_ctx
def snapshot_ls(ctx: Ctx, as_json: bool) -> None:
    """List snapshots."""
    from builder.pool.base import pool_dir

    ctx.root.ensure()
    try:
        snaps = _open(ctx).list_snapshots()
    except KilnError:
        if not pool_dir(ctx.root.path).exists():
            snaps = []  # no pool: nothing to list (not an error)
        else:
            raise
    if as_json:
        print_json([s.summary() for s in snaps])
        return
    print_table(("ID", "VOLUME", "SIZE", "THIN", "CREATED", "PATH"), [
        (s.id, s.volume[7:19], format_size(s.size), "yes" if s.thin else "no", s.created,
         s.path) for s in snaps])


@snapshot.command("rm")
@click.argument("snap_ids", metavar="ID...", nargs=-1, required=True)
@pass_ctx
def snapshot_rm(ctx: Ctx, snap_ids: tuple[str, ...]) -> None:
    """Remove snapshots."""
    p = _open(ctx)
    for sid in snap_ids:
        p.remove_snapshot(sid)
        click.echo(sid)
