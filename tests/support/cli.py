"""Running the real `kiln` command (``python -m runner`` of this checkout) in tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

KILN = [sys.executable, "-m", "runner"]


def kiln(root: Path, *args: str, env: dict[str, str] | None = None,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    """``kiln --root ROOT ARGS…``; with ``check``, a non-zero exit fails the test with stderr."""
    res = subprocess.run([*KILN, "--root", str(root), *args], capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, timeout=300, check=False)
    if check and res.returncode != 0:
        raise AssertionError(f"kiln {' '.join(args)} exited {res.returncode}: {res.stderr}")
    return res
