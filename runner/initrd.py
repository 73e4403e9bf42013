"""A minimal initrd built from a kernel's own modules, cached by content hash.

Debian's generic initrd spends ~5 s of an ~8 s TCG boot in udev and RAID benchmarks. The
guest needs far less: the virtio transport and block/console drivers (ext4 is built into
the cloud kernel; when it is a module, it and its dependencies come along), a way to find
``/dev/vda``, and ``switch_root``. So the initrd is busybox-static as ``/init``'s shell, the
few ``.ko`` files in dependency order (resolved from ``modules.dep``; ``.ko.xz``/``.ko.zst``
are decompressed here, because busybox ``insmod`` takes raw ELF), and a ~40 line script.

Pure parts (tested directly): ``parse_modules_dep``, ``plan_modules`` (dependency order, the
builtin check), ``cpio_newc`` (a deterministic archive: mtime 0, inode numbers by position).
``ensure_initrd`` is the thin shell: hash every input, reuse ``ROOT/kernels/initrd-<hash>``
when present, else write it through a temp name + fsync + rename.

The initrd honours the usual ``root=``, ``rootfstype=`` and ``init=`` arguments and passes
microvm's ``virtio_mmio.device=`` arguments (which only ``modprobe`` would read from the
command line) to ``insmod`` itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import lzma
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from builder import proc
from helper.base.errors import KilnError, NotFound

FORMAT = 1  # bump when the layout or the script changes
BUSYBOX = Path("/bin/busybox")

# In load order; dependencies are added (and ordered) by plan_modules.
WANTED = ("virtio_mmio", "virtio_blk", "virtio_console", "ext4")
# virtio_pci: harmless on microvm, lets the initrd serve q35/pc too; virtio_net (+ failover,
# net_failover): --net user and --net tap, so eth0 exists before kiln's init configures it;
# vmw_vsock_virtio_transport (+ vsock, vmw_vsock_virtio_transport_common): the control
# channel on Firecracker (docs/run.md), modules on Debian's cloud kernel — loaded only when
# the command line names a vsock channel (kiln.ctl=vsock:PORT): their insmods are ~170 ms
# of every TCG boot
OPTIONAL = ("virtio_pci", "virtio_net", "vmw_vsock_virtio_transport")
APPLETS = ("sh", "mount", "umount", "cat", "insmod", "usleep", "sleep", "switch_root", "echo")

INIT_SCRIPT = r"""#!/bin/busybox sh
# kiln minimal initrd: load the virtio modules, mount the root, switch_root.
export PATH=/bin
mount -t proc proc /proc
mount -t devtmpfs devtmpfs /dev
root=/dev/vda
fstype=ext4
init=/sbin/init
flags=rw
mmio=""
vsock=""
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    kiln.ctl=vsock:*) vsock=1 ;;
    root=*) root="${arg#root=}" ;;
    rootfstype=*) fstype="${arg#rootfstype=}" ;;
    init=*) init="${arg#init=}" ;;
    ro) flags=ro ;;
    virtio_mmio.device=*) mmio="$mmio device=${arg#virtio_mmio.device=}" ;;
  esac
done
die() {
  echo "kiln-initrd: $*" >/dev/console
  echo o >/proc/sysrq-trigger
  sleep 5
  exit 1
}
while read -r mod; do
  case "$mod" in
    */virtio_mmio.ko) insmod "/$mod" $mmio ;;
    */vsock.ko | */vmw_vsock_*) [ -z "$vsock" ] || insmod "/$mod" ;;
    *) insmod "/$mod" ;;
  esac
done </lib/modules/load.order
i=0
while [ ! -b "$root" ]; do
  i=$((i + 1))
  [ "$i" -gt 1000 ] && die "no root device $root"
  usleep 5000
