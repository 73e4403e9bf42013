"""A small, real, offline OCI image: Debian's static busybox plus applet symlinks.

The demo recipe and the tests need an image without the internet. ``make_busybox_image``
builds one with umoci in an OCI layout (``init``, ``new``, ``raw add-layer``, ``config``);
``push`` copies it to a registry with skopeo.

Determinism: kiln writes the layer tars itself (sorted, owner 0, mtime 0), the config and
history carry a fixed ``created`` time, and umoci's gzip of identical input is identical,
so the same busybox binary always gives the same layer digest (the dedup tests rely on it:
two images built from it share their base layer). Extra files go in a second layer.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from builder import proc
from builder.source import host_platform
from helper.base.errors import UsageError

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "ash", "echo", "cat", "ls", "cp", "mv", "rm", "mkdir", "ln", "uname",
           "true", "false", "sleep", "env", "id", "ps", "mount", "umount", "poweroff",
           "reboot", "halt", "ip", "ifconfig", "hostname", "grep", "sed", "head", "tail",
           "wc", "sha256sum", "dd", "df", "du", "touch", "chmod", "stat", "date", "sync")
EPOCH = "1970-01-01T00:00:00Z"


def write_layer_tar(staged: Path, out: Path) -> None:
    """A deterministic uncompressed layer tar of ``staged``'s contents.

    Sorted names without a root entry, owner 0:0, mtime 0, PAX format; the modes and
    symlink targets of the staged files are kept.
    """
    entries: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(staged):
        dirnames.sort()
        for name in [*dirnames, *filenames]:
            entries.append(Path(dirpath) / name)
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(entries, key=lambda p: p.relative_to(staged).as_posix()):
            info = tar.gettarinfo(str(path), arcname=path.relative_to(staged).as_posix())
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mtime = 0
            if info.isfile():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)


def add_layer(image: str, layer_tar: Path, comment: str) -> None:
    """Append ``layer_tar`` (uncompressed) to ``image`` as a new gzip layer.

    ``umoci insert`` would be the obvious tool, but umoci 0.4.7 ends its layer tars early
    (no final padding or end-of-archive blocks), which strict tar readers reject.
    """
    proc.run("umoci", [
        "raw", "add-layer",
        "--image", image,
        "--history.created", EPOCH,  # a fixed time keeps the config digest stable
        "--history.created_by", f"kiln demoimage: {comment}",
        str(layer_tar),
    ], timeout=300)


def make_busybox_image(layout: Path, tag: str = "1", *,
                       extra_files: Mapping[str, bytes] | None = None) -> None:
    """Create (or add ``tag`` to) the OCI layout ``layout`` with a busybox image.

    ``extra_files`` maps absolute guest paths (``/etc/motd``) to contents (mode 0644),
    added as a separate layer over the shared busybox layer.
    """
    image = f"{layout}:{tag}"
    if not (layout / "index.json").exists():
        layout.parent.mkdir(parents=True, exist_ok=True)
        proc.run("umoci", ["init", "--layout", str(layout)], timeout=60)
    proc.run("umoci", ["new", "--image", image], timeout=60)
    with tempfile.TemporaryDirectory(prefix="kiln-demoimage-") as tmp:
        base = Path(tmp) / "base"
        (base / "bin").mkdir(parents=True)
        shutil.copyfile(proc.which("busybox") if not BUSYBOX.exists() else BUSYBOX,
                        base / "bin" / "busybox")
        os.chmod(base / "bin" / "busybox", 0o755)  # noqa: S103 - image content
        os.chmod(base / "bin", 0o755)  # noqa: S103 - image content
        for applet in APPLETS:
            os.symlink("busybox", base / "bin" / applet)
        for d in ("tmp", "proc", "sys", "dev", "etc", "root"):
            (base / d).mkdir(mode=0o755)
        os.chmod(base / "tmp", 0o1777)  # noqa: S103 - /tmp in the image
        write_layer_tar(base, Path(tmp) / "base.tar")
        add_layer(image, Path(tmp) / "base.tar", "busybox")
        if extra_files:
            extra = Path(tmp) / "extra"
            extra.mkdir()
            for guest, data in sorted(extra_files.items()):
                rel = PurePosixPath(guest)
                if not rel.is_absolute() or ".." in rel.parts or len(rel.parts) < 2:
                    raise UsageError(f"extra file path {guest!r} is not an absolute file path",
                                     "use paths like /etc/motd")
                dest = extra.joinpath(*rel.parts[1:])
                dest.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
                dest.write_bytes(data)
                os.chmod(dest, 0o644)
            write_layer_tar(extra, Path(tmp) / "extra.tar")
            add_layer(image, Path(tmp) / "extra.tar", "extra files")
    proc.run("umoci", [
        "config",
        "--image", image,
        "--no-history",
        "--created", EPOCH,
        "--config.cmd", "/bin/sh",
        "--config.env", "PATH=/bin",
        "--os", "linux",
        # the host's busybox-static, so the host's architecture
        "--architecture", host_platform().split("/")[1],
    ], timeout=60)
    # Drop the blobs of intermediate manifests/configs the steps above superseded.
    proc.run("umoci", ["gc", "--layout", str(layout)], timeout=60)


def push(layout: Path, tag: str, dest_ref: str, tls_verify: bool = False, *,
         authfile: Path | None = None, all_images: bool = False) -> None:
    """Copy ``layout:tag`` to ``dest_ref`` (a skopeo reference, e.g. ``docker://…``).

    ``all_images`` copies every manifest of an index (multi-platform images).
    """
    proc.run("skopeo", [
        "copy",
        "--quiet",
        f"--dest-tls-verify={'true' if tls_verify else 'false'}",  # false allows plain HTTP
        *(["--dest-authfile", str(authfile)] if authfile is not None else []),
        *(["--all"] if all_images else []),
        f"oci:{layout}:{tag}",
        dest_ref,
    ], timeout=300)
