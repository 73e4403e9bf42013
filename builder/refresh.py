"""``kiln refresh``: rebuild what changed upstream, for crons and CI.

For each recipe: resolve the upstream digest without pulling (``source.resolve``: one
``skopeo inspect --raw``, retried with backoff on 429/5xx/timeouts), compute the build key
the pipeline would compute, and rebuild only when no volume has that key. With a push
prefix the volume is published to ``PREFIX/<recipe stem>:<first 12 hex of the build key>``
and ``:latest`` moves to it; an unchanged recipe is pushed only when those tags are missing
or stale (two HEAD requests), so a nightly run with nothing to do sends no blobs.

Recipes are independent: one failing (registry down, bad recipe, full disk) is reported in
its row and the others go on. ``refresh`` takes ``ROOT/locks/refresh.lock`` (flock, pid
written inside) so a cron run overlapping a slow previous run exits at once with
"refresh already running (pid N)" instead of doing the work twice; ``wait=True`` queues.

"Every recipe built before under this root" comes from the volumes' metadata: the
pipeline records the recipe path in ``meta["recipe"]``, and every other recipe that builds
the same volume (same image digest, same content) in ``meta["recipes"]``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from builder import publish
from builder import source as sources
from builder.events import Listener
from builder.recipe import key_material, load_recipe
from builder.registryclient import Client
from builder.root import Root
from builder.store import Store, Volume
from helper.base.errors import Conflict, KilnError, UsageError


@dataclass(frozen=True)
class Outcome:
    """One row of the refresh report."""

    recipe: str
    old_digest: str | None
    new_digest: str | None
    volume_id: str | None
    action: str
    seconds: float
    pushed: str | None = None
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "old_source_digest": self.old_digest,
                "new_source_digest": self.new_digest, "volume_id": self.volume_id,
                "action": self.action, "seconds": round(self.seconds, 3),
                "pushed": self.pushed, "error": self.error}


# -- which recipes ---------------------------------------------------------------------------


def expand(args: Sequence[str | Path]) -> list[Path]:
    """Recipe files named by ``args``: a file as is, a directory's ``*.toml`` (not recursive)."""
    out: list[Path] = []
    for a in args:
        p = Path(a).absolute()
        if p.is_dir():
            found = sorted(p.glob("*.toml"))
            if not found:
                raise UsageError(f"{p} holds no *.toml recipe", "name recipe files or a "
                                 "directory that holds some")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise UsageError(f"{a}: no such recipe file or directory", "check the path")
    return list(dict.fromkeys(out))


def latest_by_recipe(volumes: Sequence[Volume]) -> dict[Path, Volume]:
    """The newest volume built from each recipe path (pure: volumes' metadata only)."""
    out: dict[Path, Volume] = {}
    for v in volumes:
        more = v.meta.get("recipes")  # other recipes that build the same volume
        for rec in [v.meta.get("recipe"), *(more if isinstance(more, list) else [])]:
            if not isinstance(rec, str) or not rec:
                continue
            p = Path(rec).absolute()
            old = out.get(p)
            if old is None or str(v.meta.get("created", "")) >= str(old.meta.get("created", "")):
                out[p] = v
    return out


def push_tag(build_key: str) -> str:
    """The immutable tag of a build: the first 12 hex digits of its build key."""
    return build_key.removeprefix("sha256:")[:12]


# -- one refresh at a time -------------------------------------------------------------------


@contextlib.contextmanager
def refresh_lock(root: Root, *, wait: bool) -> Iterator[None]:
    """Hold ``locks/refresh.lock``; the holder's pid is written inside for the message."""
    root.ensure()
    fd = os.open(root.locks / "refresh.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            raise Conflict(f"refresh already running (pid {pid})",
                           "let it finish, or pass --wait to run after it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock; the stale pid is harmless (only read when locked)


# -- the work --------------------------------------------------------------------------------


def _remote_current(client: Client, target: publish.Target, tag: str) -> bool:
    """Whether ``tag`` and ``latest`` both name the same manifest in the registry."""
    digests = []
    for t in (tag, "latest"):
        resp = client.do_request(client.url(target.repo, "manifests", t), "HEAD",
                                 headers={"Accept": publish.MANIFEST_TYPE})
        if resp.status_code != 200:
            return False
        digests.append(resp.headers.get("Docker-Content-Digest"))
    return digests[0] is not None and digests[0] == digests[1]


def refresh_one(root: Root, path: Path, opts: sources.RegistryOptions, *,
                previous: Volume | None, push_prefix: str | None = None,
                listener: Listener | None = None) -> Outcome:
    """Refresh one recipe; every failure becomes a ``failed`` row, never an exception."""
    from builder.pipeline import build, build_key, tool_versions

    t0 = time.monotonic()
    old = previous.meta.get("source_digest") if previous is not None else None
    new: str | None = None
    vol: Volume | None = None
    action, pushed, error = "failed", None, None
    try:
        recipe = load_recipe(path)
        if recipe.platform and opts.platform is None:
            opts = replace(opts, platform=recipe.platform)
        resolved = sources.resolve(sources.parse_ref(recipe.image_ref), opts)
        new = resolved.digest
        key = build_key(resolved.digest, key_material(recipe), tool_versions())
        store = Store(root)
        vol = store.lookup_key(key)
        if vol is None:
            result = build(root, str(path), opts, listener=listener)
            vol = result.volume
            new = str(vol.meta.get("source_digest") or new)
            key = str(vol.meta.get("build_key") or key)
            action = "unchanged" if result.cached else "rebuilt"
        else:
            action = "unchanged"
            store.note_recipe(vol, path)  # another recipe may have built it
        if push_prefix is not None:
            tag = push_tag(key)
            target = publish.parse_target(f"{push_prefix}/{path.stem.lower()}:{tag}")
            client = Client(target.host, opts)
            if action == "rebuilt" or not _remote_current(client, target, tag):
                publish.push_volume(root, vol, str(target), opts, listener=listener,
                                    tags=("latest",))
            pushed = str(target)
    except KilnError as e:
        action, error = "failed", e.message
    return Outcome(str(path), old, new, vol.id if vol is not None else None, action,
                   time.monotonic() - t0, pushed, error)


def refresh(root: Root, args: Sequence[str | Path], opts: sources.RegistryOptions, *,
            push_prefix: str | None = None, jobs: int = 4, wait: bool = False,
            listener: Listener | None = None) -> list[Outcome]:
    """Refresh the recipes named by ``args`` (none: every recipe built under ``root``)."""
    if jobs < 1:
        raise UsageError(f"--jobs must be at least 1, not {jobs}", "e.g. --jobs 4")
    if push_prefix is not None:
        push_prefix = push_prefix.removeprefix("docker://").rstrip("/")
        publish.parse_target(f"{push_prefix}/x:latest")  # a bad prefix fails before any work
    root.ensure()
    with refresh_lock(root, wait=wait):
        previous = latest_by_recipe(Store(root).list())
        if args:
            paths = expand(args)
        else:
            paths = sorted(p for p in previous if p.is_file())
            if not paths:
                raise UsageError(f"no recipe was built under {root.path} yet",
                                 "name recipes or directories: kiln refresh RECIPE|DIR …")
        # Threads: resolving is waiting on the network; builds run their tools as processes.
        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(refresh_one, root, p, opts, previous=previous.get(p),
                                   push_prefix=push_prefix, listener=listener)
                       for p in paths]
            return [f.result() for f in futures]
