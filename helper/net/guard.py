"""Anti-spoofing on the kiln bridge (``isolation = none``): a VM's tap speaks only as that VM.

With every tap on one bridge, whatever holds a tap fd (a guest kernel its user controls, or
the fd itself: ``tap-open``) could send frames with any source: answer ARP for another
VM's address or the gateway's and take its traffic. So each tap gets its own ebtables chain
in the kiln namespace, ``kg-<short id>``, jumped to from ``INPUT`` and ``FORWARD`` for
frames entering through that tap (``-i kt-…``), which drops anything whose Ethernet source
is not the VM's MAC (``netcore.mac_for``), ARP whose sender is not that MAC and the VM's
leased address, IPv4 from another address, and all IPv6 (kiln's network is IPv4 only).
The chain is made before the tap joins the bridge and removed with the tap; ``plan`` and
``unplan`` are pure (exact argv tested); ``helper.net.host`` applies them.
"""

from __future__ import annotations

from helper.net.core import TAP

GUARD = "kg-"  # + the tap's short id: at most 15 characters, as taps


def chain(tap: str) -> str:
    return GUARD + tap.removeprefix(TAP)


def plan(tap: str, mac: str, ip: str) -> list[list[str]]:
    """The ebtables argv lists that guard ``tap`` (pure)."""
    c = chain(tap)
    rules = [
        ["-N", c, "-P", "RETURN"],
        ["-A", c, "-s", "!", mac, "-j", "DROP"],
        ["-A", c, "-p", "ARP", "--arp-mac-src", "!", mac, "-j", "DROP"],
        ["-A", c, "-p", "ARP", "--arp-ip-src", "!", ip, "-j", "DROP"],
        ["-A", c, "-p", "IPv4", "--ip-src", "!", ip, "-j", "DROP"],
        ["-A", c, "-p", "IPv6", "-j", "DROP"],
    ]
    return rules + [["-A", base, "-i", tap, "-j", c] for base in ("INPUT", "FORWARD")]


def unplan(tap: str) -> list[list[str]]:
    """The ebtables argv lists that remove ``plan``'s chain (pure; each may find it gone)."""
    c = chain(tap)
    return [*(["-D", base, "-i", tap, "-j", c] for base in ("INPUT", "FORWARD")),
            ["-F", c], ["-X", c]]
