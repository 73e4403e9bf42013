"""Firecracker's HTTP API over its Unix socket (stdlib ``http.client``): ``ApiClient``, one
connection per request, and ``ApiError`` for a refusal or no answer. ``runner.vmm.fcapi``
(which re-exports both) builds the requests and runs one VM's lifecycle.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from pathlib import Path
from typing import Any

from helper.base.errors import KilnError


class ApiError(KilnError):
    """Firecracker's API refused a request or did not answer."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self._path)
        except OSError:
            s.close()
            raise
        self.sock = s


class ApiClient:
    """Firecracker's HTTP API over its Unix socket (one connection per request)."""

    def __init__(self, sock: Path, timeout: float = 5.0) -> None:
        self.sock = sock
        self.timeout = timeout

    def request(self, method: str, path: str, body: dict[str, Any] | None = None
                ) -> tuple[int, Any]:
        conn = _UnixConnection(str(self.sock), self.timeout)
        try:
            payload = json.dumps(body) if body is not None else None
            headers = {"Accept": "application/json"}
            if payload is not None:
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise ApiError(f"Firecracker API {method} {path} failed: {e}",
                           f"is Firecracker running? see its console.log ({self.sock})"
                           ) from None
        finally:
            conn.close()
        data = json.loads(raw) if raw.strip() else None
        return resp.status, data

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        status, data = self.request(method, path, body)
        if not 200 <= status < 300:
            fault = data.get("fault_message") if isinstance(data, dict) else data
            raise ApiError(f"Firecracker refused {method} {path} ({status}): {fault}",
                           "see firecracker.log in the VM's jail")
        return data

    def get(self, path: str) -> Any:
        return self.call("GET", path)

    def put(self, path: str, body: dict[str, Any]) -> None:
        self.call("PUT", path, body)

    def action(self, action_type: str) -> None:
        self.put("/actions", {"action_type": action_type})

    def wait_ready(self, timeout: float = 5.0) -> dict[str, Any]:
        """``GET /`` until it answers (the socket exists before the server accepts)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                info: dict[str, Any] = self.get("/")
                return info
            except ApiError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)


