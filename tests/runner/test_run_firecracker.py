"""`kiln run --vmm firecracker|auto`: the decision cores (choice, cgroups, console split,
reaper plan with jails, the record) and the real thing — the v1.12.1 jailer and firecracker
(scripts/fetch-firecracker.sh) driven through the `kiln` command, checked from outside:
exit codes, `kiln ps`, the API's own GET /vm/config, /proc, the cgroup trees, the jail base.

A guest cannot run on these machines (paravirtual KVM: the vCPU spins), so the real runs
end by --timeout, `kiln stop` or a SIGKILL; boot-to-marker runs only where a KVM probe
passes.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from builder.root import Root
from helper import cgroup as cg
from helper.base.errors import KilnError, NotFound
from runner import guest_init
from runner.vm import cgroup as vmcgroup
from runner.vm import reaper, state
from runner.vmm import choice as vmmchoice
from runner.vmm import fcapi as fc
from runner.vmm import fcconsole
from runner.vmm import firecracker as fcdriver
from tests.support.firecracker import BIN_DIR
from tests.support.run import KILN
from tests.support.timing import limit

REPO = Path(__file__).resolve().parents[2]
TEST_CONFIG = Path("/etc/kiln/test-config.toml")

# -- the choice ------------------------------------------------------------------------------

problems = st.one_of(st.none(), st.text(min_size=1, max_size=20))


@given(problems, problems)
def test_auto_takes_firecracker_only_when_configured_and_kvm_runs(fc_problem: str | None,
                                                                  kvm: str | None) -> None:
    vmm, why = vmmchoice.choose("auto", fc_problem, kvm)
    assert (vmm == "firecracker") == (fc_problem is None and kvm is None)
    assert why.startswith(f"--vmm auto chose {vmm}")
    if vmm == "qemu":
        assert (kvm or fc_problem or "") in why  # the reason names the cause: KVM first
    assert vmmchoice.choose("qemu", fc_problem, kvm) == ("qemu", "--vmm qemu")


def test_explicit_firecracker() -> None:
    assert vmmchoice.choose("firecracker", None, None) == ("firecracker", "--vmm firecracker")
    assert vmmchoice.choose("firecracker", None, "no /dev/kvm") == (
        "firecracker", "--vmm firecracker (KVM cannot run a guest: no /dev/kvm)")
    with pytest.raises(NotFound) as e:
        vmmchoice.choose("firecracker", "firecracker not found at /x/firecracker", None)
    assert e.value.message == ("firecracker is not configured: firecracker not found at "
                               "/x/firecracker")
    assert e.value.hint == ("set [tools] firecracker and jailer in /etc/kiln/config.toml, "
                            "or use --vmm qemu")
    with pytest.raises(KilnError) as e2:
        vmmchoice.choose("xen", None, None)
    assert e2.value.message == "unknown --vmm 'xen'"


_PICK = """
import json, sys
from pathlib import Path
from builder.root import Root
from runner.vmm import choice as vmmchoice
vmm, why, cfg = vmmchoice.pick(Root(Path(sys.argv[1])), sys.argv[2])
print(json.dumps([vmm, why, cfg is not None, "pydantic" in sys.modules,
                  "runner.vmm.firecracker" in sys.modules]))