done
mount -t "$fstype" -o "$flags" "$root" /newroot || die "cannot mount $root"
umount /proc
if [ -d /newroot/dev ]; then mount --move /dev /newroot/dev; else umount /dev; fi
exec switch_root /newroot "$init"
die "switch_root to $init failed"
"""


@dataclass(frozen=True)
class Module:
    name: str  # normalised: dashes become underscores
    path: str  # relative to the modules directory, as modules.dep writes it
    deps: tuple[str, ...]  # relative paths


def module_name(rel: str) -> str:
    base = rel.rsplit("/", 1)[-1]
    for ext in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(ext):
            base = base[: -len(ext)]
            break
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, Module]:
    """``modules.dep`` → name → Module (pure)."""
    out: dict[str, Module] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, _, rest = line.partition(":")
        path = path.strip()
        mod = Module(module_name(path), path, tuple(rest.split()))
        out[mod.name] = mod
    return out


def parse_builtin(text: str) -> set[str]:
    return {module_name(line.strip()) for line in text.splitlines() if line.strip()}


def plan_modules(modules: Mapping[str, Module], builtin: set[str], wanted: Sequence[str],
                 optional: Sequence[str] = ()) -> list[str]:
    """Relative paths to load, every dependency before its dependents (pure).

    A wanted module that is neither a module nor built in is an error; an optional one
    is skipped.
    """
    by_path = {m.path: m for m in modules.values()}
    order: list[str] = []
    seen: set[str] = set()

    def visit(path: str, stack: tuple[str, ...]) -> None:
        if path in seen:
            return
        if path in stack:
            raise KilnError(f"modules.dep has a dependency cycle through {path}",
                            "regenerate it with depmod")
        mod = by_path.get(path)
        for dep in (mod.deps if mod else ()):
            visit(dep, (*stack, path))
        seen.add(path)
        order.append(path)

    for name in [*wanted, *optional]:
        key = name.replace("-", "_")
        if key in builtin:
            continue
        mod = modules.get(key)
        if mod is None:
            if name in optional:
                continue
            raise NotFound(f"kernel module {name} is neither built in nor in modules.dep",
                           "use a kernel with virtio and ext4 support, or pass --initrd")
        visit(mod.path, ())
    return order


# -- cpio (newc) ---------------------------------------------------------------------------

@dataclass(frozen=True)
class CpioEntry:
    name: str  # without a leading slash
    mode: int  # full st_mode (type bits included)
    data: bytes = b""


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def cpio_newc(entries: Iterable[CpioEntry]) -> bytes:
    """A deterministic newc archive: owner 0, mtime 0, inode numbers by position (pure)."""
    out = bytearray()

    def header(ino: int, mode: int, nlink: int, size: int, name: bytes) -> None:
        fields = (ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, len(name) + 1, 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields))
        out.extend(name + b"\0")
        out.extend(_pad4(110 + len(name) + 1))

    for ino, e in enumerate(entries, start=1):
        name = e.name.encode()
        is_dir = (e.mode & 0o170000) == 0o040000
        header(ino, e.mode, 2 if is_dir else 1, len(e.data), name)
        out.extend(e.data)
        out.extend(_pad4(len(e.data)))
    header(0, 0, 1, 0, b"TRAILER!!!")
    out.extend(b"\0" * (-len(out) % 512))
    return bytes(out)


def read_module(path: Path) -> bytes:
    """A module's raw ELF bytes (busybox insmod cannot decompress)."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        return proc.run("zstd", ["--decompress", "--stdout", str(path)], timeout=60).stdout
    if path.name.endswith(".gz"):
        import gzip

        return gzip.decompress(data)
    return data


def initrd_entries(busybox: bytes, modules: Sequence[tuple[str, bytes]]) -> list[CpioEntry]:
    """The initrd's files: busybox + sh, the script, the modules and their load order."""
    d, f, x, ln = 0o040755, 0o100644, 0o100755, 0o120777
    entries = [CpioEntry(n, d) for n in ("bin", "dev", "proc", "sys", "newroot", "lib",
                                         "lib/modules")]
    entries.append(CpioEntry("bin/busybox", x, busybox))
    # Applets by name: the busybox shell finds applets through /proc/self/exe, which does
    # not exist before /proc is mounted.
    entries += [CpioEntry(f"bin/{a}", ln, b"busybox") for a in APPLETS]
    entries.append(CpioEntry("init", x, INIT_SCRIPT.encode()))
    names: list[str] = []
    for rel, data in modules:
        name = f"lib/modules/{module_name(rel)}.ko"
        names.append(name)
        entries.append(CpioEntry(name, f, data))
    entries.append(CpioEntry("lib/modules/load.order", f, "".join(n + "\n" for n in names)
                             .encode()))
    return entries


