"""`kiln run --warm` (and cold `kiln run`) as an ordinary user through `sudo kiln-helper`,
for ``bench/run.py``'s sudo-caller rows.

A throw-away user (``tests.support.oci.make_user``) allowed by a sudoers rule to run the
helper alone (``tests.support.sudo.sudoers``), the helper installed from this checkout
with the test configuration (``tests.support.sudo.helper_installed``: its pool directory
under ``/var/lib/kiln-helper-test``, removed afterwards) — the set-up the sudo tests use.
The user builds the busybox demo image into its own root with a reflink pool, makes the
warm image, and then each sample is the whole ``kiln run [--warm] --rm VOLUME -- echo
MARKER`` process as that user, from its start to the marker on its stdout.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.support.oci import User

# The command the sudo tests run as the user (the module, not an entry point: the user's
# PATH has no kiln).
KILN = ("import runpy, sys; sys.argv[0] = 'kiln'; "
        "runpy.run_module('runner', run_name='__main__')")


@contextlib.contextmanager
def sudo_caller() -> Iterator[Callable[[bool, str], list[str]]]:
    """Yields ``argv(warm, marker)``: the command line of one measured run as the user, its
    root holding the demo volume and that volume's warm image."""
    from builder.demoimage import make_busybox_image
    from tests.support.oci import give_to, make_user
    from tests.support.sudo import helper_installed, kiln_as, sudoers

    with helper_installed(), make_user("kilnb") as user, sudoers(user):
        layout = user.scratch / "layout"
        make_busybox_image(layout, "1")
        give_to(user, layout)
        root = user.scratch / "root"
        vol = json.loads(kiln_as(user, root, "build", f"oci:{layout}:1", "--json").stdout)
        kiln_as(user, root, "pool", "init", "--backend", "reflink", "--size", "1G")
        kiln_as(user, root, "warm", "create", vol["id"])
        try:
            yield lambda warm, marker: _argv(user, root, vol["id"], warm, marker)
        finally:
            kiln_as(user, root, "pool", "destroy", check=False)


def _argv(user: User, root: Path, volume: str, warm: bool, marker: str) -> list[str]:
    return ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups", "--",
            "env", "-i", "-C", "/", f"HOME={user.home}", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
            "LC_ALL=C.UTF-8", f"USER={user.name}",
            sys.executable, "-c", KILN, "--root", str(root), "run",
            *(["--warm"] if warm else []), "--rm", volume, "--", "echo", marker]
