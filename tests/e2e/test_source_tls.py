"""A plain-HTTP registry reached without --tls-verify=false: `kiln build`, `kiln push` and
`kiln pull` fail at once (no retries) with one line naming the registry and the flag.

The registry is a real docker-registry on loopback (plain HTTP); skopeo says "http: server
gave HTTP response to HTTPS client", requests says "WRONG_VERSION_NUMBER". Timings are loose
(the retry budget is 60 s; a busy machine must not fail these)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from builder.localregistry import LocalRegistry
from tests.support.cli import kiln
from tests.support.images import push_busybox

# half the retry budget, far above one failed handshake (not scaled: the budget is not)
LOOSE = 30.0


def expect_tls_error(res: subprocess.CompletedProcess[str], took: float, address: str) -> None:
    assert res.returncode == 1, res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines == [f"error: registry {address} answered HTTPS with plain HTTP",
                     "hint: it speaks plain HTTP: pass --tls-verify=false (or --no-tls-verify) "
                     "to use it without TLS"], res.stderr
    assert took < LOOSE, took


def timed(root: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    res = kiln(root, *args, check=False)
    return res, time.monotonic() - start


def test_build_fails_at_once_without_retrying(registry: LocalRegistry, tmp_path: Path) -> None:
    ref = push_busybox(registry.address, "tls/busybox")
    res, took = timed(tmp_path, "--debug", "build", ref)
    assert res.returncode == 1
    # --debug logs each tool command line ("kiln.proc: run: ..."): one skopeo, no retries.
    runs = [ln for ln in res.stderr.splitlines() if ln.startswith("kiln.proc: run: ")]
    assert len(runs) == 1, runs
    assert "skopeo" in runs[0]
    res, took = timed(tmp_path, "build", ref)
    expect_tls_error(res, took, registry.address)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["push", "pull"])
def test_push_and_pull_fail_at_once(registry: LocalRegistry, tmp_path: Path,
                                    command: str) -> None:
    ref = push_busybox(registry.address, "tls/busybox")
    vid = json.loads(kiln(tmp_path, "build", ref, "--tls-verify=false", "--json").stdout)["id"]
    target = f"{registry.address}/tls/volume:1"
    if command == "push":
        res, took = timed(tmp_path, "push", vid, target)
    else:
        kiln(tmp_path, "push", vid, target, "--tls-verify=false")
        res, took = timed(tmp_path / "fresh", "pull", target)
    expect_tls_error(res, took, registry.address)
