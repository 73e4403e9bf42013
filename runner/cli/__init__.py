"""The ``kiln`` command line: a thin click layer.

Each command parses its options, loads what it needs and calls one typed core function;
the result is printed with rich, or as JSON with ``--json``. One handler
(``runner.cli.common.KilnGroup``) maps errors to exit codes: 2 for what the argument
parser rejects (click's own), 1 for every other failure, printed as a one-line error plus
a hint; tracebacks only with ``--debug``. The command modules (``build``, ``dist``,
``pool``, ``run``, ``warm``) define commands; this module registers them on ``cli``, explicitly.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from builder.root import Root, default_root
from runner.cli import build, dist, pool, run, warm
from runner.cli.common import Ctx, KilnGroup

# Commands that never touch the root, and gc (it recovers itself, and not with --dry-run).
_NO_RECOVERY = frozenset({"version", "doctor", "recipe", "gc"})
# Commands whose core recovers tmp/ and the blob cache itself (builder.pipeline.build does,
# for API callers): the CLI sweeps only the run stage's caches first, so nothing runs twice.
_CORE_RECOVERS = frozenset({"build"})


@click.group(cls=KilnGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--root", "root", type=click.Path(path_type=Path), envvar="KILN_ROOT",
              default=None, help="kiln's state directory [default: /var/lib/kiln as root, "
              "else $XDG_DATA_HOME/kiln; env KILN_ROOT]")
@click.option("--debug", is_flag=True, help="log every command kiln runs; tracebacks on errors")
@click.pass_context
def cli(ctx: click.Context, root: Path | None, debug: bool) -> None:
    """kiln turns OCI container images into VM root filesystems and boots them."""
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(name)s: %(message)s",
        stream=sys.stderr,
    )
    r = Root((root or default_root()).absolute())
    ctx.obj = Ctx(root=r, debug=debug)
    if ctx.invoked_subcommand not in _NO_RECOVERY:
        from runner.tempfiles import recover

        # what a killed kiln command left (docs/architecture.md)
        recover(r, work=ctx.invoked_subcommand not in _CORE_RECOVERS)



for _command in (build.version, build.doctor, build.build, build.volume, build.gc,
                 build.recipe, build.demo, dist.push, dist.pull, dist.refresh,
                 pool.pool, pool.snapshot, run.run, run.ps, run.stop, run.rm_cmd, run.logs,
                 warm.warm):
    cli.add_command(_command)
build.volume.add_command(dist.volume_export)


def main() -> None:
    cli(prog_name="kiln")
