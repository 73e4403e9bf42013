"""Which kernel and initrd a VM boots.

Default: the host's Debian cloud kernel (``builder.doctor.find_kernel``) with kiln's
**minimal initrd** built from that kernel's own modules (``runner.initrd``; ~1 s faster
to the workload than Debian's generic initrd under TCG). ``--kernel`` picks another
kernel (its modules must be under /lib/modules/VERSION unless ``--initrd`` is given too);
``--initrd`` boots that initrd unchanged (it must honour ``root=`` and ``init=``).

``kind_of`` tells a bzImage from an ELF vmlinux with libmagic; QEMU boots either,
Firecracker needs the ELF (``runner/kernel_elf.py`` extracts it). ``boot_files`` keeps
libmagic's verdict in ``kernels/describe.json``, keyed by the file's identity (device,
inode, size, mtime, ctime): loading libmagic and its database costs ~25 ms of every
`kiln run`, and a kernel file does not change under the same identity. An ELF kernel's
release, read from its banner, is kept there the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from helper.base.errors import NotFound, UsageError

MODULES_ROOT = Path("/lib/modules")
_VERSION = re.compile(r"\bversion (\S+)")
_LINUX_VERSION = re.compile(rb"Linux version (\S+) ")


@dataclass(frozen=True)
class BootFiles:
    kernel: Path
    initrd: Path
    kind: str  # bzImage | elf
    version: str | None


def describe(path: Path) -> str:
    import magic

    try:
        return str(magic.from_file(str(path)))
    except (OSError, magic.MagicException) as e:
        raise NotFound(f"cannot read kernel {path}: {e}", "give a readable kernel file") \
            from None


def _describe_cached(path: Path, cache_dir: Path) -> str:
    """``describe(path)``, remembered in ``cache_dir/describe.json`` by file identity."""
    return _cached(path, cache_dir, lambda: describe(path))


def _cached(path: Path, cache_dir: Path, compute: Callable[[], str], what: str = "") -> str:
    """``compute()``, a fact of the file ``path``, remembered in ``cache_dir/describe.json``
    by the file's identity; ``what`` names a fact other than libmagic's description. A
    file's new identity drops every fact of its old one."""
    from runner.tempfiles import write_atomic as atomic_write

    try:
        st = os.stat(path)
    except OSError as e:
        raise NotFound(f"cannot read kernel {path}: {e.strerror}", "give a readable kernel file") \
            from None
    identity = f"{path}:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
    key = f"{identity}#{what}" if what else identity
    cache = cache_dir / "describe.json"
    known: dict[str, str] = {}
    with contextlib.suppress(OSError, ValueError):
        doc = json.loads(cache.read_bytes())
        if isinstance(doc, dict):
            known = {k: v for k, v in doc.items() if isinstance(v, str)}
    if key in known:
        return known[key]
    value = compute()
    known = {k: v for k, v in list(known.items())[-15:]
             if not k.startswith(f"{path}:") or k == identity or k.startswith(f"{identity}#")}
    with contextlib.suppress(OSError):  # a cache: failing to write it costs only time
        cache_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, json.dumps({**known, key: value}, sort_keys=True).encode())
    return value


def kind_of(description: str) -> str | None:
    """bzImage | elf | None from a libmagic description (pure)."""
    if "Linux kernel" in description and "bzImage" in description:
        return "bzImage"
    if description.startswith("ELF ") and "executable" in description:
        return "elf"
    return None


_CHUNK = 4 << 20


def _elf_banner(path: Path) -> str | None:
    """The release in an ELF kernel's ``Linux version`` banner, read in 4 MiB chunks up to
    the first match within 64 MiB (Debian's 53 MB vmlinux has it ~19 MB in: reading the
    whole file took ~40 ms; ``boot_files`` keeps the answer by the file's identity)."""
    tail = b""
    with open(path, "rb") as f:
        for _ in range((64 << 20) // _CHUNK):
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            data = tail + chunk
            at = data.find(b"Linux version ")  # memchr-fast; the regex only where it is
            while at >= 0:
                found = _LINUX_VERSION.match(data, at)
                if found:
                    return found.group(1).decode("ascii", "replace")
                at = data.find(b"Linux version ", at + 1)
            tail = chunk[-256:]  # a banner across two chunks
    return None


def kernel_version(path: Path, description: str | None = None) -> str | None:
    """The kernel release (as in /lib/modules/RELEASE): from libmagic's description of a
    bzImage, else from the ``Linux version`` banner inside an ELF, else the file name."""
    desc = description if description is not None else describe(path)
    m = _VERSION.search(desc)
    if m and "bzImage" in desc:
        return m.group(1)
    if desc.startswith("ELF "):
        found = _elf_banner(path)
        if found:
            return found
    if path.name.startswith("vmlinuz-"):
        return path.name.removeprefix("vmlinuz-")
    return None


def boot_files(cache_dir: Path, kernel: Path | None = None, initrd: Path | None = None,
               *, modules_root: Path = MODULES_ROOT, boot: Path = Path("/boot")) -> BootFiles:
    """Resolve the kernel and initrd of a VM, building the minimal initrd when needed."""
    from builder.doctor import find_kernel
    from runner.initrd import ensure_initrd

    if kernel is None:
        found = find_kernel(boot)
        if found is None:
            raise NotFound(f"no Debian cloud kernel (vmlinuz-*-cloud-amd64) in {boot}",
                           "apt-get install linux-image-cloud-amd64, or pass --kernel and "
                           "--initrd")
        kernel = found[0]
    kernel = kernel.absolute()
    if not kernel.is_file():
        raise NotFound(f"kernel {kernel} not found", "give an existing file to --kernel")
    desc = _describe_cached(kernel, cache_dir)
    kind = kind_of(desc)
    if kind is None:
        raise UsageError(f"{kernel} is not a Linux kernel ({desc})",
                         "give a bzImage (vmlinuz-*) or an ELF vmlinux")
    if kind == "elf":  # read from the file: kept beside its description
        version = _cached(kernel, cache_dir, lambda: kernel_version(kernel, desc) or "",
                          "version") or None
    else:
        version = kernel_version(kernel, desc)
    if initrd is not None:
        initrd = initrd.absolute()
        if not initrd.is_file():
            raise NotFound(f"initrd {initrd} not found", "give an existing file to --initrd")
        return BootFiles(kernel, initrd, kind, version)
    if version is None or not (modules_root / version / "modules.dep").is_file():
        raise NotFound(f"no modules for kernel {kernel.name} "
                       f"(looked in {modules_root}/{version or '?'})",
                       "install the kernel's modules, or pass --initrd")
    built = ensure_initrd(cache_dir, modules_root / version)
    return BootFiles(kernel, built, kind, version)
