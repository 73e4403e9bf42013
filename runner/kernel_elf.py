"""bzImage → ELF ``vmlinux``: Firecracker on x86-64 boots only an uncompressed ELF kernel.

A bzImage is real-mode setup code followed by a self-decompressing protected-mode part
whose compressed payload is the ELF ``vmlinux``. The boot protocol (≥ 2.08) locates it in
the setup header: ``setup_sects`` at 0x1F1 (0 means 4), ``payload_offset`` at 0x248 and
``payload_length`` at 0x24C, the payload starting ``(setup_sects + 1) * 512 +
payload_offset`` bytes into the file. The kernel build appends the uncompressed size as a
4-byte little-endian trailer to LZ4/xz/zstd streams (gzip's own ISIZE field is the same).

Debian's cloud kernels use LZ4 in the *legacy* frame format (magic 0x184C2102). The ``lz4``
CLI decodes it, but reads the size trailer as one more block and exits 1, so we strip the
trailer first and then demand that the output be exactly the trailer's size and an ELF.
gzip payloads are decoded with the stdlib; other compressions are refused with a hint.

``payload_location`` is the pure core (header bytes in, location out); ``extract_vmlinux``
is the thin I/O shell (lz4 via ``builder.proc``; ``helper.base.fileops.atomic_replace``:
temp name + fsync + rename).
python-magic tells the formats apart, with the header magic as a cross-check.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import magic

from builder import proc
from builder.store import hash_file
from helper.base.errors import KilnError
from helper.base.fileops import atomic_replace
from runner.tempfiles import locked_temp

ELF_MAGIC = b"\x7fELF"
LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"  # 0x184C2102 little-endian
GZIP_MAGIC = b"\x1f\x8b"
XZ_MAGIC = b"\xfd7zXZ\x00"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
HDR_MAGIC = b"HdrS"
_HEADER_LEN = 0x250  # everything up to payload_length included
_MIN_PROTOCOL = 0x0208  # payload_offset/payload_length exist from boot protocol 2.08 on

Format = Literal["elf", "bzimage", "unknown"]
Compression = Literal["lz4-legacy", "gzip", "xz", "zstd", "unknown"]


class KernelFormatError(KilnError):
    """A kernel file is not something Firecracker can boot, or cannot be converted."""


@dataclass(frozen=True)
class Payload:
    """Where the compressed vmlinux sits in a bzImage, and how it is compressed."""

    offset: int
    length: int
    compression: Compression
    protocol: int


def kernel_format(path: Path) -> Format:
    """``elf`` for an x86-64 ELF kernel, ``bzimage`` for a bzImage, else ``unknown``.

    python-magic decides; the magic bytes must agree (libmagic names bzImages by their
    boot-sector text, which a renamed file cannot fake past the ``HdrS`` check)."""
    desc = magic.from_file(str(path))
    with open(path, "rb") as f:
        head = f.read(_HEADER_LEN)
    if desc.startswith("ELF 64-bit") and "x86-64" in desc and head.startswith(ELF_MAGIC):
        return "elf"
    if "bzImage" in desc and head[0x202:0x206] == HDR_MAGIC:
        return "bzimage"
    return "unknown"


def _compression(data: bytes) -> Compression:
    if data.startswith(LZ4_LEGACY_MAGIC):
        return "lz4-legacy"
    if data.startswith(GZIP_MAGIC):
        return "gzip"
    if data.startswith(XZ_MAGIC):
        return "xz"
    if data.startswith(ZSTD_MAGIC):
        return "zstd"
    return "unknown"


def payload_location(header: bytes, file_size: int, payload_head: bytes = b"") -> Payload:
    """Locate the compressed payload from a bzImage's first 0x250 bytes (pure).

    ``payload_head``: the payload's first bytes, when known, to name its compression."""
    if len(header) < _HEADER_LEN or header[0x202:0x206] != HDR_MAGIC:
        raise KernelFormatError("not a bzImage: no 'HdrS' boot header at 0x202",
                                "pass a Linux x86 bzImage or an ELF vmlinux")
    protocol = struct.unpack_from("<H", header, 0x206)[0]
    if protocol < _MIN_PROTOCOL:
        raise KernelFormatError(
            f"bzImage boot protocol {protocol >> 8}.{protocol & 0xFF:02d} is older than 2.08 "
            "and does not say where its payload is", "use a newer kernel")
    setup_sects = header[0x1F1] or 4  # 0 means 4, for ancient compatibility
    payload_offset, payload_length = struct.unpack_from("<II", header, 0x248)
    offset = (setup_sects + 1) * 512 + payload_offset
    if payload_length < 8 or offset + payload_length > file_size:
        raise KernelFormatError(
            f"bzImage payload ({payload_length} bytes at {offset}) lies outside the file "
            f"({file_size} bytes)", "the kernel file is truncated or corrupt")
    return Payload(offset, payload_length, _compression(payload_head), protocol)


