"""``kiln doctor`` and ``kiln version``: what this host has, checked for real.

``versions()`` asks every tool for its version. ``checks()`` returns one ``Check`` per
capability, each decided by a real probe (``builder.probes``) or a real run of the tool,
with a concrete fix in ``hint`` when it fails. ``required`` marks what ``kiln build`` cannot
do without (the tools, a writable root, libmagic); the rest (KVM, a kernel, loop devices,
reflink, dm-thin, a registry) enables a feature or a faster path, and the CLI reports them
without failing. The CLI owns presentation and exit codes.
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from builder import probes, proc
from helper.base import toolenv

# tool -> args that print its version (mke2fs prints it to stderr, which version_of reads)
TOOLS: dict[str, tuple[str, ...]] = {
    "skopeo": ("--version",),
    "umoci": ("--version",),
    "mke2fs": ("-V",),
    "docker-registry": ("--version",),
    "qemu-system-x86_64": ("--version",),
    "qemu-img": ("--version",),
}
OPTIONAL_TOOLS: dict[str, tuple[str, ...]] = {  # listed only when installed
    "firecracker": ("--version",),
    "jailer": ("--version",),
}
REQUIRED_TOOLS = ("skopeo", "umoci", "mke2fs")
E2FSPROGS_MIN = (1, 47, 1)  # mke2fs -d reading a tarball arrived in 1.47.1
E2FSPROGS_HINT = "apt-get install -t bookworm-backports e2fsprogs"
KERNEL_HINT = "apt-get install linux-image-cloud-amd64"

_VERSION_RE = re.compile(r"\d+\.\d+(?:\.\d+)?")


@dataclass(frozen=True)
class Check:
    """One line of ``kiln doctor``: ``ok``, what was found, and how to fix it if not."""

    name: str
    ok: bool
    detail: str
    hint: str = ""
    required: bool = False


def parse_version(text: str) -> str:
    """The first dotted number in a tool's version line, else the line itself."""
    m = _VERSION_RE.search(text)
    return m.group(0) if m else text


def version_tuple(version: str) -> tuple[int, ...]:
    m = _VERSION_RE.search(version)
    return tuple(int(x) for x in m.group(0).split(".")) if m else ()


def kiln_version() -> str:
    import importlib.metadata  # ~10 ms (email.*): only where a version is printed

    try:
        return importlib.metadata.version("kiln-vm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def versions() -> dict[str, str]:
    """kiln's version and each tool's (``missing`` when not installed)."""
    out = {"kiln": kiln_version()}
    for tool, args in TOOLS.items():
        line = proc.version_of(tool, args)
        out[tool] = line if line in ("missing", "unknown") else parse_version(line)
    for tool, args in OPTIONAL_TOOLS.items():
        line = proc.version_of(tool, args)
        if line != "missing":
            out[tool] = parse_version(line)
    return out


def _kernel_version_key(path: Path) -> tuple[int, ...]:
    # vmlinuz-6.1.0-56-cloud-amd64 -> (6, 1, 0, 56)
    return tuple(int(x) for x in re.findall(r"\d+", path.name.removeprefix("vmlinuz-")))


def find_kernel(boot: Path = Path("/boot")) -> tuple[Path, Path] | None:
    """The newest readable Debian cloud kernel in ``boot`` and its initrd, or ``None``.

    The cloud flavour has virtio and ext4 built in, boots in a second and is what the
    runner is tested with. A kernel counts only with its matching ``initrd.img-VERSION``.
    """
    kernels = sorted(boot.glob("vmlinuz-*-cloud-amd64"), key=_kernel_version_key, reverse=True)
    for kernel in kernels:
        initrd = boot / f"initrd.img-{kernel.name.removeprefix('vmlinuz-')}"
        if initrd.is_file() and os.access(kernel, os.R_OK) and os.access(initrd, os.R_OK):
            return kernel, initrd
    return None


def check_kernel(boot: Path = Path("/boot")) -> Check:
    found = find_kernel(boot)
    if found is not None:
        return Check("kernel", True, f"{found[0]} + {found[1].name}")
    kernels = sorted(boot.glob("vmlinuz-*-cloud-amd64"))
    if kernels:
        detail = (f"{kernels[-1]} has no readable initrd.img-"
                  f"{kernels[-1].name.removeprefix('vmlinuz-')} (or is not readable)")
        hint = f"update-initramfs -c -k {kernels[-1].name.removeprefix('vmlinuz-')}"
    else:
        detail = f"no Debian cloud kernel (vmlinuz-*-cloud-amd64) in {boot}"
        hint = KERNEL_HINT
    return Check("kernel", False, detail, hint)


def check_tool(tool: str, args: tuple[str, ...]) -> Check:
    required = tool in REQUIRED_TOOLS
    line = proc.version_of(tool, args)
    if line == "missing":
        if tool in OPTIONAL_TOOLS:
            hint = (f"optional: put the {tool} release binary in /usr/local/bin "
                    "(kiln runs VMs with QEMU without it)")
        else:
            hint = f"apt-get install {toolenv.PACKAGES.get(tool, tool)}"
        return Check(tool, False, "not installed", hint, required)
    version = parse_version(line)
    if tool == "mke2fs" and version_tuple(version) < E2FSPROGS_MIN:
        want = ".".join(map(str, E2FSPROGS_MIN))
        return Check(tool, False, f"{version} is older than {want} (mke2fs -d needs tar input)",
                     E2FSPROGS_HINT, required)
    return Check(tool, True, version, "", required)


def check_root(root: Path) -> Check:
    """The root (or the nearest existing parent it would be created in) is writable."""
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.is_dir() and os.access(probe, os.W_OK | os.X_OK):
        detail = f"{root} is writable" if probe == root else f"{root} can be created in {probe}"
        return Check("root", True, detail, required=True)
    return Check("root", False, f"{probe} is not a writable directory",
                 f"choose another root with --root or KILN_ROOT, or chown {probe}", True)


def _reflink_dir(root: Path) -> Path:
    probe = root
    while not probe.is_dir() and probe != probe.parent:
        probe = probe.parent
    return probe


def check_registry(registry: str, timeout: float = 5.0) -> Check:
    """``GET /v2/`` answers 200 or 401 (the registry API is there)."""
    import ssl  # here, not at the top: `kiln run` imports this module for find_kernel
    import urllib.error
    import urllib.request

    name = f"registry {registry}"
    if "://" in registry:
        urls = [registry.rstrip("/") + "/v2/"]
    else:
        urls = [f"https://{registry}/v2/", f"http://{registry}/v2/"]
    errors = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=timeout,  # noqa: S310 - http(s) only
                                        context=ssl.create_default_context()) as resp:
                status = resp.status
        except urllib.error.HTTPError as e:
            status = e.code
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            errors.append(f"{url}: {reason}")
            continue
        if status in (200, 401):
            return Check(name, True, f"{url} answered {status}")
        errors.append(f"{url}: HTTP {status}")
    return Check(name, False, "; ".join(errors),
                 "start the registry or fix the address (HOST:PORT); a plain-HTTP registry "
                 "needs --tls-verify=false when pulling")


