"""``kiln demo``: the main job on the embedded default, fully offline.

Starts a throw-away registry on loopback, pushes a busybox image made with umoci from
Debian's busybox-static, builds ``recipes/demo.toml`` against it (the recipe names its
registry as ``${KILN_DEMO_REGISTRY}``) and returns the volume. The registry and its data
live in a kiln work directory and are gone when the demo returns.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from builder.events import Listener
from builder.pipeline import BuildResult, build
from builder.root import Root
from helper.errors import NotFound
from helper.pool import init_pool

DEMO_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "demo.toml"


@dataclass(frozen=True)
class DemoResult:
    build: BuildResult
    registry: str
    image: str
    pool: dict[str, object]
    snapshot: dict[str, object]


def run_demo(root: Root, recipe: Path = DEMO_RECIPE, *,
             listener: Listener | None = None) -> DemoResult:
    from builder.demoimage import make_busybox_image, push
    from builder.localregistry import LocalRegistry
    from builder.source import RegistryOptions

    if not recipe.is_file():
        raise NotFound(f"demo recipe {recipe} not found",
                       "run the demo from a kiln checkout, or pass --recipe FILE")
    root.ensure()
    with root.workdir("demo") as wd, LocalRegistry(data_dir=wd / "registry") as reg:
        make_busybox_image(wd / "layout", "1")
        image = f"docker://{reg.address}/demo/busybox:1"
        push(wd / "layout", "1", image, tls_verify=False)
        previous = os.environ.get("KILN_DEMO_REGISTRY")
        os.environ["KILN_DEMO_REGISTRY"] = reg.address
        try:
            result = build(root, str(recipe), RegistryOptions(tls_verify=False),
                           listener=listener)
        finally:
            if previous is None:
                os.environ.pop("KILN_DEMO_REGISTRY", None)
            else:
                os.environ["KILN_DEMO_REGISTRY"] = previous
    # The run stage boots snapshots: make the pool (auto backend; re-running keeps it) and
    # take a copy-on-write snapshot of the new volume, as `kiln run` will.
    pool = init_pool(root.path)
    if not pool.has_volume(result.volume.id):
        pool.import_volume(result.volume.id, result.volume.path)
    snap = pool.create_snapshot(result.volume.id)
    return DemoResult(build=result, registry=reg.address, image=image,
                      pool=pool.status(), snapshot=snap.summary())
