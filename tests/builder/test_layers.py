"""builder.layers: OCI flattening semantics, hostile layers, and agreement with real umoci."""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import shutil
import tarfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builder import layers
from builder.layers import Flattener, Member, Rejected, clean_path, flatten
from builder.tree import Kind, Tree
from builder.unpack import scan, unpack
from builder.verify import diff_trees
from helper.base.errors import BuildError
from tests.support.oci import Member as TarMember
from tests.support.oci import (
    device,
    fifo,
    hardlink,
    layer_tar,
    make_layout,
    mkdir,
    opaque,
    reg,
    symlink,
    whiteout,
    write_layout,
)
from tests.support.timing import limit

SHA = {d: hashlib.sha256(d).hexdigest() for d in (b"", b"1", b"2", b"22", b"x", b"k")}


def shape(tree: Tree) -> dict[str, tuple[object, ...]]:
    """A compact view: path -> (kind, mode, uid, gid, content-or-target-or-device, link)."""
    out: dict[str, tuple[object, ...]] = {}
    for p, e in tree.items():
        detail: object = ""
        if e.kind is Kind.REG:
            detail = next((d for d, h in SHA.items() if h == e.sha256), e.sha256[:12])
        elif e.kind is Kind.SYMLINK:
            detail = e.target
        elif e.kind in (Kind.CHR, Kind.BLK):
            detail = (e.major, e.minor)
        out[p] = (e.kind.value, oct(e.mode), e.uid, e.gid, detail, e.link)
    return out


def D(mode: int = 0o755, uid: int = 0, gid: int = 0) -> tuple[object, ...]:
    return ("dir", oct(mode), uid, gid, "", "")


def F(data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0,
      link: str = "") -> tuple[object, ...]:
    return ("reg", oct(mode), uid, gid, data, link)


def L(target: str, link: str = "") -> tuple[object, ...]:
    return ("symlink", "0o777", 0, 0, target, link)


ROOT = {"": D()}

