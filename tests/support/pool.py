"""Pool test helpers: store-shaped volumes made with mke2fs, and cleanup of what a pool
leaves mounted or attached under a root."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

from helper.storage import privileged


def sha(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def make_volume(root: Path, size: str = "64M", data_dir: Path | None = None) -> tuple[str, Path]:
    """A store-shaped volume (ROOT/volumes/<hex>/volume.ext4 + meta.json), id = its sha."""
    tmp = root / "tmp" / "mkvol.ext4"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    args = ["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-E", "root_owner=0:0"]
    if data_dir is not None:
        args += ["-d", str(data_dir)]
    subprocess.run([*args, str(tmp), size], check=True, capture_output=True)
    digest = sha(tmp)
    d = root / "volumes" / digest
    d.mkdir(parents=True)
    os.rename(tmp, d / "volume.ext4")
    os.chmod(d / "volume.ext4", 0o444)
    (d / "meta.json").write_text(json.dumps({"id": f"sha256:{digest}", "size":
                                             os.path.getsize(d / "volume.ext4"),
                                             "source": "test", "created": "now"}))
    return f"sha256:{digest}", d / "volume.ext4"


def force_cleanup(root: Path) -> None:
    """Whatever happened: unmount and detach everything under ``root``."""
    real = os.path.realpath(root)
    for m in reversed(privileged.mounts()):
        if m.mountpoint.startswith(real + "/"):
            subprocess.run(["umount", "--lazy", m.mountpoint], check=False)
    for loop in privileged.loop_list(root):
        subprocess.run(["losetup", "--detach", loop.device], check=False)


def leftovers(root: Path) -> tuple[list[str], list[str]]:
    real = os.path.realpath(root)
    mounts = [m.mountpoint for m in privileged.mounts() if m.mountpoint.startswith(real + "/")]
    return mounts, [lp.device for lp in privileged.loop_list(root)]
