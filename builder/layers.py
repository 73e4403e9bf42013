"""Flatten an image's layer blobs into the truth ``Tree``, the way umoci 0.4.7 unpacks them.

Two parts. ``Flattener`` is the pure decision core: it applies tar members, one layer after
another, to an in-memory model of a root filesystem (paths -> shared inode objects, so hard
links keep their identity). ``flatten`` is the thin I/O shell: it decompresses each blob as
a stream (gzip via zlib, zstd via the ``zstd`` CLI, plain tar directly), reads members with
``tarfile``, hashes regular files, and feeds the core.

Semantics follow the OCI image-spec (layer.md) *as umoci implements them*, because umoci's
unpack is the content source the tree is checked against:

* entry names are cleaned lexically inside the root (``/a``, ``../../a`` and ``./a`` are all
  ``a``); the parent directory is then resolved following symlinks that already exist in
  the tree, scoped to the root (securejoin): ``lnk/passwd`` with ``lnk -> /etc`` lands on
  ``etc/passwd`` of the image, never the host;
* an existing path is removed (with its subtree) unless both it and the new entry are
  directories, in which case only the directory's metadata (mode, owner, xattrs) changes;
* ``.wh.NAME`` deletes NAME and ``.wh..wh..opq`` empties its directory, but only of what
  lower layers put there: paths this layer already wrote (and their ancestors) survive;
* a hard link resolves its target like a parent directory (the last component is never
  followed) and shares that inode, whatever its kind but a directory: hard links to
  symlinks, devices and fifos are valid in layers (containerd and umoci make them, as
  ``link(2)`` does); umoci clobbers before linking, so later layers replacing one name split
  it off the group;
* missing parent directories are created 0755 root:root (umoci's ``MkdirAll(dir, 0777)``
  under umask 022; the rootfs itself is ``mkdir 0755`` + ``chown 0:0``).

Where umoci fails, or does something a tree of ``Entry`` cannot carry (hard links to
directories, a root entry that is not a directory, a path below a regular file,
whiteouts named ``.wh.``/``.wh..``), the layer is rejected with one ``BuildError`` line
naming the layer and the entry. Symlink modes are normalised to 0777 (Linux has no other).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import posixpath
import tarfile
import tempfile
import urllib.parse
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from builder import proc
from builder.tree import Entry, Kind, Tree, sort_key
from helper.base.errors import BuildError, KilnError, ToolError

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
# Implied directories and the rootfs directory itself (see module docstring).
IMPLIED_MODE = 0o755
MAX_SYMLINK_HOPS = 255  # securejoin's limit before ELOOP

COMPRESSION = {
    "application/vnd.oci.image.layer.v1.tar": "tar",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}

HASH_CHUNK = 1 << 20
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


class Rejected(Exception):
    """The core refuses an entry; the shell adds layer and entry names."""


@dataclass(frozen=True)
class Member:
    """One tar member, reduced to what flattening needs.

    ``kind`` is a ``Kind`` value or ``"hardlink"``; ``target`` is the symlink target or
    the hard link's target path (``builder.tree.Entry``'s words; tar calls them ``type``
    and ``linkname``).
    """

    name: str
    kind: str
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    size: int = 0
    sha256: str = ""
    target: str = ""
    major: int = 0
    minor: int = 0
    mtime: int = 0
    xattrs: tuple[tuple[str, bytes], ...] = ()


@dataclass(eq=False)
class _Inode:
    """Mutable metadata shared by every path of a hard-link group (identity = object)."""

    kind: Kind
    mode: int
    uid: int = 0
    gid: int = 0
    size: int = 0
    sha256: str = ""
    target: str = ""
    major: int = 0
    minor: int = 0
    mtime: int = 0
    xattrs: tuple[tuple[str, bytes], ...] = field(default=())


def clean_path(name: str) -> str:
    """umoci's CleanPath: lexical normalisation inside the root, no leading ``/``."""
    return posixpath.normpath("/" + name).lstrip("/")


def _join(parts: Sequence[str]) -> str:
    return "/".join(parts)


def _ancestors(path: str) -> Iterator[str]:
    """``path`` and its ancestors, the root excluded."""
    while path:
        yield path
        path = path.rpartition("/")[0]


