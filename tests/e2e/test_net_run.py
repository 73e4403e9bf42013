"""`kiln run --net tap [-p HOST:GUEST]` end to end: real QEMU TCG boots of the busybox image
through the `kiln` command, on a kiln network inside a namespace each test creates.

The trusted test config (``/etc/kiln/test-config.toml``) names that namespace in ``[net]
namespace``, so the bridge, taps, VM namespaces' veths, forwards and NAT rules exist only
there; traffic runs only between it and the guests. Checked from outside: ``kiln ps
--json`` addresses, the guests' own view (eth0, pings, a CGI that pings its caller back),
pages fetched from the namespace directly and through forwards, which namespace QEMU runs
in, and — after stop, exit, rm, a failed setup, a SIGKILLed `kiln run` — the namespace's
links, addresses, iptables rules, the VM namespaces and the lease book exactly as before.
(An ordinary user's runs, with the tap as an fd from the helper: test_net_run_user.py.)
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from builder.root import Root
from helper.net import core as nc
from helper.net import host as net
from runner import network
from runner.guest_init import channel
from runner.vm.state import State, root_key
from runner.vmm import qemuargv
from tests.support.cli import kiln, wait_for
from tests.support.firecracker import BIN_DIR
from tests.support.netrun import (
    BRIDGE,
    GATEWAY,
    SUBNET,
    Net,
    fetch,
    host_links,
    netns_env,
    sh,
    world,
    write_config,
)
from tests.support.run import vmms
from tests.support.timing import limit

pytestmark = [pytest.mark.root, pytest.mark.slow]
__all__ = ["netns_env", "world"]  # the fixtures, from tests.support.netrun


# A's page, and a CGI that pings whoever asks (busybox httpd listens on IPv6: the caller
# is [::ffff:a.b.c.d]) and answers with the result: B learns that A reached it.
SERVER_A = r"""mkdir -p /www/cgi-bin
printf '%s\n' '#!/bin/sh' 'echo Content-Type: text/plain' echo \
  'p=${REMOTE_ADDR#[}; p=${p%]}; p=${p#::ffff:}' \
  'ping -c 1 -W 2 "$p" >/dev/null && echo "pong-to-$p" || echo "no-pong-$p"' \
  >/www/cgi-bin/ping
chmod 755 /www/cgi-bin/ping
echo hello-from-a >/www/index.html
exec busybox httpd -f -p 80 -h /www"""
PINGER = """i=0
until ping -c 1 -W 1 {peer} >/dev/null 2>&1; do
  i=$((i + 1)); [ $i -lt 90 ] || {{ echo ping-failed; exit 3; }}
