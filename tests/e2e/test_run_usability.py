"""Issue 12's run-stage usability items, through the real command: a volume-id-shaped
SOURCE never becomes a registry pull, tables a user copies ids from never cut them (at 80
columns), `kiln ps`'s REASON of a running VM stays short, `kiln logs` starts with no
alarming PCI line, and the refusal exit codes the docs state."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder.root import Root
from builder.source import RegistryOptions
from runner.cli.run import table_reason
from tests.support.cli import kiln, wait_for
from tests.support.images import busybox_layout

COLS80 = {"COLUMNS": "80"}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """(root with a copy pool, the busybox volume's full id)."""
    from builder.pipeline import build
    from builder.pool import init_pool

    root = tmp_path_factory.mktemp("usab") / "root"
    init_pool(Root(root).ensure().path, backend="copy")
    vol = build(Root(root), f"oci:{busybox_layout()}:1", RegistryOptions()).volume
    yield root, vol.id
    kiln(root, "rm", "--force", "uvm", check=False)


# -- item 6: an id-shaped SOURCE names a volume, never an image ----------------------------

@pytest.mark.parametrize("source", ["deadbeef", "DEADBEEF", "sha256:deadbeef", "beef"])
def test_run_unknown_volume_id_says_so_and_pulls_nothing(world: tuple[Path, str],
                                                         source: str) -> None:
    root, _ = world
    res = kiln(root, "run", "--rm", source, "--", "true", check=False)
    assert res.returncode == 125
    name = source.lower()
    pull = "" if name.startswith("sha256:") else \
        f"; an image named {name} is pulled as docker://{name}"
    assert res.stderr == (f"error: no volume matches '{source}'\n"
                          f"hint: list volumes with `kiln volume ls`{pull}\n")


def test_run_ambiguous_prefix_lists_the_matches(world: tuple[Path, str],
                                                tmp_path: Path) -> None:
    root, vid = world
    other = root / "volumes" / (vid[7:15] + "0" * 56)
    shutil.copytree(root / "volumes" / vid[7:], other)  # a second volume with the prefix
    try:
        res = kiln(root, "run", "--rm", vid[7:15], "--", "true", check=False)
    finally:
        shutil.rmtree(other)
    assert res.returncode == 125
    cands = sorted([vid[:19], "sha256:" + other.name[:12]])
    assert res.stderr.splitlines()[0] == \
        f"error: volume id '{vid[7:15]}' is ambiguous: {', '.join(cands)}"


@pytest.mark.parametrize("args", [("snapshot", "create", "deadbeef"),
                                  ("push", "deadbeef", "127.0.0.1:9/x:1"),
                                  ("volume", "export", "deadbeef", "out.raw")])
def test_other_volume_commands_refuse_an_unknown_id(world: tuple[Path, str],
                                                    args: tuple[str, ...]) -> None:
    root, _ = world
    res = kiln(root, *args, check=False)
    assert (res.returncode, res.stderr.splitlines()[0]) == \
        (1, "error: no volume matches 'deadbeef'")


def test_run_refusals_exit_125_and_click_errors_2(world: tuple[Path, str]) -> None:
    """What docs/usage.md and docs/run.md say: `kiln run`'s own refusals exit 125."""
    root, vid = world
    bad = kiln(root, "run", "--memory", "lots", vid[7:19], "--", "true", check=False)
    assert bad.returncode == 125, bad.stderr
    assert kiln(root, "run", "--cpus", "0", vid[7:19], check=False).returncode == 2
    assert kiln(root, "volume", "inspect", "deadbeef", check=False).returncode == 1


# -- item 9: ids whole in every table, at 80 columns ----------------------------------------

def _cells(out: str) -> set[str]:
    return {c.strip() for line in out.splitlines() for c in re.split(r"[│┃]", line)}


def test_snapshot_and_volume_tables_keep_ids_whole_at_80_columns(
        world: tuple[Path, str]) -> None:
    root, vid = world
    snap = json.loads(kiln(root, "snapshot", "create", vid[7:19], "--json").stdout)["id"]
    try:
        out = kiln(root, "snapshot", "ls", env=COLS80).stdout
        assert "…" not in out
        assert max(len(line) for line in out.splitlines()) <= 80
        ids = [s["id"] for s in json.loads(kiln(root, "snapshot", "ls", "--json").stdout)]
        assert snap in ids
        assert set(ids) <= _cells(out), out
        # what the table shows is what `snapshot rm` takes
        assert kiln(root, "snapshot", "rm", snap).stdout == f"{snap}\n"
    finally:
        kiln(root, "snapshot", "rm", snap, check=False)
    vols = kiln(root, "volume", "ls", env=COLS80).stdout
    assert "…" not in vols
    assert vid[7:19] in _cells(vols)


def test_table_wider_than_the_terminal_rather_than_cut(world: tuple[Path, str]) -> None:
    root, vid = world
    snap = json.loads(kiln(root, "snapshot", "create", vid[7:19], "--json").stdout)["id"]
    try:
        out = kiln(root, "snapshot", "ls", env={"COLUMNS": "30"}).stdout
    finally:
        kiln(root, "snapshot", "rm", snap)
    assert "…" not in out
    assert {snap, vid[7:19]} <= _cells(out)


@pytest.mark.slow
def test_ps_of_a_running_vm_at_80_columns(world: tuple[Path, str]) -> None:
    """ids whole; the running VM's REASON (why this VMM) short, not 16 wrapped lines."""
    root, vid = world
    vm_id = kiln(root, "run", "--detach", "--name", "uvm", vid[7:19], "--",
                 "sleep", "60").stdout.strip()
    try:
        row = wait_for("the VM running", lambda: next(
            (r for r in json.loads(kiln(root, "ps", "--json").stdout)
             if r["id"] == vm_id and r["state"] == "running"), None))
        out = kiln(root, "ps", env=COLS80).stdout
        assert "…" not in out
        assert {vm_id, "uvm", vid[7:19]} <= _cells(out), out
        lines = [ln for ln in out.splitlines() if ln.startswith("│")]
        assert len(lines) <= 3, out  # the VM's row, its REASON wrapped at most twice
        assert table_reason(row["reason"]) in " ".join(
            c.strip() for ln in lines for c in [ln.split("│")[-2]])
        # the console's first line is no alarming "PCI: Fatal: …" (microvm has no PCI)
        console = Path(root / "vms" / vm_id / "console.log")
        wait_for("the guest's init", lambda: "kiln-init" in console.read_text())
        logs = kiln(root, "logs", "uvm").stdout
        assert "PCI: Fatal" not in logs
        assert logs.splitlines()[0].startswith("kiln-init:"), logs
    finally:
        kiln(root, "rm", "--force", "uvm", check=False)


def test_table_reason_is_the_sentence_without_its_detail() -> None:
    assert table_reason("--vmm auto chose qemu: KVM cannot run a guest (guest code is "
                        "emulated, not run natively: a 1M-iteration loop took 0.59 s "
                        "(native: ~0.001 s))") == "KVM cannot run a guest"
    assert table_reason("--vmm qemu") == "--vmm qemu"
    assert table_reason("setup failed: no pool") == "setup failed: no pool"
    assert table_reason("") == ""


def test_doctor_kvm_row_says_what_happens_without_kvm() -> None:
    from builder import doctor, probes

    c = doctor.check_kvm(probes.Probe(False, "guest code is emulated, not run natively: a "
                                      "1M-iteration loop took 0.59 s (native: ~0.001 s); "
                                      "a guest kernel would not boot"))
    assert (c.ok, c.detail) == (False, "guest code is emulated, not run natively: a "
                                "1M-iteration loop took 0.59 s (native: ~0.001 s); QEMU "
                                "falls back to TCG emulation (VMs boot, slower); "
                                "Firecracker needs KVM")
    assert c.hint == doctor.KVM_HINT
    real = doctor.check_kvm(probes.kvm())
    assert "would not boot" not in real.detail
    assert os.path.exists("/dev/kvm") or not real.ok