class Flattener:
    """The pure flattening core: feed ``begin_layer`` and ``apply``, then read ``tree()``."""

    def __init__(self) -> None:
        self.nodes: dict[str, _Inode] = {"": _Inode(Kind.DIR, IMPLIED_MODE)}
        self.children: dict[str, set[str]] = {"": set()}
        self.upper: set[str] = set()

    # -- state helpers ------------------------------------------------------------------

    def _add(self, path: str, node: _Inode) -> None:
        self.nodes[path] = node
        self.children[path.rpartition("/")[0]].add(path)
        if node.kind is Kind.DIR:
            self.children.setdefault(path, set())

    def _remove_tree(self, path: str) -> None:
        self.children[path.rpartition("/")[0]].discard(path)
        stack = [path]
        while stack:
            p = stack.pop()
            del self.nodes[p]
            stack.extend(self.children.pop(p, ()))

    def _resolve(self, parts: Sequence[str]) -> list[str]:
        """securejoin: resolve ``parts`` inside the root, following existing symlinks."""
        resolved: list[str] = []
        pending = list(reversed(parts))
        hops = 0
        while pending:
            part = pending.pop()
            if part in ("", "."):
                continue
            if part == "..":
                if resolved:
                    resolved.pop()
                continue
            node = self.nodes.get(_join([*resolved, part]))
            if node is None or node.kind is not Kind.SYMLINK:
                resolved.append(part)
                continue
            hops += 1
            if hops > MAX_SYMLINK_HOPS:
                raise Rejected("too many levels of symbolic links")
            if node.target.startswith("/"):
                resolved = []
            pending.extend(reversed(node.target.split("/")))
        return resolved

    def _mkdir_all(self, parts: Sequence[str]) -> None:
        for i in range(1, len(parts) + 1):
            path = _join(parts[:i])
            node = self.nodes.get(path)
            if node is None:
                self._add(path, _Inode(Kind.DIR, IMPLIED_MODE))
            elif node.kind is not Kind.DIR:
                raise Rejected(f"parent {path!r} is a {node.kind.value}, not a directory")

    # -- the operations -----------------------------------------------------------------

    def begin_layer(self) -> None:
        self.upper = set()

    def apply(self, m: Member) -> None:
        name = clean_path(m.name)
        if not name:
            if m.kind != Kind.DIR:
                raise Rejected("the root directory entry is not a directory")
            self._set_meta(self.nodes[""], m)
            return
        dir_name, _, file = name.rpartition("/")
        dir_parts = self._resolve(dir_name.split("/") if dir_name else [])
        if file.startswith(WHITEOUT):
            self._whiteout(dir_parts, file)
            return
        self._mkdir_all(dir_parts)
        path = _join([*dir_parts, file])
        old = self.nodes.get(path)
        if old is not None and not (old.kind is Kind.DIR and m.kind == Kind.DIR):
            self._remove_tree(path)
            old = None
        if m.kind == "hardlink":
            self._add(path, self._link_target(m.target))
        elif old is not None:  # directory over directory: metadata only
            self._set_meta(old, m)
        else:
            if m.kind == Kind.SYMLINK and not m.target:
                raise Rejected("symlink with an empty target")
            node = _Inode(Kind(m.kind), 0)
            self._set_meta(node, m)
            self._add(path, node)
        self.upper.update(_ancestors(path))

    def _set_meta(self, node: _Inode, m: Member) -> None:
        node.mode = 0o777 if node.kind is Kind.SYMLINK else m.mode & 0o7777
        node.uid, node.gid, node.mtime = m.uid, m.gid, m.mtime
        node.xattrs = tuple(sorted(m.xattrs))
        if node.kind is Kind.REG:
            node.size, node.sha256 = m.size, m.sha256 or EMPTY_SHA256
        elif node.kind is Kind.SYMLINK:
            node.target = m.target
        elif node.kind in (Kind.CHR, Kind.BLK):
            node.major, node.minor = m.major, m.minor

    def _link_target(self, target: str) -> _Inode:
        clean = clean_path(target)
        dir_name, _, file = clean.rpartition("/")
        parts = self._resolve(dir_name.split("/") if dir_name else [])
        node = self.nodes.get(_join([*parts, file]) if file else "")
        if node is None:
            raise Rejected(f"hard link target {target!r} does not exist")
        if node.kind is Kind.DIR:
            raise Rejected(f"hard link target {target!r} is a directory")
        return node

    def _whiteout(self, dir_parts: list[str], file: str) -> None:
        opaque = file == OPAQUE
        victim = file[len(WHITEOUT):]
        if not opaque and victim in ("", ".", ".."):
            raise Rejected(f"invalid whiteout name {file!r}")
        top = _join(dir_parts if opaque else [*dir_parts, victim])
        if top not in self.nodes:
            return
        # Only what lower layers wrote is deleted: paths this layer touched survive.
        stack = [top]
        while stack:
            p = stack.pop()
            if p not in self.upper and not (opaque and p == top):
                self._remove_tree(p)
                continue
            if self.nodes[p].kind is Kind.DIR:
                stack.extend(self.children[p])

    # -- result ---------------------------------------------------------------------------

    def tree(self) -> Tree:
        groups: dict[int, list[str]] = {}
        for path, node in self.nodes.items():
            if node.kind is not Kind.DIR:
                groups.setdefault(id(node), []).append(path)
        first: dict[str, str] = {}
        for paths in groups.values():
            if len(paths) > 1:
                paths.sort(key=sort_key)
                for p in paths[1:]:
                    first[p] = paths[0]
        tree: Tree = {}
        for path, n in self.nodes.items():
            tree[path] = Entry(path=path, kind=n.kind, mode=n.mode, uid=n.uid, gid=n.gid,
                               size=n.size, sha256=n.sha256, target=n.target,
                               link=first.get(path, ""), major=n.major, minor=n.minor,
                               mtime=n.mtime, xattrs=n.xattrs)
        return tree


