"""The host end of the control channel on QEMU: the FIFOs ``CONTROL.in`` / ``CONTROL.out``
that QEMU's ``pipe`` chardev holds open for the ``kiln.control`` port
(``runner.vmm.qemuargv``), never blocking kiln.

``HelloListener`` hears the guest's ``HEL1`` (a warm save waits for it before pausing the
guest). ``SettingsSender.pump()`` is called by the driver's supervision loop: it reads the guest's
``HEL1`` from ``CONTROL.out``, then stamps the settings with the host's time and fresh seed
bytes (``channel.encode_settings``) and writes the ``SET1`` frame to ``CONTROL.in`` — every
open and write non-blocking, so a QEMU that died or has not opened its FIFOs yet costs a
retry on the next pump, never a hang; a restored guest (``greeted``) said its hello before
the save, so the frame goes out at once. The time is taken when the guest asks, not when QEMU
starts: the boot before the hello takes seconds under TCG. ``send_stop`` writes ``STP1``
(one write below ``PIPE_BUF``: atomic).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from pathlib import Path

from runner.guest_init import channel

log = logging.getLogger("kiln.vm")
SEED_BYTES = 64


def send_stop(control: Path, grace: float) -> bool:
    """Ask the guest init to stop the workload (SIGTERM, SIGKILL after ``grace`` s); False
    when no VMM holds the FIFO."""
    try:
        fd = os.open(f"{control}.in", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        os.write(fd, channel.encode_stop(grace))
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


class HelloListener:
    """Hears the guest's ``HEL1`` on ``CONTROL.out`` (``poll`` until it returns True)."""

    def __init__(self, control: Path) -> None:
        self.control = control
        self._fd: int | None = None
        self._heard = b""

    def poll(self) -> bool:
        if self._fd is None:
            self._fd = os.open(f"{self.control}.out", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(BlockingIOError):
            self._heard += os.read(self._fd, 64)
        try:
            return channel.heard_hello(self._heard)
        except channel.FrameError as e:
            raise OSError(errno.EPROTO, f"the guest sent {self._heard[:8]!r}: {e}") from None

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = None


class SettingsSender:
    """Delivers one ``SET1`` frame once the guest said ``HEL1`` (``pump`` until ``done``);
    ``greeted``: a restored guest said it before its state was saved — send at once."""

    def __init__(self, control: Path, settings: channel.Settings, *,
                 greeted: bool = False) -> None:
        self.control, self.settings = control, settings
        self.done = False
        self._hello = None if greeted else HelloListener(control)
        self._in_fd: int | None = None
        self._frame: bytes | None = None
        self._pos = 0

    @property
    def writing(self) -> bool:
        """Part of the frame is in the FIFO: a stop written now could land inside it."""
        return self._frame is not None and not self.done

    def pump(self) -> None:
        if self.done:
            return
        try:
            if self._frame is None:
                if self._hello is not None and not self._hello.poll():
                    return
                self._frame = channel.encode_settings(
                    self.settings, time_ns=time.time_ns(), seed=os.urandom(SEED_BYTES))
            self._write()
        except (OSError, channel.FrameError) as e:
            log.warning("the guest's control channel: %s", e)
            self._finish()

    def _write(self) -> None:
        assert self._frame is not None
        if self._in_fd is None:
            try:
                self._in_fd = os.open(f"{self.control}.in",
                                      os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as e:
                if e.errno == errno.ENXIO:  # QEMU has not opened it (yet)
                    return
                raise
        with contextlib.suppress(BlockingIOError):
            while self._pos < len(self._frame):
                self._pos += os.write(self._in_fd, self._frame[self._pos:])
        if self._pos == len(self._frame):
            self._finish()

    def _finish(self) -> None:
        self.done = True
        self._frame = None
        self.close()

    def close(self) -> None:
        if self._hello is not None:
            self._hello.close()
        if self._in_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._in_fd)
        self._in_fd = None
