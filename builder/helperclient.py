"""How kiln asks for a privileged step: in-process as root, ``sudo -n kiln-helper OP`` otherwise.

``call(op, request, area=...)`` is the one entry point. As root (euid 0) it validates the
request with the same pydantic model and runs the same op function in this process,
confined to ``area`` (the kiln root). Otherwise it runs ``sudo -n -C N
/opt/kiln/bin/kiln-helper OP`` with the request on stdin (``-C``: keep an fd passed to
``volume-import`` open; the sudoers drop-in allows it for this command only), parses the
JSON answer and turns an error object back into the same ``KilnError`` subclass.

Paths: the helper takes paths relative to the caller's area; ``area(root)`` is the kiln
root for root, and the helper-made ``/var/lib/kiln/users/<uid>`` for everyone else.
``rel(area, path)`` turns an absolute path under it into the relative form.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from builder import proc
from helper.base import errors
from helper.base.errors import KilnError, UsageError
from helper.cgroup import Limits

if TYPE_CHECKING:  # the jailer's module is Firecracker's: a QEMU run does not import it
    from helper.jail.jailer import JailSpec, Staged, StageItem

HELPER = "/opt/kiln/bin/kiln-helper"
SUDO = "/usr/bin/sudo"
_ERRORS: dict[str, type[KilnError]] = {
    "UsageError": UsageError, "NotFound": errors.NotFound, "Conflict": errors.Conflict,
    "IntegrityError": errors.IntegrityError, "UidInUse": errors.UidInUse,
    "UntrustedConfig": KilnError,
}
_area_cache: dict[int, Path] = {}
# Reads a sudo caller's kiln may repeat within one command (a run lists its pool three
# times: its volumes, the snapshot sweep, the snapshot): each sudo round costs ~180 ms
# (sudo, an isolated python, pydantic), so one process asks once until it changes
# something. Another process's change since is like one made just after the answer.
_MEMO = frozenset({"pool-list"})
_memo: dict[str, dict[str, Any]] = {}


def privileged() -> bool:
    """Whether this process can run ops in-process."""
    return os.geteuid() == 0


def call(op: str, request: dict[str, Any], *, area: Path | None = None,
         pass_fd: int | None = None, timeout: float = 600) -> dict[str, Any]:
    """Run ``op``; ``area`` (required in-process) confines caller-named paths."""
    if privileged():
        from helper import config
        from helper.ops import registry as ops

        if area is None:
            raise UsageError(f"{op}: no area given", "internal error: pass the kiln root")
        model = ops.OPS[op][0] if op in ops.OPS else None
        if model is None:
            raise UsageError(f"unknown op {op!r}", "")
        req = model.model_validate_json(json.dumps(request))
        ctx = ops.Ctx(cfg=config.load(), area=area, caller_uid=0, caller_gid=0, trusted=True)
        return ops.run_op(ctx, op, req)
    if op in _MEMO:  # a read: this process asked it already, and has changed nothing since
        key = f"{op} {json.dumps(request, sort_keys=True)}"
        if key not in _memo:
            _memo[key] = _sudo(op, request, pass_fd, timeout)
        return dict(_memo[key])
    _memo.clear()  # any other op may change what a read answers
    return _sudo(op, request, pass_fd, timeout)


def sudo_argv(op: str, pass_fd: int | None = None) -> list[str]:
    """The exact argv kiln runs when not root (pure)."""
    argv = [SUDO, "--non-interactive"]  # -n: fail instead of asking for a password
    if pass_fd is not None:
        argv += ["--close-from", str(pass_fd + 1)]  # -C: keep the volume fd open
    return [*argv, "--", HELPER, op]


def _sudo(op: str, request: dict[str, Any], pass_fd: int | None,
          timeout: float) -> dict[str, Any]:
    argv = sudo_argv(op, pass_fd)
    # In kiln's session and without PDEATHSIG (sudo is setuid: the kernel drops it anyway):
    # a Ctrl-C reaches sudo, which relays it to the helper, which finishes the op first.
    # The environment is kiln's allowlisted one; sudo resets it and the helper scrubs it.
    child = proc.spawn(argv[0], argv[1:], stdin=proc.PIPE, stdout=proc.PIPE,
                       stderr=proc.PIPE, new_session=False, die_with_parent=False,
                       pass_fds=(pass_fd,) if pass_fd is not None else ())
    stdout, stderr = child.communicate(json.dumps(request).encode(), timeout)
    code = child.code
    out = stdout.decode("utf-8", "replace").strip()
    try:
        data = json.loads(out.splitlines()[-1]) if out else None
    except ValueError:
        data = None
    if code == 0 and isinstance(data, dict):
        return data
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        err = data["error"]
        cls = _ERRORS.get(str(err.get("type")), KilnError)
        raise cls(str(err.get("message")), str(err.get("hint") or ""))
    last = stderr.decode("utf-8", "replace").strip().splitlines()
    raise KilnError(f"kiln-helper {op} failed: {last[-1] if last else f'exit {code}'}",
                    "is kiln-helper installed (scripts/install-helper) and are you in the "
                    "kiln group? `sudo -n -l /opt/kiln/bin/kiln-helper` tells")


def area(root: Path) -> Path:
    """Where the privileged files of ``root``'s pool live (see module docstring)."""
    if privileged():
        return root
    uid = os.getuid()
    if uid not in _area_cache:
        _area_cache[uid] = Path(call("area", {})["path"])
    return _area_cache[uid]


