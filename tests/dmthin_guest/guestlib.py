"""What the in-guest dm-thin programs share: running tools, observing devices from the
outside (``dmsetup``, ``losetup``, sha256 of block devices past the page cache), named
checks, and a small ext4 source volume made with ``mke2fs -d``."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MIB = 1 << 20
BASE_SIZE = 32 * MIB
BIG_SIZE = 48 * MIB
POOL_SIZE = 256 * MIB
TOOL_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LC_ALL": "C.UTF-8"}


def log(msg: str) -> None:
    print(f"[dmthin {time.monotonic() - T0:7.2f}s] {msg}", file=sys.stderr, flush=True)


T0 = time.monotonic()


def sh(*argv: str, ok: tuple[int, ...] = (0,), stdin: str | None = None) -> str:
    res = subprocess.run(list(argv), capture_output=True, text=True, env=TOOL_ENV,
                         input=stdin, timeout=300, check=False)
    if res.returncode not in ok:
        raise RuntimeError(f"{' '.join(argv)} exited {res.returncode}: {res.stderr.strip()}")
    return res.stdout


# -- observing devices from the outside ------------------------------------------------------


def dm_names() -> set[str]:
    out = sh("dmsetup", "ls")
    if "No devices found" in out:
        return set()
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def dm_table(name: str) -> str:
    return sh("dmsetup", "table", name).strip()


def loops() -> dict[str, str]:
    """/dev/loopN → backing file."""
    text = sh("losetup", "--list", "--json", "--output", "NAME,BACK-FILE").strip()
    devs = json.loads(text)["loopdevices"] if text else []
    return {d["name"]: (d.get("back-file") or "").removesuffix(" (deleted)") for d in devs}


def dev_size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def digest(path: str | Path) -> str:
    """sha256 of a file or block device, read past the page cache's old pages."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # drop cached pages first
        while chunk := os.read(fd, 4 * MIB):
            h.update(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def dm_create_plain(name: str, table: str, *, readonly: bool = False) -> str:
    """A device made by the test itself, not through kiln."""
    sh("dmsetup", "create", name, *(["--readonly"] if readonly else []), "--table", table)
    sh("dmsetup", "mknodes", name)
    return f"/dev/mapper/{name}"


def dm_remove_plain(name: str) -> None:
    if name in dm_names():
        sh("dmsetup", "remove", name)


# -- the run -----------------------------------------------------------------------------------


class Checks:
    def __init__(self) -> None:
        self.results: dict[str, dict[str, Any]] = {}
        self.timings: dict[str, float] = {}

    def record(self, name: str, ok: bool, detail: str = "") -> None:
        self.results[name] = {"ok": bool(ok), "detail": detail}
        log(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}")

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        t = time.monotonic()
        try:
            yield
        finally:
            self.timings[name] = round(time.monotonic() - t, 3)

    def expect(self, name: str, conds: dict[str, bool], detail: str = "") -> None:
        failed = [k for k, v in conds.items() if not v]
        self.record(name, not failed, ("failed: " + ", ".join(failed) + "; " if failed
                                       else "") + detail)


def make_source(work: Path, root: Path, tag: str = "") -> tuple[Path, str, bytes]:
    """A small ext4 with a 4 MiB data file, under the root (imports only read there)."""
    staging = work / f"staging{tag}"
    (staging / "data").mkdir(parents=True)
    payload = hashlib.sha256(b"kiln").digest() * (4 * MIB // 32)
    (staging / "data" / "payload.bin").write_bytes(payload)
    (staging / "etc").mkdir()
    (staging / "etc" / "motd").write_text("dm-thin base\n")
    src = root / "incoming.ext4"
    with open(src, "wb") as f:
        f.truncate(BASE_SIZE)
    sh("mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-d", str(staging), str(src))
    return src, "sha256:" + digest(src), payload


def cat_file(dev: str, path: str, mnt: Path) -> bytes:
    mnt.mkdir(parents=True, exist_ok=True)
    sh("mount", "-o", "ro,noload", dev, str(mnt))  # noload: no journal replay, no writes
    try:
        return (mnt / path.lstrip("/")).read_bytes()
    finally:
        sh("umount", str(mnt))


def thin_ids(root: Path, rootkey: str, meta: str | None = None) -> set[int]:
    """The thin device ids the pool's metadata holds, read with thin_ls from a metadata
    snapshot (the pool stays live). ``meta``: the metadata device, by default the loop of
    ``ROOT/pool/thin/meta.img``."""
    from helper.storage import dmthin_core as core

    pool = core.pool_name(rootkey)
    if meta is None:
        meta = next(d for d, f in loops().items() if f == str(root / "pool/thin/meta.img"))
    sh("dmsetup", "message", pool, "0", "reserve_metadata_snap")
    try:
        out = sh("thin_ls", "--metadata-snap", "--no-headers", "--format", "DEV", meta)
    finally:
        sh("dmsetup", "message", pool, "0", "release_metadata_snap")
    return {int(x) for x in out.split()}


def pool_used(rootkey: str) -> int:
    from helper.storage import dmthin_core as core

    line = sh("dmsetup", "status", core.pool_name(rootkey)).strip()
    return core.parse_pool_status(line).used_data_blocks
