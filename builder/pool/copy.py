"""copy backend: every snapshot is a full sparse copy (SEEK_DATA + copy_file_range).

For odd hosts only, and only when chosen explicitly (``kiln pool init --backend copy``):
a snapshot costs the base's allocated size and time proportional to it. ``pool status``
and every snapshot say ``thin: false``.
"""

from __future__ import annotations

from pathlib import Path

from builder.pool.base import PoolConfig, pool_dir
from builder.pool.files import FilePool


class CopyPool(FilePool):
    backend = "copy"
    thin = False
    clone_ok = False


def create(root_dir: Path, config: PoolConfig) -> CopyPool:
    pool_dir(root_dir).mkdir(parents=True, exist_ok=True)
    pool = CopyPool(root_dir, config)
    pool._activate()
    return pool
