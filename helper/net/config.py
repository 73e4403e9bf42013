"""``[net]`` of the helper's trusted config: the kiln network (bridge, subnet, isolation, NAT).

Only the trusted config names these; no request does. Checks that need only the values
(the gateway lies inside the subnet, the per-VM link does not overlap it, names fit
IFNAMSIZ) happen at load; the check that needs the host — the subnet must not overlap a
route of the namespace the network lives in — happens at use (``helper.net.host``).

``namespace``: where the bridge, the taps, the veths' kiln ends and kiln's iptables rules
live. Empty (the default, production): the namespace the helper runs in, i.e. the host's.
A name: an existing ``/run/netns/NAME`` made by someone else (the test suite uses this to
keep every address, link and rule inside a namespace it created and removes afterwards).
"""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

BRIDGE_PATTERN = r"^kiln[a-z0-9-]{1,11}$"  # "kiln" + 1-11: at most 15 bytes (IFNAMSIZ - 1)
NAMESPACE_PATTERN = r"^(|[a-z0-9][a-z0-9_-]{0,63})$"


def _net(text: str, what: str, prefixes: tuple[int, int]) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.IPv4Network(text, strict=True)
    except ValueError as e:
        raise ValueError(f"{what} {text!r} is not an IPv4 network (a.b.c.d/N, host bits "
                         f"zero): {e}") from None
    lo, hi = prefixes
    if not lo <= net.prefixlen <= hi:
        raise ValueError(f"{what} {text!r} must have a prefix between /{lo} and /{hi}")
    return net


class NetSection(BaseModel):
    """``[net]``: the network ``--net tap`` VMs join."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bridge: str = Field(default="kilnbr0", pattern=BRIDGE_PATTERN,
                        description="the kiln bridge: 'kiln' + 1-11 of a-z 0-9 -; created on "
                        "first use, never a bridge kiln did not create")
    subnet: str = Field(default="10.213.0.0/24", pattern=r"^[0-9./]{9,18}$",
                        description="IPv4 network VM addresses are allocated from (/8-/29); "
                        "must not overlap a route of the namespace the network lives in")
    gateway: str = Field(default="10.213.0.1", pattern=r"^[0-9.]{7,15}$",
                         description="the bridge's address, inside the subnet; the guests' "
                         "default gateway")
    isolation: Literal["none", "netns"] = Field(
        default="none", description="none: every tap on the bridge; netns: each VM in its own "
        "network namespace (veth to the bridge, tap inside, the guest behind NAT)")
    nat: bool = Field(default=False, strict=True,
                      description="masquerade the subnet's outbound traffic (kiln-owned "
                      "iptables rules, removed with the last VM)")
    namespace: str = Field(default="", pattern=NAMESPACE_PATTERN,
                           description="network namespace (under /run/netns) the bridge, "
                           "taps and rules live in; empty: the helper's own (the host's)")
    netns_subnet: str = Field(
        default="172.16.0.0/30", pattern=r"^[0-9./]{9,18}$",
        description="isolation = netns: the link inside every VM namespace, tap = first "
        "address, guest = second (the same in every VM; must not overlap subnet)")
    max_leases_per_user: int = Field(
        default=32, ge=1, le=1 << 24, strict=True,
        description="the most address leases (VMs on the network) one sudo caller's uid may "
        "hold at once; root running kiln itself is not capped")
    max_forwards_per_user: int = Field(
        default=64, ge=0, le=65535, strict=True,
        description="the most port forwards one sudo caller's uid may hold at once; root "
        "running kiln itself is not capped")
    dns: tuple[str, ...] = Field(default=(), max_length=3,
                                 description="IPv4 name servers written to the guest's "
                                 "/etc/resolv.conf (empty: left alone)")

    @field_validator("subnet")
    @classmethod
    def _subnet(cls, v: str) -> str:
        _net(v, "subnet", (8, 29))
        return v

    @field_validator("netns_subnet")
    @classmethod
    def _netns_subnet(cls, v: str) -> str:
        _net(v, "netns_subnet", (8, 30))
        return v

    @field_validator("gateway")
    @classmethod
    def _gateway(cls, v: str) -> str:
        try:
            ipaddress.IPv4Address(v)
        except ValueError:
            raise ValueError(f"gateway {v!r} is not an IPv4 address") from None
        return v

    @field_validator("dns")
    @classmethod
    def _dns(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for a in v:
            try:
                ipaddress.IPv4Address(a)
            except ValueError:
                raise ValueError(f"dns {a!r} is not an IPv4 address") from None
        return v

    @model_validator(mode="after")
    def _consistent(self) -> NetSection:
        net = self.network
        gw = ipaddress.IPv4Address(self.gateway)
        if gw not in net or gw in (net.network_address, net.broadcast_address):
            raise ValueError(f"gateway {self.gateway} is not a host address of subnet "
                             f"{self.subnet}")
        if self.link.overlaps(net):
            raise ValueError(f"netns_subnet {self.netns_subnet} overlaps subnet {self.subnet}")
        return self

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)

    @property
    def link(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.netns_subnet)
