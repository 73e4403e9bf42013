"""``tap-open``: an fd on a VM's tap, attached as root in the tap's namespace.

For a VMM that can neither open a tap it does not own nor enter that namespace (QEMU run by
an ordinary user; ``-netdev tap,fd=N``). The tap keeps its owner (a VM uid, never the
caller's); only this fd is handed over.

The check (the tap exists, is kiln's, is the caller's VM's) and the attach (``TUNSETIFF``
by name) are two steps, and the caller can delete its own tap between them (``tap-detach``
in a parallel call): ``TUNSETIFF`` as root would then *create* a fresh, untagged,
non-persistent tap of that name and hand the caller its fd. So after the attach the fd must
be on a persistent tap (``TUNGETIFF``: kiln's taps are persistent, one made by the attach
is not) with the ifindex the check saw (``SIOCGIFINDEX`` in the same namespace; a
re-created device gets a new index). Otherwise the fd is closed — a tap the attach made
vanishes with it, and nothing else is deleted — and the open is refused.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import threading

from helper.base.errors import Conflict, KilnError, NotFound, UsageError
from helper.net import core as nc
from helper.net import host as net
from helper.net.config import NetSection

_TUNSETIFF, _TUNGETIFF, _SIOCGIFINDEX = 0x400454CA, 0x800454D2, 0x8933
_IFF_TAP, _IFF_NO_PI, _IFF_VNET_HDR, _IFF_PERSIST = 0x0002, 0x1000, 0x4000, 0x0800
_IFREQ = "16sH22x"  # struct ifreq: name, flags (+ padding to 40 bytes)


def tap_open(sec: NetSection, vm: str, uid: int) -> int:
    """An open fd on VM ``vm``'s tap, a tap tagged as ``uid``'s."""
    n = nc.names(vm)
    ns = n.netns if sec.isolation == "netns" else sec.namespace
    if ns == n.netns and not (net.NETNS_DIR / ns).exists():
        raise NotFound(f"network namespace {ns} does not exist", "")
    d = net.link(ns, n.tap)
    if d is None:
        raise NotFound(f"tap {n.tap} does not exist in {net.where(sec)}", "")
    tag = nc.parse_tag(d.get("ifalias"))
    if net.kind(d) != "tun":
        raise UsageError(f"{n.tap} is not a tun/tap device", "kiln only opens its own taps")
    net._check_owner("tap", n.tap, tag, uid)
    if tag is None or tag.vm != vm:
        raise UsageError(f"refusing tap {n.tap}: it is not VM {vm}'s", "")
    return attach(ns, n.tap, int(d["ifindex"]))


def _verify(fd: int, name: str, ifindex: int) -> None:
    raw, flags = struct.unpack(_IFREQ, fcntl.ioctl(fd, _TUNGETIFF, bytes(40)))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # this thread's namespace
        got = struct.unpack("16si20x", fcntl.ioctl(s, _SIOCGIFINDEX,
                                                  struct.pack("16si20x", raw, 0)))[1]
    if raw.rstrip(b"\0") != name.encode() or not flags & _IFF_PERSIST or got != ifindex:
        raise Conflict(f"refusing tap {name}: it was removed or replaced while it was being "
                       "opened", "create the VM's tap again (tap-attach / netns-create)")


def attach(ns: str, name: str, ifindex: int) -> int:
    """An fd attached to the persistent tap ``name`` of namespace ``ns`` whose ifindex is
    ``ifindex`` (the one checked); refused if that is not the tap the fd got."""
    got: list[int] = []
    err: list[BaseException] = []

    def opener() -> None:
        # tun binds a device by name in the namespace of the thread that opens
        # /dev/net/tun: this thread (and only it) enters the tap's namespace, then ends.
        try:
            if ns:
                net.join_netns(ns)
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.ioctl(fd, _TUNSETIFF, struct.pack(_IFREQ, name.encode(),
                                                        _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR))
                _verify(fd, name, ifindex)
            except BaseException:
                os.close(fd)  # a tap this attach created goes with its only fd
                raise
            got.append(fd)
        except BaseException as e:  # re-raised in the caller's thread
            err.append(e)

    t = threading.Thread(target=opener, name="kiln-tap-open")
    t.start()
    t.join()
    if err:
        e = err[0]
        if isinstance(e, OSError) and e.errno == errno.EBUSY:
            raise Conflict(f"tap {name} is already in use by a VMM", "is the VM running?")
        if isinstance(e, OSError):
            raise KilnError(f"cannot open tap {name}: {e.strerror}", "") from None
        raise e
    return got[0]
