"""Long symlink targets and hard links to symlinks, through whole builds (root and rootless),
checked on the volume with debugfs.

mke2fs 1.47.2 (with libarchive 3.6) crashed on the first symlink of the tar when its target
was 100 bytes or more and kiln left the ustar link field empty; hard links with long names
were not found; hard links to symlinks were refused by the flattener.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder import mkfs, tarball
from builder.demoimage import push
from builder.localregistry import LocalRegistry
from builder.tree import Entry, Kind, Tree
from tests.support import oci
from tests.support.cli import kiln
from tests.support.oci import User, give_to, run_as

LENGTHS = (99, 100, 255, 1024, 4095)
LONG_DIR = "L" * 120
LONG_FILE = f"{LONG_DIR}/{'f' * 130}"


def target(n: int, stem: str) -> str:
    """An absolute symlink target of exactly ``n`` bytes."""
    body = "/" + (stem + "/") * n
    return body[:n - 1] + "x"


def layers(n: int) -> list[list[oci.Member]]:
    # Tar order is bytewise: "LLL…" (a directory) < "a-first" (the first symlink).
    return [[
        oci.mkdir(LONG_DIR),
        oci.reg(LONG_FILE, b"data", mode=0o4755),
        oci.symlink("a-first", target(n, "first")),
        oci.symlink("m-short", "x"),
        oci.symlink("z-later", target(n, "later")),
    ], [
        oci.hardlink("h-long", LONG_FILE),
    ]]


def long_hard_link_first_layers() -> list[list[oci.Member]]:
    # "M-hard" is the tar's first entry with a link field: a 251-byte hard-link target.
    return [[oci.mkdir(LONG_DIR), oci.reg(LONG_FILE, b"data", mode=0o4755),
             oci.hardlink("M-hard", LONG_FILE), oci.symlink("a-first", target(100, "a"))]]


def hard_to_symlink_layers() -> list[list[oci.Member]]:
    return [[
        oci.symlink("fast", "busybox"),
        oci.symlink("slow", target(150, "slow")),
    ], [
        oci.hardlink("fast-2", "fast"),
        oci.hardlink("slow-2", "slow"),
        oci.hardlink("slow-3", "/slow-2"),
    ]]


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    d = tmp_path_factory.mktemp("links")
    with LocalRegistry(data_dir=d / "data") as r:
        for n in LENGTHS:
            layout = oci.make_layout(d / f"l{n}", layers(n), tag=str(n))
            push(layout.path, str(n), f"docker://{r.address}/test/links:{n}")
        layout = oci.make_layout(d / "long", long_hard_link_first_layers(), tag="1")
        push(layout.path, "1", f"docker://{r.address}/test/long-hard-link:1")
        layout = oci.make_layout(d / "hard", hard_to_symlink_layers(), tag="1")
        push(layout.path, "1", f"docker://{r.address}/test/hard-to-symlink:1")
        yield r


def debugfs(img: str, cmd: str) -> str:
    return subprocess.run(["debugfs", "-R", cmd, img], capture_output=True, text=True,
                          check=True, timeout=60).stdout


def inode_and_links(img: str, path: str) -> tuple[str, int, int]:
    st = debugfs(img, f"stat {path}")
    ino = re.search(r"Inode: (\d+)\s+Type: (\w+)", st)
    links = re.search(r"Links: (\d+)", st)
    assert ino, st
    assert links, st
    return ino.group(2), int(ino.group(1)), int(links.group(1))


def check_volume(img: str, n: int) -> None:
    for path, stem in (("/a-first", "first"), ("/z-later", "later")):
        kind, _, nlink = inode_and_links(img, path)
        assert kind == "symlink"
        assert nlink == 1
        assert debugfs(img, f"cat {path}") == target(n, stem)  # a slow symlink's bytes
    assert 'Fast link dest: "x"' in debugfs(img, "stat /m-short")
    # The hard link whose target has a 251-byte name, with the group's mode.
    assert inode_and_links(img, "/h-long") == inode_and_links(img, f"/{LONG_FILE}")
    assert inode_and_links(img, "/h-long")[2] == 2
    assert "Mode:  04755" in debugfs(img, "stat /h-long")
    subprocess.run(["e2fsck", "-fn", img], check=True, capture_output=True, timeout=60)


@pytest.mark.parametrize("n", LENGTHS)
def test_long_symlinks_and_hard_links_build_as_root(reg: LocalRegistry, tmp_path: Path,
                                                    n: int) -> None:
    ref = f"docker://{reg.address}/test/links:{n}"
    out = json.loads(kiln(tmp_path, "build", ref, "--tls-verify=false", "--json").stdout)
    check_volume(out["path"], n)


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.parametrize("n", LENGTHS)
def test_long_symlinks_and_hard_links_build_rootless_to_the_same_bytes(
        reg: LocalRegistry, tmp_path: Path, unprivileged_user: User, n: int) -> None:
    ref = f"docker://{reg.address}/test/links:{n}"
    as_root = json.loads(kiln(tmp_path, "build", ref, "--tls-verify=false", "--json").stdout)
    rootless = build_rootless(unprivileged_user, f"links-{n}-{tmp_path.name}", ref)
    check_volume(str(rootless["path"]), n)
    assert rootless["id"] == as_root["id"]


def test_long_hard_link_as_the_first_link_entry(reg: LocalRegistry, tmp_path: Path) -> None:
    ref = f"docker://{reg.address}/test/long-hard-link:1"
    img = json.loads(kiln(tmp_path, "build", ref, "--tls-verify=false", "--json").stdout)["path"]
    assert inode_and_links(img, "/M-hard") == inode_and_links(img, f"/{LONG_FILE}")
    assert inode_and_links(img, "/M-hard")[::2] == ("regular", 2)
    assert "Mode:  04755" in debugfs(img, "stat /M-hard")
    assert debugfs(img, "cat /M-hard") == "data"
    assert debugfs(img, "cat /a-first") == target(100, "a")


def check_hard_links_to_symlinks(img: str) -> None:
    fast = {inode_and_links(img, p) for p in ("/fast", "/fast-2")}
    assert len(fast) == 1, fast
    assert fast.pop()[::2] == ("symlink", 2)
    slow = {inode_and_links(img, p) for p in ("/slow", "/slow-2", "/slow-3")}
    assert len(slow) == 1, slow
    assert slow.pop()[::2] == ("symlink", 3)
    assert 'Fast link dest: "busybox"' in debugfs(img, "stat /fast-2")
    assert debugfs(img, "cat /slow-3") == target(150, "slow")
    subprocess.run(["e2fsck", "-fn", img], check=True, capture_output=True, timeout=60)


def build_rootless(user: User, name: str, ref: str) -> dict[str, object]:
    user_root = user.scratch / name
    user_root.mkdir()
    give_to(user, user_root)
    code = ("import runpy, sys; sys.argv[0] = 'kiln'; "
            "runpy.run_module('runner', run_name='__main__')")
    res = run_as(user, [sys.executable, "-c", code, "--root", str(user_root), "build", ref,
                        "--tls-verify=false", "--json"], cwd=Path("/"), timeout=300)
    out: dict[str, object] = json.loads(res.stdout)
    return out


def test_hard_links_to_symlinks_share_one_inode(reg: LocalRegistry, tmp_path: Path) -> None:
    ref = f"docker://{reg.address}/test/hard-to-symlink:1"
    out = json.loads(kiln(tmp_path, "build", ref, "--tls-verify=false", "--json").stdout)
    check_hard_links_to_symlinks(out["path"])


@pytest.mark.slow
@pytest.mark.root
def test_hard_links_to_symlinks_rootless_same_bytes(reg: LocalRegistry, tmp_path: Path,
                                                   unprivileged_user: User) -> None:
    ref = f"docker://{reg.address}/test/hard-to-symlink:1"
    as_root = json.loads(kiln(tmp_path, "build", ref, "--tls-verify=false", "--json").stdout)
    rootless = build_rootless(unprivileged_user, f"hard-{tmp_path.name}", ref)
    check_hard_links_to_symlinks(str(rootless["path"]))
    assert rootless["id"] == as_root["id"]


def test_long_link_fields_are_deterministic_and_fill_the_ustar_field(tmp_path: Path) -> None:
    """Same bytes every time; the ustar link field holds an ASCII stand-in, never nothing."""
    tree: Tree = {"": Entry("", Kind.DIR, 0o755),
                  "s": Entry("s", Kind.SYMLINK, 0o777, target="\u00e9" * 200)}
    (tmp_path / "c").mkdir()
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    tarball.write_tar(tree, tmp_path / "c", a)
    tarball.write_tar(tree, tmp_path / "c", b)
    assert a.read_bytes() == b.read_bytes()
    header = tarball.entry_header(tree["s"])[-tarball.BLOCK:]
    assert header[157:257] == b"_" * 100
    img = tmp_path / "v.ext4"
    mkfs.make_ext4(a, img, mkfs.plan(tree), uuid=mkfs.uuid_from("ab" * 32),
                   hash_seed=mkfs.uuid_from("cd" * 32), label="t", epoch=0, tree=tree)
    assert debugfs(str(img), "cat /s") == "\u00e9" * 200