"""


@pytest.mark.parametrize("ok", [False, True])
def test_pick_asks_kvm_first_and_loads_no_config_without_it(tmp_path: Path, ok: bool) -> None:
    """The KVM verdict (cached per boot under ROOT/kernels) decides ``auto`` before the
    trusted config is read: a QEMU host never pays for pydantic or the Firecracker driver."""
    if TEST_CONFIG.exists() or Path("/etc/kiln/config.toml").exists():
        pytest.skip("a trusted config is installed; this test needs the built-in defaults")
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    kernels = tmp_path / "kernels"
    kernels.mkdir()
    (kernels / f"kvm-{boot_id}.json").write_text(json.dumps({"ok": ok, "reason": "spins"}))
    res = subprocess.run([sys.executable, "-c", _PICK, str(tmp_path), "auto"],
                         capture_output=True, text=True, check=True)
    vmm, why, has_cfg, pydantic, driver = json.loads(res.stdout)
    assert (vmm, has_cfg, driver) == ("qemu", False, False)
    if ok:  # KVM runs a guest, so the config was consulted: firecracker is not set up here
        assert why.startswith("--vmm auto chose qemu: firecracker is not configured (")
    else:
        assert why == "--vmm auto chose qemu: KVM cannot run a guest (spins)"
        assert not pydantic


# -- cgroups ----------------------------------------------------------------------------------

V1 = {c: Path(f"/sys/fs/cgroup/{c}") for c in ("cpu", "memory", "pids", "freezer")}


def test_cgroup_choice() -> None:
    limits = cg.Limits(cpus=2.5, memory_bytes=(256 << 20) + vmcgroup.FC_MEMORY_OVERHEAD,
                       pids=vmcgroup.FC_PIDS)
    v2 = cg.Layout(Path("/sys/fs/cgroup"))
    assert vmcgroup.firecracker_choice(v2, {"cpu", "memory", "pids", "io"}, 2, 256 << 20) == \
        (2, limits)
    hybrid = cg.Layout(Path("/sys/fs/cgroup/unified"), V1)  # these machines
    assert vmcgroup.firecracker_choice(hybrid, {"hugetlb"}, 2, 256 << 20) == (1, limits)
    bare = cg.Layout(Path("/sys/fs/cgroup/unified"), {"cpu": V1["cpu"]})
    assert vmcgroup.firecracker_choice(bare, set(), 1, 1 << 30) == (2, cg.Limits())
    with pytest.raises(KilnError) as e:
        vmcgroup.firecracker_choice(cg.Layout(None), set(), 1, 1 << 30)
    assert e.value.message == "no usable cgroup hierarchy for a Firecracker VM"


# -- the console ------------------------------------------------------------------------------

CONSOLE = (b"2026-11-23T13:15:23 [abc:main] Running Firecracker v1.12.1\n"
           b"[    0.512] random: crng init done\r\n"
           b"kiln-init: starting /bin/echo\r\n"
           b"hi\r\n"
           b"two words\r\n"
           b"kiln-init: workload exited 7\r\n"
           b"[    0.900] reboot: Power down\r\n")


@given(st.lists(st.integers(0, len(CONSOLE)), max_size=8))
def test_console_split_any_chunking(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(CONSOLE)]
    sp = fcconsole.ConsoleSplit()
    con, out, err = b"", b"", b""
    for a, b in itertools.pairwise(bounds):
        c, o, e = sp.feed(CONSOLE[a:b])
        con, out, err = con + c, out + o, err + e
    c, o, e = sp.feed(b"", final=True)
    assert (out + o, err + e) == (b"hi\ntwo words\n", b"")
    assert con + c == (b"2026-11-23T13:15:23 [abc:main] Running Firecracker v1.12.1\n"
                       b"[    0.512] random: crng init done\n"
                       b"kiln-init: starting /bin/echo\n"
                       b"kiln-init: workload exited 7\n"
                       b"[    0.900] reboot: Power down\n")
    assert sp.exit_code == 7
    assert sp.seen[-1] == "[    0.900] reboot: Power down"


def test_console_init_failures_and_partial_lines() -> None:
    sp = fcconsole.ConsoleSplit()
    assert sp.feed(b"kiln: nope: executable file not found in $PATH\r\n") == \
        (b"", b"", b"kiln: nope: executable file not found in $PATH\n")
    assert sp.exit_code == 127
    sp = fcconsole.ConsoleSplit()
    sp.feed(b"kiln: unable to find user bob: no matching entries in passwd file\n")
    assert sp.exit_code == 126
    sp = fcconsole.ConsoleSplit()
    assert sp.feed(b"kiln-init: starting /bin/sh\nno newline") == \
        (b"kiln-init: starting /bin/sh\n", b"", b"")
    assert sp.feed(b"", final=True) == (b"", b"no newline\n", b"")
    assert sp.exit_code is None


def test_console_exit_reports_of_kiln_init() -> None:
    """Without a status port kiln-init's finish says "kiln-init: exit N" on the console:
    after the workload (agreeing with its marker), after its own failures (125 for
    settings it cannot read, which no failure message gives), and after a stop request."""
    sp = fcconsole.ConsoleSplit()
    line = b"kiln-init: no settings from the host (see the workload's stderr)"
    assert sp.feed(line + b"\r\nkiln-init: exit 125\r\n") == \
        (line + b"\nkiln-init: exit 125\n", b"", b"")
    assert sp.exit_code == 125
    sp = fcconsole.ConsoleSplit()
    sp.feed(b"kiln: nope: executable file not found in $PATH\r\nkiln-init: exit 127\r\n")
    assert sp.exit_code == 127
    sp = fcconsole.ConsoleSplit()
    con, out, err = sp.feed(b"kiln-init: starting /bin/sh\r\nup\r\n"
                            b"kiln-init: stop requested (ctrl-alt-del)\r\nbye\r\n"
                            b"kiln-init: workload exited 3\r\nkiln-init: exit 3\r\n")
    assert (out, err, sp.exit_code) == (b"up\nbye\n", b"", 3)
    assert b"kiln-init: stop requested (ctrl-alt-del)\n" in con


def test_vmm_exit_code() -> None:
    assert fcconsole.vmm_exit_code("x\n[anonymous-instance:main] Firecracker exiting "
                                   "successfully. exit_code=0\n") == 0
    assert fcconsole.vmm_exit_code("nothing") is None


# -- the reaper and the record ---------------------------------------------------------------

def test_vmm_of() -> None:
    """The host name (root key + VM id) of a kiln VMM of any root; the plan keeps its own."""
    host = b"rootaaaaabcdefghijkl"
    assert reaper.vmm_of([b"/firecracker", b"--id", host, b"--api-sock",
                          b"/run/api.sock", b""]) == host.decode()
    assert reaper.vmm_of([b"qemu-system-x86_64", b"-name",
                          b"kiln-" + host + b",process=kiln-" + host]) == host.decode()
    assert reaper.vmm_of([b"qemu-system-x86_64", b"-name",
                          b"kiln-abcdefghijkl,process=kiln-abcdefghijkl"]) == "abcdefghijkl"
    assert reaper.vmm_of([b"qemu-system-x86_64", b"-name", b"kiln-" + b"a" * 33 + b","]) is None
    assert reaper.vmm_of([b"qemu-system-x86_64", b"-name", b"other-" + host + b","]) is None
    assert reaper.vmm_of([b"/firecracker", b"--id", b"notkiln-vm"]) is None
    assert reaper.vmm_of([b"/usr/bin/sleep", b"--id", b"abcdefghijkl"]) is None
    assert reaper.vmm_of([b""]) is None


ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz234567", min_size=12, max_size=12)


@given(st.lists(st.builds(reaper.VMView, vm_id=ids, state=st.sampled_from(state.STATES),
                          auto_remove=st.booleans(), owner_alive=st.booleans()),
                max_size=4, unique_by=lambda v: v.vm_id),
       st.lists(ids, max_size=4, unique=True), st.data())
def test_jails_reaped_like_every_resource(vms: list[reaper.VMView], extra: list[str],
                                          data: st.DataObject) -> None:
    key = "rootaaaa"
    jails = {key + i: f"/j/firecracker/{key}{i}" for i in [*(v.vm_id for v in vms), *extra]}
    cgroups: dict[str, tuple[str, ...]] = {n: (f"/c/pids/kiln/{n}",) for n in jails}
    cands = [("jail", p) for p in jails.values()] + [("cgroup", c[0]) for c in cgroups.values()]
    seen = frozenset(data.draw(st.lists(st.sampled_from(cands), max_size=8))) if cands \
        else frozenset()
    obs = reaper.Observed(vms=tuple(vms), root_key=key, cgroups=cgroups, jails=jails,
                          seen_before=seen)
    acts = reaper.plan(obs).actions
    known = {v.vm_id: v for v in vms}
    for vm_id, path in ((n[len(key):], p) for n, p in jails.items()):
        mine = [a for a in acts if a.vm_id == vm_id]
        v = known.get(vm_id)
        if v is not None and v.owner_alive:
            assert mine == []  # a VM being born (or finishing) is never touched
        elif v is not None:
            assert reaper.Action("rmjail", path, vm_id) in mine
        else:
            assert (reaper.Action("rmjail", path, vm_id, "orphan") in mine) == \
                (("jail", path) in seen)
        kinds = [a.kind for a in mine]
        if "rmjail" in kinds and "rmcgroup" in kinds:
            assert kinds.index("rmcgroup") < kinds.index("rmjail")  # no live VMM inside


def test_record_takes_the_jails_uid_range_and_resources(tmp_path: Path) -> None:
    st_ = state.State(tmp_path)
    doc = {"jail": "/j/firecracker/aaaaaaaaaaaa", "cgroup_version": 1, "step": "recorded"}
    rec = st_.create(vm_id="aaaaaaaaaaaa", name=None, vmm="firecracker", volume="sha256:0",
                     snapshot="vmaaaaaaaaaaaa", vm_dir=tmp_path / "vms" / "a", cgroups=[],
                     want_uid=True, auto_remove=False, spec={"vmm_reason": "why"},
                     uid_range=(900_000, 2), fc=doc)
    # the scan starts at a random offset (callers sharing a range rarely collide): either
    # uid of the range, then the other one, then none
    assert (rec.uid in (900_000, 900_001), rec.fc_doc, rec.summary()["vmm_reason"]) == \
        (True, doc, "why")
    second = st_.create(vm_id="bbbbbbbbbbbb", name=None, vmm="firecracker", volume="sha256:0",
               snapshot="vmbbbbbbbbbbbb", vm_dir=tmp_path / "vms" / "b", cgroups=[],
               want_uid=True, auto_remove=False, spec={}, uid_range=(900_000, 2))
    assert {rec.uid, second.uid} == {900_000, 900_001}
    with pytest.raises(KilnError) as e:
        st_.create(vm_id="cccccccccccc", name=None, vmm="firecracker", volume="sha256:0",
                   snapshot="vmcccccccccccc", vm_dir=tmp_path / "vms" / "c", cgroups=[],
                   want_uid=True, auto_remove=False, spec={}, uid_range=(900_000, 2))
    assert e.value.message == "no free VM uid"


def test_old_database_gains_the_fc_column(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "vms.db")
    schema = state._SCHEMA.replace("    fc TEXT NOT NULL DEFAULT '{}',\n", "")
    db.executescript(schema)
    db.execute("INSERT INTO vms (id, state, vmm, volume, snapshot, dir, created) "
               "VALUES ('aaaaaaaaaaaa', 'exited', 'qemu', 'v', 's', 'd', 0)")
    db.commit()
    db.close()
    rec = state.State(tmp_path).get("aaaaaaaaaaaa")
    assert rec is not None
    assert (rec.fc, rec.fc_doc) == ("{}", {})


# -- the real binaries -----------------------------------------------------------------------

def kiln(root: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KILN, "--root", str(root), *args], capture_output=True,
                          text=True, check=False, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def world() -> Iterator[dict[str, Any]]:
    """A kiln root with a copy pool and the busybox volume, the jail base beside it (same
    filesystem: staging hard-links), and a trusted test config naming the binaries."""
    from builder.pipeline import build
    from builder.pool import init_pool
    from builder.source import RegistryOptions
    from tests.support.images import busybox_layout

    base = Path(f"/tmp/kiln-fcrun-{secrets.token_hex(4)}")
    base.mkdir(mode=0o755)
    (base / "jails").mkdir()
    root = base / "root"
    init_pool(Root(root).ensure().path, backend="copy")
    volume = build(Root(root), f"oci:{busybox_layout()}:1", RegistryOptions()).volume
    parent = f"kilnfcrun{secrets.token_hex(3)}"
    saved = TEST_CONFIG.read_bytes() if TEST_CONFIG.exists() else None
    TEST_CONFIG.parent.mkdir(mode=0o755, exist_ok=True)
    TEST_CONFIG.write_text(f"""[tools]
