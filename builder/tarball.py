"""Write a flattened ``Tree`` as the tar that ``mke2fs -d`` imports.

The tar is the one channel through which the image's metadata reaches the volume, so every
header is built from the ``Tree`` (the truth, computed from the layers), never from the
unpacked directory: a rootless ``umoci unpack`` leaves wrong owners, device nodes turned
into empty files and dropped capabilities there. Only regular-file *content* is read from
the unpacked directory (``content_root``), or from ``overrides`` for recipe-added files.

Format: POSIX pax (ustar headers plus ``x`` extended records where a value does not fit).
Choices that matter to mke2fs 1.47 (``misc/create_inode_libarchive.c``):

* Entries are written in ``sort_key`` order (parents first); the root is ``.``.
* A hard-link entry's header is applied to the shared inode *after* the first path's, so
  it carries the group's full metadata (mode, owner); with a plain 0644 header a setuid
  binary would lose its mode.
* xattrs travel as ``SCHILY.xattr.NAME`` records (binary-safe, length-prefixed). mke2fs
  only imports ``security.capability`` from a tar; ``builder.mkfs.make_ext4`` applies the
  others afterwards.
* Names that are not valid UTF-8 are written with ``hdrcharset=BINARY`` so libarchive
  takes the bytes verbatim.
* A name or link target that does not fit its ustar field travels in a pax ``path`` /
  ``linkpath`` record, and the field holds an ASCII stand-in of its first bytes (the
  record wins). The link field must never be left empty: libarchive 3.6 then files the
  first such entry's ``linkpath`` as a hard-link target, so mke2fs 1.47.2 segfaults on a
  symlink (its target is NULL) or cannot find a hard link's target.
* Hard links may join any non-directory (symlinks, devices, fifos too): mke2fs links the
  entry's name to the inode it finds at ``linkname`` whatever its type.

The unpacked directory comes from an untrusted image, so files are opened with an
openat-style walk: every component ``O_NOFOLLOW``, directories ``O_DIRECTORY``. Content
is copied with ``sendfile`` (no trip through Python buffers) when ``out`` has a file
descriptor, which includes a pipe to ``mke2fs -d -``.

Output is a pure function of (tree, file contents): no clock, umask, user or staging
filesystem appears in it.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

from builder.tree import Entry, Kind, Tree, sort_key
from helper.base.errors import BuildError

BLOCK = 512
_ZERO = bytes(BLOCK)
_TYPE = {Kind.REG: b"0", Kind.DIR: b"5", Kind.SYMLINK: b"2", Kind.CHR: b"3", Kind.BLK: b"4",
         Kind.FIFO: b"6"}
_OCTAL_MAX = {8: 0o7777777, 12: 0o77777777777}
_COPY_CHUNK = 8 << 20


def _pax_record(key: bytes, value: bytes) -> bytes:
    # "LEN KEY=VALUE\n" where LEN counts the whole record including its own digits.
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return str(n).encode() + body


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def _header(name: bytes, *, mode: int, uid: int, gid: int, size: int, mtime: int,
            typeflag: bytes, linkname: bytes = b"", major: int = 0, minor: int = 0) -> bytes:
    buf = bytearray(BLOCK)
    buf[0:len(name)] = name
    buf[100:108] = _octal(mode, 8)
    buf[108:116] = _octal(uid, 8)
    buf[116:124] = _octal(gid, 8)
    buf[124:136] = _octal(size, 12)
    buf[136:148] = _octal(mtime, 12)
    buf[148:156] = b" " * 8
    buf[156:157] = typeflag
    buf[157:157 + len(linkname)] = linkname
    buf[257:265] = b"ustar\x0000"
    buf[329:337] = _octal(major, 8)
    buf[337:345] = _octal(minor, 8)
    buf[148:156] = b"%06o\0 " % sum(buf)
    return bytes(buf)


def _fits(text: bytes, width: int) -> bool:
    return len(text) < width and text.isascii()


def entry_header(e: Entry) -> bytes:
    """The header block(s) of one entry: an optional pax ``x`` header, then ustar."""
    name = os.fsencode(e.path) if e.path else b"."
    if e.kind is Kind.DIR and e.path:
        name += b"/"
    pax: list[tuple[bytes, bytes]] = []
    binary = False
    if not _fits(name, 100):
        pax.append((b"path", name))
        binary = binary or not _is_utf8(name)
    link = b""
    typeflag = _TYPE[e.kind]
    if e.link:
        typeflag = b"1"
        link = os.fsencode(e.link)
    elif e.kind is Kind.SYMLINK:
        link = os.fsencode(e.target)
    if link and not _fits(link, 100):
        pax.append((b"linkpath", link))
        binary = binary or not _is_utf8(link)
    size = e.size if e.kind is Kind.REG and not e.link else 0
    if size > _OCTAL_MAX[12]:
        pax.append((b"size", str(size).encode()))
    uid, gid = e.uid, e.gid
    if uid > _OCTAL_MAX[8]:
        pax.append((b"uid", str(uid).encode()))
    if gid > _OCTAL_MAX[8]:
        pax.append((b"gid", str(gid).encode()))
    # mtime is clamped by mke2fs to SOURCE_DATE_EPOCH anyway; out-of-range values are
    # clamped here so the header stays plain ustar.
    mtime = min(max(e.mtime, 0), _OCTAL_MAX[12])
    for key, value in sorted(e.xattrs):
        pax.append((b"SCHILY.xattr." + key.encode("utf-8", "surrogateescape"), value))
    if binary:
        pax.insert(0, (b"hdrcharset", b"BINARY"))
    out = b""
    if pax:
        data = b"".join(_pax_record(k, v) for k, v in pax)
        out = _header(b"././@PaxHeader", mode=0o644, uid=0, gid=0, size=len(data), mtime=0,
                      typeflag=b"x")
        out += data + _pad(len(data))
    # When a pax record carries the name or link, its ustar field gets an ASCII stand-in;
    # an empty link field crashes mke2fs (see the module docstring).
    short = name if _fits(name, 100) else _stand_in(name, 99)
    short_link = link if _fits(link, 100) else _stand_in(link, 100)
    out += _header(short, mode=e.mode & 0o7777, uid=min(uid, _OCTAL_MAX[8]),
                   gid=min(gid, _OCTAL_MAX[8]), size=min(size, _OCTAL_MAX[12]), mtime=mtime,
                   typeflag=typeflag, linkname=short_link, major=e.major, minor=e.minor)
    return out


def _stand_in(text: bytes, width: int) -> bytes:
    """The first ``width`` bytes of ``text`` with every non-ASCII (or NUL) byte as ``_``."""
    return bytes(c if 0 < c < 128 else 0x5F for c in text[:width])


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _pad(n: int) -> bytes:
    return bytes(-n % BLOCK)


class _Beneath:
    """Opens files under ``root`` without following a symlink in any component.

    Directory fds along the current path are kept on a stack: entries arrive in
    ``sort_key`` order, so consecutive files mostly share their parent chain.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.stack: list[tuple[tuple[str, ...], int]] = []
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        try:
            self.root_fd = os.open(root, flags)
        except OSError as e:
            raise BuildError(f"cannot open unpacked tree {root}: {e.strerror}",
                             "the unpack step did not leave a readable directory") from None

    def close(self) -> None:
        for _, fd in self.stack:
            os.close(fd)
        self.stack.clear()
        os.close(self.root_fd)

    def _dir_fd(self, parts: tuple[str, ...], path: str) -> int:
        while self.stack and self.stack[-1][0] != parts[:len(self.stack[-1][0])]:
            os.close(self.stack.pop()[1])
        fd = self.stack[-1][1] if self.stack else self.root_fd
        depth = len(self.stack[-1][0]) if self.stack else 0
        for i in range(depth, len(parts)):
            try:
                fd = os.open(parts[i], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                             | os.O_CLOEXEC, dir_fd=fd)
            except OSError as e:
                raise _open_error(path, e, _is_symlink(parts[i], fd)) from None
            self.stack.append((parts[:i + 1], fd))
        return fd

    def open(self, path: str) -> int:
        parts = tuple(path.split("/"))
        dir_fd = self._dir_fd(parts[:-1], path)
        try:
            return os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
                           | os.O_NONBLOCK, dir_fd=dir_fd)
        except OSError as e:
            raise _open_error(path, e, _is_symlink(parts[-1], dir_fd)) from None