# name -> (layer stack, expected shape). Each is also unpacked by real umoci (root) below.
SEMANTICS: dict[str, tuple[list[list[TarMember]], dict[str, tuple[object, ...]]]] = {
    "implied parents are 0755 root": (
        [[reg("a/b/c", b"x", mode=0o600, uid=5, gid=6)]],
        {**ROOT, "a": D(), "a/b": D(), "a/b/c": F(b"x", 0o600, 5, 6)}),
    "later layer overrides a file": (
        [[reg("f", b"1")], [reg("f", b"2", mode=0o755)]],
        {**ROOT, "f": F(b"2", 0o755)}),
    "whiteout deletes a subtree": (
        [[mkdir("d"), reg("d/a", b"1"), mkdir("d/e"), reg("d/e/b", b"2"), reg("k", b"k")],
         [whiteout("d")]],
        {**ROOT, "k": F(b"k")}),
    "opaque dir hides lower content only": (
        [[mkdir("d", 0o700), reg("d/a", b"1"), reg("d/b", b"2")],
         [mkdir("d", 0o750), opaque("d"), reg("d/c", b"x")]],
        {**ROOT, "d": D(0o750), "d/c": F(b"x")}),
    "whiteout after an entry of the same layer keeps the entry": (
        [[mkdir("d"), reg("d/a", b"1"), reg("d/b", b"2")],
         [reg("d/c", b"x"), whiteout("d"), opaque("d")]],
        {**ROOT, "d": D(), "d/c": F(b"x")}),
    "file replaces a directory and its subtree": (
        [[mkdir("x"), reg("x/y", b"1")], [reg("x", b"2")]],
        {**ROOT, "x": F(b"2")}),
    "directory replaces a file": (
        [[reg("x", b"1")], [mkdir("x", 0o700)]],
        {**ROOT, "x": D(0o700)}),
    "directory over directory updates metadata, keeps children": (
        [[mkdir("d", 0o755, xattrs={"user.a": b"1"}), reg("d/f", b"1")],
         [mkdir("d", 0o1777, uid=3, gid=4)]],
        {**ROOT, "d": D(0o1777, 3, 4), "d/f": F(b"1")}),
    "symlink replaces a directory": (
        [[mkdir("lib"), reg("lib/a", b"1")], [symlink("lib", "usr/lib")]],
        {**ROOT, "lib": L("usr/lib")}),
    "entries written through a symlink land on its target": (
        [[mkdir("usr"), mkdir("usr/lib"), symlink("lib", "usr/lib")], [reg("lib/b", b"2")]],
        {**ROOT, "usr": D(), "usr/lib": D(), "usr/lib/b": F(b"2"), "lib": L("usr/lib")}),
    "whiteout through a symlink removes the in-root target": (
        [[mkdir("etc"), reg("etc/keep", b"k"), reg("etc/gone", b"1"), symlink("l", "/etc")],
         [whiteout("l/gone")]],
        {**ROOT, "etc": D(), "etc/keep": F(b"k"), "l": L("/etc")}),
    "hard links share an inode across layers": (
        [[reg("a", b"1", mode=0o4755, uid=7)], [hardlink("b", "a"), hardlink("c", "/b")]],
        {**ROOT, "a": F(b"1", 0o4755, 7), "b": F(b"1", 0o4755, 7, link="a"),
         "c": F(b"1", 0o4755, 7, link="a")}),
    "replacing one name splits it off the hard-link group": (
        [[reg("a", b"1")], [hardlink("b", "a")], [reg("a", b"22")]],
        {**ROOT, "a": F(b"22"), "b": F(b"1")}),
    "hard link group survives the first name's whiteout": (
        [[reg("a", b"1"), hardlink("b", "a"), hardlink("c", "a")], [whiteout("a")]],
        {**ROOT, "b": F(b"1"), "c": F(b"1", link="b")}),
    "hard links to a symlink, a device and a fifo share their inodes": (
        [[symlink("z", "/" + "t" * 150), device("dev", "chr", 1, 3, 0o666), fifo("p", 0o600)],
         [hardlink("a", "z"), hardlink("b", "/a"), hardlink("dev2", "dev"),
          hardlink("p2", "p")]],
        {**ROOT, "a": L("/" + "t" * 150), "b": L("/" + "t" * 150, link="a"),
         "z": L("/" + "t" * 150, link="a"),
         "dev": ("chr", oct(0o666), 0, 0, (1, 3), ""),
         "dev2": ("chr", oct(0o666), 0, 0, (1, 3), "dev"),
         "p": ("fifo", oct(0o600), 0, 0, "", ""), "p2": ("fifo", oct(0o600), 0, 0, "", "p")}),
    "devices, fifos, setuid and owners": (
        [[mkdir("dev"), device("dev/null", "chr", 1, 3, 0o666), device("dev/sda", "blk", 8, 0),
          fifo("dev/p", 0o600), reg("ping", b"x", mode=0o4755),
          reg("s", b"", mode=0o2750, uid=1000, gid=50)]],
        {**ROOT, "dev": D(), "dev/null": ("chr", oct(0o666), 0, 0, (1, 3), ""),
         "dev/sda": ("blk", oct(0o660), 0, 0, (8, 0), ""),
         "dev/p": ("fifo", oct(0o600), 0, 0, "", ""), "ping": F(b"x", 0o4755),
         "s": F(b"", 0o2750, 1000, 50)}),
    "duplicate entries: the last wins": (
        [[reg("f", b"1"), reg("f", b"22"), mkdir("d", 0o700), mkdir("d", 0o711)]],
        {**ROOT, "f": F(b"22"), "d": D(0o711)}),
    "root entry sets the root's metadata": (
        [[mkdir("./", 0o700, uid=1, gid=2), reg("./f", b"1")]],
        {"": D(0o700, 1, 2), "f": F(b"1")}),
}


@pytest.mark.parametrize("name", sorted(SEMANTICS))
def test_semantics(name: str, tmp_path: Path) -> None:
    stack, expected = SEMANTICS[name]
    lay = make_layout(tmp_path, stack)
    assert shape(flatten(lay.layers)) == expected


