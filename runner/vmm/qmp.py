"""A minimal QMP client (QEMU's JSON monitor) for warm start's save and restore.

One unix socket (``-qmp unix:PATH,server=on,wait=off``, ``runner.vmm.qemuargv``), opened
by QEMU before it chroots and drops root, so kiln (root or the caller, as QEMU started)
connects. ``execute`` sends one command — with an fd attached as SCM_RIGHTS for
``getfd`` — and returns its ``return`` value, keeping the events that arrive meanwhile;
``wait_event`` waits for one. Every read has a deadline: a QEMU that hangs or dies ends
in a ``QmpError``, never a hung kiln.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from helper.base.errors import KilnError


class QmpError(KilnError):
    def __init__(self, message: str) -> None:
        super().__init__(message, "see the VM's vmm.log (`kiln logs` shows the console)")


class Qmp:
    def __init__(self, path: Path, *, timeout: float = 30.0,
                 alive: Callable[[], bool] | None = None) -> None:
        """Connect (QEMU makes the socket as it starts); ``alive``: False once QEMU has
        exited, which ends the wait at once."""
        deadline = time.monotonic() + timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        while True:
            try:
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                gone = alive is not None and not alive()
                if gone or time.monotonic() > deadline:
                    self.sock.close()
                    raise QmpError(f"QEMU exited before its monitor {path} answered" if gone
                                   else f"QEMU's monitor {path} did not answer") from None
                time.sleep(0.005)
        self.timeout = timeout
        self._buf = b""
        self.events: list[dict[str, Any]] = []
        self._read(deadline)  # the greeting
        self.execute("qmp_capabilities")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QmpError("QEMU's monitor did not answer in time")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as e:
                raise QmpError(f"QEMU's monitor: {e}") from None
            if not chunk:
                raise QmpError("QEMU closed its monitor (it exited)")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        doc = json.loads(line)
        if not isinstance(doc, dict):
            raise QmpError(f"QEMU's monitor sent {line[:80]!r}")
        return doc

    def execute(self, cmd: str, args: dict[str, Any] | None = None, *,
                fd: int | None = None, timeout: float | None = None) -> Any:
        msg = json.dumps({"execute": cmd, **({"arguments": args} if args else {})}).encode()
        try:
            if fd is None:
                self.sock.sendall(msg)
            else:
                socket.send_fds(self.sock, [msg], [fd])
        except OSError as e:
            raise QmpError(f"QEMU's monitor: {e}") from None
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            doc = self._read(deadline)
            if "event" in doc:
                self.events.append(doc)
            elif "error" in doc:
                raise QmpError(f"QEMU refused {cmd}: {doc['error'].get('desc', doc)}")
            elif "return" in doc:
                return doc["return"]

    def wait_event(self, name: str, *, data: dict[str, Any] | None = None,
                   timeout: float | None = None) -> dict[str, Any]:
        """The first event ``name`` (whose data has ``data``'s items), kept or new."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            for i, ev in enumerate(self.events):
                if ev.get("event") == name and \
                        all(ev.get("data", {}).get(k) == v for k, v in (data or {}).items()):
                    return self.events.pop(i)
            doc = self._read(deadline)
            if "event" in doc:
                self.events.append(doc)
