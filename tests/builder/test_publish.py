"""kiln push / pull against real docker-registry 2.8 instances on loopback (plain and
htpasswd), checked with the registry's access log, its storage on disk, and skopeo."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from builder import proc, publish, registryclient
from builder.localregistry import LocalRegistry
from builder.pipeline import build
from builder.registryclient import Client
from builder.root import Root
from builder.source import RegistryOptions
from builder.store import Store, Volume
from helper.base.errors import IntegrityError, RegistryError, UsageError
from tests.support.images import push_busybox
from tests.support.registry import AuthRegistry, FaultProxy

PLAIN = RegistryOptions(tls_verify=False)
KILN_DIST = [sys.executable, "-c",
             "from runner.cli import cli; cli(prog_name='kiln')"]


def kiln(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([*KILN_DIST, "--root", str(root), *args], capture_output=True,
                         text=True, timeout=120, check=False)
    if check and res.returncode != 0:
        raise AssertionError(f"kiln {' '.join(args)} exited {res.returncode}: {res.stderr}")
    return res


@pytest.fixture(scope="module")
def built(registry: LocalRegistry, tmp_path_factory: pytest.TempPathFactory) -> Volume:
    """A real busybox volume in its own root."""
    ref = push_busybox(registry.address, "pubsrc/busybox", "1")
    root = Root(tmp_path_factory.mktemp("pubroot") / "root")
    return build(root, ref, PLAIN).volume


@pytest.fixture
def own_registry(tmp_path: Path) -> Iterator[LocalRegistry]:
    """A registry of the test's own, whose storage the test may edit."""
    with LocalRegistry(data_dir=tmp_path / "regdata") as reg:
        yield reg


def root_of(vol: Volume) -> Root:
    return Root(vol.dir.parent.parent)


def blob_file(reg: LocalRegistry, digest: str) -> Path:
    hexd = digest[7:]
    return reg.data_dir / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"


# -- pure ------------------------------------------------------------------------------------


def test_parse_target_forms() -> None:
    t = publish.parse_target("docker://127.0.0.1:5000/vols/deb:1")
    assert (t.host, t.repo, t.tag, t.digest) == ("127.0.0.1:5000", "vols/deb", "1", None)
    d = "sha256:" + "a" * 64
    t = publish.parse_target(f"reg.example.com/x@{d}")
    assert (t.host, t.repo, t.tag, t.digest, t.reference) == ("reg.example.com", "x", None, d, d)
    assert publish.parse_target("localhost/a/b").reference == "latest"


@pytest.mark.parametrize("bad", ["debian:12", "vols/deb:1", "127.0.0.1:5000/UPPER:1",
                                 "oci:/x", "host.example/x@sha256:abc", ""])
def test_parse_target_rejects(bad: str) -> None:
    with pytest.raises(UsageError) as e:
        publish.parse_target(bad)
    assert e.value.message == f"invalid registry reference {bad!r}"
    assert e.value.hint.startswith("expected HOST[:PORT]/REPO[:TAG|@sha256:DIGEST]")


@given(host=st.sampled_from(["localhost", "127.0.0.1:5000", "reg.example.com:443", "a.b"]),
       repo=st.from_regex(r"[a-z0-9]{1,8}(/[a-z0-9]{1,8}){0,2}", fullmatch=True),
       tag=st.none() | st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True))
def test_parse_target_round_trips(host: str, repo: str, tag: str | None) -> None:
    text = f"{host}/{repo}" + (f":{tag}" if tag else "")
    t = publish.parse_target(text)
    assert str(t) == text
    assert publish.parse_target(f"docker://{t}") == t


