"""The helper's network ops run in-process inside network namespaces the tests create: the
``ns`` fixture, a config naming it, op calls, snapshots of what a kiln network leaves, and
traffic between namespaces."""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helper import config, configbase
from helper.base.errors import KilnError
from helper.net import host as net
from helper.net import lease as netlease
from helper.ops import registry as ops
from runner import network

ROOT_A, ROOT_B = "netroota", "netrootb"
UID = 900_123
SUBNET, GATEWAY = "10.231.7.0/24", "10.231.7.1"


def vm_id() -> str:
    return "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz234567") for _ in range(12))


def sh(*argv: str, check: bool = True) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=check).stdout


@pytest.fixture
def ns() -> Iterator[str]:
    name = f"kilnt{secrets.token_hex(4)}"
    sh("ip", "netns", "add", name)
    sh("ip", "-n", name, "link", "set", "lo", "up")  # as on a host: local traffic works
    extra: list[str] = []
    yield name
    for n in net.netns_names():  # VM namespaces a failed test left (this suite's roots only)
        t = net.netns_tag(n)
        if t is not None and t.root in (ROOT_A, ROOT_B):
            extra.append(n)
    for n in [*extra, *[f"{name}{s}" for s in "go"], name]:
        sh("ip", "netns", "del", n, check=False)
    for p in netlease.LEASE_DIR.glob(f"{name}-*"):
        p.unlink()


def cfg(ns: str, **kw: Any) -> configbase.Config:
    lines = [f'namespace = "{ns}"', 'bridge = "kilnbrt"', f'subnet = "{SUBNET}"',
             f'gateway = "{GATEWAY}"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in kw.items()]
    return config.parse(("[net]\n" + "\n".join(lines) + "\n").encode())


def call(c: configbase.Config, op: str, req: dict[str, Any], uid: int = 0) -> dict[str, Any]:
    ctx = ops.Ctx(cfg=c, area=Path("/nonexistent"), caller_uid=uid, caller_gid=uid)
    return ops.run_op(ctx, op, ops.parse(op, json.dumps(req)))


def refused(c: configbase.Config, op: str, req: dict[str, Any], uid: int = 0) -> KilnError:
    with pytest.raises(KilnError) as e:
        call(c, op, req, uid)
    return e.value


def snapshot(ns: str) -> dict[str, Any]:
    """Everything a kiln network could leave in ``ns``: links, addresses, rules, VM
    namespaces of this suite, lease files."""
    links = json.loads(sh("ip", "-n", ns, "-j", "-d", "link", "show"))
    addrs = json.loads(sh("ip", "-n", ns, "-j", "addr", "show"))
    return {
        "links": sorted((d["ifname"], d.get("ifalias"), d.get("master")) for d in links),
        "addrs": sorted((d["ifname"], a["local"]) for d in addrs for a in d["addr_info"]),
        "rules": [sh("ip", "netns", "exec", ns, "iptables", "-t", t, "-S")
                  for t in ("nat", "filter")],
        "vm_netns": sorted(n for n in net.netns_names()
                           if (t := net.netns_tag(n)) and t.root in (ROOT_A, ROOT_B)),
        "leases": sorted(p.name for p in netlease.LEASE_DIR.glob(f"{ns}-*")),
    }


def assert_host_clean(*names: str) -> None:
    """The machine's own namespace has none of the test's devices, addresses or rules."""
    host_links = {d["ifname"] for d in json.loads(sh("ip", "-j", "link", "show"))}
    assert not host_links & {"kilnbrt", *names}
    host_addrs = sh("ip", "-4", "-o", "addr", "show")
    assert "10.231.7." not in host_addrs
    assert "10.231.7." not in sh("iptables", "-t", "nat", "-S")


def link_of(ns: str, name: str) -> dict[str, Any]:
    found = [d for d in json.loads(sh("ip", "-n", ns, "-j", "-d", "link", "show", name))]
    assert len(found) == 1
    return dict(found[0])


SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen()
print("ready", flush=True)
while True:
    c, peer = s.accept()
    c.sendall(peer[0].encode())
    c.close()
"""
CLIENT = """
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
    print(s.recv(100).decode())
except OSError as e:
    print("error", type(e).__name__)
"""


def in_netns(netns: str, script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE,
                            text=True,
                            preexec_fn=lambda: net.join_netns(netns))  # noqa: PLW1509


def ask(netns: str, host: str, port: int) -> str:
    p = in_netns(netns, CLIENT, host, str(port))
    out, _ = p.communicate(timeout=20)
    return out.strip()


@contextlib.contextmanager
def server(netns: str, host: str, port: int) -> Iterator[None]:
    p = in_netns(netns, SERVER, host, str(port))
    try:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready"
        yield
    finally:
        p.kill()
        p.wait()


def caller(c: configbase.Config, uid: int = 0) -> network.Call:
    """What ``builder.helperclient.call`` does in-process, with the test's config."""
    ctx = ops.Ctx(cfg=c, area=Path("/nonexistent"), caller_uid=uid, caller_gid=uid)

    def call(op: str, req: dict[str, Any]) -> dict[str, Any]:
        return ops.run_op(ctx, op, ops.parse(op, json.dumps(req)))
    return call
