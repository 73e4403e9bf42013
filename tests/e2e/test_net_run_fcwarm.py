"""`kiln run --warm --vmm firecracker --net tap -p HOST:GUEST` end to end: the guest's side
of Firecracker warm runs on the kiln network (a namespace the test creates, as in
test_net_run.py). Needs a guest (the hello before the save, the workload after the
restore): ``kvm``, skipped where KVM cannot run one. The host side — the save with a NIC,
``network_overrides`` onto each clone's tap, the settings, the teardown — runs for real
everywhere in tests/runner/test_firecracker_warm_net.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path

import pytest

from builder import warm
from builder.root import Root
from helper.net import core as nc
from tests.e2e.test_run_warm_opts import REPORT, _report
from tests.support.cli import kiln
from tests.support.firecracker import BIN_DIR
from tests.support.netrun import GATEWAY, SUBNET, Net, fetch, netns_env, world
from tests.support.timing import limit

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.firecracker, pytest.mark.kvm]
__all__ = ["netns_env", "world"]  # the fixtures, from tests.support.netrun
FC = ("--vmm", "firecracker")


def _configure(netns_env: Net) -> None:
    jails = Path(f"/tmp/kiln-fcwn-{secrets.token_hex(3)}")  # short: the API socket's path
    jails.mkdir(mode=0o755)
    parent = f"kilnfcwn{secrets.token_hex(3)}"
    netns_env.configure(extra=f'[tools]\nfirecracker = "{BIN_DIR}/firecracker"\njailer = '
                        f'"{BIN_DIR}/jailer"\n\n[jails]\nchroot_base = "{jails}"\n'
                        f'cgroup_parent = "{parent}"\n\n', dns=["10.231.8.53"])

    def cleanup() -> None:
        for d in Path("/sys/fs/cgroup").glob(f"*/{parent}"):
            with contextlib.suppress(OSError):
                os.rmdir(d)
        shutil.rmtree(jails, ignore_errors=True)

    netns_env.cleanups.append(cleanup)


def test_two_warm_clones_on_the_kiln_network_each_their_own(
        world: tuple[Path, str], netns_env: Net) -> None:
    root, vol = world
    _configure(netns_env)
    before = netns_env.snapshot()
    made = json.loads(kiln(root, "warm", "create", *FC, "--net", "tap", "--json", vol).stdout)
    after = netns_env.snapshot()  # the save VM's lease, tap and namespace are gone
    assert (after["leases"], after["vm_netns"]) == (before["leases"], before["vm_netns"])
    vms = {}
    for i in range(2):
        res = kiln(root, "run", "--warm", *FC, "--detach", "--net", "tap", "--name",
                   f"fcw{i}", "-p", f"{8190 + i}:80", vol, "--", "sh", "-c", REPORT,
                   check=False)
        assert res.returncode == 0, res.stderr
        assert "making one" not in res.stderr
        assert "booting cold" not in res.stderr
        vms[f"fcw{i}"] = res.stdout.strip()
    assert {i.id for i in warm.list_images(Root(root))} == {made["id"]}
    rows = {r["id"]: r for r in json.loads(kiln(root, "ps", "--all", "--json").stdout)}
    seen = []
    for i, (name, vm) in enumerate(vms.items()):
        page = fetch(netns_env.ns, GATEWAY, 8190 + i, wait=limit(30))
        ip = rows[vm]["ip"]
        assert ip.startswith(SUBNET[:-4])
        # the clone's own MAC (not the save VM's), address, route and name server
        assert _report(page) == [name, *_report(page)[1:2], nc.mac_for(vm), f"{ip}/24",
                                 f"default via {GATEWAY} dev eth0 ",
                                 "nameserver 10.231.8.53"], name
        assert fetch(netns_env.ns, ip, 80, wait=limit(10)) == page
        seen.append(_report(page))
    for field in range(4):
        assert len({r[field] for r in seen}) == 2, field
    kiln(root, "stop", "--timeout", "1", *vms.values())
    kiln(root, "rm", *vms.values())
    netns_env.drop_bridge(root)
    assert netns_env.snapshot() == before
