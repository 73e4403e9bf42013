"""reflink backend: snapshots are FICLONE clones (O(1), extents shared until written).

Where the kiln root's own filesystem clones (btrfs, XFS with reflink=1), the pool is the
plain directory ``ROOT/pool/fs``. Elsewhere ``kiln pool init`` makes a sparse image
``ROOT/pool/pool.img`` (btrfs by default, or XFS), and loop-mounts it at ``ROOT/pool/fs``;
after a reboot ``ensure_mounted`` (run by every pool operation) attaches and mounts it
again. Loop devices backed by files under the root that nothing mounts are detached by
reclaim.

Privileged steps (image + mkfs, loop attach, mount, teardown) go through
``helper.client``: in-process as root, ``kiln-helper`` via sudo otherwise. For a sudo
caller the image and its mount point live in the helper-made area
(``/var/lib/kiln/users/<uid>/pool/``): root-owned, with ``fs/volumes`` root-owned (volumes
enter by ``volume-import``, re-hashed) and ``fs/snapshots`` owned by the caller, who
clones snapshots there unprivileged.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from helper import client, privileged
from helper.errors import KilnError, NotFound
from helper.pool.base import PoolConfig, pool_dir
from helper.pool.files import FilePool


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
        if privileged.is_mounted(self.fs_dir):
            return
        dev = client.loop_attach(self.area, self.image)
        client.pool_mount(self.area, dev, self.fs_dir, self.config.fs)

    def _activate(self) -> None:
        self.ensure_mounted()
        super()._activate()

    def _sweep(self, recorded: set[str]) -> None:
        super()._sweep(recorded)
        if self.loop_backed:
            # A command killed between attach and mount leaves a loop device nobody uses.
            for loop in privileged.loop_list(self.area):
                if not privileged.loop_in_use(loop.device):
                    with contextlib.suppress(KilnError):
                        client.loop_detach(self.area, loop.device)

    def _usage(self) -> tuple[int, int]:
        if not self.loop_backed:
            return super()._usage()
        st = os.statvfs(self.fs_dir)
        return st.f_blocks * st.f_frsize, (st.f_blocks - st.f_bfree) * st.f_frsize

    def _teardown(self) -> None:
        if not self.loop_backed:
            return
        with contextlib.suppress(NotFound):  # no image: nothing left to tear down
            client.pool_remove(self.area, self.image, self.fs_dir)


def create(root_dir: Path, config: PoolConfig) -> ReflinkPool:
    """Make the pool's directories (and image, when loop-backed); returns it mounted."""
    d = pool_dir(root_dir)
    d.mkdir(parents=True, exist_ok=True)
    pool = ReflinkPool(root_dir, config)
    if pool.loop_backed:
        # Sparse image + mkfs under a temp name, renamed when whole (the helper does it).
        client.pool_image(pool.area, pool.image, config.size, config.fs)
    pool._activate()
    return pool
