"""Test support: a guest image in which the dm-thin backend runs for real.

This host's kernel has no device-mapper; the Debian cloud kernel that ``kiln run`` boots
under QEMU has it as modules. The guest image is built by kiln itself from an OCI layout
made here:

* base layer: Debian bookworm minbase with python3, dmsetup, thin-provisioning-tools,
  kmod, e2fsprogs, util-linux and sudo (debootstrap + umoci), cached under
  ``/var/cache/kiln-tests`` like ``tests/support/images.py``'s plain minbase (slow the
  first time: ~1-2 minutes of debootstrap);
* test layer (rebuilt each session, it holds the code under test): the device-mapper,
  block, crypto and lib modules of the kernel ``kiln run`` boots plus its ``modules.*``
  indexes (the guest has no network and no modules of its own), the project's ``helper``
  package, the pydantic packages from the venv (Debian 12's python3 is 3.11: the venv's
  cp311 wheels load) and the in-guest programs ``tests/dmthin_guest/*.py``, all under
  ``/kiln-tests`` (byte-compiled, unchecked-hash pycs) except the modules.

``guest_layout(workdir)`` → (layout, tag): a layout in ``workdir`` whose blobs are hard
links to the cached base (no copy) plus the test layer. ``parse_summary`` reads the JSON
line the in-guest program prints.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from builder.demoimage import add_layer, write_layer_tar
from tests.support.images import debootstrap_layout

CACHE = Path(os.environ.get("KILN_TEST_CACHE", "/var/cache/kiln-tests"))
DEBIAN = ("bookworm", "minbase", "http://deb.debian.org/debian")
PACKAGES = ("python3", "dmsetup", "thin-provisioning-tools", "kmod", "e2fsprogs",
            "util-linux", "sudo")  # sudo: the helper-path scenario's unprivileged caller
TAG = "dmthin"
PROJECT = Path(__file__).resolve().parents[2]
GUEST_DIR_SRC = PROJECT / "tests" / "dmthin_guest"
GUEST_PROGRAM = GUEST_DIR_SRC / "run_dmthin.py"
GUEST_DIR = "kiln-tests"  # /kiln-tests in the guest
# Enough of /lib/modules/VERSION for loop + dm-thin-pool and their dependency closure
# (dm-mod, dm-bufio, dm-persistent-data, dm-bio-prison, libcrc32c, crc32c): the whole
# tree is ~90 MB, these are ~11 MB. modprobe reads the indexes of the full tree.
MODULE_DIRS = ("kernel/drivers/md", "kernel/drivers/block", "kernel/lib", "kernel/crypto",
               "kernel/arch/x86/crypto")
PY_PACKAGES = ("pydantic", "pydantic_core", "typing_extensions.py", "annotated_types",
               "typing_inspection")
SUMMARY_MARK = "KILN-DMTHIN-SUMMARY "
# The project code the in-guest programs import: the helper, and the pool's client side
# with the process runner its sudo client starts sudo through (``sh`` is imported only by
# ``proc.run``, which the guest never calls).
GUEST_CODE = ("helper", "builder/__init__.py", "builder/helperclient.py", "builder/proc.py",
              "builder/pool")


def base_layout() -> Path:
    """The cached Debian minbase + dm tools layout (tag ``dmthin``), built on first use."""
    # debootstrap leaves static nodes in /dev; an empty /dev makes kiln's guest init
    # mount devtmpfs, which is where the loop and device-mapper nodes appear.
    return debootstrap_layout("dmthin", TAG, "debootstrap --variant=minbase bookworm + dm tools",
                              include=PACKAGES, empty_dev=True)


def kernel_version() -> str:
    """The release of the kernel ``kiln run`` boots by default (its modules go in)."""
    from builder.doctor import find_kernel
    from runner.kernel import kernel_version as version_of

    found = find_kernel()
    if found is None:
        raise FileNotFoundError("no Debian cloud kernel in /boot")
    version = version_of(found[0])
    if version is None or not (Path("/lib/modules") / version).is_dir():
        raise FileNotFoundError(f"no /lib/modules for {found[0]}")
    return version


def stage_test_layer(staged: Path, version: str) -> None:
    """The test layer's tree: modules, helper, pydantic, the in-guest program."""
    src_mods = Path("/lib/modules") / version
    # usr/lib: bookworm is merged-/usr, and a "lib" directory entry in a layer would
    # replace the /lib -> usr/lib symlink (and with it the dynamic loader's path).
    dst_mods = staged / "usr" / "lib" / "modules" / version
    dst_mods.mkdir(parents=True)
    for f in src_mods.glob("modules.*"):
        shutil.copy2(f, dst_mods / f.name)
    for sub in MODULE_DIRS:
        if (src_mods / sub).is_dir():
            shutil.copytree(src_mods / sub, dst_mods / sub)
    guest = staged / GUEST_DIR
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for part in GUEST_CODE:
        if (PROJECT / part).is_dir():
            shutil.copytree(PROJECT / part, guest / part, ignore=ignore)
        else:
            (guest / part).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT / part, guest / part)
    site = Path(next(p for p in sys.path if p.endswith("site-packages")
                     and (Path(p) / "pydantic").is_dir()))
    for name in PY_PACKAGES:
        if (site / name).is_dir():
            shutil.copytree(site / name, guest / "site-packages" / name, ignore=ignore)
        elif (site / name).is_file():
            shutil.copy2(site / name, guest / "site-packages" / name)
    for program in sorted(GUEST_DIR_SRC.glob("*.py")):
        shutil.copy2(program, guest / program.name)
    precompile(staged, guest)


def precompile(staged: Path, tree: Path) -> None:
    """Byte-compile ``tree`` for the guest's python3 (3.11, like the venv), unchecked-hash:
    the layer's mtimes are normalised, so timestamp pycs would be stale, and an
    unprivileged guest process could not write its own (the helper-path scenario runs
    kiln-helper ~15 times; each import of pydantic is seconds under TCG)."""
    import compileall
    import py_compile

    ok = compileall.compile_dir(
        tree, quiet=1, ddir=f"/{tree.relative_to(staged)}",
        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    if not ok:
        raise RuntimeError(f"byte-compiling {tree} failed")


def guest_layout(workdir: Path) -> tuple[Path, str]:
    """An OCI layout in ``workdir`` (tag ``dmthin``): the cached base plus the test layer.

    The base's blobs are hard-linked (content-addressed, never rewritten); index.json is
    copied since umoci rewrites it."""
    base = base_layout()
    layout = workdir / "layout"
    (layout / "blobs" / "sha256").mkdir(parents=True)
    for name in ("index.json", "oci-layout"):
        shutil.copy2(base / name, layout / name)
    for blob in (base / "blobs" / "sha256").iterdir():
        try:
            os.link(blob, layout / "blobs" / "sha256" / blob.name)
        except OSError:  # another filesystem
            shutil.copy2(blob, layout / "blobs" / "sha256" / blob.name)
    staged = workdir / "staged"
    stage_test_layer(staged, kernel_version())
    tar = workdir / "test-layer.tar"
    write_layer_tar(staged, tar)
    add_layer(f"{layout}:{TAG}", tar, "kiln dm-thin guest tests")
    tar.unlink()
    shutil.rmtree(staged)
    return layout, TAG


def parse_summary(stdout: str) -> dict[str, Any]:
    """The in-guest program's summary (the last marked line of its stdout)."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith(SUMMARY_MARK)]
    if not lines:
        raise ValueError("no summary line in the guest's output")
    doc = json.loads(lines[-1][len(SUMMARY_MARK):])
    assert isinstance(doc, dict)
    return doc
