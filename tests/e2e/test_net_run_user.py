"""`kiln run --net tap` as an ordinary user (a sudo rule for the installed helper only): its
QEMU runs as the user, which can neither enter a VM namespace nor open a tap owned by a VM
uid, so the helper attaches the tap and sends the fd (``tap-open``); and that op's own
refusals. Same namespace-per-test setup as tests/e2e/test_net_run.py.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import pytest

from builder.demoimage import make_busybox_image
from helper.net import core as nc
from helper.net import lease as netlease
from runner import network
from tests.support.netrun import Net, netns_env, sh, world  # noqa: F401  (fixtures)
from tests.support.oci import User, give_to
from tests.support.run import vmms
from tests.support.sudo import BASE, _audit_len, _ops_ran, kiln_as

pytestmark = [pytest.mark.root, pytest.mark.slow]


# -- an ordinary user: QEMU as the user, the tap as an fd from the helper -------------------


@pytest.fixture(scope="module")
def user_world(sudo_user: User) -> tuple[User, Path, str]:
    """(user, its kiln root with a copy pool, the busybox volume id)."""
    user = sudo_user
    layout = user.scratch / "netlayout"
    if not layout.exists():
        make_busybox_image(layout, "1")
        give_to(user, layout)
    root = user.scratch / "netroot"
    kiln_as(user, root, "pool", "init", "--backend", "copy")
    vol = json.loads(kiln_as(user, root, "build", f"oci:{layout}:1", "--json").stdout)["id"]
    return user, root, vol[7:19]


def test_an_ordinary_user_runs_tap_vms_through_the_helper(
        user_world: tuple[User, Path, str], netns_env: Net) -> None:  # noqa: F811
    """isolation = netns, the hard case: the user's QEMU can neither enter the VM's
    namespace nor open a tap owned by a VM uid; the helper attaches it and sends the fd."""
    user, root, vol = user_world
    netns_env.roots.append(root)

    def leftovers() -> None:
        for r in json.loads(kiln_as(user, root, "ps", "--all", "--json").stdout):
            kiln_as(user, root, "rm", "--force", r["id"], check=False)

    netns_env.cleanups.append(leftovers)
    netns_env.configure(extra=f'[pool]\ndirectory = "{BASE}"\n\n', isolation="netns")
    before = netns_env.snapshot()
    start = _audit_len()
    res = kiln_as(user, root, "run", "--rm", "--net", "tap", "-p", "8090:80", vol, "--",
                  "sh", "-c", "ping -c 1 -W 5 172.16.0.1 >/dev/null && echo ping-ok; "
                  "set -- $(ip -4 -o addr show dev eth0); echo \"eth0 $4\"", check=False)
    assert (res.returncode, res.stdout) == (0, "ping-ok\neth0 172.16.0.2/30\n"), res.stderr
    ran = [op for op, outcome in _ops_ran(user.uid, start)
           if op.startswith(("bridge", "net", "tap", "forward", "nat")) and outcome == "ok"]
    assert ran == ["bridge-ensure", "net-lease", "netns-create", "forward-add", "tap-open",
                   "net-reclaim"]
    assert json.loads(kiln_as(user, root, "ps", "--all", "--json").stdout) == []  # --rm
    assert netns_env.snapshot() != before  # the bridge stays for the next VM ...
    netns_env.drop_bridge(root)
    assert netns_env.snapshot() == before  # ... and nothing else

    # A privileged host port is the helper's refusal, after the record: the VM fails and
    # leaves nothing on the network.
    res = kiln_as(user, root, "run", "--net", "tap", "-p", "80:80", vol, "--", "true",
                  check=False)
    assert (res.returncode, res.stderr) == (125, "error: host port 80 is privileged\nhint: "
                                            "forward a port of 1024 or above (or run kiln "
                                            "as root)\n")
    (rec,) = json.loads(kiln_as(user, root, "ps", "--all", "--json").stdout)
    assert (rec["state"], rec["reason"]) == ("failed", "setup failed: host port 80 is "
                                                       "privileged")
    kiln_as(user, root, "rm", rec["id"])
    netns_env.drop_bridge(root)
    assert netns_env.snapshot() == before
    assert vmms(root) == {}


def test_an_ordinary_users_warm_runs_on_the_kiln_network(
        user_world: tuple[User, Path, str], netns_env: Net) -> None:  # noqa: F811
    """`kiln run --warm --net tap` as the sudo caller (issue #14): the warm image made on
    first use, then a restore; each clone's eth0 from its own lease in its settings, the
    tap an fd from the helper; output and exit code as a cold run's; nothing left."""
    user, root, vol = user_world
    netns_env.roots.append(root)

    def leftovers() -> None:
        for r in json.loads(kiln_as(user, root, "ps", "--all", "--json").stdout):
            kiln_as(user, root, "rm", "--force", r["id"], check=False)
        for i in json.loads(kiln_as(user, root, "warm", "ls", "--json").stdout):
            kiln_as(user, root, "warm", "rm", i["id"], check=False)

    netns_env.cleanups.append(leftovers)
    netns_env.configure(extra=f'[pool]\ndirectory = "{BASE}"\n\n', isolation="netns")
    before = netns_env.snapshot()
    cmd = ("sh", "-c", "ping -c 1 -W 5 172.16.0.1 >/dev/null && echo ping-ok; "
           "set -- $(ip -4 -o addr show dev eth0); echo \"eth0 $4\"; exit 3")
    start = _audit_len()
    for first in (True, False):
        res = kiln_as(user, root, "run", "--warm", "--rm", "--net", "tap", vol, "--", *cmd,
                      check=False)
        assert (res.returncode, res.stdout) == (3, "ping-ok\neth0 172.16.0.2/30\n"), \
            res.stderr
        assert ("making one" in res.stderr) == first, res.stderr
        assert "booting cold" not in res.stderr  # restored, not the fallback
    ran = [op for op, outcome in _ops_ran(user.uid, start) if outcome == "ok"]
    assert ran.count("tap-open") == 2, ran  # each clone's tap, as an fd
    assert json.loads(kiln_as(user, root, "ps", "--all", "--json").stdout) == []  # --rm
    leftovers()
    netns_env.drop_bridge(root)
    assert netns_env.snapshot() == before
    assert vmms(root) == {}


# -- tap-open: only the caller's own VM's tap, only over a Unix socket ----------------------


def test_tap_open_hands_out_only_the_callers_own_tap(tmp_path: Path) -> None:
    """The op an ordinary user's kiln calls, in-process with a test config (as in
    tests/helper/test_net_ops.py): the fd is the VM's tap, attached; anything else is refused."""
    import fcntl
    import socket
    import struct

    from helper.base.errors import Conflict, NotFound, UsageError
    from tests.support.net import ROOT_A, UID, caller, cfg, vm_id

    name = f"kilnt{secrets.token_hex(4)}"
    sh("ip", "netns", "add", name)
    try:
        owner, other = caller(cfg(name), uid=1000), caller(cfg(name), uid=1001)
        vm = vm_id()
        network.attach(owner, vm, ROOT_A, UID, UID)
        ours, theirs = socket.socketpair()
        plain = (tmp_path / "f").open("w")
        try:
            assert owner("tap-open", {"vm": vm, "fd": theirs.fileno()}) == {
                "tap": nc.names(vm).tap}
            _, fds, _, _ = socket.recv_fds(ours, 16, 1)
            ifr = fcntl.ioctl(fds[0], 0x800454D2, b"\0" * 40)  # TUNGETIFF: what it is
            os.close(fds[0])
            assert ifr[:16].rstrip(b"\0").decode() == nc.names(vm).tap
            assert struct.unpack("H", ifr[16:18])[0] & 0x5002 == 0x5002  # tap, no PI, vnet
            for who, req, err, message in [
                (other, {"vm": vm, "fd": theirs.fileno()}, UsageError,
                 f"the address lease of VM {vm} belongs to uid 1000"),
                (owner, {"vm": vm_id(), "fd": theirs.fileno()}, NotFound, None),
                (owner, {"vm": vm, "fd": plain.fileno()}, UsageError,
                 f"file descriptor {plain.fileno()} is not a socket"),
                (owner, {"vm": vm, "fd": 250}, NotFound, "file descriptor 250 is not open"),
            ]:
                with pytest.raises(err) as e:
                    who("tap-open", req)
                if message is not None:
                    assert e.value.message == message
            held, peer = socket.socketpair()  # the fd in flight keeps the tap attached
            owner("tap-open", {"vm": vm, "fd": held.fileno()})
            with pytest.raises(Conflict) as busy:
                owner("tap-open", {"vm": vm, "fd": theirs.fileno()})
            assert busy.value.message == f"tap {nc.names(vm).tap} is already in use by a VMM"
            _, fds, _, _ = socket.recv_fds(peer, 16, 1)
            os.close(fds[0])
            held.close()
            peer.close()
        finally:
            ours.close()
            theirs.close()
            plain.close()
        assert network.reconcile(owner, ROOT_A, keep=[], vm_ids=[vm]) == [
            f"tap:{nc.names(vm).tap}", f"lease:{vm}"]
        caller(cfg(name))("bridge-remove", {})
    finally:
        sh("ip", "netns", "del", name, check=False)
        for p in netlease.LEASE_DIR.glob(f"{name}-*"):
            p.unlink()