firecracker = "{BIN_DIR}/firecracker"
jailer = "{BIN_DIR}/jailer"

[jails]
chroot_base = "{base}/jails"
cgroup_parent = "{parent}"
""")
    TEST_CONFIG.chmod(0o644)
    try:
        yield {"root": root, "volume": volume.id[7:19], "jails": base / "jails/firecracker",
               "parent": parent}
    finally:
        for rec in state.State(root).all():
            kiln(root, "rm", "--force", rec.id)
        if saved is None:
            TEST_CONFIG.unlink(missing_ok=True)
        else:
            TEST_CONFIG.write_bytes(saved)
        lay = cg.layout(cg.CgroupConfig())
        for h in [lay.v2, *lay.v1.values()]:
            if h is not None and (h / parent).is_dir():
                for d in (h / parent).iterdir():
                    if d.is_dir():
                        cg.cgroup_kill(cg.CgroupConfig(parent=parent), d.name,
                                       2 if h == lay.v2 else 1)
                with contextlib.suppress(OSError):
                    os.rmdir(h / parent)
        shutil.rmtree(base, ignore_errors=True)


def host(w: dict[str, Any], vm_id: str) -> str:
    """The VM's host name: its jail id and cgroup leaf."""
    return state.host_name(state.root_key(w["root"]), vm_id)


