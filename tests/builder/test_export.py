"""kiln volume export: raw equals the volume byte for byte (holes kept), qcow2 is what
`qemu-img compare` calls identical, and FILE is replaced atomically."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from builder import proc
from builder.export import export_volume, qemu_img_argv, unzstd_hashed
from builder.localregistry import LocalRegistry
from builder.pipeline import build
from builder.root import Root
from builder.source import RegistryOptions
from builder.store import Volume, hash_file
from helper.base.errors import ToolError, UsageError
from helper.base.fileops import sparse_copy
from tests.support.images import push_busybox

KILN_DIST = [sys.executable, "-c",
             "from runner.cli import cli; cli(prog_name='kiln')"]


@pytest.fixture(scope="module")
def vol(registry: LocalRegistry, tmp_path_factory: pytest.TempPathFactory) -> Volume:
    ref = push_busybox(registry.address, "exportsrc/busybox", "1")
    root = Root(tmp_path_factory.mktemp("exproot") / "root")
    return build(root, ref, RegistryOptions(tls_verify=False)).volume


def test_qemu_img_argv() -> None:
    assert qemu_img_argv(Path("/v/volume.ext4"), Path("/o/.d.tmp")) == [
        "convert", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zlib",
        "/v/volume.ext4", "/o/.d.tmp"]


def test_sparse_copy_keeps_holes_and_bytes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    with open(src, "wb") as f:
        f.seek(1 << 20)
        f.write(b"data" * 1024)
        f.seek(8 << 20)
        f.write(b"end")
        f.truncate(16 << 20)  # a trailing hole
    fd = os.open(tmp_path / "dst", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.ftruncate(fd, src.stat().st_size)
        sparse_copy(src, fd)
    finally:
        os.close(fd)
    assert (tmp_path / "dst").read_bytes() == src.read_bytes()
    assert os.stat(tmp_path / "dst").st_blocks * 512 < 1 << 20  # only the data segments


def test_export_raw_equals_volume(vol: Volume, tmp_path: Path) -> None:
    out = export_volume(vol, tmp_path / "disk.img")
    assert out.read_bytes() == vol.path.read_bytes()
    assert os.stat(out).st_blocks <= os.stat(vol.path).st_blocks  # holes stay holes
    assert sorted(os.listdir(tmp_path)) == ["disk.img"]  # no temp left behind
    proc.run("e2fsck", ["-n", "-f", str(out)])  # a standalone filesystem image


def test_export_qcow2_compares_identical(vol: Volume, tmp_path: Path) -> None:
    old = tmp_path / "disk.qcow2"
    old.write_bytes(b"previous content")
    out = export_volume(vol, old, "qcow2")
    info = proc.run("qemu-img", ["info", "--output=json", str(out)]).text
    assert '"format": "qcow2"' in info
    res = proc.run("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", str(vol.path), str(out)])
    assert "Images are identical" in res.text
    assert sorted(os.listdir(tmp_path)) == ["disk.qcow2"]


def test_export_errors(vol: Volume, tmp_path: Path) -> None:
    with pytest.raises(UsageError) as e:
        export_volume(vol, tmp_path / "x", "vmdk")
    assert (e.value.message, e.value.hint) == ("unknown export format 'vmdk'",
                                               "use --format raw or --format qcow2")
    with pytest.raises(UsageError, match=r"^directory .*/nope does not exist$"):
        export_volume(vol, tmp_path / "nope" / "x.img")
    with pytest.raises(UsageError, match=r" is a directory$"):
        export_volume(vol, tmp_path)
    # a failing tool leaves neither FILE nor a temp file
    out = tmp_path / "out"
    out.mkdir()
    bad = Volume(vol.id, tmp_path / "missing", vol.meta)  # its volume.ext4 does not exist
    with pytest.raises(ToolError):
        export_volume(bad, out / "x.qcow2", "qcow2")
    with pytest.raises(FileNotFoundError):
        export_volume(bad, out / "x.img", "raw")
    assert os.listdir(out) == []


def test_cli_volume_export(vol: Volume, tmp_path: Path) -> None:
    root = vol.dir.parent.parent
    out = tmp_path / "cli.qcow2"
    res = subprocess.run([*KILN_DIST, "--root", str(root), "volume", "export", vol.id[7:19],
                          str(out), "--format", "qcow2"], capture_output=True, text=True,
                         check=False, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"{out} (qcow2, ")
    res = subprocess.run([*KILN_DIST, "--root", str(root), "volume", "export", vol.id[7:19],
                          str(out), "--format", "vdi"], capture_output=True, text=True,
                         check=False, timeout=60)
    assert res.returncode == 2
    assert "'vdi' is not one of 'raw', 'qcow2'" in res.stderr


def test_unzstd_hashed_round_trip_sparse_and_failure(tmp_path: Path) -> None:
    src = tmp_path / "src"
    with open(src, "wb") as f:
        f.write(os.urandom(100_000))
        f.seek(4 << 20)
        f.write(b"tail")
        f.truncate(8 << 20)
    proc.run("zstd", ["-q", "-o", str(tmp_path / "src.zst"), str(src)])
    out = tmp_path / "out"
    digest, size = unzstd_hashed(tmp_path / "src.zst", out, tmp_path / "fifo")
    assert (digest, size) == (hash_file(src), 8 << 20)
    assert out.read_bytes() == src.read_bytes()
    assert os.stat(out).st_blocks * 512 < 1 << 20  # the zero runs stayed holes
    (tmp_path / "bad.zst").write_bytes(b"not zstd at all")
    with pytest.raises(ToolError, match=r"^zstd failed"):  # an error, not a hang
        unzstd_hashed(tmp_path / "bad.zst", tmp_path / "out2", tmp_path / "fifo2")
