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

What a configuration holds, its defaults and the tool checks are in ``helper.configbase``;
the file's schema (pydantic) is in ``helper.configfile``, imported only when a file exists.
Both import ``helper.configbase``, never this module.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from helper.base.errors import NotFound
from helper.configbase import (
    DEFAULT_BACKEND,
    DEFAULT_CGROUP_PARENT,
    DEFAULT_CHROOT_BASE,
    DEFAULT_POOL_DIR,
    DEFAULT_UID_RANGE,
    Config,
    UntrustedConfig,
    check_dirs,
    check_tool,
)

CANDIDATES = (Path("/etc/kiln/test-config.toml"), Path("/etc/kiln/config.toml"))

# The configuration without a config file: no TOML, no pydantic.
DEFAULTS = Config(tools={}, uid_first=DEFAULT_UID_RANGE[0], uid_count=DEFAULT_UID_RANGE[1],
                  cgroup_parent=DEFAULT_CGROUP_PARENT, chroot_base=Path(DEFAULT_CHROOT_BASE),
                  sources=(), pool_dir=Path(DEFAULT_POOL_DIR), backend=DEFAULT_BACKEND,
                  path=None)


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
    """A ``Config`` from TOML bytes (``helper.configfile``; tools are checked on use)."""
    from helper.configfile import parse as parse_file

    return parse_file(text, path)


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
    return DEFAULTS
