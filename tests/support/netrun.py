"""`kiln run --net tap` through the `kiln` command in a namespace each test creates: the
busybox ``world``, the trusted test config naming the namespace, the ``netns_env`` fixture,
``fetch`` (a page from inside a namespace)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from builder.root import Root
from builder.source import RegistryOptions
from helper.net import host as net
from helper.net import lease as netlease
from runner.vm.state import State, root_key
from tests.support.cli import kiln

TEST_CONFIG = Path("/etc/kiln/test-config.toml")
SUBNET, GATEWAY, BRIDGE = "10.231.8.0/24", "10.231.8.1", "kilnbrn"


def sh(*argv: str, check: bool = True) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=check).stdout


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(a root with a copy pool, the busybox volume id)."""
    from builder.pipeline import build
    from builder.pool import init_pool
    from tests.support.images import busybox_layout

    root = tmp_path_factory.mktemp("netrun") / "root"
    init_pool(Root(root).ensure().path, backend="copy")
    volume = build(Root(root), f"oci:{busybox_layout()}:1", RegistryOptions()).volume
    return root, volume.id[7:19]


@dataclass
class Net:
    """A test namespace and the trusted config pointing the kiln network at it."""

    ns: str
    roots: list[Path]  # whose VM namespaces count in snapshots
    cleanups: list[Callable[[], None]] = field(default_factory=list)  # before the config goes

    def configure(self, extra: str = "", **net_kw: Any) -> None:
        lines = [f'namespace = "{self.ns}"', f'bridge = "{BRIDGE}"', f'subnet = "{SUBNET}"',
                 f'gateway = "{GATEWAY}"', *(f"{k} = {json.dumps(v)}"
                                            for k, v in net_kw.items())]
        write_config(extra + "[net]\n" + "\n".join(lines) + "\n")

    def snapshot(self) -> dict[str, Any]:
        """Everything a kiln network could leave in the namespace (the bridge aside: it
        stays for the next VM; ``drop_bridge`` removes it), the VM namespaces of the
        test's roots, the lease book."""
        links = json.loads(sh("ip", "-n", self.ns, "-j", "-d", "link", "show"))
        addrs = json.loads(sh("ip", "-n", self.ns, "-j", "addr", "show"))
        keys = {root_key(r) for r in self.roots}
        return {
            "links": sorted((d["ifname"], d.get("ifalias"), d.get("master")) for d in links),
            # IPv4: links' IPv6 link-local addresses come and go with carrier, kernel-made
            "addrs": sorted((d["ifname"], a["local"]) for d in addrs for a in d["addr_info"]
                            if a["family"] == "inet"),
            "rules": [sh("ip", "netns", "exec", self.ns, "iptables", "-t", t, "-S")
                      for t in ("nat", "filter")],
            "vm_netns": sorted(n for n in net.netns_names()
                               if (t := net.netns_tag(n)) and t.root in keys),
            "leases": sorted(p.name for p in netlease.LEASE_DIR.glob(f"{self.ns}-*")),
        }

    def drop_bridge(self, root: Path) -> None:
        from builder import helperclient as client

        client.call("bridge-remove", {}, area=root)


def write_config(text: str) -> None:
    TEST_CONFIG.parent.mkdir(mode=0o755, exist_ok=True)
    tmp = TEST_CONFIG.with_name(".test-config.tmp")
    tmp.write_text(text)
    tmp.chmod(0o644)
    os.rename(tmp, TEST_CONFIG)


def host_links() -> list[str]:
    return sorted(os.listdir("/sys/class/net"))


@pytest.fixture
def netns_env(world: tuple[Path, str]) -> Iterator[Net]:
    saved = TEST_CONFIG.read_bytes() if TEST_CONFIG.exists() else None
    name = f"kilnt{secrets.token_hex(4)}"
    sh("ip", "netns", "add", name)
    sh("ip", "-n", name, "link", "set", "lo", "up")
    root = world[0]
    env = Net(name, [root])
    host_before = host_links()
    try:
        yield env
    finally:
        # whatever a failed test left, while the config still names the namespace
        for rec in State(root).all():
            kiln(root, "rm", "--force", rec.id, check=False)
        for cleanup in env.cleanups:
            cleanup()
        keys = {root_key(r) for r in env.roots}
        for n in net.netns_names():
            t = net.netns_tag(n)
            if t is not None and t.root in keys:
                sh("ip", "netns", "del", n, check=False)
        if saved is None:
            TEST_CONFIG.unlink(missing_ok=True)
        else:
            write_config(saved.decode())
        sh("ip", "netns", "del", name, check=False)
        for p in netlease.LEASE_DIR.glob(f"{name}-*"):
            p.unlink()
        # nothing of any test ever reaches the machine's own namespace
        assert host_links() == host_before
        assert SUBNET[:-4] not in sh("ip", "-4", "-o", "addr", "show")


HTTP = """
import socket, sys, time
deadline = time.monotonic() + float(sys.argv[3])
while True:
    try:
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
        s.sendall(b"GET /index.html HTTP/1.0\\r\\n\\r\\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        print(data.decode().split("\\r\\n\\r\\n", 1)[-1].strip())
        break
    except OSError as e:
        if time.monotonic() > deadline:
            print(f"failed: {e}")
            break
        time.sleep(0.2)
"""


def fetch(ns: str, host: str, port: int, wait: float = 60) -> str:
    """GET /index.html from inside namespace ``ns`` (retrying while the guest boots)."""
    res = subprocess.run([sys.executable, "-c", HTTP, host, str(port), str(wait)],
                         capture_output=True, text=True, timeout=wait + 30, check=False,
                         preexec_fn=lambda: net.join_netns(ns))
    return res.stdout.strip() or res.stderr.strip()
