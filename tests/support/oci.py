"""Test support: hand-crafted OCI layouts and a real unprivileged user.

``umoci insert`` and ``docker build`` only make well-behaved layers; hostile ones (``..``
names, entries written through symlinks, whiteouts in odd places) are built here member by
member with ``tarfile``, which writes names verbatim. ``write_layout`` turns layer tar bytes
into a complete OCI image layout (blobs, config with diff_ids, manifest, index.json,
oci-layout) that umoci and skopeo accept.

``unprivileged_user`` creates a throw-away system user once per session so rootless umoci
runs as a real non-root user (``run_as``), not as root pretending.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import pwd
import secrets
import subprocess
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from builder import probes

OCI_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MEDIA = {"tar": OCI_TAR, "gzip": OCI_GZIP, "zstd": OCI_ZSTD}

# -- layer members ---------------------------------------------------------------------

# A member is a TarInfo plus its data (regular files only).
Member = tuple[tarfile.TarInfo, bytes]


def _info(name: str, type_: bytes, *, mode: int, uid: int, gid: int,
          xattrs: dict[str, bytes] | None, pax: dict[str, str] | None) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.mode = mode
    ti.uid, ti.gid = uid, gid
    ti.mtime = 1_700_000_000
    headers = dict(pax or {})
    for key, value in (xattrs or {}).items():
        headers[f"SCHILY.xattr.{key}"] = value.decode("utf-8", "surrogateescape")
    ti.pax_headers = headers
    return ti


def reg(name: str, data: bytes = b"", *, mode: int = 0o644, uid: int = 0, gid: int = 0,
        xattrs: dict[str, bytes] | None = None, pax: dict[str, str] | None = None) -> Member:
    ti = _info(name, tarfile.REGTYPE, mode=mode, uid=uid, gid=gid, xattrs=xattrs, pax=pax)
    ti.size = len(data)
    return ti, data


def mkdir(name: str, mode: int = 0o755, uid: int = 0, gid: int = 0,
          xattrs: dict[str, bytes] | None = None) -> Member:
    return _info(name, tarfile.DIRTYPE, mode=mode, uid=uid, gid=gid, xattrs=xattrs,
                 pax=None), b""


def symlink(name: str, target: str, uid: int = 0, gid: int = 0) -> Member:
    ti = _info(name, tarfile.SYMTYPE, mode=0o777, uid=uid, gid=gid, xattrs=None, pax=None)
    ti.linkname = target
    return ti, b""


def hardlink(name: str, target: str) -> Member:
    ti = _info(name, tarfile.LNKTYPE, mode=0o644, uid=0, gid=0, xattrs=None, pax=None)
    ti.linkname = target
    return ti, b""


def device(name: str, kind: str, major: int, minor: int, mode: int = 0o660) -> Member:
    type_ = {"chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE}[kind]
    ti = _info(name, type_, mode=mode, uid=0, gid=0, xattrs=None, pax=None)
    ti.devmajor, ti.devminor = major, minor
    return ti, b""


def fifo(name: str, mode: int = 0o644) -> Member:
    return _info(name, tarfile.FIFOTYPE, mode=mode, uid=0, gid=0, xattrs=None, pax=None), b""


def whiteout(name: str) -> Member:
    """``.wh.<basename of name>`` next to ``name``."""
    head, _, base = name.rpartition("/")
    return reg(f"{head}/.wh.{base}" if head else f".wh.{base}")


def opaque(directory: str) -> Member:
    return reg(f"{directory}/.wh..wh..opq" if directory else ".wh..wh..opq")


def layer_tar(members: Sequence[Member]) -> bytes:
    """Uncompressed PAX tar of ``members``, names written exactly as given."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      encoding="utf-8", errors="surrogateescape") as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return buf.getvalue()


# -- layouts -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    path: Path
    tag: str
    layers: list[tuple[Path, str]]  # (blob, media type), what builder.layers.flatten takes
    layer_digests: list[str]


def _put_blob(root: Path, data: bytes) -> tuple[str, Path]:
    hexd = hashlib.sha256(data).hexdigest()
    path = root / "blobs" / "sha256" / hexd
    path.write_bytes(data)
    return f"sha256:{hexd}", path


def _compress(data: bytes, codec: str) -> bytes:
    if codec == "gzip":
        return gzip.compress(data, compresslevel=1, mtime=0)
    if codec == "zstd":
        res = subprocess.run(["zstd", "--quiet", "--stdout", "-"], input=data,
                             capture_output=True, check=True)
        return res.stdout
    return data


