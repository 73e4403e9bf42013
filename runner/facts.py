"""Facts about host files that cost time to learn, cached by each file's identity.

``FileFacts`` keeps ``ROOT/kernels/warm-facts.json``: a value per fact and file, keyed by
the file's resolved path, inode, size and mtime, so a replaced or updated file is asked
again and an unchanged one never is — hashing the kernel, the initrd and busybox and
asking QEMU its version would cost ~0.1 s of every warm run, and QEMU's version (its
command line depends on it: ``runner.vmm.qemuargv``) ~20 ms of every run. A cache that
cannot be read or written is only slower.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path

from builder.root import Root


def _fingerprint(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


class FileFacts:
    """``get(path, compute)``: ``compute()``'s answer for ``path`` as the file is now."""

    def __init__(self, root: Root) -> None:
        self.path = root.path / "kernels" / "warm-facts.json"
        try:
            doc = json.loads(self.path.read_text())
            self.known: dict[str, str] = doc if isinstance(doc, dict) else {}
        except (OSError, ValueError):
            self.known = {}
        self.dirty = False

    def get(self, path: Path, compute: Callable[[], str], fact: str = "") -> str:
        key = _fingerprint(path) + (f":{fact}" if fact else "")
        if key not in self.known:
            self.known[key] = compute()
            self.dirty = True
        return self.known[key]

    def sha256(self, path: Path) -> str:
        from builder import warm

        return self.get(path, lambda: warm.file_sha256(path))

    def version(self, binary: Path) -> str:
        """The first line of ``binary --version`` (kept only when it said something: a
        binary that could not answer is asked again next time)."""
        from builder import proc

        text = self.get(binary, lambda: proc.version_of(str(binary)), fact="version")
        if text in ("missing", "unknown"):
            self.known.pop(f"{_fingerprint(binary)}:version", None)
        return text

    def save(self) -> None:
        if self.dirty:
            from runner.tempfiles import write_atomic

            with contextlib.suppress(OSError):
                self.path.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(self.path, json.dumps(self.known).encode())
                self.dirty = False
