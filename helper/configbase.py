"""What the helper's configuration holds, its built-in defaults, and the tool checks.

``Config`` (with ``Limits``) is the loaded, checked configuration the ops run with. Its
defaults live here as constants so both ways of making one agree: ``helper.config.DEFAULTS``
(no config file: no TOML, no pydantic) and the schema's defaults in ``helper.configfile``
(a test compares them). ``check_tool`` and ``check_dirs`` are the trust rules for what the
helper runs: root-owned regular files in root-owned directories nobody else may write.

Dependency direction: ``helper.config`` (loading) and ``helper.configfile`` (the schema)
import this module; it imports only ``helper.base.errors`` (and ``helper.net.config``
lazily, for the ``[net]`` defaults on first use).
"""

from __future__ import annotations

import functools
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from helper.base.errors import KilnError, NotFound

if TYPE_CHECKING:
    from helper.net.config import NetSection

# Tool name → default absolute path (Debian 12). Names are what privileged code asks for.
DEFAULT_TOOLS: dict[str, str] = {
    "losetup": "/usr/sbin/losetup",
    "mount": "/usr/bin/mount",
    "umount": "/usr/bin/umount",
    "dmsetup": "/usr/sbin/dmsetup",
    "mkfs.btrfs": "/usr/sbin/mkfs.btrfs",
    "mkfs.xfs": "/usr/sbin/mkfs.xfs",
    "resize2fs": "/usr/sbin/resize2fs",
    "e2fsck": "/usr/sbin/e2fsck",
    "dumpe2fs": "/usr/sbin/dumpe2fs",
    "thin_check": "/usr/sbin/thin_check",
    "ip": "/usr/sbin/ip",
    "iptables": "/usr/sbin/iptables",  # [net]: NAT and port forwards
    "ebtables": "/usr/sbin/ebtables",  # [net]: each tap speaks only as its VM
    "sysctl": "/usr/sbin/sysctl",  # [net]: ip_forward in kiln's namespaces
    "qemu": "/usr/bin/qemu-system-x86_64",
    "firecracker": "/usr/local/bin/firecracker",
    "jailer": "/usr/local/bin/jailer",
}
# The basename each tool must have (firecracker: must contain it).
BASENAMES: dict[str, str] = {name: Path(p).name for name, p in DEFAULT_TOOLS.items()}

# Built-in defaults ([jails], [pool]): DEFAULTS below, and the schema's defaults.
DEFAULT_UID_RANGE = (900_000, 65_536)
DEFAULT_CGROUP_PARENT = "kiln"
DEFAULT_CHROOT_BASE = "/var/lib/kiln/jails"
DEFAULT_POOL_DIR = "/var/lib/kiln"
DEFAULT_BACKEND: Final = "auto"


@dataclass(frozen=True)
class Limits:
    """``[limits]``: what one sudo caller may hold or spend (root in-process is not
    limited; network leases and forwards have their caps in ``[net]``). Counts are per
    caller uid; ``pool_margin_percent`` is host-wide: the sum of every area's promised
    (sparse, not yet written) image bytes plus a new image must stay below the free space
    of ``[pool] directory``'s filesystem minus this share of it."""

    jails: int = 16  # staged Firecracker jails
    jail_bytes: int = 64 << 30  # what the helper copies into a caller's jails, together
    cgroups: int = 64  # VM cgroups
    pool_bytes: int = 64 << 30  # one pool image (reflink) or thin data file
    pool_margin_percent: int = 5
    import_bytes: int = 64 << 30  # one volume-import / dm-import
    cpu_seconds: int = 900  # CPU time of one op (RLIMIT_CPU), tools included
    request_bytes: int = 64 << 10  # one request on stdin
    audit_bytes_per_day: int = 1 << 20  # audit log lines one uid may add per UTC day


class UntrustedConfig(KilnError):
    """The config file (or a tool it names) could be changed by someone other than root."""


@dataclass(frozen=True)
class Config:
    """The loaded, checked configuration the ops run with."""

    tools: dict[str, Path]
    uid_first: int
    uid_count: int
    cgroup_parent: str
    chroot_base: Path
    sources: tuple[Path, ...]
    pool_dir: Path
    backend: str
    path: Path | None  # the file it came from (None: built-in defaults)
    # [net] (helper/net/config.py); None: its defaults, made on first use (``net``)
    net_section: NetSection | None = None
    # [pool] data_device / metadata_device (dm-thin on the operator's block devices)
    data_device: Path | None = None
    metadata_device: Path | None = None
    limits: Limits = Limits()

    @property
    def net(self) -> NetSection:
        return self.net_section if self.net_section is not None else _default_net()

    def users_dir(self) -> Path:
        return self.pool_dir / "users"

    def area(self, uid: int) -> Path:
        """A sudo caller's own area: pool image, mount point, imported volumes."""
        return self.users_dir() / str(uid)

    def tool(self, name: str) -> str:
        """The checked absolute path of tool ``name`` (for ``helper.base.run``)."""
        return check_tool(name, self.tools.get(name) or Path(DEFAULT_TOOLS.get(name, "")))


@functools.cache
def _default_net() -> NetSection:
    from helper.net.config import NetSection

    return NetSection()


def check_tool(name: str, path: Path) -> str:
    """Absolute, expected basename, a root-owned regular file no one else may write."""
    want = BASENAMES.get(name)
    if want is None:
        raise UntrustedConfig(f"unknown tool {name!r}", "the helper runs only known tools")
    if not path.is_absolute() or ".." in path.parts:
        raise UntrustedConfig(f"tool {name} path {path} is not absolute",
                              "fix [tools] in /etc/kiln/config.toml")
    ok_name = want in path.name if name == "firecracker" else path.name == want
    if not ok_name:
        raise UntrustedConfig(f"refusing tool {path}: its basename must be {want!r}",
                              "point [tools] at the real program")
    try:
        st = os.stat(path)  # the tool itself may be a symlink (/usr/bin/x -> ...), its
    except FileNotFoundError:  # target is what runs, and is what gets checked
        raise NotFound(f"{name} not found at {path}",
                       "install it or fix [tools] in /etc/kiln/config.toml") from None
    if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise UntrustedConfig(f"refusing tool {path}: not a root-owned regular file "
                              "writable only by root", f"chown root:root {path}; chmod "
                              f"go-w {path}")
    check_dirs(path.parent)
    return str(path)


def check_dirs(d: Path) -> None:
    """Every directory from ``d`` up to / is root-owned and not group/other-writable
    (sticky /tmp-like directories are refused too: anyone could swap names there)."""
    cur = d
    while True:
        st = os.lstat(cur)
        if stat.S_ISLNK(st.st_mode):
            st = os.stat(cur)  # /bin -> usr/bin on merged-/usr hosts; the target counts
        if st.st_uid != 0 or st.st_mode & 0o022:
            raise UntrustedConfig(f"refusing {cur}: not root-owned or writable by others",
                                  f"chown root:root {cur}; chmod go-w {cur}")
        if cur.parent == cur:
            return
        cur = cur.parent
