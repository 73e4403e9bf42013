"""Warm start's commands (docs/warm.md): ``kiln warm create`` and ``kiln run --warm``.

* ``key_for``: the ``builder.warm.WarmKey`` of a run — the volume, the kernel's and
  initrd's contents, kiln's init (init.sh, agent.c, busybox), QEMU's version, the
  accelerator and CPU model, memory, cpus, disk size and ``qemuargv.WARM_DEVICES``.
* ``create``: under the key's flock, an existing image is returned as is; else one VM is
  run through the lifecycle with ``WarmPlan("save")`` into a ``Root.workdir`` (removed by
  recovery if kiln dies), which ``builder.warm.publish`` renames into ``ROOT/warm/<id>``.
  The VM's record and snapshot go at its end (``--rm``), like any run's.
* ``run``: the matching image (made first when there is none, said on stderr), then the
  lifecycle with ``WarmPlan("restore")``; a restore that fails (``WarmFailed``) is said
  in one line and the run boots cold. Options the key cannot carry are refused: ``--init
  image`` (nothing of kiln's to wake), ``--vmm firecracker`` (not yet), a dm-thin pool
  (its snapshots are devices: no clone of the image's disk file yet).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Any

from builder import warm
from builder.root import Root
from helper.base.errors import KilnError, UsageError
from runner.vm import lifecycle
from runner.vm.spec import RunOptions, WarmPlan
from runner.vmm import qemuargv
from runner.vmm.qemuwarm import WarmFailed

log = logging.getLogger("kiln.vm")
QEMU = "qemu-system-x86_64"


def init_sha256() -> str:
    """kiln's part of every guest: init.sh, the agent's source, busybox."""
    from runner import guest_init
    from runner.guest_init import agentbin

    h = hashlib.sha256(guest_init.init_script())
    h.update(agentbin.SOURCE.read_bytes())
    h.update(warm.file_sha256(guest_init.BUSYBOX).encode())
    return h.hexdigest()


def key_for(root: Root, volume_id: str, opts: RunOptions) -> warm.WarmKey:
    from builder import proc
    from runner import kernel

    files = kernel.boot_files(root.path / "kernels", opts.kernel, opts.initrd)
    accel = qemuargv.host_accel(root)
    return warm.WarmKey(
        volume=volume_id, kernel_sha256=warm.file_sha256(files.kernel),
        initrd_sha256=warm.file_sha256(files.initrd), init_sha256=init_sha256(),
        vmm="qemu", vmm_version=proc.version_of(QEMU), accel=accel,
        cpu_model="host" if accel == "kvm" else "qemu64", memory_mib=opts.memory >> 20,
        cpus=opts.cpus, disk_size=opts.disk_size, devices=qemuargv.WARM_DEVICES)


def _check(root: Root, opts: RunOptions) -> None:
    from builder.pool import open_pool

    if opts.vmm == "firecracker":
        raise UsageError("warm start runs on QEMU only (for now)", "drop --vmm firecracker")
    if opts.init != "kiln":
        raise UsageError("--warm needs kiln's init", "drop --init image")
    pool = open_pool(root.path)
    if pool is not None and pool.config.backend == "dm-thin":
        raise UsageError("warm start needs a reflink or copy pool (not dm-thin, yet)",
                         "run without --warm, or `kiln pool init --backend reflink`")


def create(root: Root, source: str, opts: RunOptions, registry_opts: Any
           ) -> tuple[warm.WarmRecord, bool]:
    """The warm image for ``source`` with ``opts``' key: (record, made now)."""
    root.ensure()
    _check(root, opts)
    volume = lifecycle.resolve_volume(root, source, registry_opts)
    image_id = warm.key_id(key_for(root, volume.id, opts))
    with warm.key_lock(root, image_id):
        found = warm.find(root, image_id)
        if found is not None:
            return found, False
        with root.workdir("warm") as work:
            plan = WarmPlan("save", work / warm.STATE, work / warm.DISK)
            save_opts = RunOptions(
                vmm="qemu", cpus=opts.cpus, memory=opts.memory, disk_size=opts.disk_size,
                kernel=opts.kernel, initrd=opts.initrd, rm=True, command=("true",))
            code = lifecycle.run(root, volume.id, save_opts, registry_opts, warm=plan)
            if code != 0:
                raise KilnError(f"the warm image of {source} could not be made (exit {code})",
                                "see `kiln ps -a` and `kiln logs`; a cold `kiln run` boots")
            return warm.publish(root, work, image_id, volume.id, "qemu",
                                opts.memory >> 20, opts.cpus), True


def run(root: Root, source: str, opts: RunOptions, registry_opts: Any, *,
        on_ready: Any = None, say: Any = print) -> int:
    """``kiln run --warm``: restore from the matching warm image, or boot cold when the
    restore fails. ``say`` prints a line on stderr."""
    root.ensure()
    _check(root, opts)
    volume = lifecycle.resolve_volume(root, source, registry_opts)
    opts = dataclasses.replace(opts, vmm="qemu")
    image_id = warm.key_id(key_for(root, volume.id, opts))
    rec = warm.find(root, image_id)
    if rec is None:
        say(f"kiln: no warm image of {source} for these settings: making one")
        rec, _ = create(root, volume.id, opts, registry_opts)
    d = warm.image_dir(root, rec.id)
    plan = WarmPlan("restore", d / warm.STATE, d / warm.DISK)
    try:
        return lifecycle.run(root, volume.id, opts, registry_opts, on_ready=on_ready,
                             warm=plan)
    except WarmFailed as e:
        say(f"kiln: warning: the warm restore failed ({e.message}); booting cold")
    return lifecycle.run(root, volume.id, opts, registry_opts, on_ready=on_ready)
