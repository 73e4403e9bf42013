"""Running the real `kiln` command (``python -m runner`` of this checkout) in tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.timing import limit

KILN = [sys.executable, "-m", "runner"]


def kiln(root: Path, *args: str, env: dict[str, str] | None = None,
         check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """``kiln --root ROOT ARGS…`` (``input``: its stdin); with ``check``, a non-zero exit
    fails the test with stderr."""
    res = subprocess.run([*KILN, "--root", str(root), *args], capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, timeout=limit(300), check=False,
                         input=input)
    if check and res.returncode != 0:
        raise AssertionError(f"kiln {' '.join(args)} exited {res.returncode}: {res.stderr}")
    return res


def wait_for(what: str, test: Callable[[], Any], timeout: float = limit(60)) -> Any:
    """Poll ``test`` every 0.1 s until it returns something true (returned), or fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = test()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
