"""The HTTP client of ``kiln push``/``pull``/``refresh``: oras's Registry for one host, with
kiln's retries, Basic auth and upload progress.

HTTP goes through ``oras.provider.Registry`` (session, auth files, token auth, HEAD-first
chunked upload). ``Client`` overrides ``do_request`` only: oras's retry decorator sleeps
3+5+11+29+83 s on *any* error, and its token backend would fetch a "token" from a Basic
realm. Ours retries 429/5xx/timeouts with ``source.backoff`` inside a budget (never a TLS
handshake that cannot succeed: ``source.tls_failure``), answers Basic challenges itself and
reports upload progress (``upload``, set by the push).

Dependency direction: ``builder.publish`` and ``builder.refresh`` import this module.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

import oras.provider
import requests

from builder.events import Event, Progress
from builder.source import REFUSED_ATTEMPTS, RegistryOptions, backoff, tls_failure
from helper.base.errors import RegistryError, UsageError

BUDGET = 60.0  # seconds of retrying one request before giving up
CONNECT_TIMEOUT, READ_TIMEOUT = 5.0, 60.0
_TRANSIENT = frozenset({429, 500, 502, 503, 504})


class Client(oras.provider.Registry):  # type: ignore[misc]
    """oras's Registry for one host, with kiln's retries, Basic auth and upload progress."""

    def __init__(self, host: str, opts: RegistryOptions, *, budget: float | None = None) -> None:
        super().__init__(hostname=host, insecure=False, tls_verify=opts.tls_verify,
                         auth_backend="token")
        self.host = host
        self.budget = BUDGET if budget is None else budget
        self._authz: str | None = None
        self.upload: tuple[Progress, str, int] | None = None  # progress, digest, total
        self.uploaded = 0
        authfile = opts.authfile or _env_authfile()
        if authfile is not None and not authfile.is_file():
            raise UsageError(f"auth file {authfile} does not exist", "pass an existing --authfile")
        self.auth.load_configs(self.get_container(f"{host}/x"),
                               configs=[str(authfile)] if authfile else None)
        if not opts.tls_verify:
            self.prefix = self.auth.prefix = self._scheme()

    def _scheme(self) -> str:
        """With ``--tls-verify=false``: HTTPS without verification if the host speaks it,
        else plain HTTP (what skopeo and podman do)."""
        try:
            self.session.get(f"https://{self.host}/v2/", verify=False,
                             timeout=(CONNECT_TIMEOUT, CONNECT_TIMEOUT))
        except requests.exceptions.SSLError:
            return "http"
        except requests.RequestException:
            pass  # down or slow: the real request reports it
        return "https"

    def url(self, repo: str, kind: str, ref: str) -> str:
        return f"{self.prefix}://{self.host}/v2/{repo}/{kind}/{ref}"

    def do_request(self, url: str, method: str = "GET", data: Any = None,
                   headers: dict[str, str] | None = None, json: Any = None,
                   stream: bool = False) -> requests.Response:
        start, attempt, refused = time.monotonic(), 0, 0
        while True:
            try:
                resp = self._authed(url, method, data, dict(headers or {}), json, stream)
                if resp.status_code not in _TRANSIENT:
                    if method == "PATCH" and resp.status_code == 202:
                        self._progress(len(data))
                    return resp
                why = f"HTTP {resp.status_code}"
                resp.close()
            except requests.exceptions.SSLError as e:  # before ConnectionError, its base
                why = "TLS handshake failed"
                if (tls := tls_failure(self.host, str(e))) is not None:
                    raise tls from None
            except requests.exceptions.ConnectionError as e:
                if isinstance(e, requests.exceptions.ConnectTimeout) or "refused" not in str(e):
                    why = "connection failed"
                else:
                    refused += 1
                    why = "connection refused"
                    if refused >= REFUSED_ATTEMPTS:
                        raise RegistryError(f"cannot connect to registry {self.host}: {why}",
                                            "check the address and that the registry is "
                                            "running") from None
            except requests.exceptions.Timeout:
                why = "timed out"
            delay = backoff(attempt)
            if time.monotonic() - start + delay >= self.budget:
                raise RegistryError(f"registry {self.host} kept failing for "
                                    f"{self.budget:g} s: {why}",
                                    "the registry is overloaded, down or slow; retry later")
            time.sleep(delay)
            attempt += 1

    def _authed(self, url: str, method: str, data: Any, headers: dict[str, str], body: Any,
                stream: bool) -> requests.Response:
        def send() -> requests.Response:
            h = dict(headers)
            if self._authz:
                h["Authorization"] = self._authz
            r: requests.Response = self.session.request(
                method, url, data=data, json=body, headers=h, stream=stream,
                verify=self._tls_verify, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
            return r

        resp = send()
        if resp.status_code != 401:
            return resp
        challenge = resp.headers.get("Www-Authenticate", "")
        basic = getattr(self.auth, "_basic_auth", None)
        if challenge.lower().startswith("basic") and basic:
            self._authz = f"Basic {basic}"
        elif challenge.lower().startswith("bearer"):
            h, ok = self.auth.authenticate_request(resp, {}, refresh=self._authz is not None)
            if ok:
                self._authz = h["Authorization"]
        sent = resp.request.headers.get("Authorization")
        refused = sent is not None and sent == self._authz
        resp.close()
        if self._authz is not None and not refused:
            resp = send()
            refused = resp.status_code == 401
        if self._authz is None or refused:
            raise RegistryError(f"authentication failed for {self.host}",
                                "the registry refused the credentials; check the --authfile"
                                if refused else "pass --authfile FILE with credentials for "
                                "this registry (or set REGISTRY_AUTH_FILE)")
        return resp

    def _progress(self, n: int) -> None:
        self.uploaded += n
        if self.upload is not None:
            progress, digest, total = self.upload
            progress.emit(Event("bytes", "upload", digest, self.uploaded, total))

    def check(self, resp: requests.Response, what: str) -> requests.Response:
        if resp.status_code in (200, 201, 202):
            return resp
        detail = _error_text(resp)
        if resp.status_code == 404:
            raise RegistryError(f"{what}: not found ({detail})",
                                "check the reference (`skopeo inspect docker://REF`)")
        if resp.status_code in (401, 403):
            raise RegistryError(f"{what}: access denied ({detail})",
                                "pass --authfile FILE with credentials that may do this")
        raise RegistryError(f"{what}: registry answered HTTP {resp.status_code} ({detail})",
                            "check the registry's log")


def _env_authfile() -> Path | None:
    env = os.environ.get("REGISTRY_AUTH_FILE")
    return Path(env) if env else None


def _error_text(resp: requests.Response) -> str:
    with contextlib.suppress(ValueError, KeyError, TypeError, IndexError):
        return str(resp.json()["errors"][0]["message"])
    return resp.reason or "no detail"
