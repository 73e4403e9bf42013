"""A Firecracker snapshot's files across the jail wall (ops ``jail-export``, ``jail-import``;
warm start, docs/warm.md): the state and memory files Firecracker wrote into a jail's
chroot go out to a file the caller opened, and a saved pair comes into a fresh jail from
files the caller opened. Privileged, stdlib only.

The caller never names a path root acts on: it passes an open file descriptor (``sudo
-C``), and the helper reaches the jail's file by fd, from the root-owned jail directory
down, with ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)``
(``helper.base.safepath``): the chroot belongs to the VM's uid once launched, and what
runs as that uid (a compromised Firecracker) may plant a symlink, a hard link or a FIFO
there.

Both reach the jail directory by name once more after ``check_jail_owner`` and refuse
unless it is still the (device, inode) the caller's claim records (a jail removed and
re-staged under that id meanwhile — by a victim — is not the caller's). The bytes move in
a child process with only the caller's uid/gid (``as_caller``): root's rights (quota and
reserved blocks, CAP_FSETID, capabilities a /proc or cgroup file checks when written)
never reach the caller's file, and the caller can only make its own copy fail.

* **export**: the jail's ``vm.state``/``vm.mem`` is opened ``O_PATH`` first and must be a
  regular file with one link, owned by the jail's VM uid, at most ``cap`` bytes (the VM's
  memory limit: the memory file is the guest's RAM); only then reopened for reading
  (``O_NONBLOCK``) through ``/proc/self/fd``: root never opens a FIFO or a device node the
  VM's uid linked there. The destination fd: a regular, empty file opened for writing
  (not ``O_PATH``), the caller's own — the copy keeps holes (a guest's untouched RAM costs
  nothing); a failed copy truncates it to empty again.
* **import**: only into a jail not launched yet (its chroot still root's: nothing but the
  helper writes there); the source fd a regular file opened for reading (an ``O_PATH`` fd,
  which the caller may hold on a file it cannot read, is refused), at most ``cap`` bytes;
  the copy is made unnamed (``O_TMPFILE``), root's, group the VM's gid, 0440 (the VM maps
  it private: its writes never reach the file), and linked in only when whole, under the
  lock jail-launch holds, the chroot seen still root's and the name free: a refused or
  failed import leaves nothing. It lives and goes with the jail.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from collections.abc import Callable
from contextlib import AbstractContextManager

from helper.base import run, safepath
from helper.base.errors import Conflict, NotFound, UsageError
from helper.jail.jailer import JailConfig, jail_dir, open_dir_nofollow

NAMES = ("vm.state", "vm.mem")  # runner.vmm.fcsnapshot.STATE, MEM
DISK = "rootfs.ext4"  # runner.vmm.fcapi.ROOTFS: exported (jail-export-disk), never imported
STATE_MAX = 64 << 20  # a microVM state file is tens of KiB


def check_name(name: str, allowed: tuple[str, ...] = NAMES) -> str:
    if name not in allowed:
        raise UsageError(f"refusing {name!r}: not a snapshot file", f"one of {NAMES}")
    return name


def _access(fd: int) -> int:
    """``fd``'s access mode; an ``O_PATH`` fd (which reads as ``O_RDONLY``, and which the
    caller may open on a file it cannot read) is neither."""
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError:
        raise NotFound(f"file descriptor {fd} is not open", "pass the file open") from None
    return -1 if flags & os.O_PATH else flags & os.O_ACCMODE


def check_dest(fd: int, owner: int | None) -> None:
    """An export's destination: the caller's own empty regular file, open for writing."""
    if _access(fd) not in (os.O_WRONLY, os.O_RDWR):
        raise UsageError(f"file descriptor {fd} is not open for writing", "")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"file descriptor {fd} is not a regular file", "")
    if owner is not None and st.st_uid != owner:
        raise UsageError(f"file descriptor {fd} is not a file of uid {owner}",
                         "pass a file you created")
    if st.st_size != 0:
        raise UsageError(f"file descriptor {fd} is not an empty file", "pass a new file")


def check_source(fd: int, cap: int | None) -> int:
    """An import's source: a regular file open for reading, at most ``cap`` bytes; its
    size."""
    if _access(fd) not in (os.O_RDONLY, os.O_RDWR):
        raise UsageError(f"file descriptor {fd} is not open for reading", "")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"file descriptor {fd} is not a regular file", "")
    if cap is not None and st.st_size > cap:
        raise UsageError(f"refusing a snapshot file of {st.st_size} bytes: the VM's limit "
                         f"is {cap}", "restore into a VM with the memory it was saved with")
    return st.st_size


def _open_jail(cfg: JailConfig, jail_id: str, ident: list[int] | None) -> int:
    """The jail directory (``O_PATH``), refused unless it is still the (device, inode) the
    caller's claim recorded (``None``: root in-process, no claim)."""
    jfd = open_dir_nofollow(jail_dir(cfg, jail_id))
    st = os.fstat(jfd)
    if ident is not None and [st.st_dev, st.st_ino] != ident:
        os.close(jfd)
        raise Conflict(f"jail {jail_id} changed since its claim was checked",
                       "stage it again (jail-stage)")
    return jfd


