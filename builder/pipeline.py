"""The build stage in order: resolve → (cache?) → pull → unpack ∥ flatten → tar → mkfs →
verify ∥ hash → commit.

``build()`` is the typed core behind ``kiln build``. The steps are the other modules; this
one decides the order, what runs concurrently (the layer flattening runs beside
``umoci unpack``; hashing runs beside verification), the build key, and the cache:

* The **build key** is the sha256 of canonical JSON of (kiln's format version, the source
  manifest digest, the recipe's key material, the tool versions). Same key → the existing
  volume is returned with ``cached=True``, with no pull and no mkfs. Where the image came
  from (registry, port, mirror, tag or digest spelling) is deliberately absent from the key
  and from the UUID/hash-seed material (``content_seed``): one image is one volume.
* One flock per build key serialises concurrent builds of one source: the second waits,
  then finds the first one's volume.
* Everything happens in a locked ``ROOT/tmp/`` work directory; the only visible effect is
  the final rename in ``Store.commit``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import errno
import functools
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from builder import blobcache, ext4, layers, mkfs, proc, tarball, unpack
from builder import source as sources
from builder import verify as verify_mod
from builder.events import Event, Listener, Progress
from builder.pool import open_pool
from builder.recipe import Recipe, key_material, load_recipe
from builder.root import Root
from builder.store import Store, Volume, hash_file
from builder.tree import Entry, Kind, Tree, parent
from helper.base.errors import BuildError, UsageError

# Bump when a change to kiln makes different bytes from the same inputs.
FORMAT_VERSION = 1


@dataclass(frozen=True)
class BuildResult:
    volume: Volume
    cached: bool
    timings: Mapping[str, float]

    def as_json(self) -> dict[str, Any]:
        out = self.volume.summary()
        out["cached"] = self.cached
        return out


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def build_key(source_digest: str, recipe: Mapping[str, Any] | None,
              tools: Mapping[str, str]) -> str:
    """The cache key of a build: any change to an input that can change the bytes changes it."""
    doc = {"format": FORMAT_VERSION, "source_digest": source_digest, "recipe": recipe,
           "tools": dict(tools)}
    return "sha256:" + hashlib.sha256(canonical_json(doc)).hexdigest()


def content_seed(source_digest: str, recipe: Mapping[str, Any] | None) -> str:
    """Hex seed for the filesystem UUID and hash seed: fixed by the content alone, so
    a new skopeo (which cannot change the bytes) does not change them either."""
    return hashlib.sha256(canonical_json({"source_digest": source_digest,
                                          "recipe": recipe})).hexdigest()


@functools.cache
def tool_versions() -> dict[str, str]:
    return {
        "skopeo": proc.version_of("skopeo"),
        "umoci": proc.version_of("umoci"),
        "mke2fs": proc.version_of("mke2fs", ["-V"]),
    }


def epoch_of(config: Mapping[str, Any]) -> int:
    """SOURCE_DATE_EPOCH for the image: its config's ``created`` time, else 0."""
    created = config.get("created")
    if isinstance(created, str):
        try:
            return max(0, int(dt.datetime.fromisoformat(created).timestamp()))
        except ValueError:
            return 0
    return 0


def merge_config(image_config: Mapping[str, Any], recipe: Any | None) -> dict[str, Any]:
    """The runtime config a VM of this volume starts with: the image's, then the recipe's
    overrides (``env`` merges, ``entrypoint`` resets ``cmd`` as in a Dockerfile)."""
    cfg = dict(image_config.get("config") or {})
    out: dict[str, Any] = {
        "Env": list(cfg.get("Env") or []),
        "Entrypoint": list(cfg.get("Entrypoint") or []),
        "Cmd": list(cfg.get("Cmd") or []),
        "WorkingDir": cfg.get("WorkingDir") or "",
        "User": cfg.get("User") or "",
        "Labels": dict(cfg.get("Labels") or {}),
    }
    if recipe is None:
        return out
    if recipe.env:
        env = dict(kv.split("=", 1) if "=" in kv else (kv, "") for kv in out["Env"])
        env.update(recipe.env)
        out["Env"] = [f"{k}={v}" for k, v in env.items()]
    if recipe.entrypoint is not None:
        out["Entrypoint"] = list(recipe.entrypoint)
        out["Cmd"] = []
    if recipe.cmd is not None:
        out["Cmd"] = list(recipe.cmd)
    if recipe.workdir:
        out["WorkingDir"] = recipe.workdir
    if recipe.user:
        out["User"] = recipe.user
    if recipe.labels:
        out["Labels"].update(recipe.labels)
    return out