def rel(area_dir: Path, path: Path | str) -> str:
    """``path`` relative to ``area_dir``: refuses anything outside it."""
    p = Path(os.path.abspath(path))
    for base in (area_dir, Path(os.path.realpath(area_dir))):
        try:
            r = p.relative_to(base)
        except ValueError:
            continue
        if str(r) != ".":
            return str(r)
    raise UsageError(f"{path} is outside {area_dir}", "kiln only hands the helper paths "
                     "inside its own area")


# -- typed wrappers the pool backends use -----------------------------------------------------


def pool_create(area_dir: Path, size: int, fs: str) -> None:
    """Make and mount the area's pool image (``pool/pool.img`` at ``pool/fs``)."""
    call("pool-create", {"size": size, "fs": fs}, area=area_dir)


def pool_mount(area_dir: Path) -> None:
    call("pool-mount", {}, area=area_dir)


def pool_umount(area_dir: Path) -> None:
    call("pool-umount", {}, area=area_dir)


def pool_destroy(area_dir: Path) -> None:
    call("pool-destroy", {}, area=area_dir)


def pool_list(area_dir: Path) -> dict[str, Any]:
    """``{"volumes": {id: size}, "snapshots": [id], "capacity": n, "used": n}``."""
    return call("pool-list", {}, area=area_dir)


def volume_import(area_dir: Path, volume_id: str, src: Path, *, clone: bool = False) -> bool:
    """Copy ``src`` into the pool's ``volumes/`` as ``<hex>.ext4``, verified against the id."""
    fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        res = call("volume-import", {"volume": volume_id, "fd": fd, "clone": clone},
                   area=area_dir, pass_fd=fd)
    finally:
        os.close(fd)
    return bool(res.get("created"))


def volume_remove(area_dir: Path, volume_id: str) -> None:
    call("volume-remove", {"volume": volume_id}, area=area_dir)


def snapshot_create(area_dir: Path, volume_id: str, snap_id: str) -> Path:
    """A clone of the pool volume, handed to this user (0600); its path."""
    return Path(call("snapshot-create", {"volume": volume_id, "snapshot": snap_id},
                     area=area_dir)["path"])


def snapshot_remove(area_dir: Path, snap_id: str) -> None:
    call("snapshot-remove", {"snapshot": snap_id}, area=area_dir)


def reclaim(area_dir: Path, keep: list[str]) -> list[str]:
    return [str(x) for x in call("reclaim", {"keep": keep}, area=area_dir)["removed"]]


