"""Pulling an image into the ONE shared blob cache ``ROOT/blobs`` and a per-build layout.

``pull`` re-reads the resolved manifest by digest (skopeo 1.9.3 predates the CVE-2024-3727
fixes and would use its digests as paths unchecked), runs ``skopeo copy`` with
``--dest-shared-blob-dir`` so blobs land in the cache and the layout gets only JSON, then
verifies every blob it needs (sha256 and size; a bad blob is deleted and fetched once
more), checks each layer's real content type with libmagic (``check_layer_type``) and
hard-links the needed blobs into the layout so umoci can read it. ``_Progress`` polls the
cache and skopeo's temp files to report per-blob bytes.

Dependency direction: this module imports ``builder.source`` (references, platform choice,
argv builders, the retrying skopeo runner); ``builder.source`` never imports it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import magic

from builder.root import Root, rmtree
from builder.source import (
    TAG,
    Descriptor,
    ImageRef,
    RegistryOptions,
    Resolved,
    check_digest,
    choose_platform,
    copy_argv,
    inspect_raw,
    is_index,
    manifest_digests,
    manifest_json,
    run_skopeo,
)
from builder.store import hash_file
from helper.base.errors import IntegrityError
from helper.base.fileops import atomic_replace, sparse_copy

# layer media type suffix -> MIME types libmagic reports for such content
LAYER_MAGIC = {
    "gzip": frozenset({"application/gzip", "application/x-gzip"}),
    "zstd": frozenset({"application/zstd", "application/x-zstd"}),
    "tar": frozenset({"application/x-tar"}),
}


# -- the cache -------------------------------------------------------------------------------


def blob_path(root: Root, digest: str) -> Path:
    """Where the cache keeps ``digest`` (validated first: never a path from raw input)."""
    return root.blobs / "sha256" / check_digest(digest)[len("sha256:"):]


def sha256_file(path: Path) -> tuple[str, int]:
    """(``sha256:…``, size) of a blob file."""
    return hash_file(path), path.stat().st_size


# -- pull ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pulled:
    layout: Path
    tag: str
    manifest_digest: str
    manifest: dict[str, Any]
    config_digest: str
    config: dict[str, Any]
    layers: tuple[Descriptor, ...]
    blobs: tuple[str, ...]


@dataclass(frozen=True)
class BlobProgress:
    digest: str
    done: int
    total: int


PULL_TIMEOUT = 3600.0  # one whole skopeo copy (big images over slow links)


def layer_kind(media_type: str) -> str:
    """``gzip``, ``zstd`` or ``tar`` for a layer media type; IntegrityError otherwise."""
    if media_type.endswith(("+gzip", ".tar.gzip")):
        return "gzip"
    if media_type.endswith(("+zstd", ".tar.zstd")):
        return "zstd"
    if media_type.endswith((".tar", "layer.v1.tar", ".diff.tar")):
        return "tar"
    raise IntegrityError(f"unsupported layer media type {media_type!r}",
                         "kiln reads tar, tar+gzip and tar+zstd layers")


def check_layer_type(path: Path, media_type: str, digest: str, image: str) -> None:
    """The blob's real content type (libmagic) is what its media type claims."""
    kind = layer_kind(media_type)
    with open(path, "rb") as f:
        head = f.read(8192)
    found = magic.from_buffer(head, mime=True)
    if kind == "tar" and found == "application/octet-stream" and not head.strip(b"\0"):
        return  # an empty tar: only end-of-archive zero blocks, nothing for magic to see
    if found not in LAYER_MAGIC[kind]:
        raise IntegrityError(f"layer {digest} of {image} is {found}, not {kind} as its "
                             f"media type {media_type} says", "the image is broken; rebuild it")


def _verify(path: Path, desc: Descriptor) -> bool:
    try:
        digest, size = sha256_file(path)
    except FileNotFoundError:
        return False
    return digest == desc.digest and size == desc.size


def _descriptor(doc: Any, where: str) -> Descriptor:
    if not isinstance(doc, dict):
        raise IntegrityError(f"malformed descriptor in {where}", "the image is broken")
    size = doc.get("size")
    if not isinstance(size, int) or size < 0:
        raise IntegrityError(f"descriptor without a valid size in {where}", "the image is broken")
    return Descriptor(str(doc.get("mediaType", "")), check_digest(doc.get("digest"), where),
                      size)


def _read_layout(root: Root, layout: Path, image: str) -> tuple[list[Descriptor], list[str]]:
    """Descriptors of what the copied image needs (manifest, config, layers) + bad digests.

    Each JSON blob is verified before it is parsed, so nothing unverified is trusted.
    """
    index = json.loads((layout / "index.json").read_bytes())
    entries = [m for m in index.get("manifests", [])
               if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == TAG]
    if len(entries) != 1:
        raise IntegrityError(f"skopeo wrote an unexpected index for {image}", "report a bug")
    mdesc = _descriptor(entries[0], "the layout index")
    if not _verify(blob_path(root, mdesc.digest), mdesc):
        return [mdesc], [mdesc.digest]
    manifest = json.loads(blob_path(root, mdesc.digest).read_bytes())
    cdesc = _descriptor(manifest.get("config"), "the manifest")
    layers = [_descriptor(d, "the manifest") for d in manifest.get("layers") or []]
    need = [mdesc, cdesc, *layers]
    bad = [d.digest for d in need[1:] if not _verify(blob_path(root, d.digest), d)]
    return need, bad


