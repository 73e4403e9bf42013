"""The small commands' contracts: version, doctor, recipe schema, gc --keep/--dry-run."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from builder.localregistry import LocalRegistry
from tests.support.cli import kiln
from tests.support.images import push_busybox


def test_version_lists_kiln_and_tools(tmp_path: Path) -> None:
    info = json.loads(kiln(tmp_path, "version", "--json").stdout)
    assert info["kiln"] == "0.1.0"
    assert info["mke2fs"].startswith("1.47.")
    assert info["skopeo"].startswith("1.")
    assert info["umoci"].startswith("0.4")


def test_doctor_reports_each_probe_with_hints(registry: LocalRegistry, tmp_path: Path) -> None:
    res = kiln(tmp_path, "doctor", "--json", "--registry", registry.address)
    checks = {c["name"]: c for c in json.loads(res.stdout)}
    assert all(c["ok"] for c in checks.values() if c["required"])
    for c in checks.values():
        assert c["ok"] or c["hint"], c
    assert any("registry" in name and c["ok"] for name, c in checks.items())
    # The KVM here cannot run a guest: the probe must say so, with a hint.
    kvm = [c for name, c in checks.items() if "kvm" in name.lower()]
    assert kvm
    assert kvm[0]["ok"] is False
    assert kvm[0]["hint"]


def test_recipe_schema_is_json_schema(tmp_path: Path) -> None:
    schema = json.loads(kiln(tmp_path, "recipe", "schema").stdout)
    assert "source" in schema["properties"]
    assert schema["required"] == ["source"]
    assert schema.get("additionalProperties") is False


@pytest.mark.slow
def test_gc_keep_and_dry_run(registry: LocalRegistry, tmp_path: Path) -> None:
    ref = push_busybox(registry.address, "gc/busybox", "1")
    vid = json.loads(kiln(tmp_path, "build", ref, "--tls-verify=false", "--json").stdout)["id"]
    # Recently used: --keep 14d keeps it and every blob it needs.
    kept = json.loads(kiln(tmp_path, "gc", "--json").stdout)
    assert kept["removed_volumes"] == []
    assert kept["removed_blobs"] == []
    # Pretend it was last used three weeks ago.
    old = time.time() - 21 * 86400
    os.utime(tmp_path / "used" / vid[7:], (old, old))
    dry = json.loads(kiln(tmp_path, "gc", "--dry-run", "--json").stdout)
    assert dry["dry_run"] is True
    assert dry["removed_volumes"] == [vid]
    assert len(json.loads(kiln(tmp_path, "volume", "ls", "--json").stdout)) == 1
    done = json.loads(kiln(tmp_path, "gc", "--keep", "30d", "--json").stdout)
    assert done["removed_volumes"] == []
    done = json.loads(kiln(tmp_path, "gc", "--keep", "14d", "--json").stdout)
    assert done["removed_volumes"] == [vid]
    assert done["freed_bytes"] > 0
    assert json.loads(kiln(tmp_path, "volume", "ls", "--json").stdout) == []
    assert os.listdir(tmp_path / "blobs" / "sha256") == []


def test_gc_bad_keep_is_a_usage_error(tmp_path: Path) -> None:
    res = kiln(tmp_path, "gc", "--keep", "fortnight", check=False)
    assert res.returncode == 1
    assert res.stderr.splitlines()[0] == "error: invalid --keep 'fortnight'"


@pytest.mark.parametrize("ref", ["docker://", "oci:", "UPPER/Case:tag", "a b"])
def test_malformed_references_fail_in_one_line(tmp_path: Path, ref: str) -> None:
    res = kiln(tmp_path, "build", ref, check=False)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert lines[0].startswith("error: ")
    assert len(lines) == 2


REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_package_builds_without_license_deprecation_banners(tmp_path: Path) -> None:
    """pyproject.toml's license is an SPDX expression (PEP 639): the build that
    scripts/install-deps.sh runs (pip, build isolation) prints no `project.license`
    deprecation banner, and the metadata carries License-Expression."""
    import shutil
    import subprocess
    import sys
    import zipfile

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for pkg in ("builder", "runner", "helper"):
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps",
                          "--disable-pip-version-check", "-w", str(tmp_path / "whl"),
                          str(src)], capture_output=True, text=True, timeout=600,
                         check=False)
    if res.returncode != 0 and "No matching distribution" in res.stdout + res.stderr:
        pytest.skip("pip cannot fetch setuptools>=77 here")
    assert res.returncode == 0, res.stderr
    assert "project.license" not in res.stdout + res.stderr
    (wheel,) = (tmp_path / "whl").iterdir()
    with zipfile.ZipFile(wheel) as z:
        meta = z.read("kiln_vm-0.1.0.dist-info/METADATA").decode()
    assert "License-Expression: Apache-2.0" in meta.splitlines()


def test_install_deps_says_what_the_long_apt_step_does() -> None:
    """The exact lines scripts/install-deps.sh prints before its quiet apt-get step."""
    import subprocess

    script = (REPO / "scripts" / "install-deps.sh").read_text()
    block = script.split("if ! have_all; then\n", 1)[1].split("  apt-get update", 1)[0]
    pkgs = script.split("PKGS=(\n", 1)[1].split(")", 1)[0].split()
    res = subprocess.run(["bash", "-c", "log() { printf '==> %s\\n' \"$*\" >&2; }\n"
                          f"PKGS=({' '.join(pkgs)})\n{block}"],
                         capture_output=True, text=True, check=True)
    assert res.stderr == (
        "==> installing Debian packages with apt-get (a minute or two; quiet until it is "
        "done):\n"
        "==>   QEMU, a cloud kernel, skopeo, umoci, a registry, filesystem and device-mapper "
        "tools,\n"
        "==>   busybox-static, python3, gcc (the guest agent), e2fsprogs and QEMU from\n"
        f"==>   bookworm-backports: {' '.join(pkgs)}\n")