def test_manifest_round_trip_and_refusals() -> None:
    vid = "sha256:" + "1" * 64
    raw = publish.manifest_for(config=("sha256:" + "2" * 64, 10), layer=("sha256:" + "3" * 64, 20),
                               volume_id=vid, size=4096, version="0.1",
                               meta={"source": "docker://x/y:1", "build_key": "sha256:" + "4" * 64})
    doc = json.loads(raw)
    assert doc["mediaType"] == publish.MANIFEST_TYPE
    assert doc["artifactType"] == publish.ARTIFACT_TYPE
    assert doc["annotations"][publish.A_SOURCE] == "docker://x/y:1"
    p = publish.parse_manifest(doc, "r")
    assert (p.volume_id, p.size, p.layer) == (vid, 4096, ("sha256:" + "3" * 64, 20))
    with pytest.raises(UsageError, match=r"^r is not a kiln volume \(artifactType is not "):
        publish.parse_manifest({**doc, "artifactType": "application/x"}, "r")
    bad = {**doc, "layers": [{**doc["layers"][0], "digest": "sha256:../../etc"}]}
    with pytest.raises(IntegrityError, match="malformed digest"):
        publish.parse_manifest(bad, "r")
    forged = {**doc, "annotations": {**doc["annotations"], publish.A_ID: "md5:x"}}
    with pytest.raises(IntegrityError, match=r"^r has a malformed kiln manifest: invalid volume"):
        publish.parse_manifest(forged, "r")


# -- real registries ---------------------------------------------------------------------------


def test_push_pull_round_trip_same_id_and_bytes(built: Volume, own_registry: LocalRegistry,
                                                tmp_path: Path) -> None:
    ref = f"{own_registry.address}/vols/busybox:1"
    out = publish.push_volume(root_of(built), built, ref, PLAIN)
    assert out["ref"] == ref
    assert out["digest"].startswith("sha256:")
    # skopeo reads what kiln wrote: the manifest digest and kiln's media types
    raw = proc.run("skopeo", ["inspect", "--raw", "--tls-verify=false", f"docker://{ref}"]).stdout
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == out["digest"]
    doc = json.loads(raw)
    assert doc["artifactType"] == "application/vnd.kiln.volume.v1"
    assert doc["layers"][0]["mediaType"] == "application/vnd.kiln.volume.ext4.v1+zstd"
    assert doc["annotations"]["dev.kiln.volume.id"] == built.id
    assert doc["annotations"]["dev.kiln.volume.size"] == str(built.size)
    assert doc["annotations"]["dev.kiln.build-key"] == built.meta["build_key"]
    assert doc["annotations"]["dev.kiln.source.digest"] == built.meta["source_digest"]

    fresh = Root(tmp_path / "fresh")
    got = publish.pull_volume(fresh, f"docker://{ref}", PLAIN)
    assert got.volume.id == built.id
    assert not got.already
    assert got.volume.path.read_bytes() == built.path.read_bytes()
    assert got.volume.meta["config"] == built.meta["config"]  # `kiln run` needs it
    assert "recipe" not in got.volume.meta
    Store(fresh).verify(got.volume)
    # pulling by digest checks the manifest bytes too; a second pull finds it present
    again = publish.pull_volume(fresh, f"{own_registry.address}/vols/busybox@{out['digest']}",
                                PLAIN)
    assert again.already
    assert again.volume.id == built.id


def test_second_push_sends_no_blob(built: Volume, own_registry: LocalRegistry) -> None:
    root = root_of(built)
    first = publish.push_volume(root, built, f"{own_registry.address}/v/b:1", PLAIN)
    n = len(own_registry.access_log())
    second = publish.push_volume(root, built, f"{own_registry.address}/v/b:2", PLAIN)
    assert second["digest"] == first["digest"]
    assert second["uploaded"] == 0
    later = own_registry.access_log()[n:]
    # only HEADs for the two blobs and the manifest PUT: no upload session, no PATCH
    assert [(a.method, a.status) for a in later if "/blobs/" in a.path] == [
        ("HEAD", 200), ("HEAD", 200)]
    assert [a.method for a in later if "/manifests/" in a.path] == ["PUT"]
    doc = _manifest(own_registry, "v/b:2")
    assert set(second["reused"]) == {doc["layers"][0]["digest"], doc["config"]["digest"]}


def _manifest(reg: LocalRegistry, name: str) -> dict[str, Any]:
    raw = proc.run("skopeo", ["inspect", "--raw", "--tls-verify=false",
                              f"docker://{reg.address}/{name}"]).stdout
    doc = json.loads(raw)
    assert isinstance(doc, dict)
    return doc


