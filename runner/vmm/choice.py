"""Which VMM a VM gets — ``--vmm auto|qemu|firecracker`` against the host — and its driver.

* ``choose`` (pure): the decision and the sentence ``kiln ps`` shows as ``vmm_reason``;
* ``pick``: ``auto`` asks KVM first (``runner.vmm.qemuargv.kvm_verdict``, cached per boot;
  no Firecracker without KVM), then the trusted config (``helper.config``: ``[tools]``
  firecracker + jailer, ``[jails]``) for a usable ``JailConfig``. A QEMU run imports
  neither the Firecracker driver nor (when KVM cannot run a guest) pydantic: start-up time
  is a benchmark target;
* ``driver_for``: the ``runner.vmm.driver.Driver`` of a VMM, for a new run (``pick``'s
  answer) or a record (``kiln stop``/``rm``, a failed setup, the reaper's removal) — the
  one place that asks which VMM a VM has.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from builder.root import Root
from helper.base.errors import KilnError, NotFound, UsageError
from runner.vmm.driver import Driver
from runner.vmm.qemuargv import kvm_verdict

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


# -- configuration and the driver -------------------------------------------------------------

def config_problem(root_dir: Path) -> tuple[JailConfig | None, str | None]:
    """(the jail config, None), or (None, why Firecracker is not usable)."""
    from runner.vmm import fcapi  # the jails' config: only once a Firecracker VM may be asked

    try:
        return fcapi.jail_config(root_dir), None
    except KilnError as e:
        return None, e.message


def driver_for(root: Root, vmm: str, cfg: JailConfig | None = None) -> Driver[Any]:
    """The driver of ``vmm`` (``pick``'s, with its jail config; or a record's, which loads
    the config when it needs it). Each driver module is imported only here: a QEMU run
    never imports Firecracker's."""
    if vmm == "firecracker":
        from runner.vmm import firecracker

        return firecracker.FirecrackerDriver(root, cfg)
    from runner.vmm import qemu

    return qemu.QemuDriver(root)
