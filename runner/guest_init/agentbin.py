"""kiln's guest agent as a binary: ``agent.h``, ``agent.c`` and ``agentrun.c`` beside
this module, built static into one program.

``scripts/install-deps.sh`` builds it with Debian's gcc (``gcc -static -Os -s``) into
``/usr/local/lib/kiln/kiln-agent-<hash>``; a host without that copy (or with an older one:
the name carries the first 16 hex digits of the SHA-256 of the three sources, in that
order) gets it built on first use into ``ROOT/kernels/`` the same way (a flock-ed temp file
renamed into place, ``runner.tempfiles``). The lifecycle injects it into each VM's snapshot
as ``/.kiln/agent``.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from builder import proc

SYSTEM_DIR = Path("/usr/local/lib/kiln")
SOURCES = tuple(Path(__file__).parent / n for n in ("agent.h", "agent.c", "agentrun.c"))
GCC_FLAGS = ("-static", "-Os", "-s")


def source_bytes() -> bytes:
    """The three sources, concatenated in their order: what names the binary."""
    return b"".join(p.read_bytes() for p in SOURCES)


def binary_name(source: bytes) -> str:
    """``kiln-agent-<first 16 hex digits of sha256(source)>`` (pure)."""
    return "kiln-agent-" + hashlib.sha256(source).hexdigest()[:16]


def ensure_agent(cache_dir: Path, *, scratch: Path | None = None) -> Path:
    """The agent built from today's sources: install-deps' copy, else the root's cached
    one, else built now (gcc; ~0.3 s)."""
    from runner.tempfiles import write_atomic

    name = binary_name(source_bytes())
    for d in (SYSTEM_DIR, cache_dir):
        if (d / name).is_file():
            return d / name
    with tempfile.TemporaryDirectory(prefix="kiln-agent-", dir=scratch) as tmp:
        out = Path(tmp) / "agent"
        proc.run("gcc", [*GCC_FLAGS, "-o", str(out), *(str(p) for p in SOURCES[1:])],
                 timeout=120,
                 hint="apt-get install gcc libc6-dev (scripts/install-deps.sh)")
        data = out.read_bytes()
    cache_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(cache_dir / name, data, mode=0o755)
    return cache_dir / name
