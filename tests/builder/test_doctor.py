"""kiln doctor / kiln version: real tools, real probes, structured results with hints."""

from __future__ import annotations

import importlib.metadata
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from builder import doctor
from builder.doctor import Check


def test_versions_ask_the_real_tools() -> None:
    v = doctor.versions()
    assert v["kiln"] == importlib.metadata.version("kiln-vm")
    for tool in ("skopeo", "umoci", "mke2fs", "docker-registry", "qemu-system-x86_64",
                 "qemu-img"):
        assert tool in v
    # installed per the project's install script: real versions, not placeholders
    assert re.fullmatch(r"\d+\.\d+\.\d+", v["skopeo"])
    assert re.fullmatch(r"1\.\d+\.\d+", v["mke2fs"])  # read from stderr (-V)
    for optional in ("firecracker", "jailer"):
        if optional in v:
            assert v[optional] != "missing"


@pytest.mark.parametrize(("line", "version"), [
    ("skopeo version 1.9.3", "1.9.3"),
    ("umoci version 0.4.7+ds-3+b7", "0.4.7"),
    ("mke2fs 1.47.2 (1-Jan-2025)", "1.47.2"),
    ("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)", "7.2.22"),
    ("github.com/docker/distribution 2.8.2+ds1", "2.8.2"),
    ("no digits here", "no digits here"),
])
def test_parse_version(line: str, version: str) -> None:
    assert doctor.parse_version(line) == version


def test_e2fsprogs_minimum() -> None:
    assert doctor.version_tuple("1.47.0") < doctor.E2FSPROGS_MIN
    assert doctor.version_tuple("1.47.1") >= doctor.E2FSPROGS_MIN
    assert doctor.version_tuple("1.48") >= doctor.E2FSPROGS_MIN
    assert doctor.check_tool("mke2fs", ("-V",)).ok  # the installed one is new enough


def test_missing_tool_has_install_hint() -> None:
    c = doctor.check_tool("kiln-no-such-tool", ("--version",))
    assert c == Check("kiln-no-such-tool", False, "not installed",
                      "apt-get install kiln-no-such-tool", False)
    assert doctor.check_tool("skopeo", ("--version",)).required


def test_checks_are_structured(tmp_path: Path) -> None:
    boot = tmp_path / "boot"
    boot.mkdir()
    result = doctor.checks(tmp_path / "root", boot=boot)
    names = [c.name for c in result]
    for name in ("skopeo", "umoci", "mke2fs", "root", "libmagic", "loop devices", "dm-thin",
                 "kvm", "kernel"):
        assert name in names
    assert any(n.startswith("reflink (") for n in names)
    for c in result:
        assert isinstance(c, Check)
        assert c.detail
        if not c.ok:
            assert c.hint, f"{c.name} fails without a hint"
    kernel = next(c for c in result if c.name == "kernel")
    assert kernel == Check("kernel", False,
                           f"no Debian cloud kernel (vmlinuz-*-cloud-amd64) in {boot}",
                           doctor.KERNEL_HINT)
    required = {c.name for c in result if c.required}
    assert required == {"skopeo", "umoci", "mke2fs", "root", "libmagic"}
    assert all(c.ok for c in result if c.required)  # this host can build


def _touch(p: Path) -> None:
    p.write_bytes(b"x")


def test_find_kernel_picks_newest_with_initrd(tmp_path: Path) -> None:
    assert doctor.find_kernel(tmp_path) is None
    for v in ("6.1.0-9", "6.1.0-10", "6.1.0-11"):
        _touch(tmp_path / f"vmlinuz-{v}-cloud-amd64")
    _touch(tmp_path / "vmlinuz-6.9.0-1-amd64")  # not the cloud flavour
    _touch(tmp_path / "initrd.img-6.9.0-1-amd64")
    _touch(tmp_path / "initrd.img-6.1.0-9-cloud-amd64")
    _touch(tmp_path / "initrd.img-6.1.0-10-cloud-amd64")
    # 6.1.0-11 has no initrd; 10 > 9 numerically (not as text)
    assert doctor.find_kernel(tmp_path) == (tmp_path / "vmlinuz-6.1.0-10-cloud-amd64",
                                            tmp_path / "initrd.img-6.1.0-10-cloud-amd64")


def test_kernel_without_initrd_hints_update_initramfs(tmp_path: Path) -> None:
    _touch(tmp_path / "vmlinuz-6.1.0-9-cloud-amd64")
    c = doctor.check_kernel(tmp_path)
    assert not c.ok
    assert c.hint == "update-initramfs -c -k 6.1.0-9-cloud-amd64"


def test_host_kernel_if_installed() -> None:
    found = doctor.find_kernel()
    if found is not None:
        kernel, initrd = found
        assert kernel.name.startswith("vmlinuz-")
        assert kernel.name.endswith("-cloud-amd64")
        assert initrd.read_bytes()[:2]  # readable


def test_root_check(tmp_path: Path) -> None:
    assert doctor.check_root(tmp_path / "a" / "b").ok
    (tmp_path / "file").write_text("")
    c = doctor.check_root(tmp_path / "file" / "kiln")
    assert c == Check("root", False, f"{tmp_path / 'file'} is not a writable directory",
                      f"choose another root with --root or KILN_ROOT, or chown "
                      f"{tmp_path / 'file'}", True)


class _Handler(BaseHTTPRequestHandler):
    status = 401

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/v2/" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_registry() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_registry_reachable_over_http(fake_registry: str) -> None:
    c = doctor.check_registry(f"http://{fake_registry}")
    assert c == Check(f"registry http://{fake_registry}", True,
                      f"http://{fake_registry}/v2/ answered 401")
    # bare HOST:PORT: https is tried first, then plain http
    bare = doctor.check_registry(fake_registry)
    assert bare.ok
    assert bare.detail == f"http://{fake_registry}/v2/ answered 401"


def test_registry_wrong_answer_and_refused(fake_registry: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_Handler, "status", 500)
    c = doctor.check_registry(f"http://{fake_registry}")
    assert not c.ok
    assert c.detail == f"http://{fake_registry}/v2/: HTTP 500"
    host = fake_registry.split(":", maxsplit=1)[0]
    closed = doctor.check_registry(f"http://{host}:1", timeout=2)
    assert not closed.ok
    assert "Connection refused" in closed.detail
    assert closed.hint.startswith("start the registry")
