"""kiln's tap devices: create one owned by a VM's uid/gid, delete one kiln made.

Privileged (ops ``tap-create``/``tap-delete``), stdlib only. Names are ``kt-`` plus up to
12 characters of ``[a-z2-7]`` (≤ 15 bytes, the kernel's IFNAMSIZ - 1), so a caller can
never name ``eth0`` or another program's tap. ``alias`` reads the owner tag kiln puts on
the taps it makes for a VM (``helper.net.host``); the op decides whose a tap is. Deleting
checks that the device exists and is a tun/tap device (``/sys/class/net/NAME/tun_flags``)
before ``ip tuntap del``.
``#7`` adds bridges, namespaces and NAT on top.
"""

from __future__ import annotations

import os
import re

from helper.base import run
from helper.base.errors import Conflict, NotFound, UsageError

PREFIX = "kt-"
NAME_PATTERN = r"^kt-[a-z2-7]{1,12}$"
_NAME_RE = re.compile(NAME_PATTERN)
_SYS = "/sys/class/net"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or len(name.encode()) > 15:
        raise UsageError(f"invalid tap name {name!r}",
                         f"kiln taps are named {PREFIX} + 1-12 characters of a-z and 2-7")
    return name


def exists(name: str) -> bool:
    return os.path.lexists(f"{_SYS}/{check_name(name)}")


def is_tap(name: str) -> bool:
    return os.path.exists(f"{_SYS}/{check_name(name)}/tun_flags")


def create_argv(name: str, uid: int, gid: int) -> list[str]:
    """``ip`` arguments that create the tap (pure)."""
    return [
        "tuntap", "add",
        "dev", check_name(name),
        "mode", "tap",
        "user", str(uid),  # only this uid (the VM's) may attach to it
        "group", str(gid),
        "vnet_hdr",  # virtio-net offloads (Firecracker and QEMU both use them)
    ]


def delete_argv(name: str) -> list[str]:
    return ["tuntap", "del", "dev", check_name(name), "mode", "tap"]


def tap_create(name: str, uid: int, gid: int) -> None:
    if exists(name):
        raise Conflict(f"network device {name} already exists", "delete it first (tap-delete)")
    run.run("ip", create_argv(name, uid, gid), timeout=30)


def alias(name: str) -> str:
    """The device's alias (kiln's owner tag), "" when it has none."""
    try:
        with open(f"{_SYS}/{check_name(name)}/ifalias") as fh:
            return fh.read().strip()
    except FileNotFoundError:
        return ""


def tap_delete(name: str) -> None:
    if not exists(name):
        raise NotFound(f"tap {name} does not exist", "")
    if not is_tap(name):
        raise UsageError(f"{name} is not a tun/tap device", "kiln only deletes its own taps")
    run.run("ip", delete_argv(name), timeout=30)
