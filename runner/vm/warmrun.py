"""Warm start's commands (docs/warm.md): ``kiln warm create`` and ``kiln run --warm``.

* ``key_for``: the ``builder.warm.WarmKey`` of a run — the volume, the kernel's and
  initrd's contents, kiln's init (init.sh, the agent's sources, busybox), memory, cpus,
  disk size and what the VMM's driver says (``Driver.warm_facts``: its name, its binary's
  version, the accelerator, CPU model, device set and kernel command line; the VMM is
  ``choice.pick``'s, never decided here); the file hashes and the version cached by path,
  inode, size and mtime (``runner.facts``).
* ``create``: under the key's flock, an existing image is returned as is; else one VM is
  run through the lifecycle with ``WarmPlan("save")`` into a ``Root.workdir`` (removed by
  recovery if kiln dies), which ``builder.warm.publish`` renames into ``ROOT/warm/<id>``.
  The VM's record and snapshot go at its end (``--rm``), like any run's.
  A new image then prunes the oldest others to fit ``KILN_WARM_MAX``
  (``builder.warm.prune``), said on stderr.
* ``run``: the matching image (made first when there is none, said on stderr), then the
  lifecycle with ``WarmPlan("restore")``; a restore that fails (``WarmFailed``: with
  ``--detach`` the owner's, raised in the parent before the id is printed) is said in one
  line and the run boots cold. Options the key cannot carry are refused: ``--init
  image`` (nothing of kiln's to wake), a dm-thin pool (its snapshots are devices: no clone
  of the image's disk file yet), and what the driver refuses (Firecracker: ``--net user``,
  ``-i``). The VM a warm image is saved from runs with the ``--net`` the driver names
  (``WarmFacts.save_net``: Firecracker's ``--net tap`` images are saved on the kiln
  network, so the saved NIC had a tap; never with ``-p``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable
from typing import Any

from builder import warm
from builder.root import Root
from builder.units import format_size
from helper.base.errors import KilnError, UsageError
from runner.vm import lifecycle
from runner.vm.spec import RunOptions, WarmPlan
from runner.vmm import choice as vmmchoice
from runner.vmm.driver import Driver
from runner.vmm.qemuwarm import WarmFailed

log = logging.getLogger("kiln.vm")


def key_for(root: Root, volume_id: str, opts: RunOptions,
            driver: Driver[Any] | None = None) -> warm.WarmKey:
    """The warm key of ``opts`` on ``driver``'s VMM (its ``warm_facts``: the VMM's name,
    binary, accelerator, CPU model and device set; ``choice.driver_for`` decides which)."""
    from runner import guest_init, kernel
    from runner.facts import FileFacts
    from runner.guest_init import agentbin

    if driver is None:
        driver = _driver(root, opts)[1]
    vmm = driver.warm_facts(opts)
    files = kernel.boot_files(root.path / "kernels", opts.kernel, opts.initrd)
    facts = FileFacts(root)
    init = hashlib.sha256(guest_init.init_script())  # kiln's init, agent, busybox
    init.update(agentbin.source_bytes())
    init.update(facts.sha256(guest_init.BUSYBOX).encode())
    key = warm.WarmKey(
        volume=volume_id, kernel_sha256=facts.sha256(files.kernel),
        initrd_sha256=facts.sha256(files.initrd), init_sha256=init.hexdigest(),
        vmm=vmm.vmm, vmm_version=facts.version(vmm.binary), accel=vmm.accel,
        cpu_model=vmm.cpu_model,
        memory_mib=opts.memory >> 20, cpus=opts.cpus, disk_size=opts.disk_size,
        devices=vmm.devices, cmdline=vmm.cmdline)
    facts.save()
    return key


def _driver(root: Root, opts: RunOptions) -> tuple[str, Driver[Any]]:
    """The VMM (``choice.pick``: ``auto`` asks KVM and the config) and its driver."""
    vmm, _, cfg = vmmchoice.pick(root, opts.vmm)
    return vmm, vmmchoice.driver_for(root, vmm, cfg)


def _check(root: Root, opts: RunOptions) -> tuple[RunOptions, Driver[Any]]:
    """``opts`` with the VMM decided, and its driver; refuses what cannot be warm."""
    from builder.pool import open_pool

    if opts.init != "kiln":
        raise UsageError("--warm needs kiln's init", "drop --init image")
    pool = open_pool(root.path)
    if pool is not None and pool.config.backend == "dm-thin":
        raise UsageError("warm start needs a reflink or copy pool (not dm-thin, yet)",
                         "run without --warm, or `kiln pool init --backend reflink`")
    vmm, driver = _driver(root, opts)
    opts = dataclasses.replace(opts, vmm=vmm)
    driver.warm_facts(opts)  # refuses what this VMM's warm runs cannot do
    return opts, driver


def create(root: Root, source: str, opts: RunOptions, registry_opts: Any,
           say: Callable[[str], None] = print) -> tuple[warm.WarmRecord, bool]:
    """The warm image for ``source`` with ``opts``' key: (record, made now). A new image
    prunes the oldest others to fit ``KILN_WARM_MAX`` (said on ``say``)."""
    cap = warm.max_bytes()
    root.ensure()
    opts, driver = _check(root, opts)
    rec, made = _create(root, source, opts, registry_opts, driver)
    if made:
        plan = warm.prune(root, rec, cap)
        for gone in plan.remove:
            say(f"kiln: removed warm image {gone[:12]} (the oldest: {warm.MAX_ENV} is "
                f"{format_size(cap)})")
        if plan.over:
            say(f"kiln: warning: this warm image alone ({format_size(rec.bytes)}) is larger "
                f"than {warm.MAX_ENV} ({format_size(cap)}); kept, every other removed")
    return rec, made


def _create(root: Root, source: str, opts: RunOptions, registry_opts: Any,
            driver: Driver[Any]) -> tuple[warm.WarmRecord, bool]:
    volume = lifecycle.resolve_volume(root, source, registry_opts)
    image_id = warm.key_id(key_for(root, volume.id, opts, driver))
    with warm.key_lock(root, image_id):
        found = warm.find(root, image_id)
        if found is not None:
            return found, False
        vmm = driver.warm_facts(opts)
        with root.workdir("warm") as work:
            mem = work / warm.MEM if vmm.mem_file else None
            plan = WarmPlan("save", work / warm.STATE, work / warm.DISK, mem)
            # Firecracker's NIC is saved on a tap (the kiln network, no -p); QEMU's on none
            save_opts = RunOptions(
                vmm=opts.vmm, cpus=opts.cpus, memory=opts.memory, disk_size=opts.disk_size,
                kernel=opts.kernel, initrd=opts.initrd, rm=True, command=("true",),
                net=vmm.save_net)
            code = lifecycle.run(root, volume.id, save_opts, registry_opts, warm=plan)
            if code != 0:
                raise KilnError(f"the warm image of {source} could not be made (exit {code})",
                                "see `kiln ps -a` and `kiln logs`; a cold `kiln run` boots")
            return warm.publish(root, work, image_id, volume.id, opts.vmm,
                                opts.memory >> 20, opts.cpus), True


def run(root: Root, source: str, opts: RunOptions, registry_opts: Any, *,
        on_ready: Any = None, say: Any = print) -> int:
    """``kiln run --warm``: restore from the matching warm image, or boot cold when the
    restore fails. ``say`` prints a line on stderr."""
    root.ensure()
    opts, driver = _check(root, opts)
    volume = lifecycle.resolve_volume(root, source, registry_opts)
    image_id = warm.key_id(key_for(root, volume.id, opts, driver))
    rec = warm.find(root, image_id)
    if rec is None:
        say(f"kiln: no warm image of {source} for these settings: making one")
        rec, _ = create(root, volume.id, opts, registry_opts, say)
    d = warm.image_dir(root, rec.id)
    warm.prefetch(d)  # read ahead while the VM is set up (its record, disk, cgroups, VMM)
    mem = d / warm.MEM if (d / warm.MEM).exists() else None  # the key says which
    plan = WarmPlan("restore", d / warm.STATE, d / warm.DISK, mem)
    try:
        return lifecycle.run(root, volume.id, opts, registry_opts, on_ready=on_ready,
                             warm=plan)
    except WarmFailed as e:
        say(f"kiln: warning: the warm restore failed ({e.message}); booting cold")
    return lifecycle.run(root, volume.id, opts, registry_opts, on_ready=on_ready)
