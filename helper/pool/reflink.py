"""reflink backend: snapshots are FICLONE clones (O(1), extents shared until written).

Where the kiln root's own filesystem clones (btrfs, XFS with reflink=1), the pool is the
plain directory ``ROOT/pool/fs``. Elsewhere ``kiln pool init`` makes a sparse image
``ROOT/pool/pool.img`` (btrfs by default, or XFS), and loop-mounts it at ``ROOT/pool/fs``;
after a reboot ``ensure_mounted`` (run by every pool operation) attaches and mounts it
again. Loop devices backed by files under the root that nothing mounts are detached by
reclaim.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from helper import privileged
from helper.errors import KilnError
from helper.pool import fileops
from helper.pool.base import PoolConfig, pool_dir, remove_tree
from helper.pool.files import FilePool


class ReflinkPool(FilePool):
    backend = "reflink"
    thin = True
    clone_ok = True

    @property
    def image(self) -> Path:
        return self.dir / "pool.img"

    @property
    def loop_backed(self) -> bool:
        return self.config.fs in ("btrfs", "xfs")

    def ensure_mounted(self) -> None:
        """Mount the pool image at fs/ unless it already is (after a reboot it is not)."""
        if not self.loop_backed:
            return
        self.fs_dir.mkdir(parents=True, exist_ok=True)
        if privileged.is_mounted(self.fs_dir):
            return
        dev = privileged.loop_attach(self.root_dir, self.image)
        privileged.pool_mount(self.root_dir, dev, self.fs_dir, self.config.fs)

    def _activate(self) -> None:
        self.ensure_mounted()
        super()._activate()

    def _sweep(self, recorded: set[str]) -> None:
        super()._sweep(recorded)
        if self.loop_backed:
            # A command killed between attach and mount leaves a loop device nobody uses.
            for loop in privileged.loop_list(self.root_dir):
                if not privileged.loop_in_use(loop.device):
                    with contextlib.suppress(KilnError):
                        privileged.loop_detach(self.root_dir, loop.device)

    def _usage(self) -> tuple[int, int]:
        if not self.loop_backed:
            return super()._usage()
        st = os.statvfs(self.fs_dir)
        return st.f_blocks * st.f_frsize, (st.f_blocks - st.f_bfree) * st.f_frsize

    def _teardown(self) -> None:
        if not self.loop_backed:
            return
        privileged.pool_umount(self.root_dir, self.fs_dir)
        for loop in privileged.loop_list(self.root_dir):
            if loop.back_file == str(self.image.resolve()):
                privileged.loop_detach(self.root_dir, loop.device)


def create(root_dir: Path, config: PoolConfig) -> ReflinkPool:
    """Make the pool's directories (and image, when loop-backed); returns it mounted."""
    d = pool_dir(root_dir)
    d.mkdir(parents=True, exist_ok=True)
    pool = ReflinkPool(root_dir, config)
    if pool.loop_backed:
        tmp = d / ".pool.img.tmp"
        remove_tree(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fd, config.size)  # sparse: costs nothing until written
        finally:
            os.close(fd)
        privileged.pool_mkfs(root_dir, tmp, config.fs)
        os.rename(tmp, pool.image)
        fileops.fsync_dir(d)
    pool._activate()
    return pool
