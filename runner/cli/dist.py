"""The distribution commands: ``push``, ``pull``, ``refresh`` and ``volume export``.

Each is parse → one core function (``builder.publish``, ``builder.refresh``,
``builder.export``) → print, like ``runner.cli.build``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from builder.units import format_size
from runner.cli.build import _registry_opts
from runner.cli.common import Ctx, out_console, pass_ctx, print_json, print_table, registry_options


@click.command()
@click.argument("volume_id", metavar="ID")
@click.argument("ref", metavar="REF")
@registry_options
@click.option("--json", "as_json", is_flag=True, help="print {ref, digest} as JSON")
@pass_ctx
def push(ctx: Ctx, volume_id: str, ref: str, tls_verify: bool, no_tls_verify: bool,
         authfile: Path | None, as_json: bool) -> None:
    """Publish volume ID to a registry as an OCI artifact: REF is
    [docker://]HOST[:PORT]/REPO[:TAG]. Blobs the registry has are not sent again."""
    from builder.publish import push_volume
    from builder.store import Store

    opts = _registry_opts(tls_verify, no_tls_verify, authfile)
    vol = Store(ctx.root).get(volume_id)
    from runner.progress import ProgressView

    with ProgressView(enabled=None if not as_json else False) as view:
        res = push_volume(ctx.root, vol, ref, opts, listener=view)
    if as_json:
        print_json({"ref": res["ref"], "digest": res["digest"]})
        return
    sent = format_size(res["uploaded"])
    out_console.print(f"pushed {vol.id[:19]} to [bold]{res['ref']}[/] ({sent} sent, "
                      f"{len(res['reused'])} blob(s) already there)")
    out_console.print(f"  digest: {res['digest']}")


@click.command()
@click.argument("ref", metavar="REF")
@registry_options
@click.option("--json", "as_json", is_flag=True, help="print {id, path, size} as JSON")
@pass_ctx
def pull(ctx: Ctx, ref: str, tls_verify: bool, no_tls_verify: bool, authfile: Path | None,
         as_json: bool) -> None:
    """Fetch a volume pushed with `kiln push`, verify every digest and the volume's id,
    and import it (no rebuild). REF is [docker://]HOST[:PORT]/REPO[:TAG|@DIGEST]."""
    from builder.publish import pull_volume

    opts = _registry_opts(tls_verify, no_tls_verify, authfile)
    from runner.progress import ProgressView

    with ProgressView(enabled=None if not as_json else False) as view:
        res = pull_volume(ctx.root, ref, opts, listener=view)
    if as_json:
        j = res.as_json()
        print_json({"id": j["id"], "path": j["path"], "size": j["size"]})
        return
    state = "already present" if res.already else "pulled"
    v = res.volume
    out_console.print(f"{state} [bold]{v.id}[/] ({format_size(v.size)})")
    out_console.print(f"  path: {v.path}")


@click.command()
@click.argument("targets", metavar="[RECIPE|DIR]...", nargs=-1)
@click.option("--push", "push_prefix", default=None, metavar="PREFIX",
              help="publish each volume to PREFIX/<recipe stem>:<key12> and move :latest")
@click.option("--jobs", type=click.IntRange(min=1), default=4, show_default=True,
              help="recipes refreshed at once")
@click.option("--wait", is_flag=True, help="wait for a running refresh instead of exiting 1")
@registry_options
@click.option("--json", "as_json", is_flag=True, help="print a JSON array")
@pass_ctx
def refresh(ctx: Ctx, targets: tuple[str, ...], push_prefix: str | None, jobs: int, wait: bool,
            tls_verify: bool, no_tls_verify: bool, authfile: Path | None,
            as_json: bool) -> None:
    """Rebuild recipes whose upstream image changed (no arguments: every recipe built
    before under this root). Exit 1 when any recipe failed."""
    from builder.refresh import refresh as do_refresh

    opts = _registry_opts(tls_verify, no_tls_verify, authfile)
    rows = do_refresh(ctx.root, targets, opts, push_prefix=push_prefix,
                      jobs=jobs, wait=wait)
    if as_json:
        print_json([r.as_json() for r in rows])
    else:
        lines = []
        for r in rows:
            old, new = _short(r.old_digest), _short(r.new_digest)
            digests = new if old == new else f"{old} → {new}"
            colour = {"failed": "red", "rebuilt": "green"}.get(r.action, "dim")
            lines.append((Path(r.recipe).name, digests, _short(r.volume_id),
                          f"[{colour}]{r.action}[/]", f"{r.seconds:.2f}"))
        print_table(("RECIPE", "SOURCE DIGEST", "VOLUME", "ACTION", "SECONDS"), lines)
        for r in rows:
            if r.error:
                out_console.print(f"[red]{Path(r.recipe).name}[/]: {r.error}")
            elif r.pushed:
                out_console.print(f"{Path(r.recipe).name}: pushed {r.pushed}")
    if any(r.action == "failed" for r in rows):
        sys.exit(1)


def _short(digest: str | None) -> str:
    return digest[7:19] if digest else "-"


@click.command("export")
@click.argument("volume_id", metavar="ID")
@click.argument("dest", metavar="FILE", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["raw", "qcow2"]), default="raw",
              show_default=True, help="disk image format")
@pass_ctx
def volume_export(ctx: Ctx, volume_id: str, dest: Path, fmt: str) -> None:
    """Write volume ID to FILE as a standalone disk image (raw keeps holes; qcow2 via
    qemu-img). FILE appears complete or not at all."""
    from builder.export import export_volume
    from builder.store import Store

    v = Store(ctx.root).get(volume_id)
    out = export_volume(v, dest, fmt)
    click.echo(f"{out} ({fmt}, {format_size(v.size)} virtual)")
