"""The kiln commands of the build stage (registered on ``runner.cli.cli``).

Each command is parse → call one core function → print. No logic lives here that a test
of the core could not reach.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from builder.units import format_size, parse_duration
from runner.cli.common import Ctx, out_console, pass_ctx, print_json, print_table, registry_options

if TYPE_CHECKING:
    from builder.pipeline import BuildResult
    from builder.source import RegistryOptions


def _registry_opts(tls_verify: bool, no_tls_verify: bool, authfile: Path | None,
                   platform: str | None = None) -> RegistryOptions:
    from builder.source import RegistryOptions

    return RegistryOptions(tls_verify=tls_verify and not no_tls_verify,
                           authfile=authfile.absolute() if authfile else None,
                           platform=platform)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def version(as_json: bool) -> None:
    """Print kiln's version and every tool's version."""
    from builder import doctor

    info = doctor.versions()
    if as_json:
        print_json(info)
        return
    for name, ver in info.items():
        click.echo(f"{name:<20} {ver}")


@click.command()
@click.option("--registry", default=None, metavar="HOST[:PORT]",
              help="also check that this registry answers")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@pass_ctx
def doctor(ctx: Ctx, registry: str | None, as_json: bool) -> None:
    """Check that this host can build and boot: each probe with a fix hint."""
    from builder import doctor as doc

    checks = doc.checks(ctx.root.path, registry=registry)
    failed_required = [c for c in checks if not c.ok and c.required]
    if as_json:
        print_json([{"name": c.name, "ok": c.ok, "required": c.required,
                     "detail": c.detail, "hint": c.hint} for c in checks])
    else:
        print_table(("check", "", "detail", "fix"), [
            (c.name, "[green]ok[/]" if c.ok else ("[red]FAIL[/]" if c.required
                                                  else "[yellow]no[/]"),
             c.detail, "" if c.ok else c.hint) for c in checks])
    if failed_required:
        raise SystemExit(1)


@click.command()
@click.argument("source")
@registry_options
@click.option("--platform", default=None, metavar="OS/ARCH[/VARIANT]",
              help="platform to pick from a multi-platform image [default: this host's]")
@click.option("--push", "push_ref", default=None, metavar="REF",
              help="also publish the volume to HOST[:PORT]/REPO[:TAG] (see `kiln push`)")
@click.option("--json", "as_json", is_flag=True, help="print the result as one JSON object")
@pass_ctx
def build(ctx: Ctx, source: str, tls_verify: bool, no_tls_verify: bool,
          authfile: Path | None, platform: str | None, push_ref: str | None,
          as_json: bool) -> None:
    """Build a base volume from SOURCE: a recipe (*.toml) or an image reference
    (docker://…, oci:DIR[:TAG], oci-archive:FILE, docker-archive:FILE, or NAME[:TAG])."""
    from builder.pipeline import build as do_build

    opts = _registry_opts(tls_verify, no_tls_verify, authfile, platform)
    pushed = None
    from runner.progress import ProgressView

    with ProgressView(enabled=None if not as_json else False) as view:
        if push_ref is not None:
            from builder.publish import parse_target

            parse_target(push_ref)  # a bad REF fails before the build, not after it
        result = do_build(ctx.root, source, opts, listener=view)
        if push_ref is not None:
            from builder.publish import push_volume

            pushed = push_volume(ctx.root, result.volume, push_ref, opts, listener=view)
    if as_json:
        out = result.as_json()
        if pushed is not None:
            out["pushed"] = {"ref": pushed["ref"], "digest": pushed["digest"]}
        print_json(out)
        return
    v = result.volume
    state = "cached" if result.cached else "built"
    out_console.print(f"{state} [bold]{v.id}[/] ({format_size(v.size)}) from {v.meta['source']}")
    out_console.print(f"  path: {v.path}")
    if pushed is not None:
        out_console.print(f"  pushed: {pushed['ref']}@{pushed['digest']}")


@click.group()
def volume() -> None:
    """List, inspect, verify and remove base volumes."""


@volume.command("ls")
@click.option("--json", "as_json", is_flag=True, help="print a JSON array")
@pass_ctx
def volume_ls(ctx: Ctx, as_json: bool) -> None:
    """List base volumes."""
    from builder.store import Store

    vols = Store(ctx.root).list()
    if as_json:
        print_json([v.summary() for v in vols])
        return
    print_table(("ID", "SOURCE", "SIZE", "CREATED"), [
        (v.id[7:19], str(v.meta.get("source")), format_size(v.size), str(v.meta.get("created")))
        for v in vols])


@volume.command("inspect")
@click.argument("volume_id", metavar="ID")
@pass_ctx
def volume_inspect(ctx: Ctx, volume_id: str) -> None:
    """Print a volume's metadata as JSON (ID may be a prefix of 4+ hex digits)."""
    from builder.store import Store

    v = Store(ctx.root).get(volume_id)
    print_json({**v.meta, **v.summary()})


@volume.command("rm")
@click.argument("volume_ids", metavar="ID...", nargs=-1, required=True)
@pass_ctx
def volume_rm(ctx: Ctx, volume_ids: tuple[str, ...]) -> None:
    """Remove base volumes and their warm images. Snapshots made from a volume are
    independent copies and stay usable after their base is removed."""
    from builder import warm
    from builder.pool import open_pool
    from builder.store import Store

    store = Store(ctx.root)
    ctx.root.ensure()
    pool = open_pool(ctx.root.path)
    for vid in volume_ids:
        v = store.get(vid)
        if pool is not None:
            pool.remove_volume(v.id)
        warm.remove_for_volumes(ctx.root, [v.id])  # its warm images go with it
        store.remove(v)
        click.echo(v.id)


@volume.command("verify")
@click.argument("volume_id", metavar="ID")
@pass_ctx
def volume_verify(ctx: Ctx, volume_id: str) -> None:
    """Re-hash a volume's stored bytes and check them against its id."""
    from builder.store import Store

    store = Store(ctx.root)
    v = store.get(volume_id)
    secs = store.verify(v)
    click.echo(f"ok {v.id} ({format_size(v.size)} in {secs:.2f} s)")


@click.command()
@click.option("--dry-run", is_flag=True, help="only say what would be removed")
@click.option("--keep", default="14d", show_default=True, metavar="DURATION",
              help="keep volumes used within this long (e.g. 14d, 12h)")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@pass_ctx
def gc(ctx: Ctx, dry_run: bool, keep: str, as_json: bool) -> None:
    """Remove unneeded cache blobs, crash leftovers and volumes unused for longer than --keep."""
    from builder.gc import run_gc
    from runner import tempfiles
    from runner.vm import reaper

    reaper.reconcile(ctx.root, full=True)  # also lists the kiln network
    report = run_gc(ctx.root, keep_seconds=parse_duration(keep, "--keep"), dry_run=dry_run,
                    recover=lambda: tempfiles.recover(ctx.root))
    if as_json:
        print_json(report.as_json())
        return
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{verb} {len(report.removed_volumes)} volume(s), "
               f"{len(report.removed_blobs)} blob(s), "
               f"{len(report.removed_leftovers)} leftover(s); "
               f"{format_size(report.freed_bytes)} freed")
    for s in report.skipped:
        click.echo(f"skipped: {s}")