def leftovers(w: dict[str, Any], vm_id: str) -> list[str]:
    """Every host resource of the VM that still exists (process, cgroups, jail)."""
    name = host(w, vm_id)
    out = [f"process {p}" for i, p in reaper.scan_vmms().items() if i == name]
    lay = cg.layout(cg.CgroupConfig())
    for h in [lay.v2, *lay.v1.values()]:
        if h is not None and (h / w["parent"] / name).exists():
            out.append(f"cgroup {h / w['parent'] / name}")
    if (w["jails"] / name).exists():
        out.append(f"jail {w['jails'] / name}")
    return out


def ps_all(root: Path) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in json.loads(kiln(root, "ps", "--all", "--json").stdout)}


@pytest.mark.firecracker
@pytest.mark.root
@pytest.mark.slow
def test_timeout_exits_124_and_cleans_up(world: dict[str, Any]) -> None:
    root = world["root"]
    before = set(ps_all(root))
    t0 = time.monotonic()
    res = kiln(root, "run", "--vmm", "firecracker", "--timeout", "5", world["volume"], "--",
               "echo", "hi")
    took = time.monotonic() - t0
    assert res.returncode == 124, res.stderr
    assert res.stdout == ""  # the guest never got to run here
    assert took < limit(25)
    (vm_id,) = set(ps_all(root)) - before
    rec = ps_all(root)[vm_id]
    assert (rec["state"], rec["exit_code"], rec["reason"], rec["vmm"]) == \
        ("exited", None, "timed out (--timeout)", "firecracker")
    assert leftovers(world, vm_id) == []
    assert (root / "vms" / state.JAILS_MARK).is_file()  # the reaper looks for jails here
    vm_dir = root / "vms" / vm_id
    assert "Running Firecracker v1.12.1" in (vm_dir / "console.log").read_text()
    fclog = (vm_dir / "vmm.log").read_text()  # Firecracker's own log, kept from the jail
    assert "The API server received a Put request on \"/actions\"" in fclog
    snap = root / "pool" / "fs" / "snapshots" / f"{rec['snapshot']}.ext4"
    assert snap.stat().st_nlink == 1  # the jail's hard link went with the jail
    assert kiln(root, "rm", vm_id).returncode == 0
    assert not snap.exists()
    assert not vm_dir.exists()
    assert vm_id not in ps_all(root)


