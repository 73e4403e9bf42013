"""Process helpers for the runner tests (builder/proc.py's and helper/base/run.py's)."""

from __future__ import annotations

import time
from pathlib import Path


def dead(pid: int, within: float = 10.0) -> bool:
    """``pid`` is gone or a zombie within ``within`` seconds (its reaper may be slow)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.02)
    return False