def test_xattrs_from_schily_and_libarchive(tmp_path: Path) -> None:
    cap = b"\x01\x00\x00\x02\x00\x20\x00\x00" + b"\xff" * 12
    lib = {"LIBARCHIVE.xattr.user.b%3Dc": base64.b64encode(b"\x00\x80").decode().rstrip("=")}
    lay = make_layout(tmp_path, [[reg("f", b"x", xattrs={"security.capability": cap,
                                                         "user.a": b"1"}, pax=lib)]])
    assert flatten(lay.layers)["f"].xattrs == (
        ("security.capability", cap), ("user.a", b"1"), ("user.b=c", b"\x00\x80"))


@pytest.mark.parametrize("codec", ["tar", "zstd"])
def test_codecs_give_the_same_tree(codec: str, tmp_path: Path) -> None:
    stack = SEMANTICS["devices, fifos, setuid and owners"][0]
    gz = make_layout(tmp_path / "gz", stack)
    other = make_layout(tmp_path / codec, stack, codec=codec)
    assert flatten(other.layers) == flatten(gz.layers)


def test_unknown_media_type(tmp_path: Path) -> None:
    lay = make_layout(tmp_path, [[reg("f")]])
    blob = lay.layers[0][0]
    with pytest.raises(BuildError) as e:
        flatten([(blob, "application/vnd.oci.image.layer.v1.tar+lz4")])
    assert e.value.message == (f"layer 0 (sha256:{blob.name[:12]}): unsupported layer media "
                               "type 'application/vnd.oci.image.layer.v1.tar+lz4'")


def test_corrupt_gzip(tmp_path: Path) -> None:
    lay = make_layout(tmp_path, [[reg("f", b"1" * 100_000)]])
    blob = lay.layers[0][0]
    blob.write_bytes(blob.read_bytes()[:200])
    with pytest.raises(BuildError) as e:
        flatten(lay.layers)
    assert e.value.message.startswith(f"layer 0 (sha256:{blob.name[:12]}): cannot read the layer")
    assert "\n" not in e.value.message
    assert "pull the image again" in e.value.hint


def test_corrupt_zstd(tmp_path: Path) -> None:
    lay = make_layout(tmp_path, [[reg("f", b"1")]], codec="zstd")
    blob = lay.layers[0][0]
    blob.write_bytes(b"not zstd at all")
    with pytest.raises(BuildError) as e:
        flatten(lay.layers)
    assert e.value.message.startswith(
        f"layer 0 (sha256:{blob.name[:12]}): cannot decompress the layer: zstd failed (exit 1)")


def test_sparse_member_is_rejected(tmp_path: Path) -> None:
    ti = tarfile.TarInfo("sparse")
    ti.type = tarfile.GNUTYPE_SPARSE
    blob = tmp_path / ("ab" * 32)
    raw = ti.tobuf(format=tarfile.GNU_FORMAT) + b"\0" * 1024
    blob.write_bytes(raw)
    with pytest.raises(BuildError) as e:
        flatten([(blob, "application/vnd.oci.image.layer.v1.tar")])
    assert "entry 'sparse'" in e.value.message


# -- hostile layers ------------------------------------------------------------------------


@pytest.fixture
def canary() -> Iterator[Path]:
    """A host directory with a file hostile layers aim at; it must stay untouched."""
    d = Path(f"/tmp/kiln-canary-{secrets.token_hex(4)}")
    d.mkdir()
    (d / "canary").write_bytes(b"CANARY")
    yield d
    shutil.rmtree(d)


