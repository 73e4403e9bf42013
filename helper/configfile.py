"""The trusted config file's schema (pydantic), and ``parse``: TOML bytes → ``Config``.

Imported only when a config file exists (``helper.config.load``) or a test parses one:
pydantic costs ~100 ms of start-up, and `kiln run` without a config file (the built-in
defaults, ``helper.config.DEFAULTS``) must not pay it. The defaults themselves are
``helper.configbase``'s constants, so both paths agree (a test compares them).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from helper.configbase import (
    BASENAMES,
    DEFAULT_BACKEND,
    DEFAULT_CGROUP_PARENT,
    DEFAULT_CHROOT_BASE,
    DEFAULT_POOL_DIR,
    DEFAULT_UID_RANGE,
    Config,
    Limits,
    UntrustedConfig,
)
from helper.net.config import NetSection

_ABS_RE = r"^/[A-Za-z0-9._+/-]{1,255}$"
_CGROUP_RE = r"^[a-z0-9][a-z0-9_.-]{0,63}(/[a-z0-9][a-z0-9_.-]{0,63}){0,7}$"


class JailsSection(BaseModel):
    """``[jails]``: where Firecracker jails and VM cgroups live, which uids VMs get."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uid_gid_range: tuple[int, int] = Field(
        default=DEFAULT_UID_RANGE,
        description="first VM uid/gid and how many: [first, first + count); never 0")
    cgroup_parent: str = Field(default=DEFAULT_CGROUP_PARENT, pattern=_CGROUP_RE,
                               description="relative cgroup path every VM cgroup lives under")
    chroot_base: str = Field(default=DEFAULT_CHROOT_BASE, pattern=_ABS_RE,
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

    directory: str = Field(default=DEFAULT_POOL_DIR, pattern=_ABS_RE,
                           description="root-owned base; a sudo caller's area is "
                           "DIRECTORY/users/<uid>")
    backend: Literal["auto", "reflink", "copy", "dm-thin"] = Field(
        default=DEFAULT_BACKEND, description="backend for sudo callers' pools")
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


class LimitsSection(BaseModel):
    """``[limits]``: per-caller caps for sudo callers (``helper.configbase.Limits``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    jails: int = Field(default=Limits.jails, ge=0, le=4096,
                       description="Firecracker jails one caller may hold")
    jail_bytes: int = Field(default=Limits.jail_bytes, ge=0, le=1 << 50,
                            description="bytes the helper may copy into one caller's jails "
                            "(private copies of its snapshots and unreadable files)")
    cgroups: int = Field(default=Limits.cgroups, ge=0, le=4096,
                         description="VM cgroups one caller may hold")
    pool_bytes: int = Field(default=Limits.pool_bytes, ge=256 << 20, le=1 << 50,
                            description="largest pool image or thin data file of a caller")
    pool_margin_percent: int = Field(default=Limits.pool_margin_percent, ge=0, le=90,
                                     description="share of the pool directory's filesystem "
                                     "kept free of every caller's promised image bytes")
    import_bytes: int = Field(default=Limits.import_bytes, ge=1 << 20, le=1 << 50,
                              description="largest volume a caller may import")
    cpu_seconds: int = Field(default=Limits.cpu_seconds, ge=10, le=86400,
                             description="CPU seconds one op may use (RLIMIT_CPU)")
    request_bytes: int = Field(default=Limits.request_bytes, ge=1024, le=1 << 20,
                               description="largest request a caller may send")
    audit_bytes_per_day: int = Field(default=Limits.audit_bytes_per_day, ge=4096,
                                     le=1 << 30, description="audit log bytes one uid may "
                                     "add per UTC day (further lines are dropped, one "
                                     "'rate-limited' line says so)")


class ConfigFile(BaseModel):
    """The whole ``/etc/kiln/config.toml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tools: dict[str, str] = Field(default_factory=dict,
                                  description="[tools]: tool name -> absolute path")
    jails: JailsSection = Field(default_factory=JailsSection, description="[jails]")
    pool: PoolSection = Field(default_factory=PoolSection, description="[pool]")
    net: NetSection | None = Field(
        default=None, description="[net]; absent: no networking (`--net tap` refused)")
    limits: LimitsSection = Field(default_factory=LimitsSection, description="[limits]")


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
                  net_section=doc.net,
                  data_device=Path(doc.pool.data_device) if doc.pool.data_device else None,
                  metadata_device=Path(doc.pool.metadata_device)
                  if doc.pool.metadata_device else None,
                  limits=Limits(**doc.limits.model_dump()))
