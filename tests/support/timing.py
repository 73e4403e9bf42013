"""Time limits in tests are hang guards, never speed checks (bench/ measures speed).

Each is written as what an idle machine needs, with a margin, and passed through
``limit``: on a busy machine (the two cores loaded by other work, load average ~3)
everything here takes up to about three times as long — QEMU under TCG most of all — so
``SLACK`` (default 4, ``KILN_TEST_SLACK`` to change it) keeps a guard a guard. A test still
fails when what it waits for never happens; it only waits longer before saying so.
"""

from __future__ import annotations

import os

SLACK = max(1.0, float(os.environ.get("KILN_TEST_SLACK", "4")))


def limit(seconds: float) -> float:
    """A hang guard of ``seconds`` on an idle machine, scaled for a busy one."""
    return seconds * SLACK
