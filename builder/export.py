"""``kiln volume export``: a volume as a standalone disk image file, for CI jobs whose
product is a file.

* ``raw``: the ext4 bytes, copied with ``copy_file_range`` segment by segment between
  ``SEEK_DATA``/``SEEK_HOLE`` (``helper.base.fileops.sparse_copy``), so holes stay holes (a
  1 GiB volume with 200 MiB of data writes 200 MiB) and the copy stays in the kernel
  (reflinks on XFS/btrfs).
* ``qcow2``: ``qemu-img convert`` (through ``builder.proc``).

``unzstd_hashed`` is the same idea for ``kiln pull``: a compressed volume written out with
its holes, hashed on the way.

Either way the result is written to a temporary name beside FILE, fsync-ed, then renamed
(``helper.base.fileops.atomic_replace``): FILE is the old file or the whole new image, never
half an image.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
from pathlib import Path

from builder import proc
from builder.store import Volume
from helper.base.errors import UsageError
from helper.base.fileops import atomic_replace, sparse_copy

FORMATS = ("raw", "qcow2")


def qemu_img_argv(src: Path, dest: Path) -> list[str]:
    """``qemu-img convert`` of a raw volume into a qcow2 file (pure, tested directly)."""
    return [
        "convert",
        "-f", "raw",  # never let qemu-img probe the format of a file
        "-O", "qcow2",
        "-o", "compression_type=zlib",  # the default; named so old readers stay compatible
        str(src),
        str(dest),
    ]


def export_volume(volume: Volume, dest: Path, fmt: str = "raw") -> Path:
    """Write ``volume`` to ``dest`` as ``fmt`` (``raw`` or ``qcow2``), atomically."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}", "use --format raw or --format qcow2")
    dest = dest.absolute()
    if dest.is_dir():
        raise UsageError(f"{dest} is a directory", "give a file name, e.g. disk.img")
    if not dest.parent.is_dir():
        raise UsageError(f"directory {dest.parent} does not exist", "create it first")
    with atomic_replace(dest, mode=0o600, final_mode=0o644) as tmp:
        if fmt == "raw":
            os.ftruncate(tmp.fd, os.stat(volume.path).st_size)  # holes, a trailing one too
            sparse_copy(volume.path, tmp.fd)
        else:  # qemu-img writes the temp file in place (same inode, fsync-ed on commit)
            proc.run("qemu-img", qemu_img_argv(volume.path, tmp.path), timeout=3600)
    return dest


def unzstd_hashed(blob: Path, image: Path, fifo: Path) -> tuple[str, int]:
    """``zstd -d`` of ``blob`` into ``image``, hashed on the way: (``sha256:…``, size).

    zstd writes into a FIFO that a thread reads, hashes and writes out, leaving all-zero
    64 KiB runs as holes; so the volume is never read back just to hash it (1 GiB: 0.75 s
    saved) and stays as sparse as the built one.
    """
    proc.which("zstd")  # fail here, not with the reader blocked on a FIFO nobody opens
    os.mkfifo(fifo, 0o600)
    h = hashlib.sha256()
    done = 0
    failure: list[BaseException] = []

    def reader() -> None:
        nonlocal done
        with open(fifo, "rb") as src, open(image, "wb") as dst:
            try:
                while chunk := src.read(1 << 20):
                    h.update(chunk)
                    view = memoryview(chunk)
                    for off in range(0, len(chunk), _HOLE):
                        # bytes == bytes is a memcmp; memoryview == bytes compares
                        # element by element (30 times slower)
                        part = chunk[off:off + _HOLE]
                        if part == _ZEROS[:len(part)]:
                            dst.seek(len(part), os.SEEK_CUR)
                        else:
                            dst.write(view[off:off + len(part)])
                    done += len(chunk)
                dst.truncate(done)
            except BaseException as e:  # keep draining, or zstd blocks on a full pipe
                failure.append(e)
                while src.read(1 << 20):
                    pass

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        fut = pool.submit(reader)
        proc.run("zstd", ["--decompress", "--quiet", "--stdout", str(blob)],
                 stdout_path=fifo, timeout=3600)
        fut.result()
    if failure:
        raise failure[0]
    return "sha256:" + h.hexdigest(), done


_HOLE = 64 << 10
_ZEROS = bytes(_HOLE)
