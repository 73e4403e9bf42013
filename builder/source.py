"""Image references, resolving them to a digest, and pulling them into the blob cache.

Flow: ``parse_ref`` (text -> ``ImageRef``) -> ``resolve`` (``skopeo inspect --raw``; kiln
hashes the raw bytes itself and, for an index, picks the platform with the pure
``choose_platform``) -> ``pull`` (``skopeo copy`` of the pinned digest into a per-build OCI
layout whose blobs live in the ONE shared cache ``ROOT/blobs``; kiln then verifies every
blob and hard-links the ones this image needs into the layout, so umoci can read it).

Debian's skopeo 1.9.3 predates the CVE-2024-3727 fixes (digests used as paths unchecked),
so kiln re-reads the source manifest by digest and rejects any digest that is not
``sha256:<64 hex>`` before skopeo can build a path from it, and checks every blob's sha256,
size and (for layers) real file type itself.

Registry failures are classified from skopeo's stderr (``classify``, pure): 429, 5xx,
resets and timeouts are retried with exponential backoff inside a time budget; 401, 404
and refused connections fail fast with a message that says which.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform as _platform
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import magic

from builder import proc
from builder.root import Root, rmtree
from helper.errors import (
    IntegrityError,
    KilnError,
    NotFound,
    RegistryError,
    ToolError,
    ToolTimeout,
    UsageError,
)

DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")  # fullmatch: "$" would allow a "\n"
TRANSPORTS = ("docker", "oci", "oci-archive", "docker-archive")
# skopeo transports kiln knows by name but does not take (a clearer error than "bad name")
OTHER_TRANSPORTS = ("dir", "containers-storage", "docker-daemon", "ostree", "sif", "tarball")
TRANSPORT_HINT = "use docker://NAME, oci:DIR[:TAG], oci-archive:FILE or docker-archive:FILE"
TAG = "image"  # the tag of the per-build layout

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_DOMAIN = rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
_DOCKER_REF = re.compile(
    rf"^(?P<repo>(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$")
_OCI_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/-]*")

INDEX_TYPES = frozenset({"application/vnd.oci.image.index.v1+json",
                         "application/vnd.docker.distribution.manifest.list.v2+json"})
# layer media type suffix -> MIME types libmagic reports for such content
LAYER_MAGIC = {
    "gzip": frozenset({"application/gzip", "application/x-gzip"}),
    "zstd": frozenset({"application/zstd", "application/x-zstd"}),
    "tar": frozenset({"application/x-tar"}),
}


# -- references -------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRef:
    """A parsed SOURCE: ``transport`` plus the transport-specific rest."""

    transport: str
    name: str

    def skopeo(self) -> str:
        if self.transport == "docker":
            return f"docker://{self.name}"
        return f"{self.transport}:{self.name}"

    def __str__(self) -> str:
        return self.skopeo()


def _bad(message: str, hint: str = TRANSPORT_HINT) -> UsageError:
    return UsageError(message, hint)


def _file_part(transport: str, rest: str) -> str:
    path, sep, tail = rest.partition(":")
    if not path:
        raise _bad(f"{transport}: needs a path", f"e.g. {transport}:/path/to/image")
    absolute = os.path.abspath(path)
    if ":" in absolute:  # skopeo splits these references at the first ':'
        raise _bad(f"path {absolute!r} contains ':'", "move the image to a path without ':'")
    if sep and not tail:
        raise _bad(f"empty tag in {transport}:{rest}", f"write {transport}:{path} or add a tag")
    if sep and transport != "docker-archive" and not _OCI_TAG.fullmatch(tail):
        raise _bad(f"invalid tag {tail!r} in {transport}:{rest}",
                   "tags use letters, digits, '.', '_', '-' and '/'")
    return f"{absolute}:{tail}" if sep else absolute


def parse_ref(text: str) -> ImageRef:
    """Parse a SOURCE; a bare name (``alpine:3.20``) means ``docker://alpine:3.20``."""
    text = text.strip()
    if not text:
        raise _bad("image reference is empty")
    scheme, sep, rest = text.partition("://")
    if sep:
        if scheme != "docker":
            raise _bad(f"unknown transport {scheme!r} in {text!r}")
        transport, name = "docker", rest
    else:
        prefix, colon, rest = text.partition(":")
        if colon and prefix in TRANSPORTS and prefix != "docker":
            return ImageRef(prefix, _file_part(prefix, rest))
        if colon and prefix == "docker":
            raise _bad(f"docker references need '//': use 'docker://{rest}'")
        if colon and prefix in OTHER_TRANSPORTS:
            raise _bad(f"transport {prefix!r} is not supported")
        transport, name = "docker", text
    if not _DOCKER_REF.fullmatch(name):
        raise _bad(f"invalid image reference {name!r}",
                   "expected [REGISTRY/]REPOSITORY[:TAG][@sha256:DIGEST], e.g. alpine:3.20")
    return ImageRef(transport, name)


