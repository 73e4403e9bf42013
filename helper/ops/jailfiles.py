"""Warm-start ops on a caller's Firecracker jail (docs/warm.md, docs/helper.md): its
snapshot files out (``jail-export``) and in (``jail-import``) through file descriptors
the caller passes (``sudo -C``), and its vsock socket to the caller (``jail-grant-vsock``).

Each acts only on the caller's own jail, by its claim (``ops_jail.check_jail_owner``: the
claim the caller's ``jail-stage`` wrote, the jail directory still that inode). What they
move is bounded: a memory file by the VM's own memory limit (the ``memory.max`` /
``memory.limit_in_bytes`` of the caller's VM cgroup, which already allows the guest's RAM
plus kiln's slack), a state file by ``snapfiles.STATE_MAX``; an import is also charged
against the caller's jail space (``[limits] jail_bytes``) like jail-stage's copies. A
refused request creates nothing: every check is made before the first byte is copied,
and an import's file lives inside the jail the claim already records (jail-remove takes
it). The file work itself is ``helper.jail.snapfiles``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Literal

from pydantic import Field

from helper import cgattach, claims, vmuids
from helper import cgroup as cg
from helper.base import safepath
from helper.base.errors import UsageError
from helper.jail import jailer as jail
from helper.jail import snapfiles
from helper.ops import jail as ops_jail
from helper.ops.base import Ctx, KilnId, Op, Req, passed_fd
from helper.ops.vm import CG_LOCK, check_owner

SnapName = Literal["vm.state", "vm.mem"]
_LIMIT_FILES = {2: "memory.max", 1: "memory.limit_in_bytes"}


def memory_cap(ctx: Ctx, vm: str) -> int:
    """The VM's memory limit from the caller's own VM cgroup (either version); refused
    when it has none: a sudo caller's cgroup always has one (cgroup-create)."""
    cfg = ops_jail.jail_config(ctx).cgroup
    for version, fname in _LIMIT_FILES.items():
        with contextlib.suppress(OSError, UsageError):
            dirs = cg.vm_dirs(cfg, vm, version, only=("memory",) if version == 1 else None)
            for d in dirs:
                fd = os.open(d / fname, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    text = os.read(fd, 64).decode().strip()
                finally:
                    os.close(fd)
                check_owner(ctx, vm, version)  # raises: not the caller's
                if text.isdigit():
                    return int(text)
    raise UsageError(f"refusing VM {vm}'s snapshot files: its cgroup has no memory limit",
                     "create the VM's cgroup with limits.memory_bytes (cgroup-create)")


def _cap(ctx: Ctx, vm: str, name: str) -> int | None:
    if ctx.trusted:
        return None  # root in-process: its own files
    return snapfiles.STATE_MAX if name == "vm.state" else memory_cap(ctx, vm)


class JailExport(Req):
    """Copy a snapshot file Firecracker wrote into the caller's jail to a file the caller
    passes open (its own, empty, open for writing)."""

    vm: KilnId = Field(description="the VM (= jail) id (a jail the caller staged)")
    name: SnapName = Field(description="the snapshot file in the jail's chroot")
    fd: int = Field(ge=3, le=255, description="the destination file descriptor")


@cgattach.held
def jail_export(ctx: Ctx, req: JailExport) -> dict[str, Any]:
    claim = ops_jail.check_jail_owner(ctx, req.vm)
    passed_fd(req.fd, "pass the destination file open")
    snapfiles.check_dest(req.fd, None if ctx.trusted else ctx.caller_uid)
    cfg = ops_jail.jail_config(ctx)
    vm_uid, _ = vm_ids(ctx, claim, req.vm)
    size = snapfiles.export_file(cfg, req.vm, req.name, vm_uid, req.fd,
                                 _cap(ctx, req.vm, req.name), ident=claim_ident(ctx, claim, req.vm),
                                 caller=copy_caller(ctx))
    return {"bytes": size}


def claim_ident(ctx: Ctx, claim: dict[str, Any], vm: str) -> list[int] | None:
    """The jail directory's (device, inode) the caller's claim records (checked by
    ``check_jail_owner``; the file work checks the directory it opens is still it)."""
    if ctx.trusted:
        return None
    ident = next(iter((claim.get("dirs") or {}).values()), None)
    if not isinstance(ident, list):
        raise UsageError(f"refusing jail {vm}: its claim names no directory",
                         "stage it again (jail-stage)")
    return ident


def copy_caller(ctx: Ctx) -> tuple[int, int] | None:
    """Whose rights the bytes move with: the sudo caller's (root in-process: its own)."""
    return None if ctx.trusted else (ctx.caller_uid, ctx.caller_gid)


def vm_ids(ctx: Ctx, claim: dict[str, Any], vm: str) -> tuple[int, int]:
    """The jail's VM uid/gid: the caller's jail claim, or (root in-process, no claim) the
    host-wide VM uid ledger jail-stage wrote (``helper.vmuids``)."""
    doc = claim if not ctx.trusted else claims.read(ctx.cfg.pool_dir, vmuids.LEDGER, vm) or {}
    uid, gid = doc.get("uid"), doc.get("gid")
    if not isinstance(uid, int) or not isinstance(gid, int):
        raise UsageError(f"jail {vm} has no VM uid on record", "stage it again (jail-stage)")
    return uid, gid


class JailImport(Req):
    """Copy a snapshot file the caller passes open (open for reading) into its jail, before
    the jail is launched: root's, readable by the VM's gid (0440)."""

    vm: KilnId = Field(description="the VM (= jail) id (a jail the caller staged)")
    name: SnapName = Field(description="the snapshot file to make in the jail's chroot")
    fd: int = Field(ge=3, le=255, description="the source file descriptor")


@cgattach.held
def jail_import(ctx: Ctx, req: JailImport) -> dict[str, Any]:
    claim = ops_jail.check_jail_owner(ctx, req.vm)
    passed_fd(req.fd, "pass the snapshot file open")
    size = snapfiles.check_source(req.fd, _cap(ctx, req.vm, req.name))
    cfg = ops_jail.jail_config(ctx)
    _, gid = vm_ids(ctx, claim, req.vm)
    with contextlib.ExitStack() as stack:
        if not ctx.trusted:
            ops_jail.copy_budget(ctx, cfg, stack).spend(size, f"{req.name} of VM {req.vm}")
        snapfiles.import_file(
            cfg, req.vm, req.name, gid, req.fd, size, ident=claim_ident(ctx, claim, req.vm),
            caller=copy_caller(ctx), launch_lock=lambda: safepath.root_lock(ctx.cfg.pool_dir,
                                                                        CG_LOCK))
    return {"bytes": size}


class JailGrantVsock(Req):
    """Give the VM's vsock socket (the control channel) to the caller's uid (0600)."""

    vm: KilnId = Field(description="the VM (= jail) id (a jail the caller staged)")


VSOCK_INNER = "/v.sock"  # runner.guest_init.vsock.UDS, in the chroot
VSOCK_OUTER = "vsock.sock"  # beside api.sock


@cgattach.held
def jail_grant_vsock(ctx: Ctx, req: JailGrantVsock) -> dict[str, Any]:
    ops_jail.check_jail_owner(ctx, req.vm)
    sock = jail.grant_socket(ops_jail.jail_config(ctx), req.vm, ctx.caller_uid,
                             ctx.caller_gid, VSOCK_INNER, VSOCK_OUTER)
    return {"socket": str(sock)}


OPS: dict[str, tuple[type[Req], Op]] = {
    "jail-export": (JailExport, jail_export),
    "jail-import": (JailImport, jail_import),
    "jail-grant-vsock": (JailGrantVsock, jail_grant_vsock),
}
