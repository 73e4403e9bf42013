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