def _identity(p: Path) -> str:
    """Path, size and mtime: what the stat indexes below key on (a missing file counts)."""
    try:
        stt = p.stat()
    except FileNotFoundError:
        return f"{p}\0-\0"
    return f"{p}\0{stt.st_size}\0{stt.st_mtime_ns}\0"


def module_plan(cache_dir: Path, modules_dir: Path) -> list[str]:
    """The modules to load (``plan_modules`` over the kernel's modules.dep), remembered per
    identity of modules.dep and modules.builtin: parsing modules.dep (~6000 lines) costs
    ~11 ms of every ``kiln run``; depmod rewrites the file whenever a module changes."""
    dep_path = modules_dir / "modules.dep"
    if not dep_path.is_file():
        raise NotFound(f"no modules.dep in {modules_dir}",
                       "install the kernel's modules (linux-image-*) or pass --initrd")
    key = hashlib.sha256(f"{FORMAT}\n{WANTED}\n{OPTIONAL}\n{_identity(dep_path)}"
                         f"{_identity(modules_dir / 'modules.builtin')}".encode())
    remembered = cache_dir / f"plan-{key.hexdigest()[:32]}.json"
    with contextlib.suppress(OSError, ValueError):
        doc = json.loads(remembered.read_text())
        if isinstance(doc, list) and all(isinstance(r, str) for r in doc):
            return doc
    try:
        builtin = parse_builtin((modules_dir / "modules.builtin").read_text())
    except FileNotFoundError:
        builtin = set()
    plan = plan_modules(parse_modules_dep(dep_path.read_text()), builtin, WANTED, OPTIONAL)
    with contextlib.suppress(OSError):  # only a cache: the next run parses again
        cache_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(remembered, json.dumps(plan).encode())
    return plan


def ensure_initrd(cache_dir: Path, modules_dir: Path, *, busybox: Path = BUSYBOX) -> Path:
    """The minimal initrd for the kernel whose modules are in ``modules_dir`` (cached)."""
    plan = module_plan(cache_dir, modules_dir)
    # Fast path: the same input files (by path, size, mtime) as a previous call name the
    # content-hashed initrd it made, without reading and hashing them again.
    quick = hashlib.sha256(f"{FORMAT}\n{INIT_SCRIPT}".encode())
    for p in (busybox, *(modules_dir / rel for rel in plan)):
        quick.update(_identity(p).encode())
    index = cache_dir / f"index-{quick.hexdigest()[:32]}"
    with contextlib.suppress(OSError):
        known = cache_dir / index.read_text().strip()
        if known.is_file():
            return known
    try:
        bb = busybox.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"{busybox} not found", "apt-get install busybox-static") from None
    mods = [(rel, read_module(modules_dir / rel)) for rel in plan]
    h = hashlib.sha256(f"kiln-initrd {FORMAT}\n".encode())
    for part in (bb, INIT_SCRIPT.encode(), *(x for rel, data in mods
                                               for x in (rel.encode(), data))):
        h.update(struct.pack("<Q", len(part)))
        h.update(part)
    dest = cache_dir / f"initrd-{h.hexdigest()[:32]}.cpio"
    cache_dir.mkdir(parents=True, exist_ok=True)
    if not dest.is_file():
        _atomic_write(dest, cpio_newc(initrd_entries(bb, mods)))
    _atomic_write(index, dest.name.encode())
    return dest


def _atomic_write(dest: Path, data: bytes) -> None:
    from runner.tempfiles import write_atomic  # a flock-ed temp file: crash recovery finds it

    write_atomic(dest, data)