@pytest.mark.slow
@pytest.mark.firecracker
@pytest.mark.root
def test_detach_config_roundtrip_stop_rm(world: dict[str, Any]) -> None:
    root = world["root"]
    res = kiln(root, "run", "--vmm", "firecracker", "--detach", "--name", "fcbg", "--cpus",
               "2", "--memory", "256M", world["volume"], "--", "echo", "hi")
    assert res.returncode == 0, res.stderr
    vm_id = res.stdout.strip()
    assert re.fullmatch(r"[a-z2-7]{12}", vm_id)
    rows = json.loads(kiln(root, "ps", "--json").stdout)
    (row,) = [r for r in rows if r["id"] == vm_id]
    assert (row["state"], row["vmm"], row["name"]) == ("running", "firecracker", "fcbg")
    assert row["reason"].startswith("--vmm firecracker")
    rec = state.State(root).get(vm_id)
    assert rec is not None
    doc = rec.fc_doc
    assert doc["step"] == "start"
    assert doc["jail"] == str(world["jails"] / host(world, vm_id))
    assert doc["host"] == host(world, vm_id)
    assert all(Path(d).name == host(world, vm_id) for d in rec.cgroup_dirs)
    assert rec.cgroup_dirs  # named in the record before they existed
    assert all(Path(d).is_dir() for d in rec.cgroup_dirs)
    status = Path(f"/proc/{rec.pid}/status").read_text()
    assert f"Uid:\t{rec.uid}\t" in status
    assert rec.uid is not None
    assert 900_000 <= rec.uid < 900_000 + 65_536
    assert any(str(rec.pid) in (Path(d) / "cgroup.procs").read_text().split()
               for d in rec.cgroup_dirs)
    # What the driver sent is what Firecracker holds (GET /vm/config), field for field.
    client = fc.ApiClient(Path(doc["api_sock"]))
    assert client.get("/")["state"] == "Running"
    got = client.get("/vm/config")
    sent = fc.VmConfig(boot_args=f"{fcdriver.BOOT_ARGS} init=/.kiln/init "
                       f"{guest_init.SETTINGS_ARG}", vcpus=2,
                       mem_mib=256, drives=(fc.DriveSpec("rootfs", "/rootfs.ext4",
                                                         root=True),))
    assert fc.config_mismatches(fc.expected_vm_config(sent), got) == []
    assert got["boot-source"]["kernel_image_path"] == "/vmlinux"
    assert got["boot-source"]["initrd_path"] == "/initrd.img"
    t0 = time.monotonic()
    res = kiln(root, "stop", "--timeout", "1", "fcbg")
    assert (res.returncode, res.stdout) == (0, vm_id + "\n"), res.stderr
    assert time.monotonic() - t0 < limit(15)
    rec2 = ps_all(root)[vm_id]
    assert (rec2["state"], rec2["exit_code"], rec2["reason"]) == \
        ("exited", 137, "stopped (forced)")
    assert leftovers(world, vm_id) == []
    assert (root / "vms" / vm_id).is_dir()  # the VM's files and snapshot stay until rm
    snap = root / "pool" / "fs" / "snapshots" / f"vm{vm_id}.ext4"
    assert snap.exists()
    assert kiln(root, "rm", "fcbg").returncode == 0
    assert not snap.exists()
    assert not (root / "vms" / vm_id).exists()
    assert vm_id not in ps_all(root)


