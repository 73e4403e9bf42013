"""The host end of the control channel on Firecracker: its hybrid vsock (docs/run.md, "The
control channel"). The frames are ``runner.guest_init.channel``'s, as on QEMU's port.

Firecracker has no virtio-serial. Its vsock device is hybrid: the guest sees AF_VSOCK
(kiln gives it CID ``GUEST_CID``), the host a Unix socket Firecracker binds at the
``uds_path`` kiln configures (``UDS``, in the jail's chroot). Connections go either way:

* host → guest: connect to that socket, write ``CONNECT <port>\\n``, read ``OK <n>\\n``;
  Firecracker closes the connection instead when nothing in the guest listens on the port;
* guest → host: the guest connects to CID 2, port P, and Firecracker connects to a
  listener at ``<uds_path>_P`` on the host.

kiln uses the first: the agent listens on ``PORT`` (``kiln.ctl=vsock:PORT`` on the
command line) and the host connects, retrying every ``RETRY`` s until the guest accepts.
The other direction would need a listening socket of kiln's *inside the jail's chroot*,
a directory the VM's uid owns: for a sudo caller that is a socket root would have to make
there (a helper op, and a path the untrusted VM uid could swap), while a connecting host
needs only the socket Firecracker made, handed to the caller like the API socket
(``jail-grant-vsock``). It also survives a snapshot: a restore resets every vsock
connection (the one the hello went out on before the save dies) but not the guest's
listener, so a restored agent accepts the host's next connection and greets it again.

``VsockSender.pump()`` is non-blocking, called from the driver's loop: connect, handshake,
hear ``HEL1``, then (with settings) stamp and write ``SET1`` — or (a warm save: settings
None) keep the connection open once the hello is heard (``heard``), the guest paused
mid-exchange. Firecracker's own handshake is checked; a refused or closed connection is
retried, and so is one Firecracker has not answered within ``RETRY_AFTER`` s (it holds a
CONNECT until the guest's vsock driver answers it: a guest still booting may not yet);
a frame that breaks the protocol ends the exchange (``failed``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import time
from pathlib import Path

from runner.guest_init import channel
from runner.guest_init.sender import SEED_BYTES

log = logging.getLogger("kiln.vm")
GUEST_CID = 3  # the lowest guest CID (0-2 are reserved)
PORT = 5252  # the agent's vsock port (kiln.ctl=vsock:PORT)
UDS = "v.sock"  # Firecracker's end, directly in the chroot
RETRY = 0.05  # s between connection attempts while the guest does not listen yet
RETRY_AFTER = 1.0  # s: an attempt Firecracker neither answers nor closes is given up
_LINE_MAX = 64  # Firecracker's "OK <port>\n" is far shorter


def kernel_arg(port: int = PORT) -> str:
    """What init.sh reads to take its settings over vsock (pure)."""
    return f"kiln.ctl=vsock:{port}"


class VsockSender:
    """One exchange with the agent over Firecracker's vsock socket ``uds``: ``pump`` until
    ``done`` (settings written), ``heard`` (settings None: the hello arrived) or
    ``failed``."""

    def __init__(self, uds: Path, settings: channel.Settings | None, *,
                 port: int = PORT) -> None:
        self.uds, self.settings, self.port = uds, settings, port
        self.heard = self.done = False
        self.failed: str | None = None
        self._sock: socket.socket | None = None
        self._buf = b""
        self._ok = False
        self._frame: bytes | None = None
        self._next = 0.0
        self._since = 0.0  # when the current attempt connected

    def pump(self) -> None:
        if self.done or self.failed or (self.heard and self.settings is None):
            return
        try:
            self._step()
        except (OSError, channel.FrameError) as e:
            if isinstance(e, channel.FrameError) or e.errno == errno.EPROTO:
                self.failed = str(e)
                log.warning("the guest's control channel: %s", e)
                self.close()
            else:  # refused, reset, not there yet: the guest does not listen yet
                self._reset()

    def _step(self) -> None:
        if self._sock is None:
            if time.monotonic() < self._next:
                return
            self._connect()
        assert self._sock is not None
        if not self.heard:
            self._read()
            if not self._ok and time.monotonic() - self._since > RETRY_AFTER:
                # no answer: the guest's side never took the request (not running yet)
                raise TimeoutError(errno.ETIMEDOUT, "no answer to CONNECT")
            if not self._ok or not channel.heard_hello(self._buf):
                return
            self.heard = True
            if self.settings is None:
                return
        self._write()

    def _connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.connect(str(self.uds))  # a local socket: at once, or refused
            s.setblocking(False)
            s.send(f"CONNECT {self.port}\n".encode())
        except OSError:
            s.close()
            raise
        self._sock = s
        self._since = time.monotonic()

    def _read(self) -> None:
        assert self._sock is not None
        try:
            got = self._sock.recv(4096)
        except BlockingIOError:
            return
        if not got:  # Firecracker closed it: nothing listens on the port (yet)
            raise ConnectionResetError(errno.ECONNRESET, "closed")
        self._buf += got
        if not self._ok:
            line, nl, rest = self._buf.partition(b"\n")
            if not nl:
                if len(self._buf) > _LINE_MAX:
                    raise OSError(errno.EPROTO, f"Firecracker answered {self._buf[:16]!r}")
                return
            if not line.startswith(b"OK "):
                raise OSError(errno.EPROTO, f"Firecracker answered {line[:32]!r}")
            self._ok, self._buf = True, rest

    def _write(self) -> None:
        assert self._sock is not None
        assert self.settings is not None
        if self._frame is None:  # stamped when the guest asks (as on QEMU)
            self._frame = channel.encode_settings(
                self.settings, time_ns=time.time_ns(), seed=os.urandom(SEED_BYTES))
        with contextlib.suppress(BlockingIOError):
            while self._frame:
                self._frame = self._frame[self._sock.send(self._frame):]
        if not self._frame:
            self.done = True
            self.close()

    def _reset(self) -> None:
        """Drop a connection that was refused or cut before the frame went out."""
        self.close()
        self._buf, self._ok, self.heard, self._frame = b"", False, False, None
        self._next = time.monotonic() + RETRY

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock = None
