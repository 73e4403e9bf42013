"""Firecracker's serial console → kiln's console log, workload stdout and stderr.

Firecracker 1.12.1 has one guest channel, the serial console (no virtio-console, no ``PUT
/serial``), written to the jail's ``console.log``. ``ConsoleSplit`` (pure) turns it into
kiln's three files: lines between kiln-init's ``starting`` and ``workload exited N``
markers are the workload's stdout (kernel messages printed meanwhile land there too: the
kernel runs ``quiet``, so only warnings), kiln-init's own errors (``kiln: …``) go to
stderr, everything else to ``console.log`` (``kiln logs``). The exit status is the
``workload exited N`` marker; the tty's ``\\r\\n`` becomes ``\\n``. There is no stdin
(``-i``) and no separate stderr: the workload's stderr is mixed into stdout.

``Channels`` pumps the jail's ``console.log`` through the split into the VM directory's
files, and onto kiln's stdout/stderr when ``kiln run`` runs in the foreground.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

START_MARK = "kiln-init: starting "
# "workload exited N" after the workload; "exit N" from kiln-init's finish (without a status
# port it reports there every exit, its own failures 125-127 included)
EXIT_MARK = re.compile(r"^kiln-init: (?:workload exited|exit) (\d+)$")
# kiln-init's own failures (runner/guest_init/init.sh) and the exit status it gives them.
INIT_FAILURES = (
    (re.compile(r"^kiln: .*: executable file not found in \$PATH$"), 127),
    (re.compile(r"^kiln: (unable to find (user|group) |cannot enter working directory |"
                r"no command to run)"), 126),
)


# -- the split (pure) ------------------------------------------------------------------------

@dataclass
class ConsoleSplit:
    """Firecracker's serial console → (console log, workload stdout, workload stderr)."""

    buf: bytes = b""
    in_workload: bool = False
    exit_code: int | None = None
    seen: list[str] = field(default_factory=list)  # the last few console lines (reasons)

    def feed(self, data: bytes, final: bool = False) -> tuple[bytes, bytes, bytes]:
        self.buf += data
        lines = self.buf.split(b"\n")
        self.buf = lines.pop()
        if final and self.buf:
            lines.append(self.buf)
            self.buf = b""
        con, out, err = [], [], []
        for raw in lines:
            line = raw.rstrip(b"\r") + b"\n"  # the tty turns \n into \r\n
            text = line[:-1].decode("utf-8", "replace")
            if text.startswith("kiln-init: "):
                con.append(line)
                if text.startswith(START_MARK):
                    self.in_workload = True
                m = EXIT_MARK.match(text)
                if m:
                    self.exit_code, self.in_workload = int(m.group(1)), False
            elif self.in_workload:
                out.append(line)
            elif code := next((c for rx, c in INIT_FAILURES if rx.match(text)), None):
                err.append(line)
                if self.exit_code is None:
                    self.exit_code = code
            else:
                con.append(line)
                if text.strip():
                    self.seen = [*self.seen[-4:], text.strip()]
        return b"".join(con), b"".join(out), b"".join(err)


def vmm_exit_code(log_text: str) -> int | None:
    """Firecracker's own exit code from its log (``exit_code=N``), if it logged one."""
    found = re.findall(r"exit_code=(\d+)", log_text)
    return int(found[-1]) if found else None


# -- the pump ---------------------------------------------------------------------------------

@dataclass
class Channels:
    """Copies the jail's console.log into the VM's console/stdout/stderr files."""

    src: Path
    console: Path
    stdout: Path
    stderr: Path
    relay: bool
    split: ConsoleSplit = field(default_factory=ConsoleSplit)
    pos: int = 0

    def pump(self, final: bool = False) -> None:
        try:
            with open(self.src, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except OSError:
            data = b""
        self.pos += len(data)
        if not data and not final:
            return
        con, out, err = self.split.feed(data, final)
        for path, chunk, fd in ((self.console, con, None), (self.stdout, out, 1),
                                (self.stderr, err, 2)):
            if not chunk:
                continue
            with open(path, "ab") as f:
                f.write(chunk)
            if self.relay and fd is not None:
                with contextlib.suppress(BrokenPipeError):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
