"""Image references, resolving them to a digest, and the skopeo calls behind both.

Flow: ``parse_ref`` (text -> ``ImageRef``) -> ``resolve`` (``skopeo inspect --raw``; kiln
hashes the raw bytes itself and, for an index, picks the platform with the pure
``choose_platform``) -> ``builder.blobcache.pull`` (``skopeo copy`` of the pinned digest
into a per-build OCI layout whose blobs live in the ONE shared cache ``ROOT/blobs``).

Debian's skopeo 1.9.3 predates the CVE-2024-3727 fixes (digests used as paths unchecked),
so kiln rejects any digest that is not ``sha256:<64 hex>`` (``check_digest``,
``manifest_digests``) before skopeo can build a path from it.

Registry failures are classified from skopeo's stderr (``classify``, pure): 429, 5xx,
resets and timeouts are retried with exponential backoff inside a time budget
(``run_skopeo``); 401, 404, refused connections and TLS handshakes that cannot succeed (an
HTTPS client facing a plain-HTTP registry, a certificate that does not verify) fail fast
with a message that says which.

Dependency direction: ``builder.blobcache`` (the pull side) imports this module, never the
reverse.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform as _platform
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder import proc
from helper.base.errors import (
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
# Patterns as text: ``re``'s own cache compiles each on first use, not at import (every
# `kiln run` imports this module for RegistryOptions; most runs name a volume).
_DOCKER_REF = (rf"^(?P<repo>(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*)"
               r"(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$")
_OCI_TAG = r"[A-Za-z0-9_][A-Za-z0-9._/-]*"

INDEX_TYPES = frozenset({"application/vnd.oci.image.index.v1+json",
                         "application/vnd.docker.distribution.manifest.list.v2+json"})


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
    if sep and transport != "docker-archive" and not re.fullmatch(_OCI_TAG, tail):
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
    if not re.fullmatch(_DOCKER_REF, name):
        raise _bad(f"invalid image reference {name!r}",
                   "expected [REGISTRY/]REPOSITORY[:TAG][@sha256:DIGEST], e.g. alpine:3.20")
    return ImageRef(transport, name)


def docker_repo(name: str) -> str:
    """``host/repo`` of a docker name, without tag or digest."""
    m = re.fullmatch(_DOCKER_REF, name)
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


# -- digests ----------------------------------------------------------------------------


def check_digest(digest: object, where: str = "") -> str:
    """``digest`` if it is ``sha256:<64 lowercase hex>``; anything else is refused."""
    if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
        at = f" in {where}" if where else ""
        raise IntegrityError(f"malformed digest {str(digest)[:100]!r}{at}",
                             "kiln accepts sha256 digests only; the source is broken or hostile")
    return digest


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

# A TLS handshake that cannot succeed however often it is retried: an HTTPS client talking
# to a plain-HTTP registry (skopeo's Go text; OpenSSL's through requests), or a certificate
# that does not verify.
_PLAIN_HTTP = (r"server gave HTTP response to HTTPS client|WRONG_VERSION_NUMBER|"
               r"record layer failure")
_BAD_CERT = r"x509:|CERTIFICATE_VERIFY_FAILED|certificate verify failed"
PLAIN_HTTP_HINT = ("it speaks plain HTTP: pass --tls-verify=false (or --no-tls-verify) to "
                   "use it without TLS")

_KINDS = (  # searched case-insensitively, in this order
    ("plainhttp", _PLAIN_HTTP),
    ("badcert", _BAD_CERT),
    ("integrity", r"digest did not match|digest mismatch|size mismatch|"
                  r"does not match config's DiffID"),
    ("auth", r"unauthorized|authentication required|invalid username/password|\b401\b|denied"),
    ("notfound", r"manifest unknown|name unknown|not found|\b404\b|no descriptor|"
                 r"no such file or directory|does not exist"),
    ("refused", r"connection refused|no route to host|no such host"),
    ("timeout", r"deadline exceeded|timeout|timed out"),
    ("transient", r"toomanyrequests|too many requests|\b429\b|\b5\d\d\b|"
                  r"connection reset|(?-i:EOF)|broken pipe|server misbehaving|temporar"),
)


def classify(stderr: str) -> str:
    """Kind of a skopeo failure: plainhttp, badcert, integrity, auth, notfound, refused,
    timeout, transient or other. Only timeout and transient are worth retrying (refused,
    briefly)."""
    for kind, pattern in _KINDS:
        if re.search(pattern, stderr, re.I):
            return kind
    return "other"


def backoff(attempt: int, base: float = 0.5, cap: float = 8.0) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based)."""
    return float(min(cap, base * (2 ** min(attempt, 16))))


REFUSED_ATTEMPTS = 3  # a registry that refuses connections 3 times over 1.5 s is down


def tls_failure(host: str, detail: str) -> RegistryError | None:
    """The error for a TLS failure retrying cannot fix (``detail``: the tool's text), else
    None (pure; the HTTP client of ``builder.publish`` uses it too)."""
    if re.search(_PLAIN_HTTP, detail, re.I):
        return RegistryError(f"registry {host} answered HTTPS with plain HTTP", PLAIN_HTTP_HINT)
    if re.search(_BAD_CERT, detail, re.I):
        return RegistryError(f"registry {host} has a TLS certificate that does not verify",
                             "install the CA that signed it, or pass --tls-verify=false to "
                             "skip verification")
    return None


def _failure(kind: str, ref: ImageRef, last: str, budget: float) -> KilnError:
    host = registry_host(ref)
    tls = tls_failure(host, last) if kind in ("plainhttp", "badcert") else None
    if tls is not None:
        return tls
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


def run_skopeo(args: list[str], ref: ImageRef, budget: float, attempt_timeout: float, *,
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
    return run_skopeo(args, ref, budget, ATTEMPT_TIMEOUT).stdout


def manifest_json(raw: bytes, ref: ImageRef) -> dict[str, Any]:
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
    doc = manifest_json(raw, ref)
    manifest_digests(doc)
    if is_index(doc):
        digest = check_digest(choose_platform(doc, plat).digest, f"the index of {ref}")
    if ref.transport == "docker":
        pinned = f"docker://{docker_repo(ref.name)}@{digest}"
    else:
        pinned = ref.skopeo()  # skopeo 1.9 cannot address these by digest; pull re-checks
    return Resolved(ref, digest, pinned, plat)

