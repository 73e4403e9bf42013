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

* **export**: the jail's ``vm.state``/``vm.mem`` must be a regular file with one link,
  owned by the jail's VM uid, at most ``cap`` bytes (the VM's memory limit: the memory
  file is the guest's RAM); opened ``O_NONBLOCK`` (a FIFO would block root). The
  destination fd: a regular, empty file opened for writing, the caller's own — the
  copy keeps holes (a guest's untouched RAM costs nothing).
* **import**: only into a jail not launched yet (its chroot still root's: nothing but the
  helper writes there); the source fd a regular file opened for reading, at most ``cap``
  bytes; the copy is root's, group the VM's gid, 0440 (the VM maps it private: its writes
  never reach the file), as jail-stage's read-only copies. It lives and goes with the jail.
"""

from __future__ import annotations

import fcntl
import os
import stat

from helper.base import safepath
from helper.base.errors import Conflict, NotFound, UsageError
from helper.jail.jailer import JailConfig, jail_dir, open_dir_nofollow
from helper.jail.stage import copy_fd

NAMES = ("vm.state", "vm.mem")  # runner.vmm.fcsnapshot.STATE, MEM
STATE_MAX = 64 << 20  # a microVM state file is tens of KiB


def check_name(name: str) -> str:
    if name not in NAMES:
        raise UsageError(f"refusing {name!r}: not a snapshot file", f"one of {NAMES}")
    return name


def _access(fd: int) -> int:
    try:
        return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError:
        raise NotFound(f"file descriptor {fd} is not open", "pass the file open") from None


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


def export_file(cfg: JailConfig, jail_id: str, name: str, vm_uid: int, dst_fd: int,
                cap: int | None) -> int:
    """Copy the jail's ``name`` into ``dst_fd`` (checked by ``check_dest``); its size."""
    check_name(name)
    jfd = open_dir_nofollow(jail_dir(cfg, jail_id))
    try:
        src = safepath.open_beneath(
            jfd, f"root/{name}", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    finally:
        os.close(jfd)
    try:
        st = safepath.fstat_kind(src, "reg", f"jail {jail_id}'s {name}", owner=vm_uid,
                                 single_link=True)
        if cap is not None and st.st_size > cap:
            raise UsageError(f"refusing jail {jail_id}'s {name}: {st.st_size} bytes, over "
                             f"the VM's limit of {cap}", "")
        size = _sparse_copy(src, dst_fd, st.st_size)
    finally:
        os.close(src)
    return size


def _sparse_copy(src: int, dst: int, size: int) -> int:
    from helper.base.fileops import sparse_copy_fd

    got = sparse_copy_fd(src, dst, size)
    os.ftruncate(dst, got)  # a trailing hole
    os.fsync(dst)
    return got


def import_file(cfg: JailConfig, jail_id: str, name: str, vm_gid: int, src_fd: int,
                size: int) -> None:
    """``name`` in the (not yet launched) jail's chroot: a root-owned 0440 copy of the
    first ``size`` bytes of ``src_fd``, readable by the VM's gid."""
    check_name(name)
    jfd = open_dir_nofollow(jail_dir(cfg, jail_id))
    try:
        rfd = os.open("root", os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                      dir_fd=jfd)
    finally:
        os.close(jfd)
    try:
        if os.fstat(rfd).st_uid != 0:
            raise Conflict(f"jail {jail_id} is launched: its chroot is the VM's",
                           "import the snapshot files before jail-launch")
        copy_fd(src_fd, rfd, name, 0, vm_gid, 0o440, size)
    finally:
        os.close(rfd)
