"""builder.source, pure parts: reference parsing, argv, platform choice, failure kinds."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from builder import blobcache
from builder import source as src
from builder.root import Root
from helper.base.errors import IntegrityError, NotFound, UsageError

HEX = "ab" * 32
CWD = os.getcwd()

ACCEPT = [
    ("alpine:3.20", "docker", "alpine:3.20"),
    ("alpine", "docker", "alpine"),
    ("docker://alpine:3.20", "docker", "alpine:3.20"),
    ("  docker://alpine  ", "docker", "alpine"),
    ("127.0.0.1:5000/demo/busybox:1", "docker", "127.0.0.1:5000/demo/busybox:1"),
    ("docker://localhost:5000/a/b", "docker", "localhost:5000/a/b"),
    ("quay.io/org/img@sha256:" + HEX, "docker", "quay.io/org/img@sha256:" + HEX),
    ("ghcr.io/o/i:v1.2_3-x@sha256:" + HEX, "docker", "ghcr.io/o/i:v1.2_3-x@sha256:" + HEX),
    ("library/debian__x:bookworm", "docker", "library/debian__x:bookworm"),
    ("oci:/srv/layout", "oci", "/srv/layout"),
    ("oci:/srv/layout:v1", "oci", "/srv/layout:v1"),
    ("oci:rel/dir:tag", "oci", f"{CWD}/rel/dir:tag"),
    ("oci-archive:img.tar", "oci-archive", f"{CWD}/img.tar"),
    ("oci-archive:/x/img.tar:latest", "oci-archive", "/x/img.tar:latest"),
    ("docker-archive:/x/d.tar", "docker-archive", "/x/d.tar"),
    ("docker-archive:/x/d.tar:busybox:1", "docker-archive", "/x/d.tar:busybox:1"),
]

REJECT = [
    ("", "image reference is empty"),
    ("   ", "image reference is empty"),
    ("https://x/y", "unknown transport 'https' in 'https://x/y'"),
    ("docker:alpine", "docker references need '//': use 'docker://alpine'"),
    ("dir:/tmp/x", "transport 'dir' is not supported"),
    ("containers-storage:alpine", "transport 'containers-storage' is not supported"),
    ("docker-daemon:alpine:3", "transport 'docker-daemon' is not supported"),
    ("Alpine", "invalid image reference 'Alpine'"),
    ("docker://alpine:", "invalid image reference 'alpine:'"),
    ("docker://", "invalid image reference ''"),
    ("alpine@sha512:" + HEX, f"invalid image reference 'alpine@sha512:{HEX}'"),
    ("alpine@sha256:abc", "invalid image reference 'alpine@sha256:abc'"),
    ("a/../b", "invalid image reference 'a/../b'"),
    ("oci:", "oci: needs a path"),
    ("oci::tag", "oci: needs a path"),
    ("oci:/x:", "empty tag in oci:/x:"),
    ("oci:/x:bad tag", "invalid tag 'bad tag' in oci:/x:bad tag"),
    ("oci-archive:", "oci-archive: needs a path"),
]


@pytest.mark.parametrize(("text", "transport", "name"), ACCEPT)
def test_parse_ref_accepts(text: str, transport: str, name: str) -> None:
    ref = src.parse_ref(text)
    assert (ref.transport, ref.name) == (transport, name)


@pytest.mark.parametrize(("text", "message"), REJECT)
def test_parse_ref_rejects_with_exact_message(text: str, message: str) -> None:
    with pytest.raises(UsageError) as exc:
        src.parse_ref(text)
    assert exc.value.message == message
    assert exc.value.hint


def test_parse_ref_path_with_colon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "a:b"
    d.mkdir()
    monkeypatch.chdir(d)
    with pytest.raises(UsageError) as exc:
        src.parse_ref("oci:layout")
    assert exc.value.message == f"path '{d}/layout' contains ':'"


def test_skopeo_form() -> None:
    assert src.parse_ref("alpine:3").skopeo() == "docker://alpine:3"
    assert src.parse_ref("oci:/l:t").skopeo() == "oci:/l:t"
    assert src.parse_ref("docker-archive:/d.tar").skopeo() == "docker-archive:/d.tar"
    assert src.docker_repo("127.0.0.1:5000/a/b:1") == "127.0.0.1:5000/a/b"
    assert src.docker_repo(f"a/b:1@sha256:{HEX}") == "a/b"
    assert src.registry_host(src.parse_ref("127.0.0.1:5000/a:1")) == "127.0.0.1:5000"
    assert src.registry_host(src.parse_ref("library/alpine")) == "docker.io"


# -- argv ------------------------------------------------------------------------------


def test_inspect_argv_docker_insecure_with_authfile() -> None:
    ref = src.parse_ref("docker://127.0.0.1:5000/demo/busybox:1")
    opts = src.RegistryOptions(tls_verify=False, authfile=Path("/etc/auth.json"))
    assert src.inspect_argv(ref, opts, 20) == [
        "--command-timeout", "20s",
        "inspect",
        "--raw",
        "--tls-verify=false",
        "--authfile", "/etc/auth.json",
        "docker://127.0.0.1:5000/demo/busybox:1",
    ]


def test_inspect_argv_oci_has_no_registry_flags() -> None:
    ref = src.parse_ref("oci:/srv/l:1")
    opts = src.RegistryOptions(tls_verify=False, authfile=Path("/a.json"))
    assert src.inspect_argv(ref, opts, 0.2) == [
        "--command-timeout", "1s", "inspect", "--raw", "oci:/srv/l:1"]


def test_copy_argv() -> None:
    ref = src.parse_ref("docker://r:5000/a:1")
    opts = src.RegistryOptions(tls_verify=False, authfile=Path("/a.json"))
    argv = src.copy_argv(f"docker://r:5000/a@sha256:{HEX}", ref, opts,
                         platform="linux/arm64/v8", blobs=Path("/k/blobs"),
                         layout=Path("/k/tmp/w/layout"), tmpdir=Path("/k/tmp/w/t"),
                         timeout=3600)
    assert argv == [
        "--command-timeout", "3600s",
        "--tmpdir", "/k/tmp/w/t",
        "--override-os", "linux",
        "--override-arch", "arm64",
        "--override-variant", "v8",
        "copy",
        "--src-tls-verify=false",
        "--src-authfile", "/a.json",
        "--dest-shared-blob-dir", "/k/blobs",
        f"docker://r:5000/a@sha256:{HEX}",
        "oci:/k/tmp/w/layout:image",
    ]
    plain = src.copy_argv("oci:/l:1", src.parse_ref("oci:/l:1"), src.RegistryOptions(),
                          platform="linux/amd64", blobs=Path("/b"), layout=Path("/w/l"),
                          tmpdir=Path("/w/t"), timeout=10)
    assert plain == ["--command-timeout", "10s", "--tmpdir", "/w/t", "--override-os", "linux",
                     "--override-arch", "amd64", "copy", "--dest-shared-blob-dir", "/b",
                     "oci:/l:1", "oci:/w/l:image"]


# -- digests ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    "sha256:../../../etc/passwd", "sha256:" + "AB" * 32, "sha512:" + "ab" * 64,
    "sha256:" + "ab" * 31, "sha256:" + HEX + "/x", "", None, 5, "sha256:" + HEX + "\n"])
def test_blob_path_rejects_malformed_digests(bad: Any) -> None:
    with pytest.raises(IntegrityError) as exc:
        blobcache.blob_path(Root(Path("/k")), bad)
    assert exc.value.message.startswith("malformed digest")


def test_blob_path() -> None:
    assert blobcache.blob_path(Root(Path("/k")), "sha256:" + HEX) == Path("/k/blobs/sha256") / HEX


def test_manifest_digests_checks_every_digest() -> None:
    good = {"config": {"digest": "sha256:" + HEX},
            "layers": [{"digest": "sha256:" + "cd" * 32}], "fsLayers": []}
    assert src.manifest_digests(good) == ["sha256:" + HEX, "sha256:" + "cd" * 32]
    with pytest.raises(IntegrityError) as exc:
        src.manifest_digests({"layers": [{"digest": "sha256:../../x"}]})
    assert exc.value.message == "malformed digest 'sha256:../../x' in the manifest"
    with pytest.raises(IntegrityError):
        src.manifest_digests({"fsLayers": [{"blobSum": "sha256:zz"}]})


# -- platform choice -------------------------------------------------------------------

OSES = st.sampled_from(["linux", "windows"])
ARCHES = st.sampled_from(["amd64", "arm64", "arm", "s390x"])
VARIANTS = st.sampled_from(["", "v6", "v7", "v8"])


@st.composite
def indexes(draw: st.DrawFn) -> dict[str, Any]:
    entries = []
    for i in range(draw(st.integers(0, 6))):
        plat = {"os": draw(OSES), "architecture": draw(ARCHES)}
        v = draw(VARIANTS)
        if v:
            plat["variant"] = v
        entries.append({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": f"sha256:{i:064x}", "size": 100 + i, "platform": plat})
    return {"schemaVersion": 2, "manifests": entries}


def _matches(entry: dict[str, Any], os_: str, arch: str, variant: str) -> bool:
    p = entry["platform"]
    if (p["os"], p["architecture"]) != (os_, arch):
        return False
    if not variant:
        return True
    have = p.get("variant", "") or ("v8" if arch == "arm64" else "")
    return have == ("v8" if arch == "arm64" and not variant else variant)


@given(indexes(), OSES, ARCHES, VARIANTS)
def test_choose_platform_properties(index: dict[str, Any], os_: str, arch: str,
                                    variant: str) -> None:
    want = f"{os_}/{arch}" + (f"/{variant}" if variant else "")
    matching = [e for e in index["manifests"] if _matches(e, os_, arch, variant)]
    if not matching:
        with pytest.raises(NotFound) as exc:
            src.choose_platform(index, want)
        assert exc.value.message.startswith(f"image has no manifest for platform {want} ")
        return
    got = src.choose_platform(index, want)
    # the first matching entry, in index order, and never anything else
    first = matching[0]
    assert got == src.Descriptor(first["mediaType"], first["digest"], first["size"])
    # entries for other platforms do not change the choice
    others = [e for e in index["manifests"] if not _matches(e, os_, arch, variant)]
    assert src.choose_platform({"manifests": [*others, *matching]}, want) == got


def test_choose_platform_examples() -> None:
    idx = {"manifests": [
        {"mediaType": "m", "digest": "sha256:1", "size": 1,
         "platform": {"os": "unknown", "architecture": "unknown"}},
        {"mediaType": "m", "digest": "sha256:2", "size": 2,
         "platform": {"os": "linux", "architecture": "arm", "variant": "v7"}},
        {"mediaType": "m", "digest": "sha256:3", "size": 3,
         "platform": {"os": "linux", "architecture": "arm64"}},
        {"mediaType": "m", "digest": "sha256:4", "size": 4,
         "platform": {"os": "linux", "architecture": "amd64"}},
    ]}
    assert src.choose_platform(idx, "linux/arm64/v8").digest == "sha256:3"
    assert src.choose_platform(idx, "linux/arm/v7").digest == "sha256:2"
    assert src.choose_platform(idx, None).digest == {
        "linux/amd64": "sha256:4", "linux/arm64": "sha256:3"}.get(src.host_platform())
    with pytest.raises(NotFound) as exc:
        src.choose_platform(idx, "linux/arm/v6")
    assert exc.value.message == ("image has no manifest for platform linux/arm/v6 (it offers: "
                                 "linux/amd64, linux/arm/v7, linux/arm64, unknown/unknown)")
    assert exc.value.hint == "choose one of those with --platform OS/ARCH"


@pytest.mark.parametrize("bad", ["linux", "linux/", "Linux/amd64", "linux/amd64/v8/x", ""])
def test_platform_syntax(bad: str) -> None:
    with pytest.raises(UsageError) as exc:
        src.choose_platform({"manifests": []}, bad or "/")
    assert exc.value.message == f"invalid platform {bad or '/'!r}"


# -- failures --------------------------------------------------------------------------

PREFIX = 'time="2026-11-23T12:02:59Z" level=fatal msg="'
CLASSIFY = [
    ('Error parsing image name \\"docker://h/demo/bb:1\\": reading manifest 1 in h/demo/bb: '
     'unauthorized"', "auth"),
    ('reading blob sha256:aa: unable to retrieve auth token: invalid username/password: '
     'unauthorized"', "auth"),
    ('reading manifest 1 in h/demo/bb: manifest unknown: manifest unknown"', "notfound"),
    ('Error fetching blob: invalid status code from registry 404 (Not Found)"', "notfound"),
    ('Error parsing image name \\"oci:/l:nope\\": no descriptor found for reference', "notfound"),
    ('opening file \\"/tmp/x\\": open /tmp/x: no such file or directory"', "notfound"),
    ('pinging container registry 127.0.0.1:1: Get \\"http://127.0.0.1:1/v2/\\": dial tcp '
     '127.0.0.1:1: connect: connection refused"', "refused"),
    ('reading manifest 1 in h/x: received unexpected HTTP status: 503 Service Unavailable"',
     "transient"),
    ('Error fetching blob: invalid status code from registry 503 (Service Unavailable)"',
     "transient"),
    ('writing blob: happened during read: unexpected EOF"', "transient"),
    ('reading blob sha256:aa: context deadline exceeded"', "timeout"),
    ('Get \\"http://h/v2/x/manifests/1\\": context deadline exceeded"', "timeout"),
    ('writing blob: happened during read: Digest did not match, expected sha256:aa, got '
     'sha256:bb"', "integrity"),
    ('something else entirely"', "other"),
    ('Error parsing image name \\"docker://127.0.0.1:5000/x:1\\": pinging container registry '
     '127.0.0.1:5000: Get \\"https://127.0.0.1:5000/v2/\\": http: server gave HTTP response to '
     'HTTPS client"', "plainhttp"),
    ('pinging container registry h: Get \\"https://h/v2/\\": tls: failed to verify certificate: '
     'x509: certificate signed by unknown authority"', "badcert"),
]


@pytest.mark.parametrize(("msg", "kind"), CLASSIFY)
def test_classify(msg: str, kind: str) -> None:
    assert src.classify(PREFIX + msg) == kind


def test_tls_failures_are_one_line_with_the_flag_as_hint() -> None:
    requests_text = ("HTTPSConnectionPool(host='h', port=5000): Max retries exceeded with url: "
                     "/v2/ (Caused by SSLError(SSLError(1, '[SSL: WRONG_VERSION_NUMBER] wrong "
                     "version number (_ssl.c:1006)')))")
    err = src.tls_failure("h:5000", requests_text)
    assert err is not None
    assert (err.message, err.hint) == (
        "registry h:5000 answered HTTPS with plain HTTP",
        "it speaks plain HTTP: pass --tls-verify=false (or --no-tls-verify) to use it without "
        "TLS")
    cert = src.tls_failure("h", "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    assert cert is not None
    assert "--tls-verify=false" in cert.hint
    assert src.tls_failure("h", "[SSL: UNEXPECTED_EOF_WHILE_READING] EOF occurred") is None


def test_skopeo_message() -> None:
    line = PREFIX + 'Error parsing image name \\"docker://h/x\\": manifest unknown"'
    assert src.skopeo_message("noise\n" + line) == 'Error parsing image name "docker://h/x": ' \
        "manifest unknown"


@given(st.integers(0, 100))
def test_backoff_grows_and_is_capped(n: int) -> None:
    assert 0 < src.backoff(n) <= 8.0
    assert src.backoff(n + 1) >= src.backoff(n)


@pytest.mark.parametrize(("media", "kind"), [
    ("application/vnd.oci.image.layer.v1.tar+gzip", "gzip"),
    ("application/vnd.docker.image.rootfs.diff.tar.gzip", "gzip"),
    ("application/vnd.oci.image.layer.v1.tar+zstd", "zstd"),
    ("application/vnd.oci.image.layer.v1.tar", "tar"),
    ("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", "gzip"),
])
def test_layer_kind(media: str, kind: str) -> None:
    assert blobcache.layer_kind(media) == kind


def test_layer_kind_unknown() -> None:
    with pytest.raises(IntegrityError) as exc:
        blobcache.layer_kind("application/vnd.oci.image.layer.v1.tar+encrypted")
    assert exc.value.message == ("unsupported layer media type "
                                 "'application/vnd.oci.image.layer.v1.tar+encrypted'")


def test_check_layer_type(tmp_path: Path) -> None:
    import gzip
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        info = tarfile.TarInfo("hello")
        info.size = 2
        t.addfile(info, io.BytesIO(b"hi"))
    tar = tmp_path / "l.tar"
    tar.write_bytes(buf.getvalue())
    gz = tmp_path / "l.tar.gz"
    gz.write_bytes(gzip.compress(buf.getvalue()))
    empty = tmp_path / "empty.tar"
    empty.write_bytes(bytes(1024))
    oci = "application/vnd.oci.image.layer.v1.tar"
    blobcache.check_layer_type(tar, oci, "sha256:x", "img")
    blobcache.check_layer_type(gz, oci + "+gzip", "sha256:x", "img")
    blobcache.check_layer_type(empty, oci, "sha256:x", "img")
    with pytest.raises(IntegrityError) as exc:
        blobcache.check_layer_type(tar, oci + "+gzip", "sha256:x", "img")
    assert exc.value.message == ("layer sha256:x of img is application/x-tar, not gzip as its "
                                 "media type application/vnd.oci.image.layer.v1.tar+gzip says")
    with pytest.raises(IntegrityError):
        blobcache.check_layer_type(gz, oci + "+zstd", "sha256:x", "img")