def docker_repo(name: str) -> str:
    """``host/repo`` of a docker name, without tag or digest."""
    m = _DOCKER_REF.fullmatch(name)
    if not m:
        raise _bad(f"invalid image reference {name!r}")
    return m["repo"]


def registry_host(ref: ImageRef) -> str:
    """The registry a docker reference talks to (for messages)."""
    first = ref.name.split("/", 1)[0]
    if ref.transport != "docker":
        return ref.name
    if "/" in ref.name and ("." in first or ":" in first or first == "localhost"):
        return first
    return "docker.io"


# -- digests and blobs --------------------------------------------------------------------


def check_digest(digest: object, where: str = "") -> str:
    """``digest`` if it is ``sha256:<64 lowercase hex>``; anything else is refused."""
    if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
        at = f" in {where}" if where else ""
        raise IntegrityError(f"malformed digest {str(digest)[:100]!r}{at}",
                             "kiln accepts sha256 digests only; the source is broken or hostile")
    return digest


def blob_path(root: Root, digest: str) -> Path:
    """Where the cache keeps ``digest`` (validated first: never a path from raw input)."""
    return root.blobs / "sha256" / check_digest(digest)[len("sha256:"):]


def sha256_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return "sha256:" + h.hexdigest(), size


def manifest_digests(doc: Any) -> list[str]:
    """Every ``digest`` / ``blobSum`` value anywhere in a manifest or index, validated."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("digest", "blobSum"):
                    found.append(check_digest(value, "the manifest"))
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(doc)
    return found


# -- platforms ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int


_GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm/v7", "armv6l": "arm/v6",
           "i686": "386", "i386": "386", "ppc64le": "ppc64le", "s390x": "s390x",
           "riscv64": "riscv64"}


def host_platform() -> str:
    machine = _platform.machine()
    return f"linux/{_GOARCH.get(machine, machine)}"


def parse_platform(text: str) -> tuple[str, str, str]:
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(re.fullmatch(r"[a-z0-9_]+", p) for p in parts):
        raise UsageError(f"invalid platform {text!r}", "expected OS/ARCH[/VARIANT], e.g. "
                         "linux/amd64 or linux/arm64/v8")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else ""


def _variant(arch: str, variant: str) -> str:
    return "v8" if arch == "arm64" and variant == "" else variant


def choose_platform(index: dict[str, Any], want: str | None) -> Descriptor:
    """The first entry of ``index`` for platform ``want`` (default: the host's).

    Without a wanted variant any variant matches; ``arm64`` without variant equals ``v8``.
    """
    os_, arch, variant = parse_platform(want or host_platform())
    offered: list[str] = []
    for entry in index.get("manifests") or []:
        plat = entry.get("platform") if isinstance(entry, dict) else None
        if not isinstance(plat, dict):
            continue
        e_os, e_arch = str(plat.get("os", "")), str(plat.get("architecture", ""))
        e_var = str(plat.get("variant", "") or "")
        offered.append("/".join(p for p in (e_os, e_arch, e_var) if p))
        if (e_os, e_arch) != (os_, arch):
            continue
        if variant and _variant(arch, variant) != _variant(e_arch, e_var):
            continue
        return Descriptor(str(entry.get("mediaType", "")), str(entry.get("digest", "")),
                          int(entry.get("size", 0)))
    have = ", ".join(sorted(set(offered))) or "none"
    raise NotFound(f"image has no manifest for platform {want or host_platform()} "
                   f"(it offers: {have})", "choose one of those with --platform OS/ARCH")


def is_index(doc: dict[str, Any]) -> bool:
    return doc.get("mediaType") in INDEX_TYPES or ("manifests" in doc and "layers" not in doc)


# -- skopeo argv (pure) ----------------------------------------------------------------------


@dataclass(frozen=True)
class RegistryOptions:
    tls_verify: bool = True
    authfile: Path | None = None
    platform: str | None = None


def _src_flags(ref: ImageRef, opts: RegistryOptions, prefix: str) -> list[str]:
    if ref.transport != "docker":
        return []  # TLS and credentials only mean something to a registry
    flags = []
    if not opts.tls_verify:
        flags.append(f"--{prefix}tls-verify=false")  # also allows plain HTTP
    if opts.authfile is not None:
        flags += [f"--{prefix}authfile", str(opts.authfile)]
    return flags


def _timeout_flag(seconds: float) -> list[str]:
    return ["--command-timeout", f"{max(1, int(seconds))}s"]


def inspect_argv(ref: ImageRef, opts: RegistryOptions, timeout: float) -> list[str]:
    return [
        *_timeout_flag(timeout),
        "inspect",
        "--raw",  # the manifest bytes exactly as served: kiln hashes them itself
        *_src_flags(ref, opts, ""),
        ref.skopeo(),
    ]


def copy_argv(src: str, ref: ImageRef, opts: RegistryOptions, *, platform: str, blobs: Path,
              layout: Path, tmpdir: Path, timeout: float) -> list[str]:
    os_, arch, variant = parse_platform(platform)
    return [
        *_timeout_flag(timeout),
        "--tmpdir", str(tmpdir),  # spill files stay in the build's workdir
        # the same platform choice skopeo makes for an index kiln could not pin (oci:)
        "--override-os", os_,
        "--override-arch", arch,
        *(["--override-variant", variant] if variant else []),
        "copy",
        *_src_flags(ref, opts, "src-"),
        "--dest-shared-blob-dir", str(blobs),  # blobs go to the cache, the layout gets json
        src,
        f"oci:{layout}:{TAG}",
    ]


# -- failures (pure classification) ----------------------------------------------------------

_KINDS = (
    ("integrity", re.compile(r"digest did not match|digest mismatch|size mismatch|"
                             r"does not match config's DiffID", re.I)),
    ("auth", re.compile(r"unauthorized|authentication required|invalid username/password|"
                        r"\b401\b|denied", re.I)),
    ("notfound", re.compile(r"manifest unknown|name unknown|not found|\b404\b|no descriptor|"
                            r"no such file or directory|does not exist", re.I)),
    ("refused", re.compile(r"connection refused|no route to host|no such host", re.I)),
    ("timeout", re.compile(r"deadline exceeded|timeout|timed out", re.I)),
    ("transient", re.compile(r"toomanyrequests|too many requests|\b429\b|\b5\d\d\b|"
                             r"connection reset|(?-i:EOF)|"
                             r"broken pipe|server misbehaving|temporar", re.I)),
)


def classify(stderr: str) -> str:
    """Kind of a skopeo failure: integrity, auth, notfound, refused, timeout, transient or
    other. Only timeout and transient are worth retrying (refused, briefly)."""
    for kind, pattern in _KINDS:
        if pattern.search(stderr):
            return kind
    return "other"


def backoff(attempt: int, base: float = 0.5, cap: float = 8.0) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based)."""
    return float(min(cap, base * (2 ** min(attempt, 16))))


REFUSED_ATTEMPTS = 3  # a registry that refuses connections 3 times over 1.5 s is down


def _failure(kind: str, ref: ImageRef, last: str, budget: float) -> KilnError:
    host = registry_host(ref)
    if kind == "auth":
        return RegistryError(f"authentication failed for {host} ({ref})",
                             "pass --authfile FILE with credentials for this registry "
                             "(or set REGISTRY_AUTH_FILE)")
    if kind == "notfound":
        return RegistryError(f"image not found: {ref}",
                             "check the name and tag (skopeo inspect shows what exists)")
    if kind == "refused":
        return RegistryError(f"cannot connect to registry {host}: {last}",
                             "check the address and that the registry is running")
    if kind == "timeout":
        return RegistryError(f"registry {host} did not answer within {budget:g} s",
                             "check the network and the registry, then retry")
    if kind == "integrity":
        return IntegrityError(f"{ref}: data from the source does not match its digest: {last}",
                              "the registry or the network corrupts data; retry or report it")
    if kind == "transient":
        return RegistryError(f"registry {host} kept failing for {budget:g} s: {last}",
                             "the registry is overloaded or broken; retry later")
    return RegistryError(f"cannot read {ref}: {last}", "check the reference and the source")


def skopeo_message(stderr: str) -> str:
    """The message of skopeo's last log line (``time=… level=fatal msg="…"``)."""
    lines = stderr.strip().splitlines()
    last = lines[-1] if lines else ""
    m = re.search(r'msg="((?:[^"\\]|\\.)*)"', last)
    return m[1].replace('\\"', '"') if m else last


def _skopeo(args: list[str], ref: ImageRef, budget: float, attempt_timeout: float, *,
            bounded: bool = True, **kwargs: Any) -> proc.Result:
    """Run skopeo, retrying transient failures with backoff inside ``budget`` seconds.

    ``bounded``: no attempt outlasts the budget (inspect). A copy is not bounded, as moving
    a big image legitimately takes long; its retries are, counted from the first failure.
    """
    start = time.monotonic()
    first_failure: float | None = None
    attempt = 0
    while True:
        limit = attempt_timeout if not bounded else \
            max(1.0, min(budget - (time.monotonic() - start) - 0.5, attempt_timeout))
        try:
            # skopeo's --command-timeout fires first; proc's timeout only backs it up
            return proc.run("skopeo", [*_timeout_flag(limit), *args], timeout=limit + 10,
                            **kwargs)
        except ToolTimeout:
            kind, last = "timeout", "no answer"
        except ToolError as e:
            last = skopeo_message(e.stderr_tail) or e.message
            kind = classify(e.stderr_tail)
        now = time.monotonic()
        first_failure = now if first_failure is None else first_failure
        retry = kind in ("transient", "timeout") or (
            kind == "refused" and attempt + 1 < REFUSED_ATTEMPTS)
        delay = backoff(attempt)
        if not retry or now - (start if bounded else first_failure) + delay >= budget:
            raise _failure(kind, ref, last, budget) from None
        time.sleep(delay)
        attempt += 1


ATTEMPT_TIMEOUT = 20.0  # one inspect; a stalled registry costs at most this per attempt


def inspect_raw(ref: ImageRef, opts: RegistryOptions, budget: float) -> bytes:
    args = inspect_argv(ref, opts, 0)[2:]  # the timeout flag is set per attempt
    return _skopeo(args, ref, budget, ATTEMPT_TIMEOUT).stdout


def _json(raw: bytes, ref: ImageRef) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise IntegrityError(f"{ref} did not return a JSON manifest",
                             "check that the reference names an image")
    return doc


# -- resolve ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resolved:
    ref: ImageRef
    digest: str
    pinned: str
    platform: str


def resolve(ref: ImageRef, opts: RegistryOptions, *, budget: float = 60.0) -> Resolved:
    """The digest of ``ref``'s manifest for the wanted platform, and a ref pinning it."""
    plat = opts.platform or host_platform()
    parse_platform(plat)
    raw = inspect_raw(ref, opts, budget)
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    doc = _json(raw, ref)
    manifest_digests(doc)
    if is_index(doc):
        digest = check_digest(choose_platform(doc, plat).digest, f"the index of {ref}")
    if ref.transport == "docker":
        pinned = f"docker://{docker_repo(ref.name)}@{digest}"
    else:
        pinned = ref.skopeo()  # skopeo 1.9 cannot address these by digest; pull re-checks
    return Resolved(ref, digest, pinned, plat)


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
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)


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
        doc = _json(raw, ref)
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
            # [2:] drops the timeout flag: _skopeo sets it per attempt
            argv = copy_argv(resolved.pinned, ref, opts, platform=resolved.platform,
                             blobs=root.blobs, layout=layout, tmpdir=tmpdir, timeout=0)[2:]
            if on_progress is None:
                _skopeo(argv, ref, budget, PULL_TIMEOUT, bounded=False)
            else:
                prog = _Progress(root, layout, sizes, on_progress)
                with prog.running():
                    _skopeo(argv, ref, budget, PULL_TIMEOUT, bounded=False,
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
