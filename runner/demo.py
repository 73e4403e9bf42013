"""``kiln demo``: the main job on the embedded default, fully offline.

Starts a throw-away registry on loopback, pushes a busybox image made with umoci from
Debian's busybox-static, builds ``recipes/demo.toml`` against it (the recipe names its
registry as ``${KILN_DEMO_REGISTRY}``), makes the pool (``kiln pool init``, auto backend)
and boots the volume as a microVM (``kiln run --rm``), whose workload prints the recipe's
motd and greeting. The registry and its data live in a kiln work directory and are gone
when the demo returns.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from builder.events import Listener
from builder.pipeline import BuildResult, build
from builder.pool import init_pool
from builder.root import Root
from helper.base.errors import NotFound
from runner.vm import lifecycle as vm

DEMO_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "demo.toml"


@dataclass(frozen=True)
class DemoResult:
    build: BuildResult
    registry: str
    image: str
    pool: dict[str, object]
    exit_code: int | None


def run_demo(root: Root, recipe: Path = DEMO_RECIPE, *, listener: Listener | None = None,
             boot: bool = True,
             ready: Callable[[BuildResult, dict[str, object]], None] | None = None,
             ) -> DemoResult:
    """Build the demo volume and make the pool; ``ready(build, pool status)`` is called
    then — before the boot, whose workload writes to our stdout."""
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
    # VMs boot copy-on-write snapshots: make the pool (auto backend; re-running keeps it),
    # then boot the volume as `kiln run --rm` does; its workload writes to our stdout.
    pool = init_pool(root.path)
    status = pool.status()
    if ready is not None:
        ready(result, status)
    code = None
    if boot:
        code = vm.run(root, result.volume.id, vm.RunOptions(rm=True, timeout=120),
                      RegistryOptions(tls_verify=False))
    return DemoResult(build=result, registry=reg.address, image=image, pool=status,
                      exit_code=code)


def next_steps(volume_id: str) -> list[str]:
    """What to try after the demo, with its volume (a unique 12-digit prefix); each line
    pastes into a shell as is."""
    v = volume_id.removeprefix("sha256:")[:12]
    return [
        f"kiln run --rm {v}                        # the recipe's greeting",
        f"kiln run --rm {v} -- sh -c 'exit 3'      # your command, its exit code",
        f"kiln run -d --name demo {v} -- sleep 60  # then: kiln ps; kiln rm -f demo",
        f"kiln snapshot create {v}                 # a private writable copy",
        f"kiln volume inspect {v}",
    ]
