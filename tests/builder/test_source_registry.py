"""builder.source against real registries, faults, and the other transports.

Every digest kiln computes is checked against skopeo's own view (``skopeo inspect``), and
what was fetched is checked in the registry's access log.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from builder import blobcache, proc
from builder import source as src
from builder.localregistry import LocalRegistry
from builder.root import Root
from helper.base.errors import IntegrityError, NotFound, RegistryError
from tests.support.images import busybox_layout, push_busybox, set_tag
from tests.support.registry import AuthRegistry, FaultProxy

INSECURE = src.RegistryOptions(tls_verify=False)


def skopeo_digest(ref: str, *flags: str) -> str:
    raw = proc.run("skopeo", ["inspect", "--raw", *flags, ref]).stdout
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def pull(text: str, root: Root, wd: Path, opts: src.RegistryOptions = INSECURE,
         **kw: object) -> blobcache.Pulled:
    return blobcache.pull(src.resolve(src.parse_ref(text), opts), opts, root, wd, **kw)  # type: ignore[arg-type]


def blob_gets(reg: LocalRegistry, digest: str) -> int:
    return sum(1 for a in reg.access_log()
               if a.method == "GET" and a.path.endswith(f"/blobs/{digest}") and a.status == 200)


@pytest.fixture
def root(tmp_path: Path) -> Root:
    return Root(tmp_path / "root").ensure()


def test_resolve_and_pull(busybox_image: str, root: Root, tmp_path: Path) -> None:
    resolved = src.resolve(src.parse_ref(busybox_image), INSECURE)
    assert resolved.digest == skopeo_digest(busybox_image, "--tls-verify=false")
    repo = busybox_image.removeprefix("docker://").rsplit(":", 1)[0]
    assert resolved.pinned == f"docker://{repo}@{resolved.digest}"
    assert resolved.platform == src.host_platform()
    events: list[blobcache.BlobProgress] = []
    pulled = blobcache.pull(resolved, INSECURE, root, tmp_path / "wd", on_progress=events.append)
    # skopeo reads the layout kiln returns and agrees on every digest
    layout_ref = f"oci:{pulled.layout}:{pulled.tag}"
    assert skopeo_digest(layout_ref) == pulled.manifest_digest == resolved.digest
    info = json.loads(proc.run("skopeo", ["inspect", layout_ref]).stdout)
    assert info["Layers"] == [d.digest for d in pulled.layers]
    assert pulled.config["config"]["Cmd"] == ["/bin/sh"]
    assert pulled.blobs == (pulled.manifest_digest, pulled.config_digest,
                            *(d.digest for d in pulled.layers))
    for d in pulled.blobs:  # in the shared cache, hard-linked into the layout
        cached = blobcache.blob_path(root, d)
        linked = pulled.layout / "blobs" / "sha256" / d[7:]
        assert cached.stat().st_ino == linked.stat().st_ino
        assert "sha256:" + hashlib.sha256(cached.read_bytes()).hexdigest() == d
    done = {e.digest: e for e in events if e.done == e.total}
    assert set(pulled.blobs) <= set(done)
    assert all(e.done <= e.total for e in events)
    # umoci can read the layout
    proc.run("umoci", ["stat", "--image", f"{pulled.layout}:{pulled.tag}"])


def test_shared_layer_is_fetched_once(registry: LocalRegistry,
                                      shared_base_images: tuple[str, str],
                                      root: Root, tmp_path: Path) -> None:
    first = pull(shared_base_images[0], root, tmp_path / "a")
    base_layer = first.layers[0].digest
    before = blob_gets(registry, base_layer)
    second = pull(shared_base_images[1], root, tmp_path / "b")
    assert second.layers[0].digest == base_layer
    assert len(second.layers) == 2
    assert blob_gets(registry, base_layer) == before  # not fetched again
    assert blob_gets(registry, second.layers[1].digest) >= 1


def test_multiarch_index(multiarch_image: tuple[str, dict[str, str]], root: Root,
                         tmp_path: Path) -> None:
    ref, plats = multiarch_image
    index_digest = skopeo_digest(ref, "--tls-verify=false")
    arm = src.resolve(src.parse_ref(ref), src.RegistryOptions(tls_verify=False,
                                                               platform="linux/arm64"))
    assert arm.digest == plats["linux/arm64/v8"] != index_digest
    amd = src.resolve(src.parse_ref(ref), src.RegistryOptions(tls_verify=False,
                                                               platform="linux/amd64"))
    assert amd.digest == plats["linux/amd64"]
    pulled = blobcache.pull(arm, src.RegistryOptions(tls_verify=False, platform="linux/arm64"),
                      root, tmp_path / "wd")
    assert pulled.manifest_digest == arm.digest
    assert pulled.config["architecture"] == "arm64"
    with pytest.raises(NotFound) as exc:
        src.resolve(src.parse_ref(ref), src.RegistryOptions(tls_verify=False,
                                                             platform="linux/s390x"))
    assert "it offers: linux/amd64, linux/arm64/v8" in exc.value.message


def test_tampered_cache_blob_is_pulled_again(registry: LocalRegistry, busybox_image: str,
                                            root: Root, tmp_path: Path) -> None:
    first = pull(busybox_image, root, tmp_path / "a")
    layer = first.layers[0].digest
    cached = blobcache.blob_path(root, layer)
    data = bytearray(cached.read_bytes())
    data[100] ^= 0xFF
    cached.unlink()  # the layout holds a hard link: write a new file, as an attacker would
    cached.write_bytes(bytes(data))
    before = blob_gets(registry, layer)
    again = pull(busybox_image, root, tmp_path / "b")
    assert blob_gets(registry, layer) == before + 1
    assert again.layers == first.layers
    assert "sha256:" + hashlib.sha256(cached.read_bytes()).hexdigest() == layer


# -- auth ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_image(auth_registry: AuthRegistry) -> str:
    return push_busybox(auth_registry.address, "private/busybox", "1",
                        authfile=auth_registry.authfile)


def test_auth_with_authfile(auth_registry: AuthRegistry, auth_image: str, root: Root,
                            tmp_path: Path) -> None:
    opts = src.RegistryOptions(tls_verify=False, authfile=auth_registry.authfile)
    pulled = pull(auth_image, root, tmp_path / "wd", opts)
    assert pulled.manifest_digest == skopeo_digest(
        auth_image, "--tls-verify=false", "--authfile", str(auth_registry.authfile))


def test_auth_from_registry_auth_file(auth_registry: AuthRegistry, auth_image: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth_registry.authfile))
    assert src.resolve(src.parse_ref(auth_image), INSECURE).digest.startswith("sha256:")


def test_auth_refused(auth_registry: AuthRegistry, auth_image: str, tmp_path: Path,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))  # no default auth.json either
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(RegistryError) as exc:
        src.resolve(src.parse_ref(auth_image), INSECURE)
    assert exc.value.message == f"authentication failed for {auth_registry.address} " \
        f"({auth_image})"
    assert "--authfile" in exc.value.hint
    wrong = tmp_path / "wrong.json"
    from tests.support.registry import write_authfile
    write_authfile(wrong, auth_registry.address, auth_registry.username, "nope")
    with pytest.raises(RegistryError, match="authentication failed"):
        src.resolve(src.parse_ref(auth_image), src.RegistryOptions(tls_verify=False,
                                                                    authfile=wrong))


# -- faults ----------------------------------------------------------------------------


def _via(proxy: FaultProxy, image: str) -> str:
    return f"docker://{proxy.address}/{image.split('/', 3)[3]}"


def test_fault_401(fault_proxy: FaultProxy, busybox_image: str) -> None:
    fault_proxy.set_fault("401")
    with pytest.raises(RegistryError) as exc:
        src.resolve(src.parse_ref(_via(fault_proxy, busybox_image)), INSECURE)
    assert exc.value.message.startswith(f"authentication failed for {fault_proxy.address}")


def test_fault_404(fault_proxy: FaultProxy, busybox_image: str) -> None:
    fault_proxy.set_fault("404")
    ref = _via(fault_proxy, busybox_image)
    with pytest.raises(RegistryError) as exc:
        src.resolve(src.parse_ref(ref), INSECURE)
    assert exc.value.message == f"image not found: {ref}"


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["429", "503"])
def test_fault_then_success(fault_proxy: FaultProxy, busybox_image: str, fault: str,
                            root: Root, tmp_path: Path) -> None:
    ref = _via(fault_proxy, busybox_image)
    fault_proxy.set_fault(fault, times=1)
    resolved = src.resolve(src.parse_ref(ref), INSECURE)
    assert fault_proxy.hits == 1
    assert resolved.digest == skopeo_digest(busybox_image, "--tls-verify=false")
    fault_proxy.set_fault(fault, times=1, match="/blobs/")
    pulled = blobcache.pull(resolved, INSECURE, root, tmp_path / "wd")
    assert fault_proxy.hits == 1
    assert pulled.manifest_digest == resolved.digest


@pytest.mark.slow
def test_fault_503_forever_gives_up_within_budget(fault_proxy: FaultProxy,
                                                  busybox_image: str) -> None:
    fault_proxy.set_fault("503")
    start = time.monotonic()
    with pytest.raises(RegistryError) as exc:
        src.resolve(src.parse_ref(_via(fault_proxy, busybox_image)), INSECURE, budget=4)
    assert time.monotonic() - start < 8
    assert exc.value.message.startswith(f"registry {fault_proxy.address} kept failing for 4 s")
    assert fault_proxy.hits >= 3


@pytest.mark.slow
def test_fault_stall(fault_proxy: FaultProxy, busybox_image: str) -> None:
    fault_proxy.set_fault("stall")
    start = time.monotonic()
    with pytest.raises(RegistryError) as exc:
        src.resolve(src.parse_ref(_via(fault_proxy, busybox_image)), INSECURE, budget=3)
    assert time.monotonic() - start < 10
    assert exc.value.message == f"registry {fault_proxy.address} did not answer within 3 s"


@pytest.mark.slow
def test_registry_down(closed_address: str) -> None:
    start = time.monotonic()
    with pytest.raises(RegistryError) as exc:
        src.resolve(src.parse_ref(f"docker://{closed_address}/demo/x:1"), INSECURE)
    assert time.monotonic() - start < 60
    assert exc.value.message.startswith(f"cannot connect to registry {closed_address}: ")
    assert exc.value.message.endswith("connection refused")


def test_truncated_blob_is_retried(fault_proxy: FaultProxy, busybox_image: str, root: Root,
                                   tmp_path: Path) -> None:
    resolved = src.resolve(src.parse_ref(_via(fault_proxy, busybox_image)), INSECURE)
    fault_proxy.set_fault("truncate", times=1, match="/blobs/")
    pulled = blobcache.pull(resolved, INSECURE, root, tmp_path / "wd")
    assert fault_proxy.hits == 1
    assert pulled.manifest_digest == resolved.digest


def test_corrupt_blob_is_an_integrity_error(fault_proxy: FaultProxy, busybox_image: str,
                                            root: Root, tmp_path: Path) -> None:
    ref = _via(fault_proxy, busybox_image)
    resolved = src.resolve(src.parse_ref(ref), INSECURE)
    layer = json.loads(proc.run("skopeo", ["inspect", "--raw", "--tls-verify=false",
                                           busybox_image]).stdout)["layers"][0]["digest"]
    fault_proxy.set_fault("corrupt", match=f"/blobs/{layer}")
    with pytest.raises(IntegrityError) as exc:
        blobcache.pull(resolved, INSECURE, root, tmp_path / "wd")
    assert exc.value.message.startswith(f"{resolved.ref}: data from the source does not match")
    assert layer in exc.value.message
    assert not blobcache.blob_path(root, layer).exists()


# -- other transports ------------------------------------------------------------------


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("archives")
    layout = busybox_layout()
    refs = {"oci": f"oci:{layout}:2", "oci-archive": f"oci-archive:{d / 'img.tar'}",
            "docker-archive": f"docker-archive:{d / 'docker.tar'}"}
    for kind in ("oci-archive", "docker-archive"):
        proc.run("skopeo", ["copy", "--quiet", f"oci:{layout}:2", refs[kind]])
    return refs


@pytest.mark.parametrize("kind", ["oci", "oci-archive", "docker-archive"])
def test_other_transports(archives: dict[str, str], kind: str, root: Root,
                          tmp_path: Path) -> None:
    ref = src.parse_ref(archives[kind])
    assert ref.transport == kind
    resolved = src.resolve(ref, src.RegistryOptions())
    assert resolved.digest == skopeo_digest(archives[kind])
    assert resolved.pinned == archives[kind]
    pulled = blobcache.pull(resolved, src.RegistryOptions(), root, tmp_path / "wd")
    assert len(pulled.layers) == 2
    assert pulled.config["config"]["Cmd"] == ["/bin/sh"]
    proc.run("umoci", ["stat", "--image", f"{pulled.layout}:{pulled.tag}"])


def test_oci_index_picks_the_platform(multiarch_image: tuple[str, dict[str, str]],
                                      root: Root, tmp_path: Path) -> None:
    plats = multiarch_image[1]
    text = f"oci:{busybox_layout()}:multi"
    opts = src.RegistryOptions(platform="linux/arm64")
    resolved = src.resolve(src.parse_ref(text), opts)
    assert resolved.digest == plats["linux/arm64/v8"]
    assert resolved.pinned == text  # skopeo 1.9 cannot pin oci: by digest
    pulled = blobcache.pull(resolved, opts, root, tmp_path / "wd")
    assert pulled.manifest_digest == resolved.digest
    assert pulled.config["architecture"] == "arm64"


def test_missing_oci_layout(tmp_path: Path) -> None:
    ref = src.parse_ref(f"oci:{tmp_path}/none:1")
    with pytest.raises(RegistryError) as exc:
        src.resolve(ref, src.RegistryOptions())
    assert exc.value.message == f"image not found: oci:{tmp_path}/none:1"


def _hand_made(tmp_path: Path, layer_bytes: bytes, media: str, digest: str | None = None) -> str:
    """A copy of the busybox layout whose tag ``bad`` has one hand-made layer."""
    import shutil

    layout = tmp_path / "layout"
    shutil.copytree(busybox_layout(), layout)
    blobs = layout / "blobs" / "sha256"
    ld = hashlib.sha256(layer_bytes).hexdigest()
    (blobs / ld).write_bytes(layer_bytes)
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": ["sha256:" + ld]}}).encode()
    cd = hashlib.sha256(config).hexdigest()
    (blobs / cd).write_bytes(config)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": "sha256:" + cd, "size": len(config)},
        "layers": [{"mediaType": media, "digest": digest or "sha256:" + ld,
                    "size": len(layer_bytes)}]}).encode()
    md = hashlib.sha256(manifest).hexdigest()
    (blobs / md).write_bytes(manifest)
    set_tag(layout, "bad", {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                            "digest": "sha256:" + md, "size": len(manifest)})
    return f"oci:{layout}:bad"


def test_layer_type_must_match_media_type(tmp_path: Path, root: Root) -> None:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        info = tarfile.TarInfo("hello")
        info.size = 2
        t.addfile(info, io.BytesIO(b"hi"))
    data = buf.getvalue()
    ref = _hand_made(tmp_path, data, "application/vnd.oci.image.layer.v1.tar+gzip")
    resolved = src.resolve(src.parse_ref(ref), src.RegistryOptions())
    # Copied afresh, skopeo notices the blob is not compressed and gzips it (a new digest);
    # a blob already in the cache is reused as is: that mislabelled blob is what kiln sees.
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobcache.blob_path(root, digest).write_bytes(data)
    with pytest.raises(IntegrityError) as exc:
        blobcache.pull(resolved, src.RegistryOptions(), root, tmp_path / "wd")
    assert "is application/x-tar, not gzip" in exc.value.message


def test_malformed_digest_is_refused_before_skopeo_copies(tmp_path: Path, root: Root) -> None:
    ref = _hand_made(tmp_path, b"x", "application/vnd.oci.image.layer.v1.tar",
                     digest="sha256:../../../../../tmp/kiln-evil")
    with pytest.raises(IntegrityError) as exc:
        src.resolve(src.parse_ref(ref), src.RegistryOptions())
    assert exc.value.message == \
        "malformed digest 'sha256:../../../../../tmp/kiln-evil' in the manifest"


@pytest.mark.slow
def test_pull_waits_for_an_exclusive_cache_lock(busybox_image: str, root: Root,
                                                tmp_path: Path) -> None:
    import threading

    resolved = src.resolve(src.parse_ref(busybox_image), INSECURE)
    result: list[blobcache.Pulled] = []
    with root.lock("blobs"):  # what gc takes
        t = threading.Thread(target=lambda: result.append(
            blobcache.pull(resolved, INSECURE, root, tmp_path / "wd")))
        t.start()
        t.join(1.5)
        assert t.is_alive()
        assert not result
    t.join(30)
    assert result
    assert result[0].manifest_digest == resolved.digest


@pytest.mark.slow
def test_debian_minbase(debian_image: str, root: Root, tmp_path: Path) -> None:
    resolved = src.resolve(src.parse_ref(debian_image), INSECURE)
    assert resolved.digest == skopeo_digest(debian_image, "--tls-verify=false")
    pulled = blobcache.pull(resolved, INSECURE, root, tmp_path / "wd")
    assert pulled.config["config"]["Cmd"] == ["/bin/bash"]
    assert len(pulled.layers) == 1
    assert pulled.layers[0].size > 10_000_000
    proc.run("umoci", ["stat", "--image", f"{pulled.layout}:{pulled.tag}"])
