"""The control channel over Firecracker's hybrid vsock (runner/guest_init/vsock.py) and the
agent's vsock / fd channels (agent.c).

The host-side client is driven against a real listening Unix socket whose other end is a
**fake Firecracker peer** (a thread here, labelled as such: it speaks Firecracker's
``CONNECT <port>\\n`` / ``OK <n>\\n`` handshake, and refuses a connection by closing it as
Firecracker does while nothing in the guest listens). Behind the fake peer, where the guest
would be, runs the **real agent** built from agent.c in its ``greet fd:N`` mode over a
socket pair: the bytes the client sends are the ones the agent parses. The real guest side
(AF_VSOCK inside a booted VM) needs KVM: tests/runner/test_firecracker_warm.py.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from runner.guest_init import Workload, agentbin, vsock
from runner.guest_init import channel as ch
from tests.runner.test_channel import decode_settings

S = ch.Settings(Workload(("echo", "X"), (("PATH", "/bin"),), "/w", "", "vm1"), "cd" * 16)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("agent")
    return agentbin.ensure_agent(d / "cache", scratch=d)


class FakeFirecracker:
    """A FAKE Firecracker vsock peer (test double, not Firecracker): listens on ``path``;
    the first ``refuse`` connections are closed after their CONNECT line (no guest
    listener yet), later ones answered ``answer`` and then relayed to ``guest`` (a
    socket) — or, without one, fed ``script`` and recorded."""

    def __init__(self, path: Path, *, refuse: int = 0, answer: bytes = b"OK 1073741824\n",
                 guest: socket.socket | None = None, script: bytes = b"") -> None:
        self.path, self.refuse, self.answer = path, refuse, answer
        self.guest, self.script = guest, script
        self.lines: list[bytes] = []
        self.received = b""
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(str(path))
        self.srv.listen(4)
        self.srv.settimeout(0.05)  # accept() is not woken by close(): poll a flag
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            with conn:
                line = b""
                while not line.endswith(b"\n"):
                    got = conn.recv(1)
                    if not got:
                        break
                    line += got
                self.lines.append(line)
                if self.refuse > 0:
                    self.refuse -= 1
                    continue  # closed: Firecracker's answer when nothing listens
                conn.sendall(self.answer)
                if self.guest is not None:
                    _relay(conn, self.guest)
                    return
                conn.sendall(self.script)
                conn.settimeout(2.0)
                with contextlib.suppress(OSError):
                    while got := conn.recv(65536):
                        self.received += got
                return

    def close(self) -> None:
        self.stopping = True
        self.thread.join(5)
        self.srv.close()


def _relay(a: socket.socket, b: socket.socket) -> None:
    sel = selectors.DefaultSelector()
    sel.register(a, selectors.EVENT_READ, b)
    sel.register(b, selectors.EVENT_READ, a)
    while True:
        for key, _ in sel.select(5):
            src = key.fileobj
            assert isinstance(src, socket.socket)
            data = src.recv(65536)
            if not data:
                return
            key.data.sendall(data)


def pump_until(sender: vsock.VsockSender, cond: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not (cond() if callable(cond) else cond):
        assert time.monotonic() < deadline, "the exchange did not finish"
        sender.pump()
        time.sleep(0.005)


@pytest.fixture
def uds(tmp_path: Path) -> Path:
    return tmp_path / vsock.UDS


def test_client_retries_until_the_guest_listens_then_sends_one_settings_frame(
        uds: Path) -> None:
    peer = FakeFirecracker(uds, refuse=3, script=ch.encode_frame(ch.HELLO, b""))
    sender = vsock.VsockSender(uds, S)
    t0 = time.time()
    try:
        pump_until(sender, lambda: sender.done or sender.failed)
    finally:
        sender.close()
        peer.close()
    assert sender.failed is None
    assert peer.lines == [b"CONNECT 5252\n"] * 4  # three refused, the fourth accepted
    tag, payload, rest = ch.decode_frame(peer.received)
    assert (tag, rest) == (ch.SETTINGS, b"")
    got = decode_settings(payload)
    assert got["arg"] == ["echo", "X"]
    assert t0 - 1 <= float(got["time"][0]) <= time.time()  # stamped when the hello came
    assert len(bytes.fromhex(got["seed"][0])) == 64


def test_client_sends_nothing_before_the_hello(uds: Path) -> None:
    peer = FakeFirecracker(uds, script=b"HEL")  # half a header, then silence
    sender = vsock.VsockSender(uds, S)
    try:
        for _ in range(40):
            sender.pump()
            time.sleep(0.005)
        assert not sender.heard
        assert not sender.done
    finally:
        sender.close()
        peer.close()
    assert peer.received == b""


@pytest.mark.parametrize(("answer", "script", "why"), [
    (b"NO\n", b"", "Firecracker answered b'NO'"),
    (b"OK 1\n", b"SET1\0\0\0\0", "the guest sent b'SET1', not HEL1"),
    (b"OK 1\n", b"HEL1\0\0\0\1x", "HEL1 frame of 1 bytes exceeds the limit of 0 bytes"),
])
def test_client_ends_on_a_broken_handshake_or_frame(uds: Path, answer: bytes, script: bytes,
                                                    why: str) -> None:
    peer = FakeFirecracker(uds, answer=answer, script=script)
    sender = vsock.VsockSender(uds, S)
    try:
        pump_until(sender, lambda: sender.failed)
    finally:
        sender.close()
        peer.close()
    assert sender.failed is not None
    assert why in sender.failed
    assert not sender.done
    assert peer.received == b""


def test_save_mode_keeps_the_connection_after_the_hello(uds: Path) -> None:
    """A warm save hears the hello and holds the connection (the guest is paused
    mid-exchange): nothing is written."""
    peer = FakeFirecracker(uds, script=ch.encode_frame(ch.HELLO, b""))
    sender = vsock.VsockSender(uds, None)
    try:
        pump_until(sender, lambda: sender.heard)
        sender.pump()
        assert not sender.done
        assert sender._sock is not None
    finally:
        sender.close()
        peer.close()
    assert peer.received == b""


def test_the_real_agent_behind_the_fake_peer(uds: Path, agent: Path) -> None:
    """Client → fake Firecracker → socket pair → the real agent (``greet fd:N``: hello,
    one frame, the settings printed, nothing applied)."""
    host_end, guest_end = socket.socketpair()
    proc = subprocess.Popen([str(agent), "greet", f"fd:{guest_end.fileno()}"],
                            pass_fds=(guest_end.fileno(),), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    guest_end.close()
    peer = FakeFirecracker(uds, refuse=1, guest=host_end)
    sender = vsock.VsockSender(uds, S)
    try:
        pump_until(sender, lambda: sender.done or sender.failed)
        out, err = proc.communicate(timeout=10)
    finally:
        sender.close()
        peer.close()
        host_end.close()
    assert (sender.failed, proc.returncode, err) == (None, 0, b"")
    text = out.decode()
    assert "KILN_HOSTNAME='vm1'\n" in text
    assert text.endswith("set -- 'PATH=/bin' -- 'echo' 'X'\n")


def test_agent_fd_channel_closed_before_a_frame(agent: Path) -> None:
    host_end, guest_end = socket.socketpair()
    proc = subprocess.Popen([str(agent), "greet", f"fd:{guest_end.fileno()}"],
                            pass_fds=(guest_end.fileno(),), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    guest_end.close()
    assert host_end.recv(8) == b"HEL1\0\0\0\0"
    host_end.close()
    _, err = proc.communicate(timeout=10)
    assert (proc.returncode, err) == (2, b"kiln-agent: the control channel closed\n")


def test_agent_listens_on_its_vsock_port(agent: Path) -> None:
    """``vsock:PORT``: the agent binds and listens on AF_VSOCK (a guest-side socket this
    host kernel has; no peer can connect here: that needs a VM)."""
    port = 40000 + os.getpid() % 20000
    proc = subprocess.Popen([str(agent), "greet", f"vsock:{port}"], stderr=subprocess.PIPE)
    try:
        probe = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        deadline = time.monotonic() + 5
        while (err := _bind_error(probe, port)) is None:
            probe.close()
            probe = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            assert time.monotonic() < deadline, "the agent never bound its port"
            time.sleep(0.02)
        probe.close()
        assert err == errno.EADDRINUSE  # the agent holds it
        assert proc.poll() is None  # listening, waiting for the host
    finally:
        proc.kill()
        proc.wait()


def _bind_error(s: socket.socket, port: int) -> int | None:
    try:
        s.bind((socket.VMADDR_CID_ANY, port))
    except OSError as e:
        return e.errno
    return None


@pytest.mark.parametrize("chan", ["vsock:0", "vsock:x", "fd:", "fd:-1"])
def test_agent_refuses_a_bad_channel(agent: Path, chan: str) -> None:
    res = subprocess.run([str(agent), "greet", chan], capture_output=True, timeout=10,
                         check=False)
    assert res.returncode == 2
    assert res.stderr.startswith(b"kiln-agent: bad ")