def test_tampered_blob_is_refused_and_nothing_imported(built: Volume, own_registry: LocalRegistry,
                                                      tmp_path: Path) -> None:
    ref = f"{own_registry.address}/vols/tamper:1"
    publish.push_volume(root_of(built), built, ref, PLAIN)
    layer = _manifest(own_registry, "vols/tamper:1")["layers"][0]
    data = blob_file(own_registry, layer["digest"])
    buf = bytearray(data.read_bytes())
    buf[len(buf) // 2] ^= 0xFF
    data.write_bytes(bytes(buf))
    fresh = Root(tmp_path / "fresh")
    with pytest.raises(IntegrityError) as e:
        publish.pull_volume(fresh, ref, PLAIN)
    assert e.value.message.startswith(f"blob {layer['digest'][:19]} from {ref} does not match "
                                      "its digest")
    assert "nothing was imported" in e.value.hint
    assert os.listdir(fresh.volumes) == []
    assert os.listdir(fresh.tmp) == []


def test_wrong_id_is_refused(built: Volume, own_registry: LocalRegistry, tmp_path: Path) -> None:
    """A manifest that advertises another id for honest bytes: caught after decompressing."""
    ref = f"{own_registry.address}/vols/liar:1"
    publish.push_volume(root_of(built), built, ref, PLAIN)
    doc = _manifest(own_registry, "vols/liar:1")
    forged_id = "sha256:" + "e" * 64
    doc["annotations"][publish.A_ID] = forged_id
    client = Client(own_registry.address, PLAIN)
    target = publish.parse_target(ref)
    client.check(client.do_request(client.url(target.repo, "manifests", "1"), "PUT",
                                   data=json.dumps(doc).encode(),
                                   headers={"Content-Type": publish.MANIFEST_TYPE}), "forge")
    fresh = Root(tmp_path / "fresh")
    with pytest.raises(IntegrityError) as e:
        publish.pull_volume(fresh, ref, PLAIN)
    assert e.value.message == (f"volume from {ref} hashes to {built.id[:19]}, its manifest "
                               f"says {forged_id[:19]}")
    assert os.listdir(fresh.volumes) == []


def test_not_a_volume_and_missing_tag(built: Volume, registry: LocalRegistry,
                                      tmp_path: Path) -> None:
    image = push_busybox(registry.address, "pubsrc/plainimage", "1")
    with pytest.raises(UsageError, match="is not a kiln volume"):
        publish.pull_volume(Root(tmp_path / "r"), image, PLAIN)
    with pytest.raises(RegistryError, match=r"^manifest .*/pubsrc/plainimage:nope: not found"):
        publish.pull_volume(Root(tmp_path / "r"), f"{registry.address}/pubsrc/plainimage:nope",
                            PLAIN)


def test_push_refuses_a_digest_reference(built: Volume) -> None:
    ref = "reg.example.com/x@sha256:" + "a" * 64
    with pytest.raises(UsageError) as e:
        publish.push_volume(root_of(built), built, ref, PLAIN)
    assert (e.value.message, e.value.hint) == (f"cannot push to a digest reference {ref!r}",
                                               "push to REPO:TAG")


@pytest.mark.slow
def test_registry_down_fails_fast(built: Volume, closed_address: str) -> None:
    with pytest.raises(RegistryError) as e:
        publish.push_volume(root_of(built), built, f"{closed_address}/x:1", PLAIN)
    assert e.value.message == f"cannot connect to registry {closed_address}: connection refused"


def test_auth_registry_push_pull_with_authfile(built: Volume, auth_registry: AuthRegistry,
                                               tmp_path: Path) -> None:
    ref = f"{auth_registry.address}/private/busybox:1"
    with pytest.raises(RegistryError) as e:
        publish.push_volume(root_of(built), built, ref, PLAIN)
    assert e.value.message == f"authentication failed for {auth_registry.address}"
    opts = RegistryOptions(tls_verify=False, authfile=auth_registry.authfile)
    publish.push_volume(root_of(built), built, ref, opts)
    got = publish.pull_volume(Root(tmp_path / "fresh"), ref, opts)
    assert got.volume.id == built.id
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"auths": {auth_registry.address: {"auth": "a2lsbjp3cm9uZw=="}}}))
    with pytest.raises(RegistryError, match=r"^authentication failed for"):
        publish.pull_volume(Root(tmp_path / "other"), ref,
                            RegistryOptions(tls_verify=False, authfile=bad))