done
echo ping-ok
wget -q -O- http://{peer}/cgi-bin/ping
set -- $(ip -4 -o addr show dev eth0); echo "eth0 $4"
"""
# A page naming the VM and the address its guest holds.
PAGE = """mkdir -p /www; set -- $(ip -4 -o addr show dev eth0); echo "{name} $4" >/www/index.html
exec busybox httpd -f -p 80 -h /www"""

def run_detached(root: Path, *args: str) -> str:
    res = kiln(root, "run", "--detach", *args, check=False)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def ps(root: Path) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in json.loads(kiln(root, "ps", "--all", "--json").stdout)}


def stdout_of(root: Path, vm: str) -> str:
    return (root / "vms" / vm / "stdout").read_text(errors="replace")


def netns_of(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def in_subnet(ip: str) -> bool:
    return ipaddress.IPv4Address(ip) in ipaddress.IPv4Network(SUBNET)


# -- isolation = none: two guests on the bridge ---------------------------------------------


def test_two_vms_get_addresses_ping_each_other_and_serve_through_a_forward(
        world: tuple[Path, str], netns_env: Net) -> None:
    root, vol = world
    ns = netns_env.ns
    netns_env.configure()
    before = netns_env.snapshot()
    t0 = time.monotonic()
    a = run_detached(root, "--net", "tap", "--name", "neta", "-p", "8080:80", vol, "--",
                     "sh", "-c", SERVER_A)
    a_ip = ps(root)[a]["ip"]
    assert in_subnet(a_ip)
    assert a_ip != GATEWAY
    b = run_detached(root, "--net", "tap", vol, "--", "sh", "-c", PINGER.format(peer=a_ip))
    rows = ps(root)
    b_ip = rows[b]["ip"]
    assert in_subnet(b_ip)
    assert b_ip not in (a_ip, GATEWAY)
    # QEMU (root) runs inside the namespace its tap lives in
    pids = vmms(root)
    assert netns_of(pids[a]) == netns_of(pids[b]) == os.stat(f"/run/netns/{ns}").st_ino
    tap = json.loads(sh("ip", "-n", ns, "-j", "-d", "link", "show", nc.names(a).tap))[0]
    assert (tap["master"], tap["ifalias"]) == (BRIDGE, f"kiln vm={a} root={root_key(root)} "
                                                       "uid=0")
    rec = State(root).get(a)
    assert rec is not None
    assert rec.uid is not None
    assert tap["linkinfo"]["info_data"]["user"] == rec.uid  # a VM uid of the helper's range
    assert 900_000 <= rec.uid < 900_000 + 65_536

    # B pings A, asks A's CGI, which pings B back; B's guest holds the address ps shows.
    out = wait_for("B's report", lambda: (o := stdout_of(root, b)).endswith("\n") and
                   "eth0 " in o and o, 90)
    assert out == f"ping-ok\npong-to-{b_ip}\neth0 {b_ip}/24\n"
    # The namespace reaches A directly and through the forward on the gateway.
    assert fetch(ns, a_ip, 80) == "hello-from-a"
    assert fetch(ns, GATEWAY, 8080) == "hello-from-a"
    took = time.monotonic() - t0

    # B's workload ended: its VM exited and left the network on its own.
    wait_for("B to exit", lambda: ps(root)[b]["state"] == "exited", limit(90))
    rec_b = ps(root)[b]
    assert (rec_b["exit_code"], rec_b["ip"]) == (0, None)
    assert not (Path("/sys/class/net") / nc.names(b).tap).exists()
    assert nc.names(b).tap not in sh("ip", "-n", ns, "link", "show")
    # kiln stop returns once A's owner has released everything.
    assert kiln(root, "stop", "--timeout", "2", "neta").stdout == a + "\n"
    rec_a = ps(root)[a]
    assert (rec_a["state"], rec_a["ip"]) == ("exited", None)
    netns_env.drop_bridge(root)
    assert netns_env.snapshot() == before
    assert kiln(root, "rm", a, b).stdout == f"{a}\n{b}\n"
    assert netns_env.snapshot() == before
    assert took < limit(60), f"two guests took {took:.1f} s to reach each other"


# -- isolation = netns: the same guest address, reached through each VM's forward -----------


def test_netns_isolation_same_guest_address_each_behind_its_forward(
        world: tuple[Path, str], netns_env: Net) -> None:
    root, vol = world
    ns = netns_env.ns
    netns_env.configure(isolation="netns")
    before = netns_env.snapshot()
    x = run_detached(root, "--net", "tap", "-p", "8081:80", vol, "--", "sh", "-c",
                     PAGE.format(name="x"))
    y = run_detached(root, "--net", "tap", "-p", "8082:80", vol, "--", "sh", "-c",
                     PAGE.format(name="y"))
    rows = ps(root)
    assert in_subnet(rows[x]["ip"])
    assert in_subnet(rows[y]["ip"])
    assert rows[x]["ip"] != rows[y]["ip"]
    pids = vmms(root)
    for vm in (x, y):  # each QEMU in its own VM namespace
        assert netns_of(pids[vm]) == os.stat(f"/run/netns/{nc.names(vm).netns}").st_ino
    assert fetch(ns, GATEWAY, 8081) == "x 172.16.0.2/30"
    assert fetch(ns, GATEWAY, 8082) == "y 172.16.0.2/30"
    assert fetch(ns, rows[y]["ip"], 80) == "y 172.16.0.2/30"  # the lease, NATed inside
    assert kiln(root, "stop", "--timeout", "1", x, y).stdout == f"{x}\n{y}\n"
    assert not set(net.netns_names()) & {nc.names(x).netns, nc.names(y).netns}
    netns_env.drop_bridge(root)
    assert netns_env.snapshot() == before
    kiln(root, "rm", x, y)


# -- crashes and failed setups --------------------------------------------------------------


def test_sigkill_of_kiln_run_and_a_failed_setup_leave_nothing(
        world: tuple[Path, str], netns_env: Net) -> None:
    """A second VM asking for a taken port fails after its record, its tap and lease
    rolled back; a SIGKILLed `kiln run` leaves its tap, lease and forward until the next
    kiln command, which fails the VM (the record proves it dead: no second look needed)
    and takes them away."""
    root, vol = world
    netns_env.configure()
    before = netns_env.snapshot()
    run = subprocess.Popen([sys.executable, "-m", "runner", "--root", str(root), "run",
                            "--net", "tap", "--name", "killed", "-p", "8083:80", vol, "--",
                            "sleep", "300"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        vm, pid = wait_for("the VM on the network", lambda: next(
            ((r.id, r.pid) for r in State(root).all()
             if r.state == "running" and r.net_doc.get("step") == "attached"), None), 60)
        held = netns_env.snapshot()
        assert nc.names(vm).tap in str(held["links"])
        assert "--dport 8083" in held["rules"][0]

        res = kiln(root, "run", "--net", "tap", "-p", "8083:80", vol, "--", "true",
                   check=False)
        assert (res.returncode, res.stdout) == (125, "")
        assert res.stderr == (f"error: port 8083 is already forwarded (to VM {vm})\n"
                              "hint: choose another host port\n")
        (failed,) = [r for r in ps(root).values() if r["id"] != vm]
        assert (failed["state"], failed["ip"], failed["reason"]) == (
            "failed", None, f"setup failed: port 8083 is already forwarded (to VM {vm})")
        assert netns_env.snapshot() == held  # nothing of it left on the network
        kiln(root, "rm", failed["id"])

        run.send_signal(signal.SIGKILL)
        run.wait(10)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    # (QEMU may outlive its owner: -runas clears its parent-death signal)
    assert netns_env.snapshot() == held  # until the next kiln command
    rec = ps(root)[vm]  # the reaper runs first: kills QEMU, fails the VM, releases
    assert (rec["state"], rec["reason"], rec["ip"]) == (
        "failed", "kiln run (the VM's owner) died", None)
    wait_for("QEMU to die", lambda: not Path(f"/proc/{pid}").exists(), limit(10))
    netns_env.drop_bridge(root)
    assert netns_env.snapshot() == before
    kiln(root, "rm", vm)


def test_network_orphans_go_on_the_second_look(world: tuple[Path, str],
                                               netns_env: Net, tmp_path: Path) -> None:
    """Objects tagged with this root but no record (its database lost) are listed only by
    `kiln gc` (first sighting) and removed by the next command; another root's stay."""
    root, _ = world
    netns_env.configure()
    other = tmp_path / "other"
    Root(other).ensure()
    netns_env.roots.append(other)
    before = netns_env.snapshot()
    orphan, theirs = "orphanvmaaaa", "theirvmbbbbb"
    call = network.helper_call(root)
    network.attach(call, orphan, root_key(root), 900_007, 900_007,
                   forwards=(qemuargv.Forward(8084, 80),))
    network.attach(call, theirs, root_key(other), 900_008, 900_008)
    mine = netns_env.snapshot()
    kiln(root, "ps")  # records alone: nothing to look at
    assert netns_env.snapshot() == mine
    kiln(root, "gc")  # looks: first sighting
    assert netns_env.snapshot() == mine
    kiln(root, "ps")  # second sighting: gone
    after = netns_env.snapshot()
    assert nc.names(orphan).tap not in str(after["links"])
    assert "8084" not in after["rules"][0]
    assert nc.names(theirs).tap in str(after["links"])  # another root's: untouched
    kiln(root, "ps")
    assert netns_env.snapshot() == after
    network.reconcile(call, root_key(other), keep=[], vm_ids=[theirs])
    netns_env.drop_bridge(root)
    assert netns_env.snapshot() == before


