"""kiln build vs the raw tools by hand, on a realistic Debian image, in one run.

The Debian bookworm minbase test image (``tests/support/images.py``: debootstrap + umoci,
cached under ``/var/cache/kiln-tests``; ~35 s the first time) is pushed to a throw-away
``LocalRegistry`` on 127.0.0.1. Then, for ``--runs`` rounds (medians reported), each round
measures, in this order:

* **raw**, by hand, into a fresh directory: ``skopeo copy docker://…@DIGEST oci:DIR:bench``,
  ``umoci unpack --image DIR:bench BUNDLE``, ``mke2fs -t ext4 -d ROOTFS IMG SIZE`` (SIZE is
  the size kiln chose for this image) and ``sha256sum IMG``; raw total = their sum.
  ``umoci raw unpack`` (what kiln runs) is timed too, for reference only;
* **kiln API**: ``builder.pipeline.build()`` cold (fresh root, so an empty blob cache) with
  ``verify=False`` and with ``verify=True``, with its per-stage ``timings``;
* **kiln CLI cold**: the whole ``kiln --root R build REF --tls-verify=false --json`` process
  on a fresh root (it always verifies);
* **kiln CLI cache hit**: the same command again on that warm root;
* **references** (not in any ratio): ``kiln --help`` (interpreter start-up plus the CLI's
  imports) and one ``builder.proc.run("true")`` (kiln's fixed cost per tool it runs).

Targets (issue #2): kiln(no verify)/raw ≤ 1.10, kiln(verify)/raw ≤ 1.30, cache hit < 1 s.
One untimed warm-up build first fills the page cache, so every timed run reads the registry
and the tools from memory alike, and an untimed ``sync`` precedes each timed item, so none
pays for writing back the previous one's dirty pages. Needs root (umoci unpacks as root).
Usage, from the checkout root::

    .venv/bin/python bench/build.py [--runs 5] [--json | --json-file FILE]

Everything it makes lives in one temporary directory, removed at the end with the registry
stopped, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import Suite, Target, loadavg, machine, ratio, run_timed, table, timed  # noqa: E402 - needs the checkout on sys.path first

KILN = str(ROOT / ".venv" / "bin" / "kiln")
RAW_STEPS = ("skopeo", "umoci", "mke2fs", "sha256sum")
STAGES = ("resolve", "pull", "unpack", "mkfs", "verify", "hash", "commit", "import")
TARGET_NOVERIFY = 1.10
TARGET_VERIFY = 1.30
TARGET_HIT = 1.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def manifest_digest(ref: str) -> str:
    """The digest ``skopeo copy`` would pin ``ref`` to: sha256 of the raw manifest."""
    raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", ref],
                         capture_output=True, check=True).stdout
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def raw_round(suite: Suite, work: Path, by_digest: str, size: int) -> None:
    """One pass of the raw tools by hand, each timed, in a fresh directory."""
    d = Path(tempfile.mkdtemp(prefix="raw-", dir=work))
    try:
        layout = d / "layout"
        t = {}
        os.sync()
        t["skopeo"], _ = run_timed(["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                                    by_digest, f"oci:{layout}:bench"])
        t["umoci"], _ = run_timed(["umoci", "unpack", "--image", f"{layout}:bench",
                                   str(d / "bundle")])
        img = d / "raw.ext4"
        t["mke2fs"], _ = run_timed(["mke2fs", "-q", "-t", "ext4", "-d",
                                    str(d / "bundle" / "rootfs"), str(img), f"{size // 1024}k"])
        t["sha256sum"], _ = run_timed(["sha256sum", str(img)])
        for k, v in t.items():
            suite[f"raw/{k}"].add(v)
        suite["raw/total"].add(sum(t.values()))
        # for reference: the unpack kiln runs (no mtree manifest, no config.json)
        os.sync()
        dt, _ = run_timed(["umoci", "--log", "error", "raw", "unpack", "--image",
                           f"{layout}:bench", str(d / "raw-rootfs")])
        suite["ref/umoci raw unpack"].add(dt)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def api_build(suite: Suite, name: str, work: Path, ref: str, *, verify: bool) -> dict[str, Any]:
    """One cold ``pipeline.build()`` on a fresh root; its JSON summary."""
    from builder.pipeline import build
    from builder.root import Root, rmtree
    from builder.source import RegistryOptions

    root = Path(tempfile.mkdtemp(prefix="root-", dir=work))
    try:
        os.sync()
        dt, res = timed(lambda: build(Root(root), ref, RegistryOptions(tls_verify=False),
                                      verify=verify))
        assert not res.cached, "a fresh root gave a cache hit"  # type: ignore[attr-defined]
        suite[f"{name}/total"].add(dt)
        timings = dict(res.timings)  # type: ignore[attr-defined]
        for st, v in timings.items():
            suite[f"{name}/{st}"].add(v)
        # the time no stage accounts for: check_content, sizing, locks, root set-up…
        suite[f"{name}/(outside stages)"].add(dt - sum(timings.values()))
        return dict(res.as_json())  # type: ignore[attr-defined]
    finally:
        rmtree(root)


def proc_run_overhead() -> float:
    """Seconds one ``builder.proc.run`` of ``/bin/true`` takes: the fixed cost kiln pays
    per tool it runs (``true`` itself takes about a millisecond)."""
    from builder import proc

    dt, _ = timed(lambda: proc.run("true", []))
    return dt


def cli_build(root: Path, ref: str) -> tuple[float, dict[str, Any]]:
    dt, out = run_timed([KILN, "--root", str(root), "build", ref, "--tls-verify=false",
                         "--json"])
    return dt, dict(json.loads(out))


def _term(signum: int, _frame: object) -> NoReturn:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks: cleanup runs


def measure(runs: int) -> dict[str, Any]:
    from builder.localregistry import LocalRegistry
    from builder.root import rmtree
    from tests.support.images import debian_layout, push_debian

    log("preparing the Debian image (first time ~35 s)…")
    debian_layout()
    suite = Suite()
    ids: set[str] = set()
    load_before = loadavg()
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-build-", dir="/var/tmp"))
    try:
        with LocalRegistry(data_dir=work / "registry") as reg:
            ref = push_debian(reg.address, "bench/debian")
            digest = manifest_digest(ref)
            by_digest = ref.rsplit(":", 1)[0] + "@" + digest
            log(f"registry {reg.address}; image {ref} = {digest}")

            log("warm-up build (untimed)…")
            warm = api_build(Suite(), "warm", work, ref, verify=True)
            size = int(warm["size"])
            ids.add(warm["id"])

            for i in range(1, runs + 1):
                log(f"round {i}/{runs}: raw tools…")
                raw_round(suite, work, by_digest, size)
                log(f"round {i}/{runs}: kiln API, no verify…")
                ids.add(api_build(suite, "kiln-api-noverify", work, ref, verify=False)["id"])
                log(f"round {i}/{runs}: kiln API, verify…")
                ids.add(api_build(suite, "kiln-api-verify", work, ref, verify=True)["id"])
                log(f"round {i}/{runs}: kiln CLI cold, then a cache hit…")
                root = Path(tempfile.mkdtemp(prefix="cli-", dir=work))
                try:
                    os.sync()
                    dt, out = cli_build(root, ref)
                    assert out["cached"] is False, out
                    suite["kiln-cli/cold"].add(dt)
                    ids.add(out["id"])
                    dt, out = cli_build(root, ref)
                    assert out["cached"] is True, out
                    suite["kiln-cli/cache hit"].add(dt)
                finally:
                    rmtree(root)
                dt, _ = run_timed([KILN, "--help"])
                suite["ref/kiln --help"].add(dt)
                suite["ref/proc.run(true)"].add(proc_run_overhead())
    finally:
        rmtree(work)
    load_after = loadavg()
    m = suite.medians()
    raw = m["raw/total"]
    targets = [
        Target("kiln(no verify)/raw", ratio(m["kiln-api-noverify/total"], raw), TARGET_NOVERIFY,
               "×"),
        Target("kiln(verify)/raw", ratio(m["kiln-api-verify/total"], raw), TARGET_VERIFY, "×"),
        Target("kiln CLI cold(verify)/raw", ratio(m["kiln-cli/cold"], raw), TARGET_VERIFY, "×"),
        Target("cache hit (whole process)", m["kiln-cli/cache hit"], TARGET_HIT, " s",
               strict=True),
    ]
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": machine(),
        "load_before": load_before,
        "load_after": load_after,
        "runs": runs,
        "image": {"ref": "debian bookworm minbase (tests/support/images.py)", "digest": digest,
                  "volume_size": size},
        "volume_ids": sorted(ids),
        "series": suite.as_json(),
        "targets": {t.name: t.as_json() for t in targets},
        "_suite": suite,
        "_targets": targets,
    }


def report(res: dict[str, Any]) -> str:
    suite: Suite = res["_suite"]
    targets: list[Target] = res["_targets"]
    m = suite.medians()
    raw = m["raw/total"]
    out = []
    mc = res["machine"]
    out.append(f"kiln build benchmark, {res['date']}: {res['runs']} runs, medians in seconds")
    out.append(f"machine: {mc['cpus']} CPUs ({mc['cpu_model']}), {mc['os']}, "
               f"kernel {mc['kernel']}")
    out.append("load average before: {:.2f} {:.2f} {:.2f}; after: {:.2f} {:.2f} {:.2f}".format(
        *res["load_before"], *res["load_after"]))
    out.append(f"image: {res['image']['ref']}, {res['image']['digest'][:19]}…, volume "
               f"{res['image']['volume_size'] / 2**20:.0f} MiB")
    out.append("")

    def row(name: str, label: str) -> list[object]:
        s = suite[name]
        lo, hi = s.spread
        return [label, s.median, lo, hi, ratio(s.median, raw)]

    rows: list[list[object]] = [row(f"raw/{k}", f"raw {k}") for k in RAW_STEPS]
    rows.append(row("raw/total", "raw total"))
    rows.append(row("ref/umoci raw unpack", "(ref) umoci raw unpack"))
    rows.append(row("kiln-api-noverify/total", "kiln API cold, no verify"))
    rows.append(row("kiln-api-verify/total", "kiln API cold, verify"))
    rows.append(row("kiln-cli/cold", "kiln CLI cold, verify"))
    rows.append(row("kiln-cli/cache hit", "kiln CLI cache hit"))
    rows.append(row("ref/kiln --help", "(ref) kiln --help"))
    rows.append(row("ref/proc.run(true)", "(ref) proc.run('true')"))
    out.append(table(["", "median", "min", "max", "÷ raw"], rows))
    out.append("")
    out.append("kiln API per-stage timings (BuildResult.timings), medians:")
    srows = []
    for st in (*STAGES, "(outside stages)", "total"):
        a, b = f"kiln-api-noverify/{st}", f"kiln-api-verify/{st}"
        if a in suite or b in suite:
            srows.append([st, m.get(a, float("nan")), m.get(b, float("nan"))])
    out.append(table(["stage", "no verify", "verify"], srows))
    out.append("")
    out.append("raw step vs kiln stage (no verify):")
    pairs = [("skopeo", "pull"), ("umoci", "unpack"), ("mke2fs", "mkfs"), ("sha256sum", "hash")]
    out.append(table(["raw step / kiln stage", "raw", "kiln", "kiln - raw"],
                     [[f"{a} / {b}", m[f"raw/{a}"], m.get(f"kiln-api-noverify/{b}", 0.0),
                       m.get(f"kiln-api-noverify/{b}", 0.0) - m[f"raw/{a}"]]
                      for a, b in pairs]))
    out.append("")
    out.extend(t.line() for t in targets)
    if len(res["volume_ids"]) != 1:
        out.append(f"WARNING: builds gave different ids: {res['volume_ids']}")
    else:
        out.append(f"all kiln builds gave one id: {res['volume_ids'][0]}")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--runs", type=int, default=5, help="rounds to take medians over")
    ap.add_argument("--json", action="store_true", help="print one JSON object, no table")
    ap.add_argument("--json-file", type=Path, metavar="FILE",
                    help="also write the JSON object to FILE (the table still prints)")
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    if os.geteuid() != 0:
        ap.error("run as root: the raw umoci unpack and kiln's build unpack as root")
    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGHUP, _term)
    res = measure(args.runs)
    doc = json.dumps({k: v for k, v in res.items() if not k.startswith("_")}, indent=2)
    if args.json_file is not None:
        args.json_file.write_text(doc + "\n")
    if args.json:
        print(doc)
    else:
        print(report(res))
    return 0  # a missed target is reported, not an error: this is not a timed test


if __name__ == "__main__":
    sys.exit(main())
