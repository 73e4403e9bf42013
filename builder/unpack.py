"""umoci unpack (as root or rootless) and the content check against the flattened layers.

umoci is the *content* source of a build: its rootfs supplies file bytes. Metadata
(owners, modes, devices, capabilities) comes from ``builder.layers.flatten``, because a
rootless unpack cannot carry it: device nodes become empty regular files,
``security.capability`` is dropped and owners move into a ``user.rootlesscontainers``
xattr. What both must agree on is the set of paths, their kinds and the sizes of regular
files; ``check_content`` enforces that before anything is built from the rootfs.

We run ``umoci raw unpack`` (rootfs only) rather than ``umoci unpack``: the latter also
walks and hashes the whole rootfs to write an mtree manifest for ``umoci repack`` and a
runtime config.json, neither of which kiln uses (measured on a 177 MB, 8,500-file layer:
1.2 s instead of 2.0 s).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import replace
from pathlib import Path

from builder import proc
from builder.tree import Entry, Kind, Tree, sort_key
from builder.verify import show_path
from helper.base.errors import BuildError, ToolError

ROOTFS = "rootfs"
ROOTLESS_XATTR = "user.rootlesscontainers"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

_KINDS = {
    stat.S_IFREG: Kind.REG,
    stat.S_IFDIR: Kind.DIR,
    stat.S_IFLNK: Kind.SYMLINK,
    stat.S_IFCHR: Kind.CHR,
    stat.S_IFBLK: Kind.BLK,
    stat.S_IFIFO: Kind.FIFO,
}


def umoci_argv(layout: Path, tag: str, rootfs: Path, *, rootless: bool) -> list[str]:
    """Arguments for ``umoci`` (the tool itself excluded)."""
    args = [
        "--log", "error",  # warnings (rootless device stand-ins, EPERM on xattrs) are expected
        "raw", "unpack",
        "--image", f"{layout}:{tag}",
    ]
    if rootless:
        # Unprivileged mode: no chown/mknod; owners go into user.rootlesscontainers.
        args.append("--rootless")
    args.append(str(rootfs))
    return args


def unpack(layout: Path, tag: str, bundle: Path, *, rootless: bool | None = None,
           timeout: float = 1800) -> Path:
    """Unpack ``layout:tag`` into ``bundle/rootfs`` with umoci; return the rootfs path.

    ``rootless`` defaults to "not running as root". ``bundle`` is created if missing; its
    ``rootfs`` must not exist yet.
    """
    if rootless is None:
        rootless = os.geteuid() != 0
    bundle.mkdir(parents=True, exist_ok=True, mode=0o700)
    rootfs = bundle / ROOTFS
    if rootfs.exists() or rootfs.is_symlink():
        raise BuildError(f"cannot unpack into {rootfs}: it already exists",
                         "remove it, or unpack into a fresh directory")
    try:
        proc.run("umoci", umoci_argv(layout, tag, rootfs, rootless=rootless), timeout=timeout)
    except ToolError as e:
        raise BuildError(
            f"umoci could not unpack {layout}:{tag}: {umoci_reason(e.stderr_tail)}",
            "a layer of the image is malformed or hostile; check the image, or report it",
        ) from None
    return rootfs


def umoci_reason(stderr: str) -> str:
    """umoci's last error line without colours, its cross mark and the rootfs path prefix."""
    lines = [ln for ln in _ANSI.sub("", stderr).splitlines() if ln.strip()]
    if not lines:
        return "no error output"
    last = lines[-1].strip().lstrip("⨯").strip()
    return last.removeprefix("create rootfs: ")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def scan(rootfs: Path, *, hashes: bool = False, xattrs: bool = False) -> Tree:
    """Describe a directory tree as a ``Tree`` using lstat only (symlinks never followed).

    Hard links are grouped by inode. Without ``hashes`` regular files carry no sha256;
    without ``xattrs`` none are read. ``user.rootlesscontainers`` is never reported.
    """
    tree: Tree = {}
    inodes: dict[tuple[int, int], list[str]] = {}
    base = os.fsencode(rootfs)
    stack: list[bytes] = [b""]
    while stack:
        rel = stack.pop()
        full = os.path.join(base, rel) if rel else base
        st = os.lstat(full)
        kind = _KINDS.get(stat.S_IFMT(st.st_mode))
        path = os.fsdecode(rel)
        if kind is None:
            raise BuildError(f"unpacked rootfs has an unsupported file type at {show_path(path)}",
                             "this is a bug in kiln or umoci; report it with the image")
        fields: dict[str, object] = {}
        if kind is Kind.REG:
            fields["size"] = st.st_size
            if hashes:
                fields["sha256"] = _sha256(os.fsdecode(full))
        elif kind is Kind.SYMLINK:
            fields["target"] = os.fsdecode(os.readlink(full))
        elif kind in (Kind.CHR, Kind.BLK):
            fields["major"], fields["minor"] = os.major(st.st_rdev), os.minor(st.st_rdev)
        if xattrs:
            names = os.listxattr(full, follow_symlinks=False)
            fields["xattrs"] = tuple(sorted(
                (n, os.getxattr(full, n, follow_symlinks=False))
                for n in names if n != ROOTLESS_XATTR))
        tree[path] = Entry(
            path=path, kind=kind, mode=0o777 if kind is Kind.SYMLINK else st.st_mode & 0o7777,
            uid=st.st_uid, gid=st.st_gid, mtime=int(st.st_mtime), **fields,  # type: ignore[arg-type]
        )
        if kind is not Kind.DIR and st.st_nlink > 1:
            inodes.setdefault((st.st_dev, st.st_ino), []).append(path)
        if kind is Kind.DIR:
            with os.scandir(full) as it:
                stack.extend(os.path.join(rel, e.name) if rel else e.name for e in it)
    _group_links(tree, inodes)
    return tree