def apply_files(tree: Tree, recipe: Any | None) -> tuple[Tree, dict[str, Path]]:
    """Add a recipe's ``[[files]]`` to the flattened tree; return the tree and the map of
    image path → host file that supplies its content."""
    if recipe is None or not recipe.files:
        return tree, {}
    out = dict(tree)
    overrides: dict[str, Path] = {}
    for f in recipe.files:
        dst = f.dst.strip("/")
        src = f.source_path
        # Parents: existing directories are kept; a symlink or file on the way is refused,
        # since following it would put the file somewhere other than where the recipe says.
        p = parent(dst)
        missing: list[str] = []
        while p:
            e = out.get(p)
            if e is None:
                missing.append(p)
            elif e.kind is not Kind.DIR:
                raise BuildError(
                    f"recipe file {f.dst}: /{p} in the image is a {e.kind.value}, not a directory",
                    "choose a dst whose parent directories are real directories in the image",
                )
            p = parent(p)
        for m in missing:
            out[m] = Entry(path=m, kind=Kind.DIR, mode=0o755)
        old = out.get(dst)
        if old is not None and old.kind is Kind.DIR:
            raise BuildError(f"recipe file {f.dst}: the image has a directory there",
                             "choose a dst that is not a directory in the image")
        uid, gid = f.uid_gid
        st = src.stat()
        out[dst] = Entry(path=dst, kind=Kind.REG, mode=f.mode_bits, uid=uid, gid=gid,
                         size=st.st_size, sha256=hash_file(src)[7:])
        overrides[dst] = src
    # A replaced path may have been a hard link target or member: detach the others.
    for path, e in list(out.items()):
        if e.link and e.link in overrides:
            out[path] = replace(e, link="")
    return out, overrides


def _load_source(source: str) -> tuple[Any | None, str]:
    """(recipe or None, image reference text) for a SOURCE argument."""
    if source.endswith(".toml"):
        recipe = load_recipe(Path(source))
        return recipe, recipe.image_ref
    if os.path.isdir(source) or (os.path.exists(source) and ":" not in source):
        raise UsageError(
            f"{source!r} is neither a recipe (*.toml) nor an image reference",
            "give a recipe file, docker://…, oci:DIR[:TAG], oci-archive:FILE, "
            "docker-archive:FILE or a name like alpine:3.20",
        )
    return None, source


