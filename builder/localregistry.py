"""A throw-away OCI registry on 127.0.0.1, for the offline demo and the tests.

``LocalRegistry`` runs Debian's ``docker-registry`` (distribution 2.8) on a free loopback
port with its own data directory and, optionally, htpasswd users. It writes the registry's
log to a file and parses the access-log lines from it, so tests can prove what was (and was
not) fetched.

The registry is a long-running server that must outlive the call that starts it and be
stopped explicitly, so it is started with ``proc.spawn`` (not ``proc.run``): resolved on the
fixed search path, the allowlisted environment, its own session, SIGKILLed if the caller
dies; ``stop`` ends its process group, so nothing is left running.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from builder import proc
from builder.root import rmtree
from helper.base.errors import KilnError
from helper.base.fileops import atomic_write

# One access-log line as distribution 2.8 writes it (Apache combined format):
# 127.0.0.1 - - [23/Nov/2026:11:56:39 +0000] "GET /v2/x/blobs/sha256:.. HTTP/1.1" 200 349 "" "ua"
_ACCESS = re.compile(r'^\S+ \S+ \S+ \[[^]]*\] "(?P<method>[A-Z]+) (?P<path>\S+) [^"]*" '
                     r"(?P<status>\d{3}) ")

START_TIMEOUT = 15.0


@dataclass(frozen=True)
class Access:
    """One request the registry answered."""

    method: str
    path: str
    status: int


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bcrypt_hash(password: str) -> str:
    """A bcrypt hash for an htpasswd file (distribution accepts bcrypt only).

    Python's ``crypt`` module calls glibc's libxcrypt, which implements ``$2b$``; the module
    is deprecated (gone in Python 3.13), so the import is local and its warning silenced.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt

    hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=1 << 4))  # noqa: S324
    if not hashed or not hashed.startswith("$2"):
        raise KilnError("this system's crypt() cannot make bcrypt hashes",
                        "install libxcrypt (libcrypt1) with bcrypt support")
    return hashed


def registry_config(port: int, data_dir: Path, htpasswd: Path | None) -> str:
    """The registry's YAML config (JSON is valid YAML; no yaml library needed)."""
    cfg: dict[str, object] = {
        "version": 0.1,
        "log": {"level": "info", "accesslog": {"disabled": False}},
        "storage": {"filesystem": {"rootdirectory": str(data_dir)},
                    "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}"},
    }
    if htpasswd is not None:
        cfg["auth"] = {"htpasswd": {"realm": "kiln-local", "path": str(htpasswd)}}
    return json.dumps(cfg, indent=2) + "\n"


class LocalRegistry:
    """``with LocalRegistry() as reg: reg.address`` -> ``"127.0.0.1:PORT"``."""

    def __init__(self, data_dir: Path | None = None,
                 users: Mapping[str, str] | None = None) -> None:
        # config, htpasswd and log live in a private directory removed on stop; the data
        # dir is the caller's when given (it survives), else a subdirectory of that one
        self._base = Path(tempfile.mkdtemp(prefix="kiln-registry-"))
        self.data_dir = data_dir if data_dir is not None else self._base / "data"
        self.log_path = self._base / "registry.log"
        self.users = dict(users or {})
        self.port = 0
        self._proc: proc.Child | None = None
        self._log_text = ""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> LocalRegistry:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        exe = proc.which("docker-registry")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        htpasswd = None
        if self.users:
            htpasswd = self._base / "htpasswd"
            lines = "".join(f"{u}:{bcrypt_hash(p)}\n" for u, p in sorted(self.users.items()))
            atomic_write(htpasswd, lines.encode(), 0o600)
        # The port is free when picked but could be taken before the registry binds it:
        # try a few ports rather than fail on that race.
        for _ in range(5):
            self.port = free_port()
            cfg = self._base / "config.yml"
            atomic_write(cfg, registry_config(self.port, self.data_dir, htpasswd).encode())
            log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                          0o644)
            try:
                self._proc = proc.spawn(exe, ["serve", str(cfg)], stdout=log, stderr=log)
            finally:
                os.close(log)
            if self._wait_ready():
                return
            self._kill()
        raise KilnError("the local registry did not start",
                        f"see its log: {self.log_path}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"http://{self.address}/v2/", timeout=2):
                    return True
            except urllib.error.HTTPError as e:  # 401 with auth enabled: it is up
                return e.code == 401
            except OSError:
                time.sleep(0.05)
        return False

    def _kill(self) -> None:
        p, self._proc = self._proc, None
        if p is None:
            return
        p.kill(signal.SIGTERM)  # its process group: it leads its own session
        if p.wait(timeout=5) is None:
            p.kill(signal.SIGKILL)
            p.wait()

    def stop(self) -> None:
        """Stop the server (no process is left); remove its config, log and own data."""
        self._kill()
        if self._base.exists():
            with contextlib.suppress(OSError):
                self._log_text = self.log_path.read_text("utf-8", "replace")
            rmtree(self._base)

    def access_log(self) -> list[Access]:
        """Every request answered so far, oldest first."""
        try:
            text = self.log_path.read_text("utf-8", "replace")
        except FileNotFoundError:  # stopped: the log as it was at the end
            text = self._log_text
        out = []
        for line in text.splitlines():
            m = _ACCESS.match(line)
            if m:
                out.append(Access(m["method"], m["path"], int(m["status"])))
        return out