def _is_symlink(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _open_error(path: str, e: OSError, symlink: bool) -> BuildError:
    why = "a symlink is in the way" if symlink else (e.strerror or str(e))
    return BuildError(f"cannot read /{path} from the unpacked image: {why}",
                      "the unpacked tree does not match the image's layers; rebuild")


@contextlib.contextmanager
def _output(out: Path | BinaryIO) -> Iterator[BinaryIO]:
    if isinstance(out, Path):
        with open(out, "wb", buffering=1 << 20) as f:
            yield f
    else:
        yield out


def write_tar(tree: Tree, content_root: Path, out: Path | BinaryIO, *,
              overrides: Mapping[str, Path] | None = None) -> None:
    """Write ``tree`` as a pax tar to ``out`` (a path, or an open binary stream / pipe).

    Raises ``BuildError`` when a regular file cannot be opened beneath ``content_root``
    without following symlinks, or when its size differs from the ``Entry``.
    """
    overrides = overrides or {}
    beneath = _Beneath(content_root)
    try:
        with _output(out) as f:
            try:
                out_fd: int | None = f.fileno()
            except (OSError, io.UnsupportedOperation, AttributeError):
                out_fd = None
            for p in sorted(tree, key=sort_key):
                e = tree[p]
                f.write(entry_header(e))
                if e.kind is Kind.REG and not e.link:
                    src = overrides.get(p)
                    fd = _open_override(p, src) if src is not None else beneath.open(p)
                    try:
                        _copy(f, out_fd, fd, e)
                    finally:
                        os.close(fd)
            f.write(_ZERO * 2)
            f.flush()
    finally:
        beneath.close()


def _open_override(path: str, src: Path) -> int:
    try:
        return os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise BuildError(f"cannot read {src} for /{path}: {e.strerror}",
                         "check the recipe's [[files]] source path") from None


def _copy(f: BinaryIO, out_fd: int | None, fd: int, e: Entry) -> None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise BuildError(f"/{e.path} in the unpacked image is not a regular file",
                         "the unpacked tree does not match the image's layers; rebuild")
    if st.st_size != e.size:
        raise BuildError(
            f"/{e.path} has {st.st_size} bytes in the unpacked image but {e.size} in its layers",
            "the unpacked tree does not match the image's layers; rebuild")
    done = 0
    if out_fd is not None and e.size:
        f.flush()
        while done < e.size:
            n = os.sendfile(out_fd, fd, done, min(e.size - done, 1 << 30))
            if n == 0:
                break
            done += n
    else:
        while done < e.size:
            chunk = os.pread(fd, min(_COPY_CHUNK, e.size - done), done)
            if not chunk:
                break
            f.write(chunk)
            done += len(chunk)
    if done != e.size:
        raise BuildError(f"/{e.path} shrank to {done} bytes while it was being read",
                         "something modified the unpacked tree during the build; rebuild")
    f.write(_pad(e.size))
