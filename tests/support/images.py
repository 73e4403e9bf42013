"""Test support: real images, built locally and pushed to the test registries.

Helpers (callable from any test; they build once per session and push on demand):

* ``busybox_layout()`` -> an OCI layout with tags ``1`` (busybox) and ``2`` (busybox plus
  ``/etc/motd``: shares its base layer with ``1``) and ``multi`` (an index for linux/amd64 and
  linux/arm64).
* ``push_busybox(address, repo, tag="1", authfile=None)`` -> ``docker://…`` reference.
* ``push_multiarch(address, repo)`` -> (reference, {platform: manifest digest}).
* ``debian_layout()`` / ``push_debian(address, repo)``: a Debian bookworm minbase made with
  debootstrap and umoci, cached across runs under ``/var/cache/kiln-tests`` (slow first time).

Fixtures: ``busybox_image``, ``shared_base_images`` (two refs sharing a base layer),
``multiarch_image`` and ``debian_image`` (tests using it must be marked slow).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from builder import proc
from builder.demoimage import add_layer, make_busybox_image, push
from builder.localregistry import LocalRegistry

CACHE = Path(os.environ.get("KILN_TEST_CACHE", "/var/cache/kiln-tests"))
MOTD = {"/etc/motd": b"hello from kiln tests\n"}
DEBIAN = ("bookworm", "minbase", "http://deb.debian.org/debian")


@functools.cache
def busybox_layout() -> Path:
    d = Path(tempfile.mkdtemp(prefix="kiln-test-busybox-"))
    atexit.register(shutil.rmtree, d, True)
    layout = d / "layout"
    make_busybox_image(layout, "1")
    make_busybox_image(layout, "2", extra_files=MOTD)
    _add_index(layout, "1", "multi")
    return layout


def _blob(layout: Path, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return "sha256:" + digest, len(data)


def _read(layout: Path, digest: str) -> dict[str, object]:
    doc = json.loads((layout / "blobs" / "sha256" / digest[7:]).read_bytes())
    assert isinstance(doc, dict)
    return doc


def _tag_entry(layout: Path, tag: str) -> dict[str, object]:
    index = json.loads((layout / "index.json").read_bytes())
    for m in index["manifests"]:
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return dict(m)
    raise KeyError(tag)


def set_tag(layout: Path, tag: str, entry: dict[str, object]) -> None:
    """Point ``tag`` of ``layout`` at ``entry`` (a descriptor), replacing an older one."""
    index = json.loads((layout / "index.json").read_bytes())
    index["manifests"] = [m for m in index["manifests"]
                          if m.get("annotations", {}).get("org.opencontainers.image.ref.name")
                          != tag]
    index["manifests"].append({**entry, "annotations": {
        "org.opencontainers.image.ref.name": tag}})
    (layout / "index.json").write_text(json.dumps(index))


def _add_index(layout: Path, base_tag: str, tag: str) -> None:
    """Tag ``tag``: an index of the base image (amd64) and a copy whose config says arm64."""
    base = _tag_entry(layout, base_tag)
    manifest = _read(layout, str(base["digest"]))
    cfg_desc = manifest["config"]
    assert isinstance(cfg_desc, dict)
    cfg = _read(layout, str(cfg_desc["digest"]))
    cfg["architecture"] = "arm64"
    cfg["variant"] = "v8"
    cd, cs = _blob(layout, json.dumps(cfg).encode())
    arm = {**manifest, "config": {**cfg_desc, "digest": cd, "size": cs}}
    md, ms = _blob(layout, json.dumps(arm).encode())
    mt = "application/vnd.oci.image.manifest.v1+json"
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [
                 {"mediaType": mt, "digest": base["digest"], "size": base["size"],
                  "platform": {"os": "linux", "architecture": "amd64"}},
                 {"mediaType": mt, "digest": md, "size": ms,
                  "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}}]}
    idig, isize = _blob(layout, json.dumps(index).encode())
    set_tag(layout, tag, {"mediaType": index["mediaType"], "digest": idig, "size": isize})


def push_busybox(address: str, repo: str = "demo/busybox", tag: str = "1",
                 authfile: Path | None = None) -> str:
    """Push busybox tag ``1`` or ``2`` to ``address/repo:tag``; return the docker:// ref."""
    ref = f"docker://{address}/{repo}:{tag}"
    push(busybox_layout(), tag, ref, authfile=authfile)
    return ref