@click.group()
def recipe() -> None:
    """Recipe tools."""


@recipe.command("schema")
def recipe_schema() -> None:
    """Print the recipe JSON Schema."""
    from builder.recipe import recipe_schema as schema

    print_json(schema())


@click.command()
@click.option("--recipe", "recipe_path", type=click.Path(path_type=Path, dir_okay=False),
              default=None, help="recipe to build [default: the checkout's recipes/demo.toml]")
@click.option("--no-boot", is_flag=True, help="build and make the pool, but boot nothing")
@click.option("--json", "as_json", is_flag=True,
              help="print the volume and pool as JSON (implies --no-boot: stdout stays JSON)")
@pass_ctx
def demo(ctx: Ctx, recipe_path: Path | None, no_boot: bool, as_json: bool) -> None:
    """Offline demo: local registry, busybox image, build recipes/demo.toml, boot it."""
    from runner.demo import DEMO_RECIPE, next_steps, run_demo
    from runner.progress import ProgressView

    boot = not (no_boot or as_json)

    def announce(res: BuildResult, pool: dict[str, object]) -> None:
        v = res.volume
        state = "cached" if res.cached else "built"
        out_console.print(f"volume    [bold]{v.id}[/] ({state}, {format_size(v.size)})")
        out_console.print(f"path      {v.path}")
        out_console.print(f"pool      {pool['backend']} (thin: {pool['thin']})")
        if boot:
            out_console.print(f"booting   kiln run --rm {v.id[7:19]}  (the guest's output "
                              "follows)")
        out_console.file.flush()  # before the guest's output, which bypasses rich

    with ProgressView(enabled=None if not as_json else False) as view:
        res = run_demo(ctx.root, recipe_path or DEMO_RECIPE, listener=view, boot=boot,
                       ready=None if as_json else announce)
    if as_json:
        print_json({**res.build.as_json(), "pool": res.pool})
        return
    if res.exit_code is not None:
        out_console.print(f"the VM exited with {res.exit_code}")
    out_console.print("next      " + "\n          ".join(next_steps(res.build.volume.id)),
                      markup=False)
    if res.exit_code:
        raise SystemExit(res.exit_code)
