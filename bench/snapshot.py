"""Snapshot creation time vs base size, next to the raw tools, in one run.

For ext4 bases of 256 MiB, 2 GiB and 8 GiB (one eighth of each filled with random data,
made with ``mke2fs -d``) in a reflink pool on a loop-mounted btrfs image, it measures
(medians):

* ``api``: ``Pool.create_snapshot`` in-process (target: flat in size, < 50 ms at 8 GiB);
* ``cli``: the whole ``kiln snapshot create VOLUME --json`` process;
* ``cp-sparse``: ``cp --sparse=always --reflink=never`` of the base (a full copy);
* ``cp-reflink``: ``cp --reflink=always`` of the base (the raw clone);

and prints the ratios. Needs root and loop devices. Usage::

    .venv/bin/python bench/snapshot.py [--sizes 256M,2G,8G] [--repeat 7] [--fs btrfs|xfs]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from builder.pool import init_pool
from builder.units import format_size, parse_size

KILN = [sys.executable, "-c", "from runner.cli import cli; cli(prog_name='kiln')"]


def make_base(root: Path, size: int) -> tuple[str, Path]:
    data = root / "tmp" / "data"
    data.mkdir(parents=True, exist_ok=True)
    with open(data / "blob", "wb") as f:
        left = size // 8
        while left:
            n = min(left, 64 << 20)
            f.write(os.urandom(n))
            left -= n
    img = root / "tmp" / "base.ext4"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-d", str(data),
                    str(img), str(size // 1024) + "k"], check=True)
    shutil.rmtree(data)
    h = hashlib.sha256()
    with open(img, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    d = root / "volumes" / h.hexdigest()
    d.mkdir(parents=True)
    os.rename(img, d / "volume.ext4")
    (d / "meta.json").write_text(json.dumps({"id": f"sha256:{h.hexdigest()}", "size": size,
                                             "source": "bench", "created": "bench"}))
    return f"sha256:{h.hexdigest()}", d / "volume.ext4"


def timed(fn: object, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="256M,2G,8G")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--fs", default="btrfs", choices=["btrfs", "xfs"])
    args = ap.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-snap-"))
    root = work / "root"
    for d in ("locks", "volumes", "tmp", "keys"):
        (root / d).mkdir(parents=True)
    pool = init_pool(root, backend="reflink", size=sum(sizes) * 3 // 8 + (4 << 30), fs=args.fs)
    rows = []
    try:
        for size in sizes:
            vid, src = make_base(root, size)
            base = pool.import_volume(vid, src)
            os.sync()
            made: list[str] = []

            def api(vid: str = vid, made: list[str] = made) -> None:
                made.append(pool.create_snapshot(vid).id)

            def cli(vid: str = vid) -> None:
                subprocess.run([*KILN, "--root", str(root), "snapshot", "create", vid[7:19],
                                "--json"], check=True, capture_output=True)

            dst = pool.dir / "fs" / "cp.tmp"

            def cp(flags: list[str], base: Path = base, dst: Path = dst) -> None:
                subprocess.run(["cp", *flags, str(base), str(dst)], check=True)
                os.unlink(dst)

            r = {
                "size": size,
                "api": timed(api, args.repeat),
                "cli": timed(cli, max(3, args.repeat // 2)),
                "cp-sparse": timed(lambda: cp(["--sparse=always", "--reflink=never"]), 3),
                "cp-reflink": timed(lambda: cp(["--reflink=always"]), args.repeat),
            }
            rows.append(r)
            for s in pool.list_snapshots():
                pool.remove_snapshot(s.id)
            pool.remove_volume(vid)
            shutil.rmtree(src.parent)
    finally:
        pool.destroy(force=True)
        shutil.rmtree(work, ignore_errors=True)
    print(f"reflink pool on loop-mounted {args.fs}; medians in ms; bases 1/8 filled")
    print(f"{'base':>9} {'api':>8} {'cli':>8} {'cp-sparse':>10} {'cp-reflink':>10}"
          f" {'cli/api':>8} {'cp-sparse/api':>13} {'api/cp-reflink':>14}")
    for r in rows:
        print(f"{format_size(int(r['size'])):>9} {r['api'] * 1e3:8.1f} {r['cli'] * 1e3:8.1f} "
              f"{r['cp-sparse'] * 1e3:10.1f} {r['cp-reflink'] * 1e3:10.1f} "
              f"{r['cli'] / r['api']:8.1f} {r['cp-sparse'] / r['api']:13.1f} "
              f"{r['api'] / r['cp-reflink']:14.2f}")


if __name__ == "__main__":
    main()