def push_multiarch(address: str, repo: str = "demo/multi") -> tuple[str, dict[str, str]]:
    layout = busybox_layout()
    ref = f"docker://{address}/{repo}:1"
    push(layout, "multi", ref, all_images=True)
    index = _read(layout, str(_tag_entry(layout, "multi")["digest"]))
    plats: dict[str, str] = {}
    for m in index["manifests"]:  # type: ignore[attr-defined]
        p = m["platform"]
        plats["/".join(x for x in (p["os"], p["architecture"], p.get("variant", "")) if x)] = \
            m["digest"]
    return ref, plats


def layout_from_tree(rootfs: Path, layout: Path, tag: str, comment: str) -> None:
    """A one-layer OCI image ``layout:tag`` holding ``rootfs`` exactly (owners, xattrs)."""
    proc.run("umoci", ["init", "--layout", str(layout)], timeout=60)
    proc.run("umoci", ["new", "--image", f"{layout}:{tag}"], timeout=60)
    tar = layout.parent / f"{tag}-rootfs.tar"
    proc.run("tar", [
        "--create",
        "--file", str(tar),
        "--format=pax",
        "--sort=name",
        "--numeric-owner",
        "--xattrs", "--xattrs-include=*",  # keep file capabilities and the like
        "--directory", str(rootfs),
        *sorted(os.listdir(rootfs)),  # names without a "./" prefix or a root entry
    ], timeout=600)
    add_layer(f"{layout}:{tag}", tar, comment)
    tar.unlink()
    proc.run("umoci", ["config", "--image", f"{layout}:{tag}", "--no-history",
                       "--config.cmd", "/bin/bash", "--config.env",
                       "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
             timeout=60)
    proc.run("umoci", ["gc", "--layout", str(layout)], timeout=60)


def debootstrap_layout(name: str, tag: str, comment: str, *, include: Sequence[str] = (),
                       empty_dev: bool = False) -> Path:
    """A cached one-layer layout of a Debian minbase tree (plus ``include`` packages),
    built on first use under ``CACHE/debian-bookworm-<name>-<key>`` and renamed into place
    atomically. ``empty_dev`` drops debootstrap's static /dev nodes."""
    material: list[Any] = [DEBIAN, list(include)] if include else [DEBIAN]
    material += [proc.version_of("umoci"), "tar-v2"]
    key = hashlib.sha256(json.dumps(material).encode()).hexdigest()
    final = CACHE / f"debian-{DEBIAN[0]}-{name}-{key[:16]}"
    if (final / "index.json").exists():
        return final
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=CACHE))
    try:
        rootfs = work / "rootfs"
        proc.run("debootstrap", [
            f"--variant={DEBIAN[1]}",
            *(["--include=" + ",".join(include)] if include else []),
            DEBIAN[0],
            str(rootfs),
            DEBIAN[2],
        ], timeout=1200)
        for p in (rootfs / "var/cache/apt/archives").glob("*.deb"):
            p.unlink()
        if empty_dev:
            for p in (rootfs / "dev").iterdir():
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        layout = work / "layout"
        layout_from_tree(rootfs, layout, tag, comment)
        with contextlib.suppress(OSError):  # a parallel run won the race: keep theirs
            os.rename(layout, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def debian_layout() -> Path:
    """The cached Debian minbase layout (tag ``bookworm``), built on first use."""
    return debootstrap_layout(DEBIAN[1], "bookworm", "debootstrap --variant=minbase bookworm")


def push_debian(address: str, repo: str = "demo/debian") -> str:
    ref = f"docker://{address}/{repo}:bookworm"
    push(debian_layout(), "bookworm", ref)
    return ref


@pytest.fixture(scope="session")
def busybox_image(registry: LocalRegistry) -> str:
    return push_busybox(registry.address, "demo/busybox", "1")


@pytest.fixture(scope="session")
def shared_base_images(registry: LocalRegistry) -> tuple[str, str]:
    """Two images in different repositories that share the busybox base layer."""
    return (push_busybox(registry.address, "shared/base", "1"),
            push_busybox(registry.address, "shared/app", "2"))


@pytest.fixture(scope="session")
def multiarch_image(registry: LocalRegistry) -> tuple[str, dict[str, str]]:
    return push_multiarch(registry.address)


@pytest.fixture(scope="session")
def debian_image(registry: LocalRegistry) -> str:
    return push_debian(registry.address)