def as_caller(caller: tuple[int, int] | None, what: str, work: Callable[[], None],
              keep: tuple[int, ...]) -> None:
    """Run ``work`` in a child with only the caller's uid/gid (no groups, no capabilities,
    no fd but ``keep`` and stdio): bytes root moves between a caller's file and a jail
    obey the caller's quota, reserved blocks and the checks a /proc or cgroup file makes
    when written. ``None``: root in-process, here."""
    if caller is None:
        work()
        return
    code = run.fork_as(caller[0], caller[1], work, keep)
    if code:
        why = os.strerror(code) if 0 < code < 124 else f"exit status {code}"
        raise UsageError(f"refusing {what}: the copy as uid {caller[0]} failed: {why}",
                         "free space on the destination's filesystem, then retry")


def export_file(cfg: JailConfig, jail_id: str, name: str, vm_uid: int, dst_fd: int,
                cap: int | None, *, ident: list[int] | None = None,
                caller: tuple[int, int] | None = None, single_link: bool = True) -> int:
    """Copy the jail's ``name`` (a snapshot file, or its disk) into ``dst_fd`` (checked by
    ``check_dest``) as the caller; its size. A failed copy leaves ``dst_fd`` empty.
    ``single_link`` False only for root in-process (its own snapshot is hard-linked in)."""
    check_name(name, (*NAMES, DISK))
    src = _open_vm_file(cfg, jail_id, name, vm_uid, cap, ident, single_link)
    try:
        size = os.fstat(src).st_size
        try:
            as_caller(caller, f"jail {jail_id}'s {name}",
                      lambda: _sparse_copy(src, dst_fd, size), (src, dst_fd))
        except BaseException:
            os.ftruncate(dst_fd, 0)
            raise
        return os.fstat(dst_fd).st_size
    finally:
        os.close(src)


def _open_vm_file(cfg: JailConfig, jail_id: str, name: str, vm_uid: int, cap: int | None,
                  ident: list[int] | None, single_link: bool) -> int:
    """The jail's ``name`` open for reading: checked by its ``O_PATH`` fd first (root never
    opens a FIFO or a device node the VM's uid linked there), then reopened."""
    jfd = _open_jail(cfg, jail_id, ident)
    try:
        pfd = safepath.open_beneath(jfd, f"root/{name}", os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    finally:
        os.close(jfd)
    try:
        st = safepath.fstat_kind(pfd, "reg", f"jail {jail_id}'s {name}", owner=vm_uid,
                                 single_link=single_link)
        if cap is not None and st.st_size > cap:
            raise UsageError(f"refusing jail {jail_id}'s {name}: {st.st_size} bytes, over "
                             f"the {'space' if name == DISK else 'VM'}'s limit of {cap}", "")
        src = os.open(safepath.fd_path(pfd), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    finally:
        os.close(pfd)
    if (os.fstat(src).st_ino, os.fstat(src).st_dev) != (st.st_ino, st.st_dev):
        os.close(src)  # pragma: no cover - /proc/self/fd names the open inode
        raise Conflict(f"jail {jail_id}'s {name} changed while opened", "")
    return src


def _sparse_copy(src: int, dst: int, size: int) -> None:
    from helper.base.fileops import sparse_copy_fd

    got = sparse_copy_fd(src, dst, size)
    os.ftruncate(dst, got)  # a trailing hole
    os.fsync(dst)


def import_file(cfg: JailConfig, jail_id: str, name: str, vm_gid: int, src_fd: int,
                size: int, *, ident: list[int] | None = None,
                caller: tuple[int, int] | None = None,
                launch_lock: Callable[[], AbstractContextManager[None]] | None = None) -> None:
    """``name`` in the (not yet launched) jail's chroot: a root-owned 0440 copy of the
    first ``size`` bytes of ``src_fd``, readable by the VM's gid, read as the caller. The
    copy is unnamed (``O_TMPFILE``) until whole, then linked in under ``launch_lock`` (what
    jail-launch holds) once the chroot is seen still root's: a refusal leaves nothing."""
    check_name(name)
    jfd = _open_jail(cfg, jail_id, ident)
    try:
        rfd = os.open("root", os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                      dir_fd=jfd)
    finally:
        os.close(jfd)
    try:
        _check_unlaunched(rfd, jail_id, name)
        out = os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=rfd)
        try:
            as_caller(caller, f"{name} of jail {jail_id}",
                      lambda: _sparse_copy(src_fd, out, size), (src_fd, out))
            os.fchown(out, 0, vm_gid)
            os.fchmod(out, 0o440)
            with launch_lock() if launch_lock else contextlib.nullcontext():
                _check_unlaunched(rfd, jail_id, name)
                try:
                    os.link(safepath.fd_path(out), name, dst_dir_fd=rfd,
                            follow_symlinks=True)
                except FileExistsError:
                    _check_unlaunched(rfd, jail_id, name)  # raises: already there
                    raise
        finally:
            os.close(out)
    finally:
        os.close(rfd)


def _check_unlaunched(rfd: int, jail_id: str, name: str) -> None:
    if os.fstat(rfd).st_uid != 0:
        raise Conflict(f"jail {jail_id} is launched: its chroot is the VM's",
                       "import the snapshot files before jail-launch")
    with contextlib.suppress(FileNotFoundError):
        os.stat(name, dir_fd=rfd, follow_symlinks=False)
        raise Conflict(f"jail {jail_id}'s {name} is already there",
                       "import each file once, into a fresh jail")
