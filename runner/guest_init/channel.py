"""The host→guest control channel's wire format (pure): frames and the settings message.

kiln's guest init takes a run's settings (argv, env, workdir, user, hostname, machine id,
the time, seed material, the network) over the ``kiln.control`` port instead of the disk or
the kernel command line, so a cold boot and (issue #14) a restored VM are given them the
same way. A cold Firecracker run, which has no channel up before its guest boots, gets the
same frame on its disk (``/.kiln/settings``, without ``time``). docs/run.md, "The control
channel", is the specification; the guest's reader is ``agent.c`` beside this module.

A frame is a 4-byte ASCII tag (its type and version), a 4-byte big-endian payload length
and the payload. Each tag has a hard size limit (``LIMITS``), checked by both sides before
a payload is read:

* ``HEL1`` (guest → host, empty): the guest init waits for its settings;
* ``SET1`` (host → guest, ≤ 64 KiB): the settings, records ``KEY=VALUE`` each ended by a
  NUL byte (``arg`` and ``env`` repeat, in order);
* ``STP1`` (host → guest, ≤ 16 bytes): stop the workload, payload the grace in seconds.

``encode_settings`` is what the drivers send; ``heard_hello`` reads the guest's hello
(``decode_frame`` is also the tests' oracle, with their own settings decoder). The QEMU
end of the channel is ``runner.guest_init.sender``, Firecracker's ``runner.guest_init.vsock``:
both use these functions, so the bytes on either channel are the same.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from runner.guest_init import Workload

HEADER = struct.Struct(">4sI")
HELLO, SETTINGS, STOP = b"HEL1", b"SET1", b"STP1"
LIMITS = {HELLO: 0, SETTINGS: 64 << 10, STOP: 16}
SEED_BYTES = 32  # at least; the agent refuses fewer (and more than 256)
_MACHINE_ID = re.compile(r"^[0-9a-f]{32}$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_IP = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")


class FrameError(ValueError):
    """A frame that breaks the protocol: unknown tag, too large, cut short."""


@dataclass(frozen=True)
class GuestNet:
    """eth0 as the guest configures it (``ip`` is ``ADDRESS/PREFIX``)."""

    mac: str
    ip: str
    gateway: str
    dns: tuple[str, ...] = ()


@dataclass(frozen=True)
class Settings:
    """One run's settings, less what is stamped when they are sent (time, seed)."""

    work: Workload  # argv, env, workdir, user, hostname
    machine_id: str  # 32 lowercase hex digits (/etc/machine-id)
    net: GuestNet | None = None
    stdin: bool | None = None  # warm runs: is the kiln.stdin port the workload's stdin?


def encode_frame(tag: bytes, payload: bytes) -> bytes:
    """One frame; a payload over the tag's limit is refused (``FrameError``)."""
    if tag not in LIMITS:
        raise FrameError(f"unknown frame type {tag!r}")
    if len(payload) > LIMITS[tag]:
        raise FrameError(f"{tag.decode()} frame of {len(payload)} bytes exceeds the limit "
                         f"of {LIMITS[tag]} bytes")
    return HEADER.pack(tag, len(payload)) + payload


def decode_frame(data: bytes) -> tuple[bytes, bytes, bytes]:
    """(tag, payload, the bytes after the frame); ``FrameError`` when ``data`` is not a
    whole frame within its limit (a shorter prefix: "incomplete")."""
    if len(data) < HEADER.size:
        raise FrameError("incomplete frame header")
    tag, size = HEADER.unpack_from(data)
    if tag not in LIMITS:
        raise FrameError(f"unknown frame type {tag!r}")
    if size > LIMITS[tag]:
        raise FrameError(f"{tag.decode()} frame of {size} bytes exceeds the limit of "
                         f"{LIMITS[tag]} bytes")
    end = HEADER.size + size
    if len(data) < end:
        raise FrameError("incomplete frame payload")
    return tag, data[HEADER.size:end], data[end:]


def heard_hello(data: bytes) -> bool:
    """Whether ``data`` (what the guest sent so far) holds its whole ``HEL1``; False while
    it is shorter than a header; ``FrameError`` when it is anything else (both channels:
    the QEMU port, Firecracker's vsock)."""
    if len(data) < HEADER.size:
        return False
    tag, _, _ = decode_frame(data)
    if tag != HELLO:
        raise FrameError(f"the guest sent {tag!r}, not HEL1")
    return True


def _record(key: str, value: str) -> bytes:
    if "\0" in value:
        raise FrameError(f"the settings' {key} contains a NUL byte")
    return f"{key}={value}".encode() + b"\0"


def _checked(s: Settings, seed: bytes) -> None:
    if not s.work.argv:
        raise FrameError("the settings have no command")
    if not _MACHINE_ID.fullmatch(s.machine_id):
        raise FrameError(f"invalid machine id {s.machine_id!r}")
    if not SEED_BYTES <= len(seed) <= 256:
        raise FrameError(f"the seed must be {SEED_BYTES} to 256 bytes, not {len(seed)}")
    if s.net is not None:
        n = s.net
        if not _MAC.fullmatch(n.mac):
            raise FrameError(f"invalid MAC address {n.mac!r}")
        addr, _, prefix = n.ip.partition("/")
        if not (_IP.fullmatch(addr) and prefix.isdigit() and int(prefix) <= 32):
            raise FrameError(f"invalid guest address {n.ip!r}")
        if not all(_IP.fullmatch(a) for a in (n.gateway, *n.dns)):
            raise FrameError("invalid gateway or name server address")


def encode_settings(s: Settings, *, time_ns: int | None, seed: bytes) -> bytes:
    """The ``SET1`` frame for ``s`` sent at ``time_ns`` (the host's CLOCK_REALTIME) with
    fresh ``seed`` bytes (pure). ``time_ns`` None: no ``time`` record, and the guest leaves
    its clock alone — a frame written on a disk before the boot (a cold Firecracker run)
    would set it back by the boot's length."""
    _checked(s, seed)
    w = s.work
    fields = [("hostname", w.hostname), ("machine_id", s.machine_id)]
    if time_ns is not None:
        sec, nsec = divmod(time_ns, 1_000_000_000)
        fields.append(("time", f"{sec}.{nsec:09d}"))
    fields += [("seed", seed.hex()), ("workdir", w.workdir), ("user", w.user)]
    if s.net is not None:
        fields += [("mac", s.net.mac), ("ip", s.net.ip), ("gw", s.net.gateway),
                   ("dns", ",".join(s.net.dns))]
    if s.stdin is not None:
        fields.append(("stdin", "1" if s.stdin else "0"))
    fields += [("env", f"{k}={v}") for k, v in w.env]
    fields += [("arg", a) for a in w.argv]
    return encode_frame(SETTINGS, b"".join(_record(k, v) for k, v in fields))


def encode_stop(grace: float) -> bytes:
    """The ``STP1`` frame: SIGTERM the workload, SIGKILL everything ``grace`` s later."""
    return encode_frame(STOP, str(max(0, round(grace))).encode())

