"""builder.localregistry and builder.demoimage against the real registry, umoci and skopeo."""

from __future__ import annotations

import json
import os
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from builder import proc
from builder.demoimage import make_busybox_image, push
from builder.localregistry import Access, LocalRegistry, registry_config
from tests.support.images import busybox_layout
from tests.support.registry import AuthRegistry


def _status(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}),
                                    timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code


def test_registry_config_is_exact(tmp_path: Path) -> None:
    cfg = json.loads(registry_config(5123, tmp_path / "d", tmp_path / "h"))
    assert cfg == {
        "version": 0.1,
        "log": {"level": "info", "accesslog": {"disabled": False}},
        "storage": {"filesystem": {"rootdirectory": str(tmp_path / "d")},
                    "delete": {"enabled": True}},
        "http": {"addr": "127.0.0.1:5123"},
        "auth": {"htpasswd": {"realm": "kiln-local", "path": str(tmp_path / "h")}},
    }
    assert "auth" not in json.loads(registry_config(1, tmp_path, None))


def test_start_log_and_stop_leaves_nothing(tmp_path: Path) -> None:
    with LocalRegistry(data_dir=tmp_path / "data") as reg:
        assert reg.address.startswith("127.0.0.1:")
        assert _status(f"http://{reg.address}/v2/") == 200
        assert _status(f"http://{reg.address}/v2/nope/manifests/1") == 404
        pid = reg._proc.pid if reg._proc else 0
        log = reg.access_log()
        assert Access("GET", "/v2/nope/manifests/1", 404) in log
        base = reg._base
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not base.exists()
    assert (tmp_path / "data").is_dir()  # the caller's data dir stays
    assert Access("GET", "/v2/nope/manifests/1", 404) in reg.access_log()


def test_htpasswd_registry(auth_registry: AuthRegistry) -> None:
    url = f"http://{auth_registry.address}/v2/"
    assert _status(url) == 401
    import base64
    good = base64.b64encode(f"{auth_registry.username}:{auth_registry.password}".encode())
    bad = base64.b64encode(f"{auth_registry.username}:wrong".encode())
    assert _status(url, {"Authorization": "Basic " + good.decode()}) == 200
    assert _status(url, {"Authorization": "Basic " + bad.decode()}) == 401


def _manifest(layout: Path, tag: str) -> dict[str, object]:
    out = proc.run("skopeo", ["inspect", "--raw", f"oci:{layout}:{tag}"]).stdout
    doc = json.loads(out)
    assert isinstance(doc, dict)
    return doc


def test_busybox_image_is_deterministic_and_shares_its_base(tmp_path: Path) -> None:
    make_busybox_image(tmp_path / "a", "1")
    make_busybox_image(tmp_path / "b", "1")
    make_busybox_image(tmp_path / "b", "2", extra_files={"/etc/motd": b"hi\n"})
    one_a, one_b, two = (_manifest(tmp_path / "a", "1"), _manifest(tmp_path / "b", "1"),
                         _manifest(tmp_path / "b", "2"))
    assert one_a == one_b
    assert two["layers"][0] == one_a["layers"][0]  # type: ignore[index]
    assert len(two["layers"]) == 2  # type: ignore[arg-type]
    cfg = json.loads(proc.run("skopeo", ["inspect", "--config", f"oci:{tmp_path / 'b'}:2"])
                     .stdout)
    assert cfg["config"]["Cmd"] == ["/bin/sh"]
    assert cfg["os"] == "linux"
    layer = one_a["layers"][0]["digest"][7:]  # type: ignore[index]
    with tarfile.open(tmp_path / "a" / "blobs" / "sha256" / layer) as t:
        members = {m.name: m for m in t.getmembers()}
    assert members["bin/busybox"].isfile()
    assert members["bin/busybox"].mode == 0o755
    assert members["bin/sh"].issym()
    assert members["bin/sh"].linkname == "busybox"
    assert members["tmp"].mode == 0o1777
    assert all(m.mtime == 0 and m.uid == 0 for m in members.values())
    with pytest.raises(Exception, match="not an absolute file path"):
        make_busybox_image(tmp_path / "c", "1", extra_files={"etc/x": b""})


def test_push_and_inspect(registry: LocalRegistry) -> None:
    layout = busybox_layout()
    ref = f"docker://{registry.address}/test/pushed:1"
    push(layout, "1", ref)
    remote = proc.run("skopeo", ["inspect", "--raw", "--tls-verify=false", ref]).stdout
    assert json.loads(remote) == _manifest(layout, "1")