@pytest.mark.slow
def test_cli_push_pull_json(built: Volume, own_registry: LocalRegistry, tmp_path: Path) -> None:
    ref = f"docker://{own_registry.address}/cli/busybox:7"
    res = kiln(root_of(built).path, "push", built.id[7:19], ref, "--tls-verify=false", "--json")
    out = json.loads(res.stdout)
    assert set(out) == {"ref", "digest"}
    assert out["ref"] == ref.removeprefix("docker://")
    fresh = tmp_path / "fresh"
    res = kiln(fresh, "pull", ref, "--no-tls-verify", "--json")
    got = json.loads(res.stdout)
    assert got == {"id": built.id, "path": got["path"], "size": built.size}
    assert Path(got["path"]).read_bytes() == built.path.read_bytes()
    res = kiln(fresh, "pull", f"{own_registry.address}/cli/busybox:nope", "--tls-verify=false",
               check=False)
    assert res.returncode == 1
    assert "error: manifest" in res.stderr
    assert "not found" in res.stderr
    res = kiln(fresh, "push", built.id, "not a ref", check=False)
    assert res.returncode == 1
    assert "error: invalid registry reference 'not a ref'" in res.stderr
    res = kiln(fresh, "push", "ffff0000", ref, check=False)
    assert res.returncode == 1
    assert "error: no volume matches 'ffff0000'" in res.stderr


@pytest.mark.slow
def test_transient_failures_are_retried(built: Volume, registry: LocalRegistry,
                                        fault_proxy: FaultProxy, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    publish.push_volume(root_of(built), built, f"{registry.address}/retry/busybox:1", PLAIN)
    ref = f"{fault_proxy.address}/retry/busybox:1"
    fault_proxy.set_fault("503", times=2, match="/manifests/")
    got = publish.pull_volume(Root(tmp_path / "a"), ref, PLAIN)
    assert got.volume.id == built.id
    assert fault_proxy.hits == 2
    fault_proxy.set_fault("corrupt", times=1, match="/blobs/")  # the network flips bytes
    with pytest.raises(IntegrityError, match="does not match its digest"):
        publish.pull_volume(Root(tmp_path / "b"), ref, PLAIN)
    monkeypatch.setattr(registryclient, "BUDGET", 1.0)
    fault_proxy.set_fault("429", times=-1, match="/manifests/")
    with pytest.raises(RegistryError) as e:
        publish.pull_volume(Root(tmp_path / "c"), ref, PLAIN)
    assert e.value.message == f"registry {fault_proxy.address} kept failing for 1 s: HTTP 429"
    assert fault_proxy.hits >= 2


@pytest.mark.slow
def test_build_push_publishes_what_it_built(registry: LocalRegistry, tmp_path: Path) -> None:
    """`kiln build --push REF`: the volume it prints is the one a fresh root pulls."""
    from tests.support.cli import kiln
    from tests.support.images import push_busybox

    src = push_busybox(registry.address, "bp/busybox", "1")
    target = f"{registry.address}/bp/volume:1"
    built = json.loads(kiln(tmp_path / "a", "build", src, "--tls-verify=false", "--push",
                            target, "--json").stdout)
    assert built["pushed"]["ref"].endswith("/bp/volume:1")
    pulled = json.loads(kiln(tmp_path / "b", "pull", target, "--tls-verify=false",
                             "--json").stdout)
    assert pulled["id"] == built["id"]
    bad = kiln(tmp_path / "c", "build", src, "--tls-verify=false", "--push", "not a ref",
               check=False)
    assert bad.returncode == 1
    assert json.loads(kiln(tmp_path / "c", "volume", "ls", "--json").stdout) == []