def hostile(c: Path) -> dict[str, list[list[TarMember]]]:
    up = "../" * 12
    rel = str(c).lstrip("/")
    return {
        "dotdot escape": [[reg(f"{up}{rel}/canary", b"1")]],
        "dotdot inside": [[reg("a/../b", b"1"), reg("a/./../../c", b"2")]],
        "absolute path": [[reg(f"{c}/canary", b"1"), reg("/etc/hostname", b"2")]],
        "symlink to host dir, write through": [[symlink("l", str(c)), reg("l/canary", b"1")]],
        "symlink up and out, write through": [[symlink("l", up + rel), reg("l/canary", b"1")]],
        "nested dotdot symlink": [[mkdir("d"), symlink("d/l", "../../../" + rel),
                                   reg("d/l/canary", b"1")]],
        "symlink loop": [[symlink("a", "b"), symlink("b", "a"), reg("a/x", b"1")]],
        "hard link outside the root": [[hardlink("h", f"{up}{rel}/canary")]],
        "hard link through an escaping symlink": [
            [mkdir(rel), reg(f"{rel}/canary", b"2"), symlink("l", f"{up}{rel}"),
             hardlink("h", "l/canary")]],
        "hard link to a symlink": [[symlink("s", str(c / "canary")), hardlink("h", "s")]],
        "root is a symlink": [[symlink(".", str(c)), reg("canary", b"1")]],
        "whiteout through a symlink": [[symlink("l", str(c))], [reg("l/.wh.canary")]],
        "opaque through a symlink": [[symlink("l", up + rel)], [opaque("l")]],
        "whiteout of the parent": [[mkdir("d"), reg("d/f", b"1")], [reg("d/.wh..", b"")]],
        "duplicate entries of different kinds": [[reg("x", b"1"), mkdir("x"), symlink("x", "/"),
                                                  reg("x/canary", b"2")]],
        "device nodes": [[device("null", "chr", 1, 3), device(rel, "blk", 7, 0)]],
        "file below a file": [[reg("f", b"1"), reg("f/g", b"2")]],
    }


HOSTILE_NAMES = sorted(hostile(Path("/x")))


def _outcome(fn: object) -> tuple[Tree | None, BuildError | None]:
    try:
        return fn(), None  # type: ignore[operator]
    except BuildError as e:
        return None, e


def _same(a: Tree, b: Tree) -> list[str]:
    return diff_trees({p: replace(e, mtime=0) for p, e in a.items()},
                      {p: replace(e, mtime=0) for p, e in b.items()})


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_flatten(name: str, canary: Path, tmp_path: Path) -> None:
    lay = make_layout(tmp_path, hostile(canary)[name])
    tree, err = _outcome(lambda: flatten(lay.layers))
    assert (canary / "canary").read_bytes() == b"CANARY"
    assert sorted(os.listdir(canary)) == ["canary"]
    if err is not None:
        assert "\n" not in err.message
        assert err.message.startswith("layer ")
        assert "entry " in err.message
    else:
        assert tree is not None
        assert hashlib.sha256(b"CANARY").hexdigest() not in {e.sha256 for e in tree.values()}


@pytest.mark.root
@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_matches_umoci(name: str, canary: Path, tmp_path: Path) -> None:
    """Inside the rootfs flatten does what umoci does, or refuses the layer."""
    lay = make_layout(tmp_path / "layout", hostile(canary)[name])
    tree, err = _outcome(lambda: flatten(lay.layers))
    rootfs, uerr = _outcome(lambda: unpack(lay.path, lay.tag, tmp_path / "bundle",
                                           rootless=False))
    assert (canary / "canary").read_bytes() == b"CANARY"
    assert sorted(os.listdir(canary)) == ["canary"]
    if uerr is not None:  # umoci refuses: so must we
        assert err is not None, f"umoci refused ({uerr.message}) but flatten accepted"
    if err is None:
        assert tree is not None
        assert rootfs is not None
        assert _same(tree, scan(rootfs, hashes=True, xattrs=True)) == []  # type: ignore[arg-type]


@pytest.mark.root
@pytest.mark.parametrize("name", sorted(SEMANTICS))
def test_semantics_match_umoci(name: str, tmp_path: Path) -> None:
    """Every semantics case, unpacked by real umoci as root: identical tree."""
    lay = make_layout(tmp_path / "layout", SEMANTICS[name][0])
    rootfs = unpack(lay.path, lay.tag, tmp_path / "bundle", rootless=False)
    assert _same(flatten(lay.layers), scan(rootfs, hashes=True, xattrs=True)) == []


