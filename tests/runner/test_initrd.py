"""The minimal initrd: module planning (properties), the cpio writer (read back with the
real cpio), and a real build from this host's kernel modules (content-hash cache)."""

from __future__ import annotations

import lzma
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from helper.base.errors import NotFound
from runner import initrd

V = "kernel/drivers/virtio"
DEP = f"""{V}/virtio_ring.ko:
{V}/virtio.ko: {V}/virtio_ring.ko
{V}/virtio_mmio.ko: {V}/virtio.ko {V}/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko.xz: {V}/virtio.ko {V}/virtio_ring.ko
kernel/drivers/char/virtio_console.ko.zst: {V}/virtio.ko {V}/virtio_ring.ko
"""


def test_plan_orders_dependencies_first_and_skips_builtins() -> None:
    mods = initrd.parse_modules_dep(DEP)
    assert set(mods) == {"virtio_ring", "virtio", "virtio_mmio", "virtio_blk", "virtio_console"}
    plan = initrd.plan_modules(mods, {"ext4"}, initrd.WANTED, initrd.OPTIONAL)
    assert plan == [
        "kernel/drivers/virtio/virtio_ring.ko",
        "kernel/drivers/virtio/virtio.ko",
        "kernel/drivers/virtio/virtio_mmio.ko",
        "kernel/drivers/block/virtio_blk.ko.xz",
        "kernel/drivers/char/virtio_console.ko.zst",
    ]


def test_plan_missing_module_is_an_error() -> None:
    mods = initrd.parse_modules_dep(DEP)
    with pytest.raises(NotFound) as e:
        initrd.plan_modules(mods, set(), initrd.WANTED, initrd.OPTIONAL)
    assert e.value.message == "kernel module ext4 is neither built in nor in modules.dep"


