"""Op ``jail-export-disk``: a caller's Firecracker jail's writable disk out to a file the
caller passes open (warm start's save, docs/warm.md, docs/helper.md).

Why an op: a sudo caller's VM never writes the caller's snapshot. ``jail-stage`` gives
the VM a private copy (``rootfs.ext4`` in the chroot, the VM uid's, 0600), so what the
guest wrote before it was paused is only there — a warm image must hold that disk, not
the snapshot it was staged from (the saved memory's page cache describes the disk the
guest wrote; the other one would corrupt its filesystem after a restore).

As ``jail-export`` (``helper.ops.jailfiles``), through the same code
(``snapfiles.export_file``): only the caller's own jail (its claim), the jail directory
still the one the claim records; the caller never names a path: the jail's file is
reached from the root-owned jail directory down (``safepath.open_beneath``: no symlinks,
no magic links) as an ``O_PATH`` fd, checked — a regular file owned by the jail's VM uid
with one link (a sudo caller's is always a private copy; root in-process has its own
snapshot hard-linked there: two links) — before root opens it for reading; the bytes move
in a child with the caller's uid only, into ``snapfiles.check_dest``'s destination (the
caller's own empty regular file open for writing). What is copied is bounded by
``[limits] jail_bytes``: the copy came into the jail charged against it, and a
Firecracker block device never grows its file. Holes stay holes.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from helper import cgattach
from helper.jail import snapfiles
from helper.jail.jailer import JailConfig
from helper.ops import jail as ops_jail
from helper.ops import jailfiles
from helper.ops.base import Ctx, KilnId, Op, Req, passed_fd

DISK = snapfiles.DISK  # runner.vmm.fcapi.ROOTFS: a file-backed root drive's name


class JailExportDisk(Req):
    """Copy the caller's jail's disk (``rootfs.ext4``) into a file the caller passes open
    (its own, empty, open for writing)."""

    vm: KilnId = Field(description="the VM (= jail) id (a jail the caller staged)")
    fd: int = Field(ge=3, le=255, description="the destination file descriptor")


def export_disk(cfg: JailConfig, jail_id: str, vm_uid: int, dst_fd: int, *,
                single_link: bool, cap: int | None, ident: list[int] | None = None,
                caller: tuple[int, int] | None = None) -> int:
    """Copy the jail's ``rootfs.ext4`` into ``dst_fd`` (checked by ``check_dest``) the way
    ``jail-export`` copies a snapshot file (``snapfiles.export_file``: the claim's jail
    directory, the file checked by an ``O_PATH`` fd before root opens it, the bytes moved
    as the caller); its size."""
    return snapfiles.export_file(cfg, jail_id, DISK, vm_uid, dst_fd, cap, ident=ident,
                                 caller=caller, single_link=single_link)


@cgattach.held
def jail_export_disk(ctx: Ctx, req: JailExportDisk) -> dict[str, Any]:
    claim = ops_jail.check_jail_owner(ctx, req.vm)
    passed_fd(req.fd, "pass the destination file open")
    snapfiles.check_dest(req.fd, None if ctx.trusted else ctx.caller_uid)
    size = export_disk(ops_jail.jail_config(ctx), req.vm, jailfiles.vm_ids(ctx, claim, req.vm)[0],
                       req.fd, single_link=not ctx.trusted,
                       cap=None if ctx.trusted else ctx.cfg.limits.jail_bytes,
                       ident=jailfiles.claim_ident(ctx, claim, req.vm),
                       caller=jailfiles.copy_caller(ctx))
    return {"bytes": size}


OPS: dict[str, tuple[type[Req], Op]] = {
    "jail-export-disk": (JailExportDisk, jail_export_disk),
}
