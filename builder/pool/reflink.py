"""reflink backend: snapshots are FICLONE clones (O(1), extents shared until written).

Where the kiln root's own filesystem clones (btrfs, XFS with reflink=1), the pool is the
plain directory ``ROOT/pool/fs``. Elsewhere ``kiln pool init`` makes a sparse image
``ROOT/pool/pool.img`` (btrfs by default, or XFS), and loop-mounts it at ``ROOT/pool/fs``;
after a reboot ``ensure_mounted`` (run by every pool operation) attaches and mounts it
again. Loop devices backed by files under the root that nothing mounts are detached by
reclaim.

Privileged steps (``pool-create``: image + mkfs + mount; ``pool-mount`` after a reboot;
``pool-destroy``) go through ``builder.helperclient``: in-process as root, ``kiln-helper`` via
sudo otherwise. The helper names nothing the caller chooses: the image and its mount
point have fixed names in the area (the kiln root for root; for a sudo caller the
helper-made ``/var/lib/kiln/users/<uid>/pool/``, root's all the way up), and the
snapshots of a sudo caller are made by the helper (``builder.pool.files``).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from builder import helperclient as client
from builder.pool.base import PoolConfig, pool_dir
from builder.pool.files import FilePool
from helper.base.errors import NotFound


class ReflinkPool(FilePool):
    backend = "reflink"
    thin = True
    clone_ok = True

    @property
    def area(self) -> Path:
        """Where the privileged files live: the root itself, or the caller's helper area."""
        return client.area(self.root_dir)

    @property
    def image(self) -> Path:
        return self.area / "pool" / "pool.img"

    @property
    def loop_backed(self) -> bool:
        return self.config.fs in ("btrfs", "xfs")

    @property
    def fs_dir(self) -> Path:
        return self.area / "pool" / "fs" if self.loop_backed else self.dir / "fs"

    def ensure_mounted(self) -> None:
        """Mount the pool image at fs/ unless it already is (after a reboot it is not)."""
        if not self.loop_backed:
            return
        from helper.storage import privileged  # dm-thin's module too: only loop-backed pools

        if privileged.is_mounted(self.fs_dir):
            return
        client.pool_mount(self.area)

    def _activate(self) -> None:
        self.ensure_mounted()
        super()._activate()

    def _usage(self) -> tuple[int, int]:
        if not self.loop_backed:
            return super()._usage()
        st = os.statvfs(self.fs_dir)
        return st.f_blocks * st.f_frsize, (st.f_blocks - st.f_bfree) * st.f_frsize

    def _teardown(self) -> None:
        if not self.loop_backed:
            return
        with contextlib.suppress(NotFound):  # no image: nothing left to tear down
            client.pool_destroy(self.area)


def create(root_dir: Path, config: PoolConfig) -> ReflinkPool:
    """Make the pool's directories (and image, when loop-backed); returns it mounted."""
    d = pool_dir(root_dir)
    d.mkdir(parents=True, exist_ok=True)
    pool = ReflinkPool(root_dir, config)
    if pool.loop_backed:
        # Sparse image + mkfs, unnamed until whole, then mounted (the helper does it).
        client.pool_create(pool.area, config.size, config.fs)
    pool._activate()
    return pool