@contextlib.contextmanager
def _disk_errors(root: Root) -> Iterator[None]:
    """A full disk or quota anywhere in the build is one clear error, not a traceback."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise BuildError(
            f"no space left on the device holding {root.path}",
            "free some space (`kiln gc` removes unused blobs and volumes) or use another --root",
        ) from None


def build(root: Root, source: str, opts: Any, *, listener: Listener | None = None,
          verify: bool = True) -> BuildResult:
    """Build (or find in the cache) the volume for ``source``: a recipe path or an image
    reference. ``opts`` is a ``builder.source.RegistryOptions``. ``verify=False`` skips
    the read-back comparison (the benchmark measures its cost; users always verify)."""
    root.ensure()
    root.recover()  # for API callers too; `kiln build` leaves tmp/ and blobs/ to this one
    progress = Progress(listener)
    store = Store(root)
    recipe, ref_text = _load_source(source)
    if recipe is not None and recipe.platform and opts.platform is None:
        opts = replace(opts, platform=recipe.platform)
    ref = sources.parse_ref(ref_text)
    with progress.stage("resolve", ref.skopeo()):
        resolved = sources.resolve(ref, opts)
    material = None
    if recipe is not None:
        material = key_material(recipe)
    key = build_key(resolved.digest, material, tool_versions())
    cached = True
    hit = store.lookup_key(key)
    if hit is None:
        with root.lock(f"build-{key[7:]}"):
            hit = store.lookup_key(key)
            if hit is None:
                cached = False
                with root.workdir("build") as wd, _disk_errors(root):
                    hit = _build_fresh(root, store, wd, resolved=resolved, recipe=recipe,
                                       material=material, key=key, opts=opts,
                                       progress=progress, verify=verify)
                store.set_key(key, hit.id)
    if cached:
        store.touch(hit.id)
    if recipe is not None:
        store.note_recipe(hit, recipe.path)
    return BuildResult(hit, cached, progress.timings)


def _build_fresh(root: Root, store: Store, wd: Path, *, resolved: sources.Resolved,
                 recipe: Recipe | None,
                 material: Mapping[str, Any] | None, key: str, opts: Any,
                 progress: Progress, verify: bool) -> Volume:
    def on_blob(p: blobcache.BlobProgress) -> None:
        progress.emit(Event("bytes", "pull", p.digest, p.done, p.total))

    with progress.stage("pull"):
        pulled = blobcache.pull(resolved, opts, root, wd, on_progress=on_blob)
    # The layout's hard links, not the shared cache: gc may prune the cache once pull()
    # has released its lock, but cannot take a link count to zero under us.
    blob_files = [(pulled.layout / "blobs" / "sha256" / d.digest[7:], d.media_type)
                  for d in pulled.layers]
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        flat = pool.submit(layers.flatten, blob_files, scratch=wd)
        with progress.stage("unpack"):
            rootfs = unpack.unpack(pulled.layout, pulled.tag, wd / "bundle")
        tree = flat.result()
    unpack.check_content(tree, rootfs)
    tree, overrides = apply_files(tree, recipe)
    size = recipe.size_bytes if recipe is not None else None
    headroom = recipe.headroom_value if recipe is not None else None
    extra = 0
    if recipe is not None and recipe.headroom_bytes is not None:
        # Headroom in bytes: exactly that much on top of the content (plus mkfs's minimum).
        headroom, extra = 0.0, recipe.headroom_bytes
    geometry = mkfs.plan(tree, size=size, headroom=headroom, extra_bytes=extra)
    seed = content_seed(resolved.digest, material)
    stage = wd / "stage"
    stage.mkdir()
    image = stage / "volume.ext4"
    with progress.stage("mkfs"):
        # The tar streams through a pipe into `mke2fs -d -`: it never touches the disk.
        def tar(out: BinaryIO) -> None:
            tarball.write_tar(tree, rootfs, out, overrides=overrides)

        mkfs.make_ext4(tar, image, geometry, uuid=mkfs.uuid_from(seed),
                       hash_seed=mkfs.uuid_from(seed[32:] + seed[:32]), label="kiln",
                       epoch=epoch_of(pulled.config), tree=tree)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        hashed = pool.submit(hash_file, image)
        if verify:
            with progress.stage("verify"):
                verify_mod.verify_trees(
                    tree, ext4.read_tree(image, keep_lost_found="lost+found" in tree))
        with progress.stage("hash"):
            volume_id = hashed.result()
    meta = {
        "source": resolved.ref.skopeo(),
        "source_digest": resolved.digest,
        "platform": resolved.platform,
        "recipe": str(recipe.path) if recipe is not None else None,
        "build_key": key,
        "size": image.stat().st_size,
        "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "blobs": list(pulled.blobs),
        "config": merge_config(pulled.config, recipe),
        "kiln_format": FORMAT_VERSION,
        "tools": tool_versions(),
        "entries": len(tree),
    }
    with progress.stage("commit"):
        vol = store.commit(stage, volume_id, meta)
    vol_pool = open_pool(root.path)
    if vol_pool is not None:
        with progress.stage("import"):
            vol_pool.import_volume(vol.id, vol.path)
    return vol
