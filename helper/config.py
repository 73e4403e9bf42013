"""The helper's trusted configuration: ``/etc/kiln/config.toml`` (stdlib + pydantic only).

Trust rules (the helper runs as root for callers it does not trust):

* the file is read only from fixed candidate paths (``CANDIDATES``), never from the
  caller's environment or arguments. The first candidate, ``/etc/kiln/test-config.toml``,
  exists only while the test suite runs (tests create and remove it as root); then
  ``/etc/kiln/config.toml``; none present → built-in defaults;
* a present file must be a regular file (not a symlink) owned by root and not writable by
  group or others, in a directory chain with the same properties; anything else refuses
  to run (``UntrustedConfig``);
* each tool is an absolute path whose basename is the tool's own name (``firecracker``:
  must contain "firecracker", jailer 1.12 demands it). Ownership and mode are checked when
  the tool is used (``tool``): root-owned, a regular file, not group/other-writable.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from helper.errors import KilnError, NotFound
from helper.netconfig import NetSection

CANDIDATES = (Path("/etc/kiln/test-config.toml"), Path("/etc/kiln/config.toml"))

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
    "sysctl": "/usr/sbin/sysctl",  # [net]: ip_forward in kiln's namespaces
    "qemu": "/usr/bin/qemu-system-x86_64",
    "firecracker": "/usr/local/bin/firecracker",
    "jailer": "/usr/local/bin/jailer",
}
# The basename each tool must have (firecracker: must contain it).
BASENAMES: dict[str, str] = {name: Path(p).name for name, p in DEFAULT_TOOLS.items()}

_ABS_RE = r"^/[A-Za-z0-9._+/-]{1,255}$"
_CGROUP_RE = r"^[a-z0-9][a-z0-9_.-]{0,63}(/[a-z0-9][a-z0-9_.-]{0,63}){0,7}$"


class UntrustedConfig(KilnError):
    """The config file (or a tool it names) could be changed by someone other than root."""


class JailsSection(BaseModel):
    """``[jails]``: where Firecracker jails and VM cgroups live, which uids VMs get."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uid_gid_range: tuple[int, int] = Field(
        default=(900_000, 65_536),
        description="first VM uid/gid and how many: [first, first + count); never 0")
    cgroup_parent: str = Field(default="kiln", pattern=_CGROUP_RE,
                               description="relative cgroup path every VM cgroup lives under")
    chroot_base: str = Field(default="/var/lib/kiln/jails", pattern=_ABS_RE,
                             description="jailer --chroot-base-dir (on the pool's filesystem)")
    sources: tuple[str, ...] = Field(
        default=(), description="extra absolute directories staged files may come from "
        "(the caller's pool area is always allowed)")

    @field_validator("uid_gid_range")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        first, count = v
        if first < 1000 or count < 1 or first + count - 1 > 2**32 - 2:
            raise ValueError("uid_gid_range must start at 1000 or above and fit 32 bits")
        return v

    @field_validator("sources")
    @classmethod
    def _sources(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for s in v:
            if not re.fullmatch(_ABS_RE, s) or ".." in s.split("/"):
                raise ValueError(f"source {s!r} is not a plain absolute path")
        return v


class PoolSection(BaseModel):
    """``[pool]``: where sudo callers' pools live and which backend they get."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    directory: str = Field(default="/var/lib/kiln", pattern=_ABS_RE,
                           description="root-owned base; a sudo caller's area is "
                           "DIRECTORY/users/<uid>")
    backend: Literal["auto", "reflink", "copy", "dm-thin"] = Field(
        default="auto", description="backend for sudo callers' pools")
    data_device: str | None = Field(
        default=None, pattern=_ABS_RE,
        description="dm-thin: the operator's block device for the thin-pool's data, used "
        "instead of loop-backed files (needs metadata_device; checked when used: a block "
        "device, not mounted, not in use)")
    metadata_device: str | None = Field(
        default=None, pattern=_ABS_RE,
        description="dm-thin: the operator's block device for the thin-pool's metadata "
        "(needs data_device; `kiln pool init` formats it)")

    @model_validator(mode="after")
    def _devices(self) -> PoolSection:
        data, meta = self.data_device, self.metadata_device
        if (data is None) != (meta is None):
            raise ValueError("data_device and metadata_device go together: set both or "
                             "neither")
        for dev in (data, meta):
            if dev is not None and ".." in dev.split("/"):
                raise ValueError(f"device path {dev!r} contains '..'")
        if data is not None and data == meta:
            raise ValueError("data_device and metadata_device must be different devices")
        return self


class ConfigFile(BaseModel):
    """The whole ``/etc/kiln/config.toml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tools: dict[str, str] = Field(default_factory=dict,
                                  description="[tools]: tool name -> absolute path")
    jails: JailsSection = Field(default_factory=JailsSection, description="[jails]")
    pool: PoolSection = Field(default_factory=PoolSection, description="[pool]")
    net: NetSection = Field(default_factory=NetSection, description="[net]")


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
    net: NetSection = field(default_factory=NetSection)  # [net]: helper/netconfig.py
    # [pool] data_device / metadata_device (dm-thin on the operator's block devices)
    data_device: Path | None = None
    metadata_device: Path | None = None

    def users_dir(self) -> Path:
        return self.pool_dir / "users"

    def area(self, uid: int) -> Path:
        """A sudo caller's own area: pool image, mount point, imported volumes."""
        return self.users_dir() / str(uid)

    def tool(self, name: str) -> str:
        """The checked absolute path of tool ``name`` (for ``helper.run``)."""
        return check_tool(name, self.tools.get(name) or Path(DEFAULT_TOOLS.get(name, "")))


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


def check_file(path: Path) -> bytes:
    """Read a config file that must be trusted; refuse symlinks and loose permissions."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise NotFound(f"{path} does not exist", "") from None
    if stat.S_ISLNK(st.st_mode):
        raise UntrustedConfig(f"refusing config {path}: it is a symlink",
                              "replace it with a regular root-owned file")
    if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise UntrustedConfig(f"refusing config {path}: not a root-owned regular file "
                              "writable only by root", f"chown root:root {path}; "
                              f"chmod 0644 {path}")
    check_dirs(path.parent)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fst = os.fstat(fd)
        if (fst.st_ino, fst.st_dev) != (st.st_ino, st.st_dev):
            raise UntrustedConfig(f"config {path} changed while being read", "retry")
        return os.read(fd, 1 << 20)
    finally:
        os.close(fd)


def parse(text: bytes, path: Path | None = None) -> Config:
    """A ``Config`` from TOML bytes (pure apart from nothing: tools are checked on use)."""
    where = str(path) if path else "config"
    try:
        data = tomllib.loads(text.decode("utf-8"))
        doc = ConfigFile.model_validate(data)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UntrustedConfig(f"{where} is not valid TOML: {e}", "fix the file") from None
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise UntrustedConfig(f"{where}: {loc}: {err['msg']}",
                              "see docs/helper.md for the config reference") from None
    tools: dict[str, Path] = {}
    for name, p in doc.tools.items():
        if name not in BASENAMES:
            raise UntrustedConfig(f"{where}: unknown tool {name!r}",
                                  "known tools: " + ", ".join(sorted(BASENAMES)))
        tp = Path(p)
        want = BASENAMES[name]
        if not tp.is_absolute() or ".." in tp.parts or not (
                want in tp.name if name == "firecracker" else tp.name == want):
            raise UntrustedConfig(f"{where}: tool {name} = {p!r} must be an absolute path "
                                  f"named {want!r}", "fix [tools]")
        tools[name] = tp
    first, count = doc.jails.uid_gid_range
    return Config(tools=tools, uid_first=first, uid_count=count,
                  cgroup_parent=doc.jails.cgroup_parent,
                  chroot_base=Path(doc.jails.chroot_base),
                  sources=tuple(Path(s) for s in doc.jails.sources),
                  pool_dir=Path(doc.pool.directory), backend=doc.pool.backend, path=path,
                  net=doc.net,
                  data_device=Path(doc.pool.data_device) if doc.pool.data_device else None,
                  metadata_device=Path(doc.pool.metadata_device)
                  if doc.pool.metadata_device else None)


def load(candidates: tuple[Path, ...] = CANDIDATES) -> Config:
    """The first candidate that exists (checked), else the built-in defaults."""
    for path in candidates:
        try:
            os.lstat(path)
        except FileNotFoundError:
            continue
        cfg = parse(check_file(path), path)
        for name, tp in cfg.tools.items():  # configured tools: checked now, not on use
            check_tool(name, tp)
        return cfg
    return parse(b"", None)