# -- odd names and big directories ---------------------------------------------------------

ODD = ["new\nline", "tab\tand space ", "bad\udce9byte", "\udcff\udcfe", "ünïcødé",
       "-dash", "a" * 255, "deep/" * 30 + "end", ".wh", "..dots", "x.wh.y"]


def test_odd_names(tmp_path: Path) -> None:
    lay = make_layout(tmp_path, [[reg(n, n.encode("utf-8", "surrogateescape")) for n in ODD]])
    tree = flatten(lay.layers)
    for n in ODD:
        assert tree[n].size == len(n.encode("utf-8", "surrogateescape"))
    assert os.fsencode("\udcff\udcfe") == b"\xff\xfe"


@pytest.mark.root
@pytest.mark.slow
def test_odd_names_and_20k_directory_match_umoci(tmp_path: Path) -> None:
    big = [mkdir("big")] + [reg(f"big/f{i:05d}", b"1" if i % 2 else b"") for i in range(20_000)]
    gone = [reg(f"big/.wh.f{i:05d}") for i in range(0, 20_000, 3)]
    stack = [[reg(n, b"x") for n in ODD], big, gone]
    lay = make_layout(tmp_path / "layout", stack)
    started = time.monotonic()
    tree = flatten(lay.layers)
    took = time.monotonic() - started
    assert len([p for p in tree if p.startswith("big/")]) == 20_000 - len(range(0, 20_000, 3))
    # a hang guard, not a speed check (bench/build.py times the stages): a flatten quadratic
    # in a directory's entries takes minutes here, a linear one well under a second
    assert took < limit(5), f"flattening 40k entries took {took:.1f} s"
    rootfs = unpack(lay.path, lay.tag, tmp_path / "bundle", rootless=False)
    assert _same(tree, scan(rootfs, hashes=True, xattrs=True)) == []


def test_flatten_of_a_64_mib_layer_hashes_every_file(tmp_path: Path) -> None:
    """A layer of 3000 files / 64 MiB (gzip): every file and its hash (its speed is
    bench/build.py's to measure, beside the raw tools)."""
    members = [reg(f"usr/lib/f{i}", os.urandom(1024) * ((i % 40) + 1)) for i in range(3000)]
    tar = layer_tar(members)
    lay = write_layout(tmp_path, [tar])
    tree = flatten(lay.layers)
    assert len(tree) == 3003
    for ti, data in members[::300]:
        assert tree[ti.name].sha256 == hashlib.sha256(data).hexdigest()


# -- the pure core: clean_path and a reference model -----------------------------------------


@given(st.text(alphabet="ab./", max_size=30))
def test_clean_path_stays_inside(name: str) -> None:
    c = clean_path(name)
    assert not c.startswith("/")
    assert ".." not in c.split("/")
    assert "" not in c.split("/") or c == ""
    assert clean_path(c) == c


INNER = st.sampled_from(["a", "b"])
LEAF = st.sampled_from(["a", "b", "s"])  # "s" is only ever a leaf, so symlinks are never followed
PATH = st.builds(lambda d, leaf: "/".join([*d, leaf]), st.lists(INNER, max_size=2), LEAF)
SPATH = st.lists(INNER, max_size=2).map(lambda d: "/".join([*d, "s"]))
DIRPATH = st.lists(INNER, max_size=2).map("/".join)
# A hard link copies its target's node: one to an "s" leaf (maybe a symlink) is itself an
# "s" leaf, so no symlink ever becomes a parent (the model does not follow symlinks; the
# flattener does, as umoci's securejoin does — tested on real layers above).
NOT_S = st.builds(lambda d, leaf: "/".join([*d, leaf]), st.lists(INNER, max_size=2), INNER)
OP = st.one_of(
    st.tuples(st.just("file"), PATH, st.sampled_from([b"1", b"2", b"x"])),
    st.tuples(st.just("dir"), PATH, st.sampled_from([0o755, 0o700])),
    st.tuples(st.just("symlink"), SPATH, st.sampled_from(["/a", "b/../a"])),
    st.tuples(st.just("hardlink"), NOT_S, NOT_S),
    st.tuples(st.just("hardlink"), SPATH, PATH),
    st.tuples(st.just("whiteout"), PATH, st.none()),
    st.tuples(st.just("opaque"), DIRPATH, st.none()),
)
STACK = st.lists(st.lists(OP, max_size=6), min_size=1, max_size=4)