# -- hostile input: exact one-line errors, nothing created ----------------------------------


def test_refusals_leave_nothing(world: tuple[Path, str], netns_env: Net) -> None:
    root, vol = world
    ns = netns_env.ns
    records = ps(root)

    def refused(*args: str, message: str, hint: str) -> None:
        res = kiln(root, "run", *args, vol, "--", "true", check=False)
        assert (res.returncode, res.stdout, res.stderr) == (
            125, "", f"error: {message}\nhint: {hint}\n"), args
        assert ps(root) == records, args  # not even a record
        assert netns_env.snapshot() == before, args

    write_config("[jails]\n")  # a trusted config without [net]
    before = netns_env.snapshot()
    refused("--net", "tap", message="networking is not configured: the trusted config has "
            "no [net] settings", hint="an administrator sets [net] in /etc/kiln/config.toml "
            "(docs/net.md)")
    assert "kilnbr0" not in host_links()  # the built-in defaults were not used

    netns_env.configure()
    before = netns_env.snapshot()
    for bad in ("80", "0:80", "65536:80", "a:b"):
        refused("--net", "tap", "-p", bad, message=f"invalid port forward {bad!r}",
                hint="write -p HOST:GUEST with TCP ports 1-65535, e.g. -p 8080:80")
    refused("--net", "tap", "-p", "8080:80", "-p", "8080:81",
            message="host port 8080 is forwarded twice", hint="give each -p its own HOST port")
    refused("-p", "8080:80", message="-p needs --net tap or --net user",
            hint="add --net tap (or --net user)")

    # an uplink whose route covers the subnet (veth: this kernel has no dummy devices)
    sh("ip", "-n", ns, "link", "add", "uplink", "type", "veth", "peer", "name", "uplinkp")
    sh("ip", "-n", ns, "addr", "add", "10.231.0.1/16", "dev", "uplink")
    sh("ip", "-n", ns, "link", "set", "uplink", "up")
    before = netns_env.snapshot()
    refused("--net", "tap", message=f"subnet {SUBNET} overlaps the route 10.231.0.0/16 dev "
            f"uplink of network namespace {ns}",
            hint="choose another [net] subnet in /etc/kiln/config.toml")
    assert BRIDGE not in sh("ip", "-n", ns, "link", "show")

    write_config(f'[net]\nnamespace = "kiltnosuchns"\nsubnet = "{SUBNET}"\n'
                 f'gateway = "{GATEWAY}"\n')
    refused("--net", "tap", message="network namespace kiltnosuchns does not exist",
            hint="create it (ip netns add kiltnosuchns) or clear [net] namespace")