def check_magic() -> Check:
    try:
        # imported here so a missing libmagic is a failed check, not a crash
        magic = importlib.import_module("magic")
        kind = str(magic.from_buffer(b"#!/bin/sh\n", mime=True))
    except (ImportError, OSError, AttributeError) as e:
        return Check("libmagic", False, f"python-magic unusable: {e}",
                     "apt-get install libmagic1", True)
    if kind != "text/x-shellscript":
        return Check("libmagic", False, f"libmagic says a shell script is {kind}",
                     "apt-get install --reinstall libmagic1 libmagic-mgc", True)
    return Check("libmagic", True, "recognises file types", "", True)


def _probe_check(name: str, probe: probes.Probe, hint: str) -> Check:
    return Check(name, probe.ok, probe.detail, "" if probe.ok else hint)


KVM_HINT = ("for speed and Firecracker: enable hardware virtualization (or nested "
            "virtualization for a VM), modprobe kvm_intel or kvm_amd, and add the user to "
            "the kvm group")
_NO_BOOT = re.compile(r"[;:,]?\s*a guest kernel would not boot")


def kvm_problem(detail: str) -> str:
    """The KVM probe's finding without its claim that no guest would boot (QEMU boots
    guests without KVM, under TCG)."""
    return _NO_BOOT.sub("", detail).rstrip(" ;:,")


def check_kvm(probe: probes.Probe) -> Check:
    """KVM, said as what it means for kiln: without it QEMU VMs still boot, emulated."""
    if probe.ok:
        return Check("kvm", True, probe.detail, "")
    return Check("kvm", False, f"{kvm_problem(probe.detail)}; QEMU falls back to TCG "
                 "emulation (VMs boot, slower); Firecracker needs KVM", KVM_HINT)


def checks(root: Path, *, registry: str | None = None, boot: Path = Path("/boot")) -> list[Check]:
    """Every doctor check, in display order (tools first, then capabilities)."""
    out = [check_tool(tool, args) for tool, args in TOOLS.items()]
    out += [check_tool(tool, args) for tool, args in OPTIONAL_TOOLS.items()]
    out += [check_root(root), check_magic()]
    if registry is not None:
        out.append(check_registry(registry))
    reflink_dir = _reflink_dir(root)
    out += [
        _probe_check("loop devices", probes.loop_devices(),
                     "run as root (or via kiln-helper); modprobe loop"),
        _probe_check(f"reflink ({reflink_dir})", probes.reflink(reflink_dir),
                     "put the root on btrfs or XFS (mkfs.xfs -m reflink=1) for instant "
                     "snapshots; kiln falls back to dm-thin or full copies"),
        _probe_check("dm-thin", probes.dm_thin(),
                     "run as root and modprobe dm-thin-pool (apt-get install dmsetup)"),
        check_kvm(probes.kvm()),
        check_kernel(boot),
    ]
    return out
