"""Pure and validating parts of the pool: the backend choice, snapshot ids, and the
privileged layer refusing bad arguments before any tool runs (no root needed)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from builder.pool import choose_backend
from builder.pool.base import SNAP_ID_RE, check_snapshot_id, new_snapshot_id
from helper.base import run
from helper.base.errors import NotFound, ToolError, ToolNotFound, ToolTimeout, UsageError
from helper.storage import privileged
from helper.storage.dmthin_core import root_key

FACTS = {"thin_detail": "dmsetup targets does not list thin-pool",
         "reflink_detail": "FICLONE refused: Operation not supported"}


def test_choose_backend_table() -> None:
    none = choose_backend("auto", None, thin_pool=False, host_reflink=False, **FACTS)
    assert (none.backend, none.fs) == ("reflink", "btrfs")
    assert none.reason == ("auto: no dm-thin (dmsetup targets does not list thin-pool); the "
                           "root's filesystem has no reflinks (FICLONE refused: Operation not "
                           "supported): loop-mounted btrfs image")
    host = choose_backend("auto", None, thin_pool=False, host_reflink=True, **FACTS)
    assert (host.backend, host.fs) == ("reflink", "host")
    thin = choose_backend("auto", None, thin_pool=True, host_reflink=True, **FACTS)
    assert thin.backend == "dm-thin"
    xfs = choose_backend("auto", "xfs", thin_pool=True, host_reflink=True, **FACTS)
    assert (xfs.backend, xfs.fs) == ("reflink", "xfs")
    assert choose_backend("copy", None, thin_pool=True, host_reflink=True, **FACTS).backend \
        == "copy"
    with pytest.raises(UsageError, match="dm-thin is not available here"):
        choose_backend("dm-thin", None, thin_pool=False, host_reflink=True, **FACTS)
    with pytest.raises(UsageError, match="unknown pool backend 'zfs'"):
        choose_backend("zfs", None, thin_pool=False, host_reflink=True, **FACTS)


@given(st.sampled_from(["auto", "reflink", "copy", "dm-thin"]),
       st.sampled_from([None, "btrfs", "xfs"]), st.booleans(), st.booleans())
def test_choice_never_silent(req: str, fs: str | None, thin: bool, reflink: bool) -> None:
    """Whatever is chosen says why; an explicit request is honoured or refused, never
    swapped for another backend."""
    try:
        c = choose_backend(req, fs, thin_pool=thin, host_reflink=reflink, **FACTS)
    except UsageError:
        assert (req == "dm-thin" and not thin) or (fs is not None and req in ("dm-thin", "copy"))
        return
    assert c.reason
    if req != "auto":
        assert c.backend == req
    if c.backend == "dm-thin":
        assert thin
    if fs is not None:
        assert c.fs == fs


def test_snapshot_ids() -> None:
    ids = {new_snapshot_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(SNAP_ID_RE.fullmatch(i) and len(i) == 16 for i in ids)
    for bad in ["", "../x", "a/b", "ABC", "a1", "a" * 33, "abc\n", "-abc"]:
        with pytest.raises(UsageError, match="invalid snapshot id"):
            check_snapshot_id(bad)


def test_confine_refuses_escapes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "pool").mkdir(parents=True)
    (root / "pool" / "ok.img").write_bytes(b"")
    (tmp_path / "outside.img").write_bytes(b"")
    os.symlink(tmp_path / "outside.img", root / "pool" / "link.img")
    os.symlink(tmp_path, root / "pool" / "dirlink")
    assert privileged.confine(root, root / "pool" / "ok.img") == root / "pool" / "ok.img"
    cases = [
        ("pool/ok.img", "is not absolute"),
        (f"{root}/pool/../../outside.img", "contains '..'"),
        (f"{root}/pool/-rf", "component starting with '-'"),
        (f"{tmp_path}/outside.img", "is outside the kiln root"),
        (f"{root}/pool/link.img", "is a symlink"),
        (f"{root}/pool/dirlink/outside.img", "is a symlink"),
        (f"{root}/pool/a\nb", "invalid path"),
    ]
    for path, msg in cases:
        with pytest.raises(UsageError, match=msg):
            privileged.confine(root, path)
    with pytest.raises(NotFound, match="does not exist"):
        privileged.confine(root, root / "pool" / "missing.img")
    assert privileged.confine(root, root / "pool" / "new.img", must_exist=False) \
        == root / "pool" / "new.img"


def test_privileged_ops_validate_before_running_tools(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    rk = root_key(str(root))
    with pytest.raises(UsageError, match="refusing device-mapper name 'vg0-root'"):
        privileged.dm_remove(root, "vg0-root")
    with pytest.raises(UsageError, match="refusing device-mapper name"):
        privileged.dm_create(root, f"kiln-{root_key('/other')}-pool", "0 8 zero")
    with pytest.raises(UsageError, match="refusing device-mapper message"):
        privileged.dm_message(root, f"kiln-{rk}-pool", "set_transaction_id 0 1")
    with pytest.raises(UsageError, match="a table is one line"):
        privileged.dm_create(root, f"kiln-{rk}-pool", "0 8 zero\n0 8 zero")
    with pytest.raises(UsageError, match="is not a loop device"):
        privileged.loop_detach(root, "/dev/sda")
    with pytest.raises(UsageError, match="refusing device-mapper name"):
        privileged.reclaim(root, ["vg0-root"])


@pytest.mark.root
@pytest.mark.loop
def test_loop_detach_refuses_a_foreign_loop(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    img = tmp_path / "foreign.img"
    img.write_bytes(b"\0" * (1 << 20))
    dev = subprocess.run(["losetup", "--find", "--show", str(img)], capture_output=True,
                         text=True, check=True).stdout.strip()
    try:
        with pytest.raises(NotFound, match=f"{dev} is not backed by a file under"):
            privileged.loop_detach(root, dev)
        assert privileged.reclaim(root, []) == []
        assert dev in subprocess.run(["losetup", "--list"], capture_output=True, text=True,
                                     check=True).stdout
    finally:
        subprocess.run(["losetup", "--detach", dev], check=False)


def test_runner_errors_and_argv() -> None:
    res = run.run("true", [])
    assert res.cmd == ["/usr/bin/true"]
    assert res.code == 0
    with pytest.raises(ToolError, match=r"false failed \(exit 1\)"):
        run.run("false", [])
    with pytest.raises(ToolNotFound, match="no-such-kiln-tool not found"):
        run.run("no-such-kiln-tool", [])
    with pytest.raises(ToolNotFound):
        run.run("/bin/true", [])  # tools are named, never given as paths
    with pytest.raises(ToolTimeout, match=r"did not finish within 0\.2 s"):
        run.run("sleep", ["5"], timeout=0.2)
    env = run.run("env", []).text
    assert "LD_PRELOAD" not in env
    assert "PYTHONPATH" not in env
    assert "KILN_TEST" not in env
