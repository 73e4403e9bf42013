"""The kiln root directory: where every byte kiln keeps lives, and how crashes are undone.

Layout (all on one filesystem, so commits are renames)::

    ROOT/blobs/sha256/<hex>      shared OCI blob cache (skopeo --dest-shared-blob-dir)
    ROOT/volumes/<hex>/          committed base volumes: volume.ext4 (0444) + meta.json
    ROOT/keys/<hex>              build key -> volume id index (one small file each)
    ROOT/used/<hex>              a volume's last use (mtime), for gc --keep
    ROOT/dist/<hex>.json         a volume's compressed blob digest, so a re-push skips zstd
    ROOT/pool/                   the volume pool and snapshots (helper/pool)
    ROOT/vms.db, ROOT/vms/<id>/  VM records (SQLite) and each VM's files (runner/)
    ROOT/kernels/                vmlinux and minimal initrds, cached by content hash
    ROOT/tmp/<name>/             work in progress, each held by an flock while in use
    ROOT/locks/<name>.lock       named locks (per build key, the blob cache, gc)

Crash safety rests on one rule: nothing under ``tmp/`` is ever visible as a result, and
every work directory is flock-ed by the process that owns it. A SIGKILL releases the lock,
so the next kiln command (``Root.recover``) can tell abandoned work from live work without
guessing from ages or pids.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from helper.base.errors import Conflict, KilnError


def default_root() -> Path:
    """``$KILN_ROOT``, else ``/var/lib/kiln`` for root, else ``$XDG_DATA_HOME/kiln``."""
    env = os.environ.get("KILN_ROOT")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/kiln")
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "kiln"


def rmtree(path: Path) -> None:
    """Remove a tree, including what a rootless unpack left without write permission."""

    def onerror(_func: object, p: str, _exc: object) -> None:
        parent = os.path.dirname(p)
        with contextlib.suppress(OSError):
            os.chmod(parent, 0o700)
        with contextlib.suppress(OSError):
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
                shutil.rmtree(p, onerror=onerror)
            else:
                os.unlink(p)

    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, onerror=onerror)
    else:
        path.unlink()


def locked_new(make: Callable[[], tuple[Path, int]]) -> tuple[Path, int]:
    """A new entry made by ``make`` (its path and an open fd), flock-ed by this process.
    Recovery removes only unlocked entries, so it may remove this one between ``make`` and
    the flock: then another is made. Once locked and still ours, it is safe."""
    while True:
        path, fd = make()
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return path, fd
        os.close(fd)


@dataclass(frozen=True)
class Root:
    """A kiln root directory."""

    path: Path

    @property
    def blobs(self) -> Path:
        return self.path / "blobs"

    @property
    def volumes(self) -> Path:
        return self.path / "volumes"

    @property
    def keys(self) -> Path:
        return self.path / "keys"

    @property
    def tmp(self) -> Path:
        return self.path / "tmp"

    @property
    def locks(self) -> Path:
        return self.path / "locks"

    def ensure(self) -> Root:
        """Create the layout (idempotent) and return self."""
        try:
            for d in (self.path, self.blobs / "sha256", self.volumes, self.keys, self.tmp,
                      self.locks):
                d.mkdir(parents=True, exist_ok=True, mode=0o755)
        except OSError as e:
            raise KilnError(
                f"cannot use kiln root {self.path}: {e.strerror}",
                "pass --root DIR (or set KILN_ROOT) to a directory you can write",
            ) from None
        return self

    # -- locks ------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, name: str, *, shared: bool = False, blocking: bool = True,
             what: str = "") -> Iterator[None]:
        """Hold the named flock for the duration of the block.

        Non-blocking callers get ``Conflict`` naming ``what`` when it is held elsewhere.
        """
        fd = os.open(self.locks / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            flags = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
            if not blocking:
                flags |= fcntl.LOCK_NB
            try:
                fcntl.flock(fd, flags)
            except BlockingIOError:
                raise Conflict(
                    f"{what or name} is busy: another kiln command holds it",
                    "wait for the other command to finish, then retry",
                ) from None
            yield
        finally:
            os.close(fd)

    # -- work directories ----------------------------------------------------------------

    @contextlib.contextmanager
    def workdir(self, purpose: str) -> Iterator[Path]:
        """A fresh directory under ``tmp/``, locked while in use and removed afterwards."""
        self.ensure()

        def make() -> tuple[Path, int]:
            path = self.tmp / f"{purpose}-{os.getpid()}-{secrets.token_hex(4)}"
            path.mkdir(mode=0o700)
            return path, os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

        path, fd = locked_new(make)
        try:
            yield path
        finally:
            try:
                rmtree(path)
            finally:
                os.close(fd)

    def recover(self) -> list[Path]:
        """Remove work left by crashed kiln processes; return what was removed.

        An entry of ``tmp/`` whose flock can be taken belongs to nobody: its owner died
        (SIGKILL, power loss) or never got as far as locking it.
        """
        removed: list[Path] = []
        try:
            entries = list(os.scandir(self.tmp))
        except FileNotFoundError:
            return removed
        for entry in entries:
            p = Path(entry.path)
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                removed.append(p)
                continue
            try:
                fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ELOOP):
                    continue
                raise
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # live work of another process
                rmtree(p)
                removed.append(p)
            finally:
                os.close(fd)
        removed += self._sweep_blob_temps()
        return removed

    def _sweep_blob_temps(self) -> list[Path]:
        """Temp files a killed skopeo left in the shared blob cache.

        Only while nobody uses the cache (its lock is free): a live pull's temp files are
        indistinguishable from dead ones by name.
        """
        removed: list[Path] = []
        d = self.blobs / "sha256"
        try:
            with self.lock("blobs", blocking=False):
                for entry in os.scandir(d):
                    name = entry.name
                    if len(name) == 64 and all(c in "0123456789abcdef" for c in name):
                        continue
                    p = Path(entry.path)
                    rmtree(p)
                    removed.append(p)
        except (Conflict, FileNotFoundError):
            pass
        return removed
