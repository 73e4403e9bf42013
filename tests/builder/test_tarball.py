"""write_tar: headers from the Tree only, content beneath the root only, deterministic."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from builder import tarball
from builder.tree import Entry, Kind, Tree
from helper.base.errors import BuildError
from tests.support.ext4 import CAP, Builder, sha


def small(root: Path) -> Tree:
    b = Builder(root)
    b.dir("bin", 0o755)
    b.file("bin/su", b"setuid", 0o4755, uid=0, gid=0,
           xattrs=(("security.capability", CAP), ("user.x", b"\x00\xff")))
    b.link("bin/su2", "bin/su")
    b.symlink("bin/sh", "dash")
    b.symlink("bin/far", "x/" * 80)
    b.special("null", Kind.CHR, 0o666, 1, 3)
    b.special("pipe", Kind.FIFO, 0o600)
    b.file("owned", b"o", 0o640, uid=3_000_000, gid=70000)
    b.file("caf\u00e9", b"u")
    b.file(os.fsdecode(b"bad\xff"), b"b")
    b.file("d" * 150, b"long")
    return b.tree


def read_back(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), encoding="utf-8",
                      errors="surrogateescape") as tf:
        return {m.name: m for m in tf.getmembers()}


def test_headers_carry_the_tree_metadata(tmp_path: Path) -> None:
    tree = small(tmp_path / "c")
    buf = io.BytesIO()
    tarball.write_tar(tree, tmp_path / "c", buf)
    members = read_back(buf.getvalue())
    names = list(members)
    assert names[0] == "."
    su = members["bin/su"]
    assert (su.mode, su.size, su.pax_headers["SCHILY.xattr.user.x"]) == \
        (0o4755, 6, "\x00\udcff")  # tarfile decodes the binary value with surrogateescape
    link = members["bin/su2"]
    # The hard-link header repeats the group's metadata (mke2fs applies it to the inode).
    assert (link.type, link.linkname, link.mode, link.size) == (tarfile.LNKTYPE, "bin/su",
                                                                0o4755, 0)
    assert members["bin/far"].linkname == "x/" * 80
    null = members["null"]
    assert (null.type, null.devmajor, null.devminor) == (tarfile.CHRTYPE, 1, 3)
    assert members["pipe"].type == tarfile.FIFOTYPE
    assert (members["owned"].uid, members["owned"].gid) == (3_000_000, 70000)
    assert "caf\u00e9" in members
    assert os.fsdecode(b"bad\xff") in members
    assert members["d" * 150].size == 4
    assert members["bin"].isdir()


def test_same_bytes_whatever_the_content_root(tmp_path: Path) -> None:
    a = small(tmp_path / "a")
    small(tmp_path / "b")
    os.utime(tmp_path / "b" / "bin" / "su", (0, 0))
    os.chmod(tmp_path / "b" / "owned", 0o600)
    out_a, out_b = tmp_path / "a.tar", tmp_path / "b.tar"
    tarball.write_tar(a, tmp_path / "a", out_a)
    tarball.write_tar(a, tmp_path / "b", out_b)
    assert out_a.read_bytes() == out_b.read_bytes()


def test_file_pipe_and_buffer_give_the_same_bytes(tmp_path: Path) -> None:
    tree = small(tmp_path / "c")
    tarball.write_tar(tree, tmp_path / "c", tmp_path / "t.tar")
    buf = io.BytesIO()
    tarball.write_tar(tree, tmp_path / "c", buf)
    r, w = os.pipe()
    with os.fdopen(w, "wb") as wf:
        import threading
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(os.fdopen(r, "rb").read()))
        reader.start()
        tarball.write_tar(tree, tmp_path / "c", wf)
    reader.join()
    assert buf.getvalue() == (tmp_path / "t.tar").read_bytes() == got[0]


def test_symlink_in_a_component_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "c"
    (root / "real").mkdir(parents=True)
    (root / "real" / "f").write_bytes(b"secret")
    (root / "bin").symlink_to("real")
    tree = {"": Entry("", Kind.DIR, 0o755), "bin": Entry("bin", Kind.DIR, 0o755),
            "bin/f": Entry("bin/f", Kind.REG, 0o644, size=6, sha256=sha(b"secret"))}
    with pytest.raises(BuildError) as e:
        tarball.write_tar(tree, root, io.BytesIO())
    assert e.value.message == "cannot read /bin/f from the unpacked image: a symlink is in the way"


def test_symlink_as_the_file_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "c"
    root.mkdir()
    (tmp_path / "outside").write_bytes(b"secret")
    (root / "f").symlink_to(tmp_path / "outside")
    tree = {"": Entry("", Kind.DIR, 0o755),
            "f": Entry("f", Kind.REG, 0o644, size=6, sha256=sha(b"secret"))}
    with pytest.raises(BuildError) as e:
        tarball.write_tar(tree, root, io.BytesIO())
    assert e.value.message == "cannot read /f from the unpacked image: a symlink is in the way"


def test_size_mismatch_names_the_path(tmp_path: Path) -> None:
    b = Builder(tmp_path / "c")
    b.dir("etc")
    b.file("etc/passwd", b"root:x:0:0")
    (b.root / "etc" / "passwd").write_bytes(b"root")
    with pytest.raises(BuildError) as e:
        tarball.write_tar(b.tree, b.root, io.BytesIO())
    assert e.value.message == \
        "/etc/passwd has 4 bytes in the unpacked image but 10 in its layers"


def test_missing_file_is_a_build_error(tmp_path: Path) -> None:
    root = tmp_path / "c"
    root.mkdir()
    tree = {"": Entry("", Kind.DIR, 0o755), "gone": Entry("gone", Kind.REG, 0o644, size=1)}
    with pytest.raises(BuildError) as e:
        tarball.write_tar(tree, root, io.BytesIO())
    assert e.value.message == \
        "cannot read /gone from the unpacked image: No such file or directory"


def test_overrides_supply_recipe_files(tmp_path: Path) -> None:
    root = tmp_path / "c"
    root.mkdir()
    host = tmp_path / "motd"
    host.write_bytes(b"hello from the recipe\n")
    tree = {"": Entry("", Kind.DIR, 0o755),
            "motd": Entry("motd", Kind.REG, 0o600, uid=7, size=22, sha256=sha(host.read_bytes()))}
    buf = io.BytesIO()
    tarball.write_tar(tree, root, buf, overrides={"motd": host})
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tf:
        m = tf.getmember("motd")
        f = tf.extractfile(m)
        assert f is not None
        assert (f.read(), m.mode, m.uid) == (host.read_bytes(), 0o600, 7)


def test_pax_record_length_counts_itself() -> None:
    # 9 + len(" k=v\n") crosses from one to two digits exactly at the boundary.
    for n in range(0, 200):
        rec = tarball._pax_record(b"k", b"v" * n)
        assert int(rec.split(b" ", 1)[0]) == len(rec)
