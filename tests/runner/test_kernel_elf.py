"""bzImage → ELF vmlinux: the pure header core (synthetic headers), format detection with
python-magic, and real extraction from the host's Debian cloud kernel (LZ4 legacy)."""

from __future__ import annotations

import glob
import gzip
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runner import kernel_elf as ke

FAKE_ELF = b"\x7fELF\x02\x01\x01" + bytes(9) + b"\x02\x00\x3e\x00" + b"kernel body " * 500


def bzimage(payload: bytes, setup_sects: int = 3, payload_offset: int = 0x40,
            protocol: int = 0x020F) -> bytes:
    """A minimal bzImage: boot sector + setup header fields the extractor reads."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x1FE:0x200] = b"\x55\xaa"
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, protocol)
    setup[0x211] = 1  # loadflags: LOADED_HIGH (libmagic calls that a bzImage)
    struct.pack_into("<II", setup, 0x248, payload_offset, len(payload))
    return bytes(setup) + bytes(payload_offset) + payload + b"\x00" * 16


@given(st.integers(0, 60), st.integers(0, 4096), st.integers(8, 1 << 20))
def test_payload_location_formula(sects: int, off: int, length: int) -> None:
    hdr = bytearray(0x250)
    hdr[0x1F1] = sects
    hdr[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", hdr, 0x206, 0x020F)
    struct.pack_into("<II", hdr, 0x248, off, length)
    start = ((sects or 4) + 1) * 512 + off
    loc = ke.payload_location(bytes(hdr), start + length)
    assert (loc.offset, loc.length) == (start, length)
    with pytest.raises(ke.KernelFormatError):
        ke.payload_location(bytes(hdr), start + length - 1)


@pytest.mark.parametrize(("header", "message"), [
    (bytes(0x250), "not a bzImage: no 'HdrS' boot header at 0x202"),
    (bytes(0x202) + b"HdrS" + struct.pack("<H", 0x0206) + bytes(0x250 - 0x208),
     "bzImage boot protocol 2.06 is older than 2.08 and does not say where its payload is"),
])
def test_payload_location_errors(header: bytes, message: str) -> None:
    with pytest.raises(ke.KernelFormatError) as e:
        ke.payload_location(header, 1 << 20)
    assert e.value.message == message


def test_gzip_bzimage_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "bz"
    src.write_bytes(bzimage(gzip.compress(FAKE_ELF, mtime=0)))
    assert ke.kernel_format(src) == "bzimage"
    out = ke.extract_vmlinux(src, tmp_path / "vmlinux")
    assert out.read_bytes() == FAKE_ELF
    assert ke.kernel_format(out) == "elf"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp


def test_unsupported_compression_refused(tmp_path: Path) -> None:
    src = tmp_path / "bz"
    src.write_bytes(bzimage(b"\xfd7zXZ\x00" + bytes(64)))
    with pytest.raises(ke.KernelFormatError) as e:
        ke.extract_vmlinux(src, tmp_path / "vmlinux")
    assert e.value.message == f"{src}: xz kernel payloads are not supported"
    assert not (tmp_path / "vmlinux").exists()


def test_not_a_kernel(tmp_path: Path) -> None:
    src = tmp_path / "x"
    src.write_bytes(b"hello" * 200)
    assert ke.kernel_format(src) == "unknown"
    with pytest.raises(ke.KernelFormatError) as e:
        ke.extract_vmlinux(src, tmp_path / "y")
    assert e.value.message == f"{src} is neither a bzImage nor an x86-64 ELF kernel"


HOST = sorted(glob.glob("/boot/vmlinuz-*-cloud-amd64"))


@pytest.mark.skipif(not HOST, reason="no /boot/vmlinuz-*-cloud-amd64")
def test_real_debian_kernel(tmp_path: Path) -> None:
    src = Path(HOST[-1])
    loc, data = ke.read_payload(src)
    assert loc.compression == "lz4-legacy"
    size = struct.unpack("<I", data[-4:])[0]
    out = ke.ensure_vmlinux(src, tmp_path / "cache")
    assert out.parent == tmp_path / "cache"
    assert out.name.startswith("vmlinux-")
    assert out.stat().st_size == size
    assert ke.kernel_format(out) == "elf"
    assert ke.ensure_vmlinux(src, tmp_path / "cache") == out  # cached by content
    assert ke.ensure_vmlinux(out, tmp_path / "other") == out  # already ELF
    assert not (tmp_path / "other").exists()
