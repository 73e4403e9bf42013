"""What every ``kiln`` command shares: the context, output, the error handler, options.

Each command parses its options, loads what it needs and calls one typed core function;
the result is printed with rich, or as JSON with ``--json``. One handler maps errors to
exit codes: 2 for what the argument parser rejects (click's own), 1 for every other
failure, printed as a one-line error plus a hint; tracebacks only with ``--debug``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from builder.root import Root
from helper.base.errors import KilnError

F = TypeVar("F", bound=Callable[..., Any])



class _LazyConsole:
    """A ``rich.console.Console`` made on first use: importing rich's console costs ~30 ms,
    and a successful `kiln run` never prints through it (start-up is a benchmark target)."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._console: Any = None

    def __getattr__(self, name: str) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._options)
        return getattr(self._console, name)


err_console = _LazyConsole(stderr=True, highlight=False, soft_wrap=True)
out_console = _LazyConsole(highlight=False, soft_wrap=True)


@dataclass
class Ctx:
    """What every command receives: the root and the global flags."""

    root: Root
    debug: bool


# Columns whose cells a user copies into the next command: never wrapped, never cut.
WHOLE_COLUMNS = frozenset({"ID", "NAME", "VOLUME"})


def print_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """One table on stdout (rich.table is imported here: most commands print none, and
    every import counts in `kiln run`'s start-up).

    Nothing is cut with "…": ``WHOLE_COLUMNS`` stay on one line, the other columns wrap
    (folding a word longer than their width), and when the whole columns alone are wider
    than the terminal the table is printed wider than it rather than cutting them."""
    from rich.table import Table

    table = Table(show_header=True, header_style="bold")
    whole = [c in WHOLE_COLUMNS for c in columns]
    for col, keep in zip(columns, whole, strict=True):
        table.add_column(col, no_wrap=keep, overflow="ignore" if keep else "fold")
    for row in rows:
        table.add_row(*row)
    # borders and padding: 3 per column + 1; a wrapping column needs a few cells at least
    need = 3 * len(columns) + 1 + sum(
        max([len(col), *(len(r[i]) for r in rows)]) if keep else 4
        for i, (col, keep) in enumerate(zip(columns, whole, strict=True)))
    if need <= out_console.width:
        out_console.print(table)
    else:  # Console.print(width=) cannot exceed the console's own width: a wider console
        from rich.console import Console

        Console(width=need, highlight=False, soft_wrap=True).print(table)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    sys.stdout.flush()


def fail(error: KilnError) -> NoReturn:
    from rich.markup import escape  # messages name config sections: "[net]" is not markup

    err_console.print(f"[bold red]error:[/] {escape(error.message)}", markup=True)
    if error.hint:
        err_console.print(f"[dim]hint:[/] {escape(error.hint)}", markup=True)
    sys.exit(error.exit_code)


class KilnGroup(click.Group):
    """A click group whose commands report ``KilnError`` the kiln way."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KilnError as e:
            debug = bool(ctx.find_root().params.get("debug"))
            if debug:
                err_console.print_exception()
            fail(e)
        except KeyboardInterrupt:
            err_console.print("interrupted")
            sys.exit(130)


pass_ctx = click.make_pass_decorator(Ctx)


def machine_options(f: F) -> F:
    """``--cpus``, ``--memory``, ``--disk-size``, ``--kernel``, ``--initrd``: the machine
    ``kiln run`` boots and ``kiln warm create`` saves (a warm image's key holds them)."""
    f = click.option("--initrd", type=click.Path(path_type=Path, dir_okay=False), default=None,
                     help="initrd to boot unchanged [default: kiln's minimal initrd]")(f)
    f = click.option("--kernel", type=click.Path(path_type=Path, dir_okay=False), default=None,
                     help="kernel to boot [default: the host's Debian cloud kernel]")(f)
    f = click.option("--disk-size", default=None, metavar="SIZE",
                     help="grow the VM's snapshot (and its ext4) to SIZE")(f)
    f = click.option("--memory", default="512M", show_default=True, metavar="SIZE")(f)
    return click.option("--cpus", type=click.IntRange(1, 64), default=1, show_default=True)(f)


def registry_options(f: F) -> F:
    """``--tls-verify``, ``--no-tls-verify`` and ``--authfile``, as podman spells them."""
    f = click.option("--authfile", type=click.Path(path_type=Path, dir_okay=False),
                     default=None, help="registry credentials (containers auth.json format)")(f)
    f = click.option("--no-tls-verify", "no_tls_verify", is_flag=True,
                     help="same as --tls-verify=false")(f)
    # is_flag=False + flag_value: both `--tls-verify` and podman's `--tls-verify=false` parse.
    return click.option("--tls-verify", "tls_verify", type=click.BOOL, default=True,
                     is_flag=False, flag_value=True, show_default=True,
                     help="require HTTPS and verify certificates")(f)