def write_layout(path: Path, layers: Sequence[bytes], *, tag: str = "latest",
                 codec: str = "gzip") -> Layout:
    """A complete OCI image layout at ``path`` holding one image made of ``layers``."""
    (path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    descs, blobs, digests = [], [], []
    for tar in layers:
        blob = _compress(tar, codec)
        digest, blob_path = _put_blob(path, blob)
        descs.append({"mediaType": MEDIA[codec], "digest": digest, "size": len(blob)})
        blobs.append((blob_path, MEDIA[codec]))
        digests.append(digest)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers",
                   "diff_ids": [f"sha256:{hashlib.sha256(t).hexdigest()}" for t in layers]},
    }
    cdata = json.dumps(config).encode()
    cdigest, _ = _put_blob(path, cdata)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": cdigest, "size": len(cdata)},
        "layers": descs,
    }
    mdata = json.dumps(manifest).encode()
    mdigest, _ = _put_blob(path, mdata)
    index = {
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": mdigest, "size": len(mdata),
                       "annotations": {"org.opencontainers.image.ref.name": tag}}],
    }
    (path / "index.json").write_text(json.dumps(index))
    return Layout(path, tag, blobs, digests)


def make_layout(path: Path, stack: Sequence[Sequence[Member]], *, codec: str = "gzip",
                tag: str = "latest") -> Layout:
    return write_layout(path, [layer_tar(m) for m in stack], tag=tag, codec=codec)


# -- an unprivileged user ------------------------------------------------------------------


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: Path
    scratch: Path  # a directory this user owns, for layouts and bundles


def run_as(user: User, argv: Sequence[str], *, cwd: Path | None = None,
           check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as ``user`` (setpriv: real uid/gid switch, no supplementary groups)."""
    env = {"HOME": str(user.home), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
           "LC_ALL": "C.UTF-8", "USER": user.name}
    cmd = ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups",
           "--", *argv]
    res = subprocess.run(cmd, cwd=cwd or user.scratch, env=env, capture_output=True,
                         text=True, timeout=timeout, check=False)
    if check and res.returncode != 0:
        raise AssertionError(f"{argv} as {user.name} failed ({res.returncode}):\n"
                             f"{res.stdout}\n{res.stderr}")
    return res


@contextlib.contextmanager
def make_user(prefix: str = "kilnt") -> Iterator[User]:
    """A fresh system user with a home and a scratch directory, removed afterwards."""
    name = f"{prefix}{secrets.token_hex(4)}"
    home = Path(f"/tmp/{name}-home")
    subprocess.run(["useradd", "--system", "--create-home", "--home-dir", str(home),
                    "--shell", "/bin/sh", "--user-group", name], check=True,
                   capture_output=True)
    try:
        pw = pwd.getpwnam(name)
        scratch = home / "scratch"
        scratch.mkdir()
        os.chown(scratch, pw.pw_uid, pw.pw_gid)
        yield User(name, pw.pw_uid, pw.pw_gid, home, scratch)
    finally:
        # Rootless unpacks leave 0500 directories: make them removable first.
        subprocess.run(["chmod", "-R", "u+rwX", str(home)], check=False, capture_output=True)
        subprocess.run(["userdel", "--remove", name], check=False, capture_output=True)
        subprocess.run(["rm", "-rf", "--one-file-system", str(home)], check=False)


@pytest.fixture(scope="session")
def unprivileged_user() -> Iterator[User]:
    """A throw-away user for the whole session."""
    if os.geteuid() != 0 or not probes.can_mknod().ok:
        pytest.skip("creating a user needs root")
    with make_user() as user:
        yield user


@pytest.fixture(scope="session")
def second_user() -> Iterator[User]:
    """Another throw-away user (a victim for attack tests)."""
    if os.geteuid() != 0 or not probes.can_mknod().ok:
        pytest.skip("creating a user needs root")
    with make_user("kilnv") as user:
        yield user


def give_to(user: User, path: Path) -> None:
    """Hand a tree over to ``user`` (lchown, no symlink following)."""
    for dirpath, dirnames, filenames in os.walk(path):
        os.lchown(dirpath, user.uid, user.gid)
        for n in dirnames + filenames:
            os.lchown(os.path.join(dirpath, n), user.uid, user.gid)
