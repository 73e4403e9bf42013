"""Firecracker's API definition (tests/data) as data, and request bodies validated against it."""

from __future__ import annotations

import functools
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]

from builder.probes import Probe
from helper import cgroup as cg
from helper.cgroup import Limits
from helper.jail import jailer as jail
from helper.jail import snapfiles
from helper.jail import stage as jailstage
from helper.jail.jailer import JailConfig, JailSpec, Staged, StageItem
from helper.ops import jaildisk

# Firecracker's API definition trimmed to what kiln uses and brought back to 1.12.1, the release
# kiln runs (its header says what changed and how it was checked against the real binary).
SPEC = Path(__file__).resolve().parents[1] / "data" / "firecracker-api-1.12.1.yaml"
REPO = Path(__file__).resolve().parents[2]
# The pinned Firecracker and jailer (scripts/fetch-firecracker.sh: hashes checked).
BIN_DIR = Path("/opt/kiln-test/firecracker")


@functools.cache
def probe() -> Probe:
    """The ``firecracker`` marker's probe: root (the jailer needs it), the pinned binaries
    fetched (idempotent: a no-op once they are there) and answering ``--version``."""
    if os.geteuid() != 0:
        return Probe(False, "the jailer needs root")
    res = subprocess.run([str(REPO / "scripts/fetch-firecracker.sh"), str(BIN_DIR)],
                         capture_output=True, text=True, check=False, timeout=300)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        return Probe(False, f"fetch-firecracker.sh failed: {last}")
    ver = subprocess.run([str(BIN_DIR / "firecracker"), "--version"], capture_output=True,
                         text=True, check=False, timeout=30)
    if ver.returncode != 0 or not ver.stdout.startswith("Firecracker v"):
        return Probe(False, f"{BIN_DIR}/firecracker --version failed: {ver.stderr.strip()}")
    return Probe(True, ver.stdout.splitlines()[0])


def load_swagger() -> dict[str, Any]:
    """The swagger file as data (PyYAML, a test dependency)."""
    import yaml

    return dict(yaml.safe_load(SPEC.read_text()))


def validate(swagger: dict[str, Any], definition: str, body: Any) -> None:
    """Validate ``body`` against ``#/definitions/<definition>`` with $refs resolved."""
    schema = {"$ref": f"#/definitions/{definition}", "definitions": swagger["definitions"]}
    jsonschema.Draft4Validator(schema).validate(body)


@dataclass
class InProcessOps:
    """``runner.vmm.fcapi.PrivOps`` as the helper's jail functions called in-process (root,
    same validation as through the helper): the jail tests without sudo in between."""

    cfg: JailConfig
    caller_uid: int = field(default_factory=os.getuid)
    caller_gid: int = field(default_factory=os.getgid)

    def cgroup_create(self, vm_id: str, version: int, limits: Limits) -> None:
        cg.cgroup_create(self.cfg.cgroup, vm_id, version, limits)

    def cgroup_kill(self, vm_id: str, version: int) -> None:
        cg.cgroup_kill(self.cfg.cgroup, vm_id, version)

    def jail_stage(self, vm_id: str, uid: int, gid: int, items: Sequence[StageItem],
                   logs: Sequence[str]) -> Staged:
        return jailstage.jail_stage(self.cfg, vm_id, uid, gid, items, caller_uid=self.caller_uid,
                               logs=logs)

    def jail_launch(self, spec: JailSpec) -> int:
        return jail.jail_launch(self.cfg, spec)

    def jail_grant_api(self, vm_id: str) -> Path:
        return jail.jail_grant_api(self.cfg, vm_id, self.caller_uid, self.caller_gid)

    def jail_remove(self, vm_id: str) -> None:
        jail.jail_remove(self.cfg, vm_id)

    def jail_grant_vsock(self, vm_id: str) -> Path:
        return jail.grant_socket(self.cfg, vm_id, self.caller_uid, self.caller_gid,
                                 "/v.sock", "vsock.sock")

    def jail_import(self, vm_id: str, name: str, source: Path) -> None:
        # the VM's gid: the one its log file was staged for
        gid = os.stat(jail.chroot(self.cfg, vm_id) / "firecracker.log").st_gid
        fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        try:
            snapfiles.import_file(self.cfg, vm_id, name, gid, fd,
                                  snapfiles.check_source(fd, None))
        finally:
            os.close(fd)

    def jail_export(self, vm_id: str, name: str, dest: Path) -> int:
        uid = os.stat(jail.chroot(self.cfg, vm_id)).st_uid  # the jailer's chown: the VM's
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            snapfiles.check_dest(fd, os.getuid())
            return snapfiles.export_file(self.cfg, vm_id, name, uid, fd, None)
        finally:
            os.close(fd)

    def jail_export_disk(self, vm_id: str, dest: Path) -> int:
        uid = os.stat(jail.chroot(self.cfg, vm_id)).st_uid
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            snapfiles.check_dest(fd, os.getuid())
            return jaildisk.export_disk(self.cfg, vm_id, uid, fd, single_link=False, cap=None)
        finally:
            os.close(fd)


def helper_kernel(src: Path) -> Path:
    """The host's cloud kernel as an uncompressed vmlinux in ``src`` (a directory the
    helper's test config lists in ``sources``), world-readable; skips without one."""
    import glob

    import pytest

    from runner.kernel_elf import ensure_vmlinux

    bz = sorted(glob.glob("/boot/vmlinuz-*-cloud-amd64"))
    if not bz:
        pytest.skip("no /boot/vmlinuz-*-cloud-amd64")
    src.mkdir(mode=0o755, parents=True, exist_ok=True)
    vmlinux = ensure_vmlinux(Path(bz[-1]), src)
    vmlinux.chmod(0o644)
    return vmlinux


def helper_config(src: Path, parent: str) -> str:
    """The helper's test config with the fetched Firecracker and jailer, ``src`` as a kernel
    source and ``parent`` as the jails' cgroup parent."""
    from tests.support.sudo import GOOD_CONFIG

    return GOOD_CONFIG + f"""sources = ["{src}"]
cgroup_parent = "{parent}"

[tools]
firecracker = "{BIN_DIR}/firecracker"
jailer = "{BIN_DIR}/jailer"
"""
