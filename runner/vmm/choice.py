"""Which VMM a VM gets: ``--vmm auto|qemu|firecracker`` against the host.

* ``choose`` (pure): the decision and the sentence ``kiln ps`` shows as ``vmm_reason``;
* ``kvm_verdict``: whether KVM runs a guest (``builder.probes.kvm``, ~0.7 s when KVM is
  emulated), cached for the current boot under ``ROOT/kernels``; QEMU's accelerator
  choice uses the same verdict;
* ``pick``: ``auto`` asks KVM first (no Firecracker without KVM), then the trusted config
  (``helper.config``: ``[tools]`` firecracker + jailer, ``[jails]``) for a usable
  ``JailConfig``. Kept apart from ``runner.vmm.firecracker`` so that a QEMU run imports neither
  the Firecracker driver nor (when KVM cannot run a guest) pydantic: start-up time is a
  benchmark target.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from builder.root import Root
from helper.base.errors import KilnError, NotFound, UsageError
from runner.tempfiles import write_atomic

if TYPE_CHECKING:
    from helper.jail.jailer import JailConfig

log = logging.getLogger("kiln.vm")


# -- the choice (pure) ------------------------------------------------------------------------

def choose(requested: str, fc_problem: str | None, kvm_problem: str | None
           ) -> tuple[str, str]:
    """(vmm, why) for ``--vmm requested``. ``fc_problem``: why Firecracker is not usable
    (None: configured); ``kvm_problem``: why KVM cannot run a guest (None: it can)."""
    if requested not in ("auto", "qemu", "firecracker"):
        raise UsageError(f"unknown --vmm {requested!r}", "use auto, qemu or firecracker")
    if requested == "qemu":
        return "qemu", "--vmm qemu"
    if requested == "firecracker":
        if fc_problem is not None:
            raise NotFound(f"firecracker is not configured: {fc_problem}",
                           "set [tools] firecracker and jailer in /etc/kiln/config.toml, or "
                           "use --vmm qemu")
        if kvm_problem is not None:
            return "firecracker", f"--vmm firecracker (KVM cannot run a guest: {kvm_problem})"
        return "firecracker", "--vmm firecracker"
    if kvm_problem is not None:  # first: `pick` asks KVM before loading the config
        return "qemu", f"--vmm auto chose qemu: KVM cannot run a guest ({kvm_problem})"
    if fc_problem is not None:
        return "qemu", f"--vmm auto chose qemu: firecracker is not configured ({fc_problem})"
    return "firecracker", "--vmm auto chose firecracker: configured, and KVM runs a guest"


def kvm_problem(detail: str) -> str:
    """The KVM probe's finding without its claim that no guest would boot: QEMU boots
    guests without KVM, under TCG (as ``builder.doctor.kvm_problem``; importing the doctor
    here would cost `kiln run`'s start-up)."""
    return re.sub(r"[;:,]?\s*a guest kernel would not boot", "", detail).rstrip(" ;:,")


def kvm_verdict(root: Root) -> tuple[bool, str]:
    """(KVM runs a guest, why not). The probe costs ~0.7 s when KVM is emulated, so the
    verdict is cached for the current boot (keyed by the boot id)."""
    from builder import probes

    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = ""
    cache = root.path / "kernels" / f"kvm-{boot_id}.json"
    if boot_id:
        with contextlib.suppress(OSError, ValueError, KeyError):
            doc = json.loads(cache.read_text())
            return bool(doc["ok"]), kvm_problem(str(doc["reason"]))
    p = probes.kvm()
    verdict = (bool(p.ok), "" if p.ok else kvm_problem(str(p.detail)))
    if boot_id:
        with contextlib.suppress(OSError):
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(cache, json.dumps({"ok": verdict[0], "reason": verdict[1]}).encode())
    return verdict


def pick(root: Root, requested: str) -> tuple[str, str, Any]:
    """(vmm, why, jail config or None). Firecracker needs the trusted config to name it
    and, for ``auto``, KVM that runs a guest (probed once per boot). ``auto`` asks KVM
    first: when it cannot run a guest the answer is QEMU whatever the config says, and
    the trusted config (pydantic, ~100 ms) is not loaded on that path."""
    if requested == "qemu":
        return "qemu", "--vmm qemu", None
    kvm_problem = None
    if requested == "auto":
        ok, why = kvm_verdict(root)
        if not ok:
            vmm, reason = choose(requested, None, why)
            log.info("vmm: %s", reason)
            return vmm, reason, None
    cfg, problem = config_problem(root.path)
    if problem is None and requested != "auto":
        ok, why = kvm_verdict(root)
        kvm_problem = None if ok else why
    vmm, reason = choose(requested, problem, kvm_problem)
    log.info("vmm: %s", reason)
    if vmm == "firecracker" and kvm_problem is not None:
        log.warning("KVM cannot run a guest here (%s): the VM will not boot", kvm_problem)
    return vmm, reason, cfg


# -- configuration ----------------------------------------------------------------------------

def jail_config(root_dir: Path) -> JailConfig:
    """The jail configuration from the trusted config (``helper.config``): the same one
    kiln-helper uses. Raises when a tool is missing or untrusted."""
    from helper import cgroup as cg
    from helper import config as hconfig
    from helper.jail import jailer as jail

    c = hconfig.load()
    firecracker = Path(c.tool("firecracker"))
    cfg = jail.JailConfig(
        jailer=Path(c.tool("jailer")), firecracker=firecracker,
        chroot_base=c.chroot_base, uid_first=c.uid_first, uid_count=c.uid_count,
        sources=(root_dir, *c.sources), cgroup=cg.CgroupConfig(parent=c.cgroup_parent))
    return jail.check_config(cfg)


def config_problem(root_dir: Path) -> tuple[JailConfig | None, str | None]:
    try:
        return jail_config(root_dir), None
    except KilnError as e:
        return None, e.message