# -- Firecracker: the jailer joins the VM's namespace, the API names the tap ----------------


@pytest.mark.firecracker
def test_firecracker_joins_the_vm_namespace_and_opens_its_tap(
        world: tuple[Path, str], netns_env: Net) -> None:
    """The real 1.12.1 jailer and firecracker (no guest runs here: KVM is emulated): the
    jailer enters kn-ID, Firecracker (as the VM uid that owns the tap) opens it when the
    network interface is configured, GET /vm/config returns eth0 with the tap and kiln's
    MAC, the guest's address is in its settings on its disk; stop leaves nothing."""
    from runner.vmm import fcapi as fc

    root, vol = world
    bins = BIN_DIR
    # on the root's filesystem (staging hard-links), short (the API socket's path)
    jails = Path(f"/tmp/kiln-fcnet-{secrets.token_hex(3)}")
    jails.mkdir(mode=0o755)
    parent = f"kilnfcnet{secrets.token_hex(3)}"
    netns_env.configure(extra=f'[tools]\nfirecracker = "{bins}/firecracker"\njailer = '
                        f'"{bins}/jailer"\n\n[jails]\nchroot_base = "{jails}"\n'
                        f'cgroup_parent = "{parent}"\n\n', isolation="netns")

    def cleanup() -> None:
        for d in Path("/sys/fs/cgroup").glob(f"*/{parent}"):
            with contextlib.suppress(OSError):  # VM cgroups left inside: reported above
                os.rmdir(d)
        shutil.rmtree(jails, ignore_errors=True)

    netns_env.cleanups.append(cleanup)
    before = netns_env.snapshot()
    vm = run_detached(root, "--vmm", "firecracker", "--net", "tap", "-p", "8086:80", vol,
                      "--", "true")
    rec = State(root).get(vm)
    assert rec is not None
    assert rec.pid is not None
    assert ps(root)[vm]["ip"] == rec.net_doc["ip"]
    assert in_subnet(rec.net_doc["ip"])
    assert netns_of(rec.pid) == os.stat(f"/run/netns/{nc.names(vm).netns}").st_ino
    got = fc.ApiClient(Path(rec.fc_doc["api_sock"])).get("/vm/config")
    assert [(n["iface_id"], n["host_dev_name"], n["guest_mac"])
            for n in got["network-interfaces"]] == [("eth0", nc.names(vm).tap,
                                                     nc.mac_for(vm))]
    # the guest's address is in its settings on its disk, which the command line points to
    assert got["boot-source"]["boot_args"].endswith(
        " init=/.kiln/init kiln.ctl=file:/.kiln/settings")
    assert "kiln.ip" not in got["boot-source"]["boot_args"]
    snap = Path(root) / "pool" / "fs" / "snapshots" / f"{rec.snapshot}.ext4"
    frame = subprocess.run(["debugfs", "-R", "cat /.kiln/settings", str(snap)],
                           capture_output=True, check=True).stdout
    records = channel.decode_frame(frame)[1].split(b"\0")
    assert b"ip=172.16.0.2/30" in records
    assert b"gw=172.16.0.1" in records
    assert f"mac={nc.mac_for(vm)}".encode() in records
    assert kiln(root, "stop", "--timeout", "1", vm).stdout == vm + "\n"
    assert ps(root)[vm]["ip"] is None
    netns_env.drop_bridge(root)
    assert netns_env.snapshot() == before
    kiln(root, "rm", vm)