class _Progress:
    """Polls the cache and skopeo's temp files; reports per-blob bytes without slowing skopeo.

    skopeo prints ``Copying blob sha256:…`` when it starts a blob and writes it to
    ``LAYOUT/oci-put-blob*`` before renaming it into the cache. Bytes are attributed while
    exactly one blob is in flight; otherwise only start and finish are reported.
    """

    def __init__(self, root: Root, layout: Path, sizes: dict[str, int],
                 cb: Callable[[BlobProgress], None]) -> None:
        self.root, self.layout, self.sizes, self.cb = root, layout, sizes, cb
        self.started: list[str] = []
        self.finished: set[str] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="kiln-pull-progress",
                                       daemon=True)

    def on_line(self, line: str) -> None:
        m = re.match(r"Copying (?:blob|config) (sha256:[0-9a-f]{64})", line)
        if m:
            with self.lock:
                self.started.append(m[1])

    def _loop(self) -> None:
        seen: set[str] = set()
        while not self.stop.wait(0.25):
            with self.lock:
                started = list(self.started)
            flying = []
            for d in started:
                total = self.sizes.get(d, 0)
                if d not in seen:
                    seen.add(d)
                    self.cb(BlobProgress(d, 0, total))
                if d in self.finished:
                    continue
                if blob_path(self.root, d).exists():
                    self.finished.add(d)
                    self.cb(BlobProgress(d, total, total))
                else:
                    flying.append(d)
            if len(flying) == 1:
                written = 0
                with contextlib.suppress(OSError):
                    for e in os.scandir(self.layout):
                        if e.name.startswith("oci-put-blob"):
                            written += e.stat().st_size
                if written:
                    total = self.sizes.get(flying[0], 0)
                    self.cb(BlobProgress(flying[0], min(written, total or written), total))

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        self.thread.start()
        try:
            yield
        finally:
            self.stop.set()
            self.thread.join()


def _link(src: Path, dest: Path) -> None:
    if dest.exists():
        return
    try:
        os.link(src, dest)
    except OSError:  # another filesystem: copy (rare; workdirs live under the root)
        with atomic_replace(dest) as tmp:
            os.ftruncate(tmp.fd, os.stat(src).st_size)
            sparse_copy(src, tmp.fd)


def _pinned_ref(resolved: Resolved) -> ImageRef:
    if resolved.pinned.startswith("docker://"):
        return ImageRef("docker", resolved.pinned[len("docker://"):])
    return resolved.ref


def pull(resolved: Resolved, opts: RegistryOptions, root: Root, workdir: Path, *,
         on_progress: Callable[[BlobProgress], None] | None = None,
         budget: float = 60.0) -> Pulled:
    """Copy the resolved image into the blob cache and a verified layout under ``workdir``."""
    ref, image = resolved.ref, resolved.ref.skopeo()
    root.ensure()
    layout, tmpdir = workdir / "layout", workdir / "skopeo-tmp"
    with root.lock("blobs", shared=True, what="the blob cache"):
        # Re-read the source by digest: skopeo 1.9 would use its digests as paths unchecked,
        # and for transports that cannot be pinned this catches a source changed since resolve.
        raw = inspect_raw(_pinned_ref(resolved), opts, budget)
        doc = manifest_json(raw, ref)
        manifest_digests(doc)
        got = "sha256:" + hashlib.sha256(raw).hexdigest()
        if is_index(doc):
            got = choose_platform(doc, resolved.platform).digest
        if got != resolved.digest:
            raise IntegrityError(f"{image} changed since it was resolved ({resolved.digest} "
                                 f"is now {got})", "build again to use the new image")
        sizes = {str(d.get("digest")): int(d.get("size", 0))
                 for d in [doc.get("config"), *(doc.get("layers") or [])] if isinstance(d, dict)}
        for attempt in range(2):
            rmtree(layout)
            tmpdir.mkdir(parents=True, exist_ok=True)
            # [2:] drops the timeout flag: run_skopeo sets it per attempt
            argv = copy_argv(resolved.pinned, ref, opts, platform=resolved.platform,
                             blobs=root.blobs, layout=layout, tmpdir=tmpdir, timeout=0)[2:]
            if on_progress is None:
                run_skopeo(argv, ref, budget, PULL_TIMEOUT, bounded=False)
            else:
                prog = _Progress(root, layout, sizes, on_progress)
                with prog.running():
                    run_skopeo(argv, ref, budget, PULL_TIMEOUT, bounded=False,
                            on_line=prog.on_line)
            need, bad = _read_layout(root, layout, image)
            if not bad:
                break
            for digest in bad:  # re-fetched by the next copy: skopeo skips present blobs
                blob_path(root, digest).unlink(missing_ok=True)
            if attempt == 1:
                raise IntegrityError(f"blob {bad[0]} of {image} does not match its digest or "
                                     "size, also after pulling it again",
                                     "the source serves corrupt data; report it to its owner")
        mdesc, cdesc, *layers = need
        for d in layers:
            check_layer_type(blob_path(root, d.digest), d.media_type, d.digest, image)
        (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        for d in need:
            _link(blob_path(root, d.digest), layout / "blobs" / "sha256" / d.digest[7:])
        manifest = json.loads(blob_path(root, mdesc.digest).read_bytes())
        config = json.loads(blob_path(root, cdesc.digest).read_bytes())
    rmtree(tmpdir)
    if on_progress is not None:
        for d in need:
            on_progress(BlobProgress(d.digest, d.size, d.size))
    return Pulled(layout, TAG, mdesc.digest, manifest, cdesc.digest, config, tuple(layers),
                  tuple(d.digest for d in need))
