"""builder.verify: tree diffs (pure) and the one-line verification error."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from builder.tree import COMPARED, Entry, Kind, Tree
from builder.verify import count_differences, diff_trees, show_path, verify_trees
from helper.base.errors import BuildError


def _tree() -> Tree:
    return {
        "": Entry("", Kind.DIR, 0o755),
        "bin": Entry("bin", Kind.DIR, 0o755),
        "bin/ping": Entry("bin/ping", Kind.REG, 0o4755, size=3, sha256="ab" * 32,
                          xattrs=(("security.capability", b"\x01"),)),
        "bin/sh": Entry("bin/sh", Kind.SYMLINK, 0o777, target="busybox"),
        "dev": Entry("dev", Kind.DIR, 0o755),
        "dev/null": Entry("dev/null", Kind.CHR, 0o666, major=1, minor=3),
    }


def test_examples() -> None:
    exp = _tree()
    act = dict(exp)
    del act["dev/null"]
    act["bin/ping"] = replace(exp["bin/ping"], mode=0o755, xattrs=())
    act["tmp"] = Entry("tmp", Kind.DIR, 0o1777)
    assert diff_trees(exp, act) == [
        "/bin/ping: mode 4755 != 0755",
        "/bin/ping: xattrs {security.capability=b'\\x01'} != {}",
        "missing /dev/null",
        "extra /tmp",
    ]
    assert diff_trees(exp, act, limit=2) == diff_trees(exp, act)[:2]
    with pytest.raises(BuildError) as e:
        verify_trees(exp, act)
    assert e.value.message == ("volume does not match the image: 4 differences, first: "
                               "/bin/ping: mode 4755 != 0755")
    assert e.value.hint


def test_single_difference_wording() -> None:
    exp = _tree()
    act = {**exp, "bin/sh": replace(exp["bin/sh"], target="dash")}
    with pytest.raises(BuildError) as e:
        verify_trees(exp, act)
    assert e.value.message == ("volume does not match the image: 1 difference, first: "
                               "/bin/sh: target 'busybox' != 'dash'")


def test_mtime_is_not_compared() -> None:
    exp = _tree()
    verify_trees(exp, {p: replace(e, mtime=123) for p, e in exp.items()})


NAMES = st.text(alphabet="abc\n\udcff", min_size=1, max_size=4)
ENTRY = st.builds(
    lambda name, kind, mode, uid, size, x: Entry(name, kind, mode, uid=uid, size=size,
                                                 xattrs=x),
    NAMES, st.sampled_from(list(Kind)), st.integers(0, 0o7777), st.integers(0, 70000),
    st.integers(0, 1 << 40),
    st.lists(st.tuples(st.sampled_from(["user.a", "security.b"]), st.binary(max_size=3)),
             max_size=2, unique_by=lambda t: t[0]).map(lambda x: tuple(sorted(x))),
)
TREES = st.lists(ENTRY, max_size=12).map(lambda es: {e.path: e for e in es})

MUTATIONS = {
    "kind": lambda e: replace(e, kind=Kind.FIFO if e.kind is not Kind.FIFO else Kind.REG),
    "mode": lambda e: replace(e, mode=e.mode ^ 0o4000),
    "uid": lambda e: replace(e, uid=e.uid + 1),
    "gid": lambda e: replace(e, gid=e.gid + 1),
    "size": lambda e: replace(e, size=e.size + 1),
    "sha256": lambda e: replace(e, sha256=e.sha256 + "0"),
    "target": lambda e: replace(e, target=e.target + "x"),
    "link": lambda e: replace(e, link=e.link + "y"),
    "major": lambda e: replace(e, major=e.major + 1),
    "minor": lambda e: replace(e, minor=e.minor + 1),
    "xattrs": lambda e: replace(e, xattrs=(*e.xattrs, ("user.zz", b""))),
}


def test_mutations_cover_compared_fields() -> None:
    assert set(MUTATIONS) == set(COMPARED)


@given(TREES)
def test_diff_with_itself_is_empty(tree: Tree) -> None:
    assert diff_trees(tree, dict(tree)) == []
    verify_trees(tree, dict(tree))


@given(TREES.filter(bool), st.data(), st.sampled_from(sorted(MUTATIONS)))
def test_any_single_field_mutation_is_reported(tree: Tree, data: st.DataObject,
                                               field: str) -> None:
    path = data.draw(st.sampled_from(sorted(tree)))
    mutated = {**tree, path: MUTATIONS[field](tree[path])}
    lines = diff_trees(tree, mutated)
    assert len(lines) == 1
    assert lines[0].startswith(f"{show_path(path)}: {field} ")
    assert "\n" not in lines[0]
    assert count_differences(tree, mutated) == 1
    with pytest.raises(BuildError):
        verify_trees(tree, mutated)


@given(TREES, TREES, st.integers(0, 5))
def test_limit_and_missing_extra(a: Tree, b: Tree, limit: int) -> None:
    lines = diff_trees(a, b, limit=limit)
    assert len(lines) <= limit
    full = diff_trees(a, b, limit=10_000)
    assert lines == full[:limit]
    assert {ln for ln in full if ln.startswith("missing ")} == {
        f"missing {show_path(p)}" for p in a.keys() - b.keys()}
    assert {ln for ln in full if ln.startswith("extra ")} == {
        f"extra {show_path(p)}" for p in b.keys() - a.keys()}
    assert count_differences(a, b) >= len(full)


def test_show_path_is_one_printable_line() -> None:
    assert show_path("bin/ping") == "/bin/ping"
    assert show_path("caf\u00e9") == "/caf\u00e9"
    assert show_path("a\nb") == "/a\\nb"
    assert show_path("raw\udcff") == "/raw\\xff"