# -- the Firecracker driver's privileged steps (runner.vmm.fcapi.PrivOps, structurally) ------


@dataclass
class HelperOps:
    """``PrivOps`` through the helper's ops: what ``kiln run`` gives ``runner.vmm.fcapi``
    (in-process as root, through sudo otherwise; and ``runner.vm.cgroup`` uses it for a QEMU
    VM's cgroups: create, attach the VMM's child, kill). Jails, cgroups and VM uids come
    from the helper's trusted config; staged files must lie under the caller's area or
    ``[jails] sources``."""

    area_dir: Path | None = None

    def _call(self, op: str, request: dict[str, Any]) -> dict[str, Any]:
        return call(op, request, area=self.area_dir)

    def cgroup_create(self, vm_id: str, version: int, limits: Limits) -> None:
        self._call("cgroup-create", {"vm": vm_id, "version": version, "limits": {
            "cpus": limits.cpus, "memory_bytes": limits.memory_bytes, "pids": limits.pids}})

    def cgroup_attach(self, vm_id: str, version: int, pid: int) -> None:
        """Move ``pid`` (this user's) into the VM's cgroup (made by ``cgroup_create``)."""
        self._call("cgroup-attach", {"vm": vm_id, "version": version, "pid": pid})

    def cgroup_kill(self, vm_id: str, version: int) -> None:
        with contextlib.suppress(errors.NotFound):  # idempotent, like InProcessOps
            self._call("cgroup-kill", {"vm": vm_id, "version": version})

    def jail_stage(self, vm_id: str, uid: int, gid: int, items: Sequence[StageItem],
                   logs: Sequence[str]) -> Staged:
        from helper.jail.jailer import Staged

        res = self._call("jail-stage", {
            "vm": vm_id, "uid": uid, "gid": gid, "logs": list(logs),
            "items": [{"name": i.name, "source": str(i.source), "writable": i.writable}
                      for i in items]})
        return Staged(Path(res["root"]), [str(w) for w in res["warnings"]])

    def jail_launch(self, spec: JailSpec) -> int:
        return int(self._call("jail-launch", {
            "vm": spec.jail_id, "uid": spec.uid, "gid": spec.gid,
            "cgroup_version": spec.cgroup_version,
            "cgroups": [f"{k}={v}" for k, v in spec.cgroups],
            "parent_cgroup": spec.parent_cgroup, "netns": spec.netns})["pid"])

    def jail_grant_api(self, vm_id: str) -> Path:
        return Path(self._call("jail-grant-api", {"vm": vm_id})["socket"])

    def jail_remove(self, vm_id: str) -> None:
        self._call("jail-remove", {"vm": vm_id})

    def jail_grant_vsock(self, vm_id: str) -> Path:
        return Path(self._call("jail-grant-vsock", {"vm": vm_id})["socket"])

    def jail_import(self, vm_id: str, name: str, source: Path) -> None:
        """Copy this user's ``source`` into the jail (passed open: ``sudo -C``)."""
        fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            call("jail-import", {"vm": vm_id, "name": name, "fd": fd}, area=self.area_dir,
                 pass_fd=fd)
        finally:
            os.close(fd)

    def jail_export(self, vm_id: str, name: str, dest: Path) -> int:
        """The jail's ``name`` into a new file ``dest`` (this user's, 0600, made here and
        passed open); its size. A refusal removes ``dest``."""
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)
        try:
            return int(call("jail-export", {"vm": vm_id, "name": name, "fd": fd},
                            area=self.area_dir, pass_fd=fd)["bytes"])
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)

    def jail_export_disk(self, vm_id: str, dest: Path) -> int:
        """The jail's disk (the VM's own copy of its snapshot) into a new file ``dest``
        (this user's, 0600, made here and passed open); its size. A refusal removes
        ``dest``."""
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)
        try:
            return int(call("jail-export-disk", {"vm": vm_id, "fd": fd}, area=self.area_dir,
                            pass_fd=fd)["bytes"])
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