class Ref:
    """A deliberately naive model of OCI flattening over (path -> [node]) with prefix scans."""

    def __init__(self) -> None:
        self.state: dict[str, list[object]] = {"": ["dir", 0o755]}
        self.upper: set[str] = set()

    def _sub(self, p: str) -> list[str]:
        return [k for k in self.state if k == p or (p == "" or k.startswith(p + "/"))]

    def _parents(self, p: str) -> None:
        parts = p.split("/")
        for i in range(1, len(parts)):
            a = "/".join(parts[:i])
            if a not in self.state:
                self.state[a] = ["dir", 0o755]
            elif self.state[a][0] != "dir":
                raise Rejected(a)

    def op(self, kind: str, p: str, arg: object) -> None:
        if kind in ("whiteout", "opaque"):
            if p in self.state:
                for k in self._sub(p):
                    if k not in self.upper and not (kind == "opaque" and k == p):
                        del self.state[k]
            return
        self._parents(p)
        old = self.state.get(p)
        if old is not None and not (old[0] == "dir" and kind == "dir"):
            for k in self._sub(p):
                del self.state[k]
        if kind == "hardlink":
            t = self.state.get(str(arg))
            if t is None or t[0] == "dir":
                raise Rejected(str(arg))
            self.state[p] = t
        elif kind == "dir" and p in self.state:
            self.state[p][1] = arg
        else:
            self.state[p] = [kind, arg]
        parts = p.split("/")
        self.upper.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))


def _member(kind: str, p: str, arg: object) -> Member:
    if kind == "file":
        assert isinstance(arg, bytes)
        return Member(p, "reg", size=len(arg), sha256=hashlib.sha256(arg).hexdigest())
    if kind == "dir":
        return Member(p, "dir", mode=int(arg))  # type: ignore[call-overload]
    if kind == "symlink":
        return Member(p, "symlink", target=str(arg))
    if kind == "hardlink":
        return Member(p, "hardlink", target=str(arg))
    base = "/".join([*p.split("/")[:-1], ".wh." + p.rsplit("/", maxsplit=1)[-1]]) if p else ""
    if kind == "opaque":
        base = f"{p}/.wh..wh..opq" if p else ".wh..wh..opq"
    return Member(base.lstrip("/"), "reg", sha256=layers.EMPTY_SHA256)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(STACK)
def test_flattener_matches_reference_model(stack: list[list[tuple[str, str, object]]]) -> None:
    core, ref = Flattener(), Ref()
    ref_err = core_err = None
    for layer in stack:
        core.begin_layer()
        ref.upper = set()
        for kind, p, arg in layer:
            try:
                ref.op(kind, p, arg)
            except Rejected:
                ref_err = True
            try:
                core.apply(_member(kind, p, arg))
            except Rejected:
                core_err = True
            assert ref_err == core_err, (kind, p, arg)
            if ref_err:
                return
    tree = core.tree()
    assert set(tree) == set(ref.state)
    groups: dict[int, set[str]] = {}
    for p, node in ref.state.items():
        e = tree[p]
        assert e.kind.value == {"file": "reg"}.get(str(node[0]), str(node[0])), p
        if node[0] == "file":
            assert e.sha256 == hashlib.sha256(node[1]).hexdigest()  # type: ignore[arg-type]
        elif node[0] == "dir":
            assert e.mode == node[1]
        else:
            assert e.target == node[1]
        if node[0] != "dir":
            groups.setdefault(id(node), set()).add(p)
    for g in groups.values():
        first = min(g, key=lambda q: [os.fsencode(x) for x in q.split("/")])
        assert {tree[q].link or q for q in g} == {first}
