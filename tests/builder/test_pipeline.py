"""Pure parts of the build pipeline: the build key and the runtime config merge."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from builder.pipeline import build_key, content_seed, epoch_of, merge_config

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=3),
    max_leaves=8,
)
digest = st.text("0123456789abcdef", min_size=64, max_size=64).map(lambda h: "sha256:" + h)


@given(digest, st.dictionaries(st.text(max_size=5), json_values, max_size=4),
       st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3))
def test_key_ignores_dict_order(d: str, recipe: dict[str, Any], tools: dict[str, str]) -> None:
    rev = dict(reversed(list(recipe.items())))
    assert build_key(d, recipe, tools) == build_key(d, rev, dict(reversed(list(tools.items()))))


@given(digest, digest)
def test_key_changes_with_source(a: str, b: str) -> None:
    assert (build_key(a, None, {}) == build_key(b, None, {})) == (a == b)


def test_key_changes_with_tools_and_recipe_but_seed_ignores_tools() -> None:
    d = "sha256:" + "0" * 64
    base = build_key(d, {"size": 1}, {"mke2fs": "1.47.2"})
    assert base != build_key(d, {"size": 2}, {"mke2fs": "1.47.2"})
    assert base != build_key(d, {"size": 1}, {"mke2fs": "1.47.3"})
    assert base.startswith("sha256:")
    assert len(base) == 71
    assert content_seed(d, {"size": 1}) != content_seed(d, {"size": 2})


def test_epoch_of() -> None:
    assert epoch_of({"created": "2024-01-02T03:04:05Z"}) == 1704164645
    assert epoch_of({"created": "garbage"}) == 0
    assert epoch_of({}) == 0


def test_merge_config_recipe_overrides() -> None:
    image = {"config": {"Env": ["PATH=/bin", "A=1"], "Entrypoint": ["/init"], "Cmd": ["x"],
                        "WorkingDir": "/w", "User": "1", "Labels": {"a": "b"}}}
    assert merge_config(image, None)["Cmd"] == ["x"]
    recipe = SimpleNamespace(env={"A": "2", "B": "3"}, entrypoint=["/bin/sh", "-c"], cmd=None,
                             workdir="/srv", user="1000:1000", labels={"c": "d"})
    cfg = merge_config(image, recipe)
    assert cfg == {"Env": ["PATH=/bin", "A=2", "B=3"], "Entrypoint": ["/bin/sh", "-c"],
                   "Cmd": [], "WorkingDir": "/srv", "User": "1000:1000",
                   "Labels": {"a": "b", "c": "d"}}