def test_plan_is_remembered_until_depmod_rewrites_its_inputs(tmp_path: Path) -> None:
    mods, cache = tmp_path / "modules", tmp_path / "cache"
    mods.mkdir()
    (mods / "modules.dep").write_text(DEP)
    (mods / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\n")
    first = initrd.module_plan(cache, mods)
    assert first[-1] == "kernel/drivers/char/virtio_console.ko.zst"
    assert len(list(cache.glob("plan-*.json"))) == 1
    # the remembered plan is what a second call returns (not a re-parse): a planted one shows
    remembered = next(cache.glob("plan-*.json"))
    remembered.write_text('["planted"]')
    assert initrd.module_plan(cache, mods) == ["planted"]
    # depmod rewrote modules.dep (another size): planned again, from the new file
    (mods / "modules.dep").write_text(DEP + "kernel/drivers/net/virtio_net.ko: "
                                      f"{V}/virtio.ko {V}/virtio_ring.ko\n")
    assert initrd.module_plan(cache, mods) == [*first, "kernel/drivers/net/virtio_net.ko"]
    # modules.builtin too: ext4 no longer built in, and not a module either
    (mods / "modules.builtin").write_text("")
    with pytest.raises(NotFound) as e:
        initrd.module_plan(cache, mods)
    assert e.value.message == "kernel module ext4 is neither built in nor in modules.dep"
    (mods / "modules.dep").unlink()
    with pytest.raises(NotFound) as e:
        initrd.module_plan(cache, mods)
    assert e.value.message == f"no modules.dep in {mods}"


@st.composite
def dags(draw: st.DrawFn) -> str:
    """A random modules.dep: module i may depend only on modules < i (a DAG)."""
    n = draw(st.integers(1, 12))
    lines = []
    for i in range(n):
        deps = draw(st.lists(st.integers(0, max(0, i - 1)), max_size=4, unique=True)) if i else []
        lines.append(f"k/m{i}.ko: " + " ".join(f"k/m{d}.ko" for d in deps))
    return "\n".join(lines) + "\n"


@given(dags(), st.data())
def test_plan_property_every_dependency_before_its_dependent(dep: str, data: st.DataObject) -> None:
    mods = initrd.parse_modules_dep(dep)
    wanted = data.draw(st.lists(st.sampled_from(sorted(mods)), min_size=1, unique=True))
    builtin = set(data.draw(st.lists(st.sampled_from(sorted(mods)), unique=True)))
    plan = initrd.plan_modules(mods, builtin, wanted)
    pos = {p: i for i, p in enumerate(plan)}
    assert len(pos) == len(plan)  # no duplicates
    for p in plan:
        for d in next(m for m in mods.values() if m.path == p).deps:
            assert d in pos
            assert pos[d] < pos[p]
    for w in wanted:
        assert w in builtin or mods[w].path in pos


def test_cpio_is_read_back_by_cpio(tmp_path: Path) -> None:
    data = initrd.cpio_newc(initrd.initrd_entries(b"BB", [("k/virtio.ko", b"ELF")]))
    assert len(data) % 512 == 0
    assert data == initrd.cpio_newc(initrd.initrd_entries(b"BB", [("k/virtio.ko", b"ELF")]))
    listing = subprocess.run(["cpio", "-itv", "--quiet"], input=data, capture_output=True,
                             check=True).stdout.decode()
    names = [line.split()[8] for line in listing.splitlines()]
    assert names[:7] == ["bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"]
    assert {"bin/busybox", "bin/sh", "init", "lib/modules/virtio.ko",
            "lib/modules/load.order"} <= set(names)
    assert "bin/sh -> busybox" in listing
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-id", "--quiet"], input=data, cwd=out, check=True)
    assert (out / "lib/modules/load.order").read_text() == "lib/modules/virtio.ko\n"
    assert (out / "init").read_text() == initrd.INIT_SCRIPT
    assert os.access(out / "init", os.X_OK)


def test_read_module_decompresses_xz(tmp_path: Path) -> None:
    p = tmp_path / "a.ko.xz"
    p.write_bytes(lzma.compress(b"\x7fELF module"))
    assert initrd.read_module(p) == b"\x7fELF module"


def _host_modules() -> Path:
    found = sorted(Path("/lib/modules").glob("*/modules.dep"))
    if not found:
        pytest.skip("no kernel modules on this host")
    return found[-1].parent


def test_real_build_is_cached_by_content(tmp_path: Path) -> None:
    mods = _host_modules()
    first = initrd.ensure_initrd(tmp_path, mods)
    assert first.name.startswith("initrd-")
    assert first.suffix == ".cpio"
    assert initrd.ensure_initrd(tmp_path, mods) == first  # the stat index
    for index in tmp_path.glob("index-*"):
        index.unlink()
    mtime = first.stat().st_mtime_ns
    assert initrd.ensure_initrd(tmp_path, mods) == first  # same content, same file
    assert first.stat().st_mtime_ns == mtime
    listing = subprocess.run(["cpio", "-it", "--quiet"], stdin=first.open("rb"),
                             capture_output=True, check=True).stdout.decode().split()
    assert "lib/modules/virtio_blk.ko" in listing
    assert "lib/modules/virtio_mmio.ko" in listing
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_real_initrd_loads_virtio_net_after_its_dependencies(tmp_path: Path) -> None:
    """--net tap needs eth0 before kiln's init runs: virtio_net (a module in Debian's cloud
    kernel) and its dependencies are in the initrd, dependencies first."""
    mods = _host_modules()
    if "virtio_net" not in initrd.parse_modules_dep((mods / "modules.dep").read_text()):
        pytest.skip("this kernel has virtio_net built in or not at all")
    image = initrd.ensure_initrd(tmp_path, mods)
    order = subprocess.run(["cpio", "-i", "--quiet", "--to-stdout", "lib/modules/load.order"],
                           stdin=image.open("rb"), capture_output=True, check=True
                           ).stdout.decode().split()
    net = order.index("lib/modules/virtio_net.ko")
    for dep in ("failover", "net_failover", "virtio", "virtio_ring"):
        assert order.index(f"lib/modules/{dep}.ko") < net, dep


def test_real_initrd_loads_the_vsock_transport_after_its_dependencies(tmp_path: Path) -> None:
    """Firecracker's control channel is vsock (docs/run.md): the cloud kernel has the
    transport as modules, so the initrd carries vsock, the common transport and the virtio
    transport, dependencies first."""
    mods = _host_modules()
    if "vmw_vsock_virtio_transport" not in initrd.parse_modules_dep(
            (mods / "modules.dep").read_text()):
        pytest.skip("this kernel has the vsock transport built in or not at all")
    image = initrd.ensure_initrd(tmp_path, mods)
    order = subprocess.run(["cpio", "-i", "--quiet", "--to-stdout", "lib/modules/load.order"],
                           stdin=image.open("rb"), capture_output=True, check=True
                           ).stdout.decode().split()
    transport = order.index("lib/modules/vmw_vsock_virtio_transport.ko")
    for dep in ("vsock", "vmw_vsock_virtio_transport_common", "virtio", "virtio_ring"):
        assert order.index(f"lib/modules/{dep}.ko") < transport, dep


def _loaded(tmp_path: Path, cmdline: str, order: list[str]) -> list[str]:
    """The modules the initrd's script insmods for ``cmdline`` (busybox sh, insmod a
    recorder, the script's own argument and load loops)."""
    text = initrd.INIT_SCRIPT
    block = text[text.index('mmio=""'):text.index("i=0\n")]
    (tmp_path / "cmdline").write_text(cmdline + "\n")
    (tmp_path / "load.order").write_text("".join(f"{m}\n" for m in order))
    log = tmp_path / "log"
    script = ("die() { echo \"die $*\" >>" + str(log) + "; }\n"
              "insmod() { echo \"$1\" >>" + str(log) + "; }\n"
              + block.replace("/proc/cmdline", str(tmp_path / "cmdline"))
              .replace("/lib/modules/load.order", str(tmp_path / "load.order")))
    subprocess.run(["/bin/busybox", "sh", "-c", script], check=True)
    return log.read_text().split() if log.exists() else []


def test_the_vsock_modules_are_loaded_only_for_a_vsock_channel(tmp_path: Path) -> None:
    """Their insmods are ~170 ms of a TCG boot: only Firecracker's warm runs, whose command
    line names the channel (kiln.ctl=vsock:PORT), load them."""
    order = ["lib/modules/virtio_mmio.ko", "lib/modules/vsock.ko",
             "lib/modules/vmw_vsock_virtio_transport_common.ko",
             "lib/modules/vmw_vsock_virtio_transport.ko", "lib/modules/ext4.ko"]
    (tmp_path / "a").mkdir()
    cold = _loaded(tmp_path / "a", "console=ttyS0 root=/dev/vda", order)
    assert cold == ["/lib/modules/virtio_mmio.ko", "/lib/modules/ext4.ko"]
    (tmp_path / "b").mkdir()
    warm = _loaded(tmp_path / "b", "console=ttyS0 kiln.ctl=vsock:5252 root=/dev/vda", order)
    assert warm == [f"/{m}" for m in order]