# -- the I/O shell ----------------------------------------------------------------------

_TYPES = {
    tarfile.REGTYPE: "reg",
    tarfile.AREGTYPE: "reg",
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "chr",
    tarfile.BLKTYPE: "blk",
    tarfile.FIFOTYPE: "fifo",
}


def _xattrs(pax: Mapping[str, str]) -> tuple[tuple[str, bytes], ...]:
    """PAX xattr records: ``SCHILY.xattr.NAME`` (raw) and ``LIBARCHIVE.xattr.NAME`` (base64)."""
    out: dict[str, bytes] = {}
    for key, value in pax.items():
        if key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote(key[len("LIBARCHIVE.xattr."):], errors="surrogateescape")
            raw = value.encode("utf-8", "surrogateescape")
            out.setdefault(name, base64.b64decode(raw + b"=" * (-len(raw) % 4)))
    for key, value in pax.items():
        if key.startswith("SCHILY.xattr."):
            out[key[len("SCHILY.xattr."):]] = value.encode("utf-8", "surrogateescape")
    return tuple(sorted(out.items()))


def _member(ti: tarfile.TarInfo, tf: tarfile.TarFile) -> Member:
    kind = _TYPES.get(ti.type)
    if kind is None:
        what = "sparse file" if ti.issparse() else f"type {ti.type!r}"
        raise Rejected(f"unsupported tar member {what}")
    sha = ""
    nbytes = 0
    if kind == "reg":
        h = hashlib.sha256()
        f = tf.extractfile(ti)
        assert f is not None
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
            nbytes += len(chunk)
        if nbytes != ti.size:
            raise Rejected(f"truncated: {nbytes} of {ti.size} bytes")
        sha = h.hexdigest()
    return Member(name=ti.name, kind=kind, mode=ti.mode, uid=ti.uid, gid=ti.gid, size=nbytes,
                  sha256=sha, target=ti.linkname, major=ti.devmajor, minor=ti.devminor,
                  mtime=int(ti.mtime), xattrs=_xattrs(ti.pax_headers))


@contextmanager
def _open_layer(blob: Path, media_type: str, scratch: Path | None) -> Iterator[BinaryIO]:
    codec = COMPRESSION.get(media_type)
    if codec is None:
        raise Rejected(f"unsupported layer media type {media_type!r}")
    if codec == "gzip":
        with gzip.GzipFile(blob, "rb") as gz:
            yield gz  # type: ignore[misc]  # GzipFile is a binary file object
    elif codec == "zstd":
        # No zstd in the standard library: the CLI decompresses to a scratch file.
        with tempfile.TemporaryDirectory(dir=scratch, prefix="kiln-zstd-") as tmp:
            out = Path(tmp) / "layer.tar"
            proc.run("zstd", ["--decompress", "--stdout", "--quiet", "--", str(blob)],
                     stdout_path=out, hint=f"the layer blob {blob} may be corrupt")
            with open(out, "rb") as f:
                yield f
    else:
        with open(blob, "rb") as f:
            yield f


def layer_label(index: int, blob: Path) -> str:
    """``layer 2 (sha256:abcdef012345)``: blobs are stored under their hex digest."""
    return f"layer {index} (sha256:{blob.name[:12]})"


def flatten(layers: Sequence[tuple[Path, str]], *, scratch: Path | None = None) -> Tree:
    """Apply ``layers`` (blob path, media type), bottom first; return the flattened tree.

    Raises ``BuildError`` naming the layer and entry when a layer is unreadable or does
    something kiln will not reproduce (see the module docstring).
    """
    core = Flattener()
    for index, (blob, media_type) in enumerate(layers):
        label = layer_label(index, blob)
        core.begin_layer()
        name = ""
        try:
            with _open_layer(blob, media_type, scratch) as raw, \
                    tarfile.open(fileobj=raw, mode="r|", bufsize=16 * 1024,
                                 encoding="utf-8", errors="surrogateescape") as tf:
                for ti in tf:
                    name = ti.name
                    core.apply(_member(ti, tf))
        except Rejected as e:
            where = f" entry {name!r}" if name else ""
            raise BuildError(
                f"{label}{where}: {e}",
                "the image contains a layer kiln refuses to flatten; rebuild the image "
                "without that entry",
            ) from None
        except ToolError as e:  # zstd refused the blob
            raise BuildError(f"{label}: cannot decompress the layer: {e.message}",
                             "remove the blob from the blob cache and pull the image again",
                             ) from None
        except KilnError:
            raise
        except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error) as e:
            raise BuildError(
                f"{label}: cannot read the layer: {e}",
                "the blob may be corrupt or truncated; remove it from the blob cache and "
                "pull the image again",
            ) from None
    return core.tree()
