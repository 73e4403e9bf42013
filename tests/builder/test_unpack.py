"""builder.unpack: umoci argv, real unpacks (root and rootless as a real user), content check."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from builder.layers import flatten
from builder.tree import Entry, Kind
from builder.unpack import check_content, content_mismatches, scan, umoci_argv, umoci_reason, unpack
from helper.base.errors import BuildError
from tests.support.oci import (
    User,
    device,
    fifo,
    give_to,
    hardlink,
    make_layout,
    mkdir,
    reg,
    run_as,
    symlink,
)

REPO = Path(__file__).resolve().parents[2]
CAP = b"\x01\x00\x00\x02\x00\x20\x00\x00" + b"\x00" * 12  # cap_net_raw, permitted

STACK = [
    [mkdir("bin"), reg("bin/ping", b"ping", mode=0o4755, xattrs={"security.capability": CAP}),
     reg("bin/sh", b"#!sh\n", mode=0o755), symlink("bin/ash", "sh"),
     mkdir("dev"), device("dev/null", "chr", 1, 3, 0o666), device("dev/loop0", "blk", 7, 0),
     fifo("run.fifo"), mkdir("home"), mkdir("home/u", 0o700, uid=1000, gid=1000),
     reg("home/u/.profile", b"export A=1\n", mode=0o600, uid=1000, gid=1000),
     mkdir("locked", 0o500), reg("locked/secret", b"s3cret", mode=0o000)],
    [hardlink("bin/ping6", "bin/ping"), reg("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")],
]


def test_umoci_argv_root() -> None:
    assert umoci_argv(Path("/l"), "v1", Path("/b/rootfs"), rootless=False) == [
        "--log", "error", "raw", "unpack", "--image", "/l:v1", "/b/rootfs"]


def test_umoci_argv_rootless() -> None:
    assert umoci_argv(Path("/l"), "v1", Path("/b/rootfs"), rootless=True) == [
        "--log", "error", "raw", "unpack", "--image", "/l:v1", "--rootless", "/b/rootfs"]


def test_umoci_reason_strips_colours_and_prefix() -> None:
    tail = ("\x1b[33mWARN\x1b[0m something\n"
            "\x1b[31m\x1b[1m   ⨯\x1b[0m create rootfs: unpack layer: "
            "unpack entry: x: boom\x1b[0m\n")
    assert umoci_reason(tail) == "unpack layer: unpack entry: x: boom"
    assert umoci_reason("") == "no error output"


def _e(path: str, kind: Kind, size: int = 0) -> Entry:
    return Entry(path=path, kind=kind, mode=0o644, size=size)


def test_content_mismatches_pure() -> None:
    tree = {"": _e("", Kind.DIR), "dev": _e("dev", Kind.DIR),
            "dev/null": _e("dev/null", Kind.CHR), "f": _e("f", Kind.REG, 3),
            "gone": _e("gone", Kind.REG)}
    found = {"": _e("", Kind.DIR), "dev": _e("dev", Kind.DIR),
             "dev/null": _e("dev/null", Kind.REG, 0), "f": _e("f", Kind.REG, 4),
             "new": _e("new", Kind.DIR)}
    assert content_mismatches(tree, found, rootless=True) == [
        "/gone is missing from the unpacked rootfs",
        "/new is in the unpacked rootfs but not in the layers",
        "/f has 4 bytes in the unpacked rootfs, the layers say 3",
    ]
    assert "/dev/null is a reg in the unpacked rootfs, the layers say chr" in content_mismatches(
        tree, found, rootless=False)
    found["dev/null"] = _e("dev/null", Kind.REG, 1)  # a stand-in is always empty
    assert "/dev/null is a reg in the unpacked rootfs, the layers say chr" in content_mismatches(
        tree, found, rootless=True)


def test_scan_never_follows_symlinks(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"abc")
    os.link(tmp_path / "d" / "f", tmp_path / "g")
    (tmp_path / "etc").symlink_to("/etc")
    (tmp_path / "loop").symlink_to("loop")
    os.setxattr(tmp_path / "g", "user.rootlesscontainers", b"\x08\x01")
    os.setxattr(tmp_path / "g", "user.k", b"v")
    tree = scan(tmp_path, hashes=True, xattrs=True)
    assert sorted(tree) == ["", "d", "d/f", "etc", "g", "loop"]
    assert tree["etc"].kind is Kind.SYMLINK
    assert tree["etc"].target == "/etc"
    assert tree["d/f"].link == ""
    assert tree["g"].link == "d/f"
    assert tree["g"].sha256 == hashlib.sha256(b"abc").hexdigest()
    assert tree["g"].xattrs == (("user.k", b"v"),)
    assert scan(tmp_path)["g"].sha256 == ""


@pytest.mark.root
def test_unpack_as_root_matches_flatten(tmp_path: Path) -> None:
    lay = make_layout(tmp_path / "layout", STACK)
    rootfs = unpack(lay.path, lay.tag, tmp_path / "bundle", rootless=False)
    assert rootfs == tmp_path / "bundle" / "rootfs"
    assert sorted(os.listdir(tmp_path / "bundle")) == ["rootfs"]  # no mtree, no config.json
    tree = flatten(lay.layers)
    check_content(tree, rootfs, rootless=False)
    found = scan(rootfs, hashes=True, xattrs=True)
    assert {p: replace(e, mtime=0) for p, e in found.items()} == {
        p: replace(e, mtime=0) for p, e in tree.items()}
    with pytest.raises(BuildError) as e:
        unpack(lay.path, lay.tag, tmp_path / "bundle", rootless=False)
    assert e.value.message == f"cannot unpack into {rootfs}: it already exists"


@pytest.mark.root
def test_check_content_reports_one_line(tmp_path: Path) -> None:
    lay = make_layout(tmp_path / "layout", STACK)
    rootfs = unpack(lay.path, lay.tag, tmp_path / "bundle", rootless=False)
    tree = flatten(lay.layers)
    (rootfs / "etc" / "passwd").write_bytes(b"x")
    (rootfs / "extra").mkdir()
    with pytest.raises(BuildError) as e:
        check_content(tree, rootfs, rootless=False)
    assert e.value.message == (
        "umoci's unpack disagrees with the flattened layers: /extra is in the unpacked rootfs "
        "but not in the layers (and 1 more)")


@pytest.mark.root
def test_umoci_refusal_is_one_build_error(tmp_path: Path) -> None:
    lay = make_layout(tmp_path / "layout", [[symlink(".", "/etc")]])
    with pytest.raises(BuildError) as e:
        unpack(lay.path, lay.tag, tmp_path / "bundle", rootless=False)
    assert e.value.message == (
        f"umoci could not unpack {lay.path}:latest: unpack layer: unpack entry: .: malicious "
        "tar entry -- refusing to change type of root directory")


_AS_USER = """
import hashlib, json, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from builder.layers import flatten
from builder.unpack import check_content, unpack
layers = [(Path(p), m) for p, m in json.loads(sys.argv[1])]
tree = flatten(layers)
rootfs = unpack(Path(sys.argv[2]), "latest", Path(sys.argv[3]))
check_content(tree, rootfs)
print(hashlib.sha256(repr(sorted(tree.items())).encode()).hexdigest())
"""


@pytest.mark.root
def test_rootless_unpack_as_a_real_user(unprivileged_user: User, tmp_path: Path) -> None:
    user = unprivileged_user
    work = user.scratch / tmp_path.name
    work.mkdir()
    lay = make_layout(work / "layout", STACK)
    give_to(user, work)
    bundle = work / "bundle"
    res = run_as(user, [sys.executable, "-c", _AS_USER.format(repo=str(REPO)),
                        json.dumps([[str(p), m] for p, m in lay.layers]), str(lay.path),
                        str(bundle)])
    # The same truth tree whoever flattens it.
    tree = flatten(lay.layers)
    assert res.stdout.strip() == hashlib.sha256(repr(sorted(tree.items())).encode()).hexdigest()
    # Rootless umoci: same paths and bytes, but metadata it cannot carry is gone.
    found = scan(bundle / "rootfs", hashes=True, xattrs=True)
    assert set(found) == set(tree)
    for p, e in tree.items():
        if e.kind is Kind.REG:
            assert found[p].sha256 == e.sha256, p
    assert found["dev/null"].kind is Kind.REG
    assert found["dev/null"].size == 0
    assert found["bin/ping"].uid == user.uid
    assert found["bin/ping"].xattrs == ()
    assert found["bin/ping6"].link == "bin/ping"
    assert tree["bin/ping"].xattrs == (("security.capability", CAP),)
    assert tree["dev/null"].kind is Kind.CHR
    assert tree["home/u"].uid == 1000
    # ...which is why check_content as root (no stand-ins allowed) would refuse this rootfs.
    with pytest.raises(BuildError, match="/dev/loop0 is a reg in the unpacked rootfs"):
        check_content(tree, bundle / "rootfs", rootless=False)


def test_rootless_default_follows_euid(tmp_path: Path) -> None:
    """Without ``rootless``, the choice is the euid's: argv shows it for the current user."""
    lay = make_layout(tmp_path / "layout", [[reg("f", b"1")]])
    if os.geteuid() != 0:
        rootfs = unpack(lay.path, lay.tag, tmp_path / "bundle")
        check_content(flatten(lay.layers), rootfs)
    else:
        rootfs = unpack(lay.path, lay.tag, tmp_path / "bundle")
        assert (rootfs / "f").stat().st_uid == 0
        assert "user.rootlesscontainers" not in os.listxattr(rootfs / "f")
