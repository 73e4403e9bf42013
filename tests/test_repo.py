"""The repository's own rules, checked from the source: docs/architecture.md names every
module (scripts/architecture.py), and the shape figures hold (scripts/figures.py: no import
cycles, at most two process-starting modules, no function over 80 lines, no module over
500)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "scripts" / name), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)


def test_architecture_doc_names_every_module() -> None:
    res = _script("architecture.py", "--check")
    assert res.returncode == 0, res.stderr + res.stdout


def test_shape_figures_hold() -> None:
    res = _script("figures.py")
    assert res.returncode == 0, res.stdout + res.stderr