@pytest.mark.firecracker
@pytest.mark.root
def test_a_vm_uid_another_callers_jail_holds_is_retried(world: dict[str, Any],
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    """Another caller (a second kiln root) holds the range's first uid with a jail; this
    kiln's scan starts there (pinned): jail-stage refuses it, the launch is torn down,
    the record gets the next uid and the real jailer runs Firecracker as that one."""
    from builder.source import RegistryOptions
    from helper import config
    from helper.ops import registry as ops
    from runner.vm import lifecycle as vmcore
    from runner.vm.spec import RunOptions

    cfg = config.load()
    held = cfg.uid_first
    (tmp_path / "other").mkdir()
    other = ops.Ctx(cfg=cfg, area=tmp_path / "other", caller_uid=0, caller_gid=0,
                    trusted=True)

    def op(name: str, req: dict[str, Any]) -> None:
        ops.run_op(other, name, ops.parse(name, json.dumps(req)))

    op("jail-stage", {"vm": "otherjail", "uid": held, "gid": held, "items": []})
    monkeypatch.setattr(state.secrets, "randbelow", lambda n: 0)  # the scan starts at U
    ids: list[str] = []
    try:
        code = vmcore.run(Root(world["root"]), world["volume"],
                          RunOptions(vmm="firecracker", detach=True, command=("echo", "hi")),
                          RegistryOptions(), on_ready=ids.append)
        assert code == 0
        rec = state.State(world["root"]).get(ids[0])
        assert rec is not None
        assert (rec.state, rec.uid) == ("running", held + 1)
        status = Path(f"/proc/{rec.pid}/status").read_text()
        assert f"Uid:\t{held + 1}\t" in status  # Firecracker runs as the second uid
        assert (world["jails"] / "otherjail").is_dir()  # the other caller's jail is left
    finally:
        for vm_id in ids:
            kiln(world["root"], "rm", "--force", vm_id)
        op("jail-remove", {"vm": "otherjail"})
    assert leftovers(world, ids[0]) == []


@pytest.mark.slow
@pytest.mark.firecracker
@pytest.mark.root
def test_sigkill_of_the_owner_is_reconciled(world: dict[str, Any]) -> None:
    root = world["root"]
    res = kiln(root, "run", "--vmm", "firecracker", "--detach", world["volume"], "--",
               "sleep", "100")
    assert res.returncode == 0, res.stderr
    vm_id = res.stdout.strip()
    rec = state.State(root).get(vm_id)
    assert rec is not None
    assert rec.owner_pid is not None
    assert leftovers(world, vm_id)  # running: process, cgroups, jail
    os.kill(rec.owner_pid, signal.SIGKILL)
    deadline = time.monotonic() + limit(5)
    while state.alive(rec.owner_pid, rec.owner_start) and time.monotonic() < deadline:
        time.sleep(0.05)
    after = ps_all(root)[vm_id]  # the reaper runs on every kiln start
    assert (after["state"], after["reason"]) == ("failed", "kiln run (the VM's owner) died")
    assert leftovers(world, vm_id) == []
    assert kiln(root, "rm", vm_id).returncode == 0
    assert not (root / "vms" / vm_id).exists()


@pytest.mark.firecracker
@pytest.mark.root
@pytest.mark.slow
def test_auto_says_why_it_chose(world: dict[str, Any]) -> None:
    from builder import probes

    root = world["root"]
    res = kiln(root, "run", "--detach", world["volume"], "--", "sleep", "100")
    assert res.returncode == 0, res.stderr
    vm_id = res.stdout.strip()
    try:
        row = ps_all(root)[vm_id]
        if probes.kvm().ok:
            assert (row["vmm"], row["vmm_reason"]) == (
                "firecracker", "--vmm auto chose firecracker: configured, and KVM runs a "
                "guest")
        else:
            assert row["vmm"] == "qemu"
            assert row["vmm_reason"].startswith(
                "--vmm auto chose qemu: KVM cannot run a guest (")
            assert row["reason"] == row["vmm_reason"]  # while it runs
    finally:
        assert kiln(root, "rm", "--force", vm_id).returncode == 0


@pytest.mark.firecracker
@pytest.mark.root
@pytest.mark.kvm
@pytest.mark.slow
def test_boot_to_marker(world: dict[str, Any]) -> None:
    """Only where KVM runs a guest: the workload's output and exit status come back over
    the serial console."""
    root = world["root"]
    res = kiln(root, "run", "--vmm", "firecracker", "--rm", world["volume"], "--", "echo",
               "hi")
    assert (res.returncode, res.stdout) == (0, "hi\n"), res.stderr
    res = kiln(root, "run", "--vmm", "firecracker", "--rm", world["volume"], "--", "sh",
               "-c", "exit 7")
    assert res.returncode == 7, res.stderr
