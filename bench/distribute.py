"""kiln push/pull of a 1 GiB volume vs ``skopeo copy`` of a same-size image; refresh of 20
unchanged recipes. One run, one throw-away registry on 127.0.0.1.

Setup (untimed):

* a 1 GiB volume: the Debian bookworm minbase test image (``tests/support/images.py``,
  cached under ``/var/cache/kiln-tests``) built by a recipe with ``size = "1G"``;
* the same-size image: one layer holding that 1 GiB ext4 file as a tar, gzip-compressed
  by ``umoci raw add-layer`` (what a registry usually carries), in an OCI layout;
* 20 recipes on 20 tags of a busybox image, each built once.

Timed, ``--runs`` rounds (medians), each push to a new repository so nothing is skipped:

* **push**: ``kiln push ID REF`` (zstd compression included) vs ``skopeo copy
  oci:LAYOUT docker://REF`` (its layer is already compressed: skopeo only uploads);
* **re-push**: ``kiln push`` of the same volume to a new tag of a repository that has it
  (HEAD requests only: no compression, no upload);
* **pull**: ``kiln pull REF`` into a fresh root (download, digest checks, decompression,
  sha256 of the volume, commit) vs ``skopeo copy docker://REF oci:DIR`` (download and digest
  check; it does not decompress);
* **refresh**: ``kiln refresh DIR`` of the 20 unchanged recipes (target < 5 s), with the
  registry's access log checked for blob downloads (there must be none).

Usage: ``.venv/bin/python bench/distribute.py [--runs 3] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import Suite, Target, loadavg, machine, ratio, run_timed, table  # noqa: E402 - needs the checkout on sys.path first

KILN = [sys.executable, "-c",
        "from runner.cli import cli; cli(prog_name='kiln')"]
RECIPES = 20
TARGET_REFRESH = 5.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def setup_volume(work: Path, kroot: Path) -> dict[str, Any]:
    from tests.support.images import debian_layout

    rdir = work / "vol-recipe"
    rdir.mkdir()
    (rdir / "debian1g.toml").write_text(
        f'source = "oci:{debian_layout()}:bookworm"\nsize = "1G"\n')
    _, out = run_timed([*KILN, "--root", str(kroot), "build", str(rdir / "debian1g.toml"),
                        "--json"])
    vol: dict[str, Any] = json.loads(out)
    return vol


def setup_image(work: Path, volume_path: Path) -> Path:
    """An OCI layout with one gzip layer whose tar holds the volume file."""
    from builder import proc
    from builder.demoimage import add_layer

    layout = work / "same-size"
    proc.run("umoci", ["init", "--layout", str(layout)])
    proc.run("umoci", ["new", "--image", f"{layout}:bench"])
    tar = work / "layer.tar"
    proc.run("tar", ["--create", "--file", str(tar), "--directory", str(volume_path.parent),
                     volume_path.name], timeout=600)
    add_layer(f"{layout}:bench", tar, "bench: the volume as one layer")
    tar.unlink()
    return layout


def setup_recipes(work: Path, kroot: Path, address: str) -> Path:
    from builder.demoimage import push
    from tests.support.images import busybox_layout

    d = work / "recipes"
    d.mkdir()
    for i in range(RECIPES):
        push(busybox_layout(), "1", f"docker://{address}/bench/r{i}:1")
        (d / f"r{i:02}.toml").write_text(
            f'source = "docker://{address}/bench/r{i}:1"\nheadroom = "{10 + i}%"\n')
    res = subprocess.run([*KILN, "--root", str(kroot), "refresh", str(d), "--tls-verify=false",
                          "--json"], capture_output=True, text=True, check=False)
    failed = [r for r in json.loads(res.stdout or "[]") if r["action"] == "failed"]
    if res.returncode != 0 or failed:
        raise RuntimeError(f"setup refresh failed: {failed or res.stderr}")
    return d


def transfer_round(suite: Suite, work: Path, kroot: Path, vol: dict[str, Any], layout: Path,
                   addr: str, run: int) -> None:
    """One round of push and pull, kiln and skopeo, against the registry at ``addr``."""
    ref = f"{addr}/kiln/vol{run}:1"
    os.sync()
    dt, _ = run_timed([*KILN, "--root", str(kroot), "push", vol["id"], ref,
                         "--tls-verify=false", "--json"])
    suite["push/kiln"].add(dt)
    dt, _ = run_timed([*KILN, "--root", str(kroot), "push", vol["id"],
                       f"{addr}/kiln/vol{run}:again", "--tls-verify=false"])
    suite["push/kiln again (blobs present)"].add(dt)
    os.sync()
    dt, _ = run_timed(["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                       f"oci:{layout}:bench", f"docker://{addr}/skopeo/img{run}:1"])
    suite["push/skopeo copy"].add(dt)
    fresh = work / f"pull-{run}"
    os.sync()
    dt, _ = run_timed([*KILN, "--root", str(fresh), "pull", ref,
                       "--tls-verify=false", "--json"])
    suite["pull/kiln"].add(dt)
    shutil.rmtree(fresh)
    dest = work / f"skopeo-pull-{run}"
    os.sync()
    dt, _ = run_timed(["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                       f"docker://{addr}/skopeo/img{run}:1", f"oci:{dest}:bench"])
    suite["pull/skopeo copy"].add(dt)
    # what skopeo leaves is a gzip tar: making it a usable disk file costs this much more
    layer = dest / "blobs/sha256" / blob_digest(dest)[7:]
    dt, _ = run_timed(["sh", "-c", 'gzip -dc "$1" | tar -xO | sha256sum', "sh", str(layer)])
    suite["ref/gunzip+untar+sha256 of that layer"].add(dt)
    shutil.rmtree(dest)


def _layer(layout: Path) -> dict[str, Any]:
    index = json.loads((layout / "index.json").read_text())
    mdig = index["manifests"][0]["digest"][7:]
    manifest = json.loads((layout / "blobs/sha256" / mdig).read_text())
    layer: dict[str, Any] = manifest["layers"][0]
    return layer


def blob_size(layout: Path) -> int:
    return int(_layer(layout)["size"])


def blob_digest(layout: Path) -> str:
    return str(_layer(layout)["digest"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args()
    from builder.localregistry import LocalRegistry

    work = Path(tempfile.mkdtemp(prefix="kiln-bench-dist-", dir="/var/tmp"))
    suite = Suite()
    try:
        with LocalRegistry(data_dir=work / "registry") as reg:
            kroot = work / "root"
            log("setup: 1 GiB volume")
            vol = setup_volume(work, kroot)
            log("setup: same-size single-layer image")
            layout = setup_image(work, Path(vol["path"]))
            log("setup: 20 recipes")
            rdir = setup_recipes(work, work / "refresh-root", reg.address)
            for run in range(args.runs):
                log(f"round {run + 1}/{args.runs}")
                # A registry of its own per round (a new port): skopeo's blob-info cache
                # remembers blobs per registry and would mount them instead of uploading.
                with LocalRegistry(data_dir=work / f"registry-{run}") as target:
                    transfer_round(suite, work, kroot, vol, layout, target.address, run)
                shutil.rmtree(work / f"registry-{run}", ignore_errors=True)
                gets = sum(1 for a in reg.access_log() if a.method == "GET" and
                           "/bench/" in a.path and "/blobs/" in a.path)
                dt, out = run_timed([*KILN, "--root", str(work / "refresh-root"), "refresh",
                                     str(rdir), "--tls-verify=false", "--json"])
                rows = json.loads(out)
                assert [r["action"] for r in rows] == ["unchanged"] * RECIPES, rows
                after = sum(1 for a in reg.access_log() if a.method == "GET" and
                            "/bench/" in a.path and "/blobs/" in a.path)
                assert after == gets, "refresh of unchanged recipes downloaded blobs"
                suite["refresh/20 unchanged"].add(dt)
            compressed = json.loads(
                next((kroot / "dist").glob("*.json")).read_text())["size"]
            gz = blob_size(layout)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = suite.medians()
    targets = [Target("refresh of 20 unchanged recipes", med["refresh/20 unchanged"],
                      TARGET_REFRESH, " s", strict=True)]
    ratios = {"push kiln/skopeo": ratio(med["push/kiln"], med["push/skopeo copy"]),
              "pull kiln/skopeo": ratio(med["pull/kiln"], med["pull/skopeo copy"])}
    sizes = {"volume": int(vol["size"]), "kiln zstd layer": int(compressed),
             "image gzip layer": gz}
    if args.json:
        print(json.dumps({"machine": machine(), "loadavg": loadavg(), "series": suite.as_json(),
                          "ratios": ratios, "sizes": sizes,
                          "targets": {t.name: t.as_json() for t in targets}}, indent=2))
        return 0
    print(table(["measure", "median s", "min s", "max s"],
                [(n, s.median, *s.spread) for n, s in
                 ((n, suite[n]) for n in suite.names())]))
    print()
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    for k, n in sizes.items():
        print(f"{k}: {n / 2**20:.1f} MiB")
    for t in targets:
        print(t.line())
    print(f"machine: {machine()['cpus']} cpus, load {loadavg()}")
    return 0 if all(t.met for t in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
