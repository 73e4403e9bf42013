"""A volume's identity is the image's digest and the recipe's content, never where the image
came from: one image in two registries (two real docker-registry instances on loopback), or
one registry spelled two ways, gives one volume and a cache hit."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from builder.localregistry import LocalRegistry
from tests.support.cli import kiln
from tests.support.images import push_busybox

RECIPE = """source = "docker://${KILN_TEST_REGISTRY}/demo/busybox%s"
cmd = ["/bin/sh"]
env = { GREETING = "hello" }

[[files]]
src = "motd"
dst = "/etc/motd"
"""


@pytest.fixture(scope="module")
def two_registries() -> Iterator[tuple[LocalRegistry, LocalRegistry]]:
    with LocalRegistry() as a, LocalRegistry() as b:
        push_busybox(a.address)
        push_busybox(b.address)
        yield a, b


def build(root: Path, source: str, registry: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(kiln(root, "build", source, "--tls-verify=false", "--json",
                                          env={"KILN_TEST_REGISTRY": registry}).stdout)
    return out


def recipe(d: Path, suffix: str = ":1") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "motd").write_text("identity\n")
    (d / "r.toml").write_text(RECIPE % suffix)
    return d / "r.toml"


@pytest.mark.slow
def test_one_image_from_two_registries_is_one_volume(
        two_registries: tuple[LocalRegistry, LocalRegistry], tmp_path: Path) -> None:
    a, b = two_registries
    assert a.port != b.port
    r = recipe(tmp_path / "recipe")
    first = build(tmp_path / "root", str(r), a.address)
    second = build(tmp_path / "root", str(r), b.address)
    assert first["cached"] is False
    assert second["cached"] is True
    assert (second["id"], second["build_key"]) == (first["id"], first["build_key"])
    assert first["source_digest"] == second["source_digest"]
    # A fresh root, the other registry: the same bytes, not just the same cache entry.
    elsewhere = build(tmp_path / "other-root", str(r), b.address)
    assert elsewhere["cached"] is False
    assert elsewhere["id"] == first["id"]
    # A plain reference, too.
    plain_a = build(tmp_path / "plain", f"docker://{a.address}/demo/busybox:1", "")
    plain_b = build(tmp_path / "plain", f"docker://{b.address}/demo/busybox:1", "")
    assert (plain_b["cached"], plain_b["id"]) == (True, plain_a["id"])


def test_one_registry_spelled_two_ways_is_one_volume(
        two_registries: tuple[LocalRegistry, LocalRegistry], tmp_path: Path) -> None:
    a, _ = two_registries
    by_tag = build(tmp_path / "root", str(recipe(tmp_path / "t")), f"localhost:{a.port}")
    digest = by_tag["source_digest"]
    by_digest = build(tmp_path / "root", str(recipe(tmp_path / "d", f"@{digest}")),
                      f"127.0.0.1:{a.port}")
    assert by_digest["cached"] is True
    assert by_digest["id"] == by_tag["id"]


@pytest.mark.slow
def test_recipe_content_still_changes_the_volume(
        two_registries: tuple[LocalRegistry, LocalRegistry], tmp_path: Path) -> None:
    a, _ = two_registries
    one = build(tmp_path / "root", str(recipe(tmp_path / "one")), a.address)
    other = recipe(tmp_path / "two")
    (other.parent / "motd").write_text("something else\n")
    two = build(tmp_path / "root", str(other), a.address)
    assert two["cached"] is False
    assert two["id"] != one["id"]
