"""Test support: real registries on loopback, with auth, and a fault-injecting proxy.

Fixtures:

* ``registry``: a plain ``LocalRegistry`` (session-scoped; tests use their own repo names).
* ``auth_registry``: a registry with one htpasswd user; ``.authfile`` holds its credentials
  in the containers auth.json format.
* ``fault_proxy``: a ``FaultProxy`` in front of ``registry``; ``set_fault(...)`` switches
  what it does to matching requests (truncate, corrupt, 401, 404, 429, 503, stall).
* ``closed_address``: ``127.0.0.1:PORT`` with nothing listening (a registry that is down).
"""

from __future__ import annotations

import base64
import http.client
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from builder.localregistry import LocalRegistry, free_port

FAULTS = ("truncate", "corrupt", "401", "404", "429", "503", "stall")

_ERROR_BODY = {
    401: ("UNAUTHORIZED", "authentication required"),
    404: ("MANIFEST_UNKNOWN", "manifest unknown"),
    429: ("TOOMANYREQUESTS", "too many requests"),
    503: ("UNAVAILABLE", "service unavailable"),
}


@dataclass(frozen=True)
class AuthRegistry:
    registry: LocalRegistry
    username: str
    password: str
    authfile: Path

    @property
    def address(self) -> str:
        return self.registry.address


def write_authfile(path: Path, address: str, username: str, password: str) -> Path:
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {address: {"auth": token}}}))
    return path


class FaultProxy:
    """A threaded HTTP proxy to ``upstream`` that misbehaves on request.

    ``set_fault(kind, times=N, match=S)``: the next ``N`` requests whose path contains ``S``
    (``-1``: all of them) get the fault; others pass through unchanged. ``hits`` counts
    faulted requests. ``truncate`` sends half of the body and closes the connection;
    ``corrupt`` flips bytes keeping the length; ``stall`` never answers.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.fault: str | None = None
        self.times = 0
        self.match = "/manifests/"
        self.hits = 0
        self._lock = threading.Lock()
        self._closing = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                proxy._handle(self)

            def do_HEAD(self) -> None:
                proxy._handle(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    def set_fault(self, kind: str | None, *, times: int = -1, match: str = "/manifests/") -> None:
        assert kind is None or kind in FAULTS, kind
        with self._lock:
            self.fault, self.times, self.match, self.hits = kind, times, match, 0

    def _take(self, path: str) -> str | None:
        with self._lock:
            if self.fault is None or self.match not in path or self.times == 0:
                return None
            if self.times > 0:
                self.times -= 1
            self.hits += 1
            return self.fault

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        fault = self._take(h.path)
        if fault == "stall":
            self._closing.wait(120)
            h.close_connection = True
            return
        if fault in ("401", "404", "429", "503"):
            code = int(fault)
            err, msg = _ERROR_BODY[code]
            body = json.dumps({"errors": [{"code": err, "message": msg}]}).encode()
            h.send_response(code)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            h.send_header("Docker-Distribution-API-Version", "registry/2.0")
            if code == 401:
                h.send_header("WWW-Authenticate", 'Basic realm="fault-proxy"')
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(body)
            return
        conn = http.client.HTTPConnection(self.upstream, timeout=30)
        try:
            # header by header: registries' clients send several Accept headers
            conn.putrequest(h.command, h.path, skip_accept_encoding=True)
            for k, v in h.headers.items():
                if k.lower() not in ("connection", "host"):
                    conn.putheader(k, v)
            conn.endheaders()
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        if fault == "corrupt" and body:
            body = bytes(b ^ 0xFF for b in body[:64]) + body[64:]
        h.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("connection", "transfer-encoding", "content-length"):
                h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command == "HEAD":
            return
        if fault == "truncate":
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        h.wfile.write(body)

    def close(self) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="session")
def registry() -> Iterator[LocalRegistry]:
    with LocalRegistry() as reg:
        yield reg


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthRegistry]:
    user, password = "kiln", "s3cret-pass"
    with LocalRegistry(users={user: password}) as reg:
        authfile = write_authfile(tmp_path_factory.mktemp("auth") / "auth.json", reg.address,
                                  user, password)
        yield AuthRegistry(reg, user, password, authfile)


@pytest.fixture
def fault_proxy(registry: LocalRegistry) -> Iterator[FaultProxy]:
    proxy = FaultProxy(registry.address)
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture
def closed_address() -> str:
    return f"127.0.0.1:{free_port()}"