def _group_links(tree: Tree, inodes: dict[tuple[int, int], list[str]]) -> None:
    for paths in inodes.values():
        paths.sort(key=sort_key)
        for p in paths[1:]:
            tree[p] = replace(tree[p], link=paths[0])


def content_mismatches(tree: Tree, found: Tree, *, rootless: bool) -> list[str]:
    """Where ``found`` (a scan of umoci's rootfs) disagrees with ``tree``: paths, kinds, sizes.

    A rootless unpack turns device nodes into empty regular files; that is accepted.
    """
    problems: list[str] = []
    for path in sorted(tree.keys() - found.keys()):
        problems.append(f"{show_path(path)} is missing from the unpacked rootfs")
    for path in sorted(found.keys() - tree.keys()):
        problems.append(f"{show_path(path)} is in the unpacked rootfs but not in the layers")
    for path in sorted(tree.keys() & found.keys()):
        want, got = tree[path], found[path]
        stand_in = (rootless and want.kind in (Kind.CHR, Kind.BLK)
                    and got.kind is Kind.REG and got.size == 0)
        if want.kind is not got.kind and not stand_in:
            problems.append(f"{show_path(path)} is a {got.kind.value} in the unpacked rootfs, "
                            f"the layers say {want.kind.value}")
        elif want.kind is Kind.REG and want.size != got.size:
            problems.append(f"{show_path(path)} has {got.size} bytes in the unpacked rootfs, "
                            f"the layers say {want.size}")
        elif want.kind is Kind.SYMLINK and want.target != got.target:
            problems.append(f"{show_path(path)} points to {got.target!r} in the unpacked rootfs, "
                            f"the layers say {want.target!r}")
    return problems


def check_content(tree: Tree, rootfs: Path, *, rootless: bool | None = None) -> None:
    """Raise ``BuildError`` unless umoci's ``rootfs`` holds exactly the paths of ``tree``."""
    if rootless is None:
        rootless = os.geteuid() != 0
    problems = content_mismatches(tree, scan(rootfs), rootless=rootless)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise BuildError(
            f"umoci's unpack disagrees with the flattened layers: {problems[0]}{more}",
            "this is a bug in kiln or umoci; report it with the image reference",
        )