def read_payload(path: Path) -> tuple[Payload, bytes]:
    """The payload's location and its bytes (the uncompressed-size trailer included)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(_HEADER_LEN)
        loc = payload_location(header, size)
        f.seek(loc.offset)
        data = f.read(loc.length)
    return payload_location(header, size, data[:8]), data


def _check(tmp: Path, expected: int) -> None:
    """The decoded file is an ELF of the expected size (else the rename never happens)."""
    size = tmp.stat().st_size
    with open(tmp, "rb") as f:
        head = f.read(4)
    if size != expected or head != ELF_MAGIC:
        raise KernelFormatError(
            f"decompressed kernel is {size} bytes starting {head!r}; expected an ELF of "
            f"{expected} bytes", "the bzImage payload is corrupt")


def extract_vmlinux(src: Path, dest: Path, *, tmp_dir: Path | None = None) -> Path:
    """Write the ELF vmlinux inside bzImage ``src`` to ``dest`` (atomically); return ``dest``.

    ``src`` already an ELF → copied as is. ``tmp_dir`` holds the stripped payload (default:
    ``dest``'s directory)."""
    fmt = kernel_format(src)
    if fmt == "elf":
        # flock-ed until renamed (crash recovery finds it), fsync-ed, renamed 0644
        with atomic_replace(dest, mode=0o600, final_mode=0o644) as out:
            with open(src, "rb") as i, open(out.path, "wb") as o:
                while chunk := i.read(1 << 20):
                    o.write(chunk)
            _check(out.path, src.stat().st_size)
        return dest
    if fmt != "bzimage":
        raise KernelFormatError(f"{src} is neither a bzImage nor an x86-64 ELF kernel",
                                "pass --kernel a Linux bzImage or vmlinux")
    loc, data = read_payload(src)
    # The last 4 bytes are the uncompressed size: the build's trailer (lz4, xz, zstd) or
    # gzip's own ISIZE field.
    expected = struct.unpack("<I", data[-4:])[0]
    with atomic_replace(dest, mode=0o600, final_mode=0o644) as out, \
            locked_temp((tmp_dir or dest.parent) / dest.name, "lz4") as stripped:
        tmp = out.path
        if loc.compression == "lz4-legacy":
            stripped.write_bytes(data[:-4])  # without the trailer, lz4 exits 0
            proc.run("lz4", [
                "--decompress",
                "--force",  # tmp is ours (flock-ed, made empty just now)
                "--quiet",
                str(stripped),
                str(tmp),
            ], timeout=120, hint="the lz4 tool comes with: apt-get install lz4")
        elif loc.compression == "gzip":
            # No appended trailer for gzip: its own ISIZE field is the last 4 bytes.
            d = zlib.decompressobj(wbits=31)  # gzip container
            with open(tmp, "wb") as o:
                o.write(d.decompress(data))
                o.write(d.flush())
        else:
            raise KernelFormatError(
                f"{src}: {loc.compression} kernel payloads are not supported",
                "use a kernel compressed with LZ4 or gzip (Debian's are LZ4), or pass an "
                "ELF vmlinux")
        _check(tmp, expected)
    return dest


def ensure_vmlinux(src: Path, cache_dir: Path) -> Path:
    """The ELF kernel for ``src``: ``src`` itself when already ELF, else an extracted copy
    cached by the bzImage's content hash (``cache_dir/vmlinux-<sha256 prefix>``)."""
    if kernel_format(src) == "elf":
        return src
    dest = cache_dir / f"vmlinux-{hash_file(src)[7:39]}"
    if not dest.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        extract_vmlinux(src, dest)
    return dest
