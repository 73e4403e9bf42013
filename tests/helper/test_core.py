"""kiln-helper in-process: request schemas, hostile requests, config trust, safepath races.

Everything here runs the real validation and the real op functions (as root, against
directories the tests make); the installed binary and sudo are in test_sudo.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from builder import helperclient as client
from helper import config, configbase
from helper.base import safepath
from helper.base.errors import KilnError, NotFound, UsageError
from helper.net import tap
from helper.ops import registry as ops
from helper.storage.dmthin_core import root_key

REQUIRED_OPS = {"pool-create", "pool-mount", "pool-umount", "pool-destroy", "pool-list",
                "snapshot-create", "snapshot-remove", "dm-create", "dm-message", "dm-remove",
                "volume-import", "jail-stage", "jail-launch", "jail-grant-api",
                "jail-remove", "cgroup-create", "cgroup-kill", "tap-create", "tap-delete",
                "reclaim"}


# -- schemas ----------------------------------------------------------------------------------


def _walk_props(schema: dict[str, Any], defs: dict[str, Any], where: str) -> list[str]:
    """Problems: a property without a description, a string without pattern/enum."""
    bad: list[str] = []
    for name, prop in schema.get("properties", {}).items():
        here = f"{where}.{name}"
        if not prop.get("description"):
            bad.append(f"{here}: no description")
        variants = prop.get("anyOf", [prop])
        for v in variants:
            if "$ref" in v:
                bad += _walk_props(defs[v["$ref"].rsplit("/", 1)[-1]], defs, here)
            items = v.get("items")
            if isinstance(items, dict):
                if "$ref" in items:
                    bad += _walk_props(defs[items["$ref"].rsplit("/", 1)[-1]], defs, here)
                elif items.get("type") == "string" and not ("pattern" in items
                                                            or "enum" in items):
                    bad.append(f"{here}[]: unconstrained string")
            if v.get("type") == "string" and not ("pattern" in v or "enum" in v
                                                  or "const" in v):
                bad.append(f"{here}: unconstrained string")
    return bad


def test_list_has_every_op_and_every_field_is_documented_and_constrained() -> None:
    res = subprocess.run([sys.executable, "-I", "-m", "helper.main", "--list"],
                         capture_output=True, text=True, check=True, cwd="/")
    schemas = json.loads(res.stdout)
    assert set(schemas) >= REQUIRED_OPS
    problems: list[str] = []
    for op, schema in schemas.items():
        assert schema.get("additionalProperties") is False, op
        assert schema.get("description"), op
        problems += _walk_props(schema, schema.get("$defs", {}), op)
    assert problems == []


def test_no_op_takes_a_program_or_argv() -> None:
    for op, schema in ops.schemas().items():
        text = json.dumps(schema).lower()
        for word in ('"argv"', '"binary"', '"program"', '"exec"', '"command"', '"table"'):
            assert word not in text, (op, word)


# -- hostile requests (validation) ---------------------------------------------------------------

HOSTILE: list[tuple[str, dict[str, Any]]] = [
    # Storage ops name no path: every path-shaped field is unknown (extra="forbid").
    ("pool-create", {"image": "pool/pool.img", "size": 256 << 20, "fs": "btrfs"}),
    ("pool-create", {"size": 256 << 20, "fs": "ext4"}),
    ("pool-create", {"size": 1, "fs": "btrfs"}),
    ("pool-mount", {"mountpoint": "pool/fs"}),
    ("pool-umount", {"mountpoint": "pool/fs"}),
    ("pool-destroy", {"image": "cgroups/x"}),
    ("snapshot-create", {"volume": "sha256:" + "0" * 64, "snapshot": "../x"}),
    ("snapshot-create", {"volume": "sha256:" + "0" * 64, "snapshot": "ABC"}),
    ("snapshot-remove", {"snapshot": "a" * 33}),
    ("volume-import", {"volume": "sha256:" + "0" * 64, "fd": 3, "directory": "v"}),
    ("dm-remove", {"name": "vg0-root"}),
    ("dm-remove", {"name": "kiln-0000000g-pool"}),
    ("dm-create", {"name": "kiln-00000000-pool", "kind": "linear"}),
    ("dm-create", {"name": "kiln-00000000-pool", "kind": "thin-pool", "table": "0 8 zero"}),
    ("dm-message", {"name": "kiln-00000000-pool", "message": "set_transaction_id 0 1"}),
    ("dm-message", {"name": "kiln-00000000-pool", "message": "delete 1\ndelete 2"}),
    ("cgroup-kill", {"vm": "system.slice", "version": 2}),
    ("cgroup-kill", {"vm": "../..", "version": 2}),
    ("cgroup-kill", {"vm": "a" * 33, "version": 2}),
    ("cgroup-kill", {"vm": "abc", "version": 3}),
    ("cgroup-kill", {"vm": "abc", "version": "2"}),  # strict: no string → int
    ("cgroup-create", {"vm": "ABC", "version": 2}),
    ("jail-remove", {"vm": "-rf"}),
    ("jail-remove", {"vm": "аbc"}),  # Cyrillic a
    ("jail-stage", {"vm": "abc", "uid": 0, "gid": 0, "items": []}),
    ("jail-stage", {"vm": "abc", "uid": 900000, "gid": 900000,
                    "items": [{"name": "../x", "source": "/etc/shadow"}]}),
    ("jail-stage", {"vm": "abc", "uid": 900000, "gid": 900000,
                    "items": [{"name": "rootfs", "source": "relative/x"}]}),
    ("jail-launch", {"vm": "abc", "uid": 900000, "gid": 900000,
                     "cgroups": ["cpu.max=1;rm -rf /"]}),
    ("jail-launch", {"vm": "abc", "uid": 900000, "gid": 900000, "argv": ["/bin/sh"]}),
    ("tap-create", {"name": "eth0", "uid": 900000, "gid": 900000}),
    ("tap-create", {"name": "kt-abcdefghijklm", "uid": 900000, "gid": 900000}),  # 16 bytes
    ("tap-create", {"name": "kt-abc", "uid": 0, "gid": 900000}),
    ("tap-delete", {"name": "lo"}),
    ("volume-import", {"volume": "sha256:" + "0" * 63, "fd": 3}),
    ("volume-import", {"volume": "sha256:" + "0" * 64, "fd": 0}),
    ("volume-import", {"volume": "SHA256:" + "0" * 64, "fd": 3}),
    ("reclaim", {"keep": ["vg0-root"]}),
    ("pool-mount", {"device": "/dev/loop0", "mountpoint": "/mnt", "fs": "ext4"}),
]


@pytest.mark.parametrize(("op", "request_"), HOSTILE,
                         ids=[f"{o}-{i}" for i, (o, _) in enumerate(HOSTILE)])
def test_hostile_requests_are_malformed(op: str, request_: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ops.parse(op, json.dumps(request_))


def test_unknown_op_and_non_json() -> None:
    with pytest.raises(UsageError, match="unknown op 'mount'"):
        ops.parse("mount", "{}")
    with pytest.raises(UsageError, match="unknown op '--list '"):
        ops.parse("--list ", "{}")
    with pytest.raises(ValidationError):
        ops.parse("area", "not json")


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=80))
def test_any_accepted_relative_path_stays_beneath_the_root(text: str) -> None:
    try:  # the rule every helper-resolved relative path passes (dm-thin's own files)
        rel = safepath.check_rel(text)
    except UsageError:
        return
    assert not rel.startswith(("/", "-", "."))
    assert all(p not in ("", ".", "..") and not p.startswith(("-", ".")) for p in
               rel.split("/"))
    assert "\x00" not in rel
    assert "\n" not in rel
    root = "/r"
    assert os.path.normpath(os.path.join(root, rel)).startswith(root + "/")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_tap_and_id_patterns_never_accept_foreign_names(text: str) -> None:
    try:
        req = ops.parse("tap-delete", json.dumps({"name": text}))
        name = req.name  # type: ignore[attr-defined]
        assert name.startswith(tap.PREFIX)
        assert len(name.encode()) <= 15
    except ValidationError:
        pass
    try:
        req2 = ops.parse("jail-remove", json.dumps({"vm": text}))
        assert set(req2.vm) <= set("abcdefghijklmnopqrstuvwxyz234567")  # type: ignore[attr-defined]
    except ValidationError:
        pass


# -- argv builders ---------------------------------------------------------------------------


def test_tap_argv() -> None:
    assert tap.create_argv("kt-abc", 900001, 900002) == [
        "tuntap", "add", "dev", "kt-abc", "mode", "tap", "user", "900001", "group", "900002",
        "vnet_hdr"]
    assert tap.delete_argv("kt-abc") == ["tuntap", "del", "dev", "kt-abc", "mode", "tap"]
    with pytest.raises(UsageError, match="invalid tap name 'eth0'"):
        tap.create_argv("eth0", 1, 1)


def test_sudo_argv() -> None:
    assert client.sudo_argv("loop-attach") == [
        "/usr/bin/sudo", "--non-interactive", "--", "/opt/kiln/bin/kiln-helper", "loop-attach"]
    assert client.sudo_argv("volume-import", 5) == [
        "/usr/bin/sudo", "--non-interactive", "--close-from", "6", "--",
        "/opt/kiln/bin/kiln-helper", "volume-import"]


def test_a_sudo_caller_asks_a_read_once_until_it_changes_something(monkeypatch: Any) -> None:
    """Each sudo round costs ~180 ms: ``pool-list`` is asked once per process until any
    other op (which may change its answer) runs; callers get their own copy."""
    asked: list[str] = []

    def sudo(op: str, request: dict[str, Any], *_: object) -> dict[str, Any]:
        asked.append(op)
        return {"volumes": {}, "snapshots": [str(len(asked))]}

    monkeypatch.setattr(client, "privileged", lambda: False)
    monkeypatch.setattr(client, "_sudo", sudo)
    monkeypatch.setattr(client, "_memo", {})
    first = client.call("pool-list", {})
    first["snapshots"] = ["changed by a caller"]
    assert client.call("pool-list", {}) == {"volumes": {}, "snapshots": ["1"]}
    client.call("snapshot-create", {"volume": "v", "snapshot": "s"})
    assert client.call("pool-list", {})["snapshots"] == ["3"]
    assert client.call("pool-list", {})["snapshots"] == ["3"]
    assert asked == ["pool-list", "snapshot-create", "pool-list"]


def test_client_rel_refuses_paths_outside_the_area(tmp_path: Path) -> None:
    assert client.rel(tmp_path, tmp_path / "pool" / "x.img") == "pool/x.img"
    with pytest.raises(UsageError, match="is outside"):
        client.rel(tmp_path, "/etc/passwd")
    with pytest.raises(UsageError, match="is outside"):
        client.rel(tmp_path, tmp_path)


# -- config trust -------------------------------------------------------------------------------


def test_config_defaults_and_parse_errors() -> None:
    cfg = config.parse(b"")
    assert (cfg.uid_first, cfg.uid_count, cfg.cgroup_parent) == (900_000, 65_536, "kiln")
    assert cfg.area(1000) == Path("/var/lib/kiln/users/1000")
    with pytest.raises(configbase.UntrustedConfig, match=r"^x: jails.uid_gid_range: Value error, "
                       "uid_gid_range must start at 1000"):
        config.parse(b"[jails]\nuid_gid_range = [0, 10]\n", Path("x"))
    with pytest.raises(configbase.UntrustedConfig, match=r"^x: unknown tool 'sh'"):
        config.parse(b"[tools]\nsh = '/bin/sh'\n", Path("x"))
    with pytest.raises(configbase.UntrustedConfig, match="tool losetup = '/usr/bin/mount' must be "
                       "an absolute path named 'losetup'"):
        config.parse(b"[tools]\nlosetup = '/usr/bin/mount'\n", Path("x"))
    with pytest.raises(configbase.UntrustedConfig, match="x: bogus: Extra inputs"):
        config.parse(b"bogus = 1\n", Path("x"))
    cfg = config.parse(b"[tools]\nfirecracker = '/opt/fc/firecracker-v1.12.1'\n")
    assert cfg.tools["firecracker"] == Path("/opt/fc/firecracker-v1.12.1")


def test_built_in_defaults_equal_an_empty_file_and_need_no_pydantic(tmp_path: Path) -> None:
    """``load()`` without a config file returns ``DEFAULTS`` (no TOML, no pydantic: kiln run's
    start-up); they must be what the schema gives for an empty file."""
    empty = config.parse(b"")
    assert config.load((tmp_path / "absent.toml",)) is config.DEFAULTS
    assert empty == config.DEFAULTS
    assert empty.net_section is None  # no [net]: networking off
    assert config.parse(b"[net]\n").net_section == empty.net  # an empty [net]: defaults
    probe = ("import sys; from pathlib import Path; from helper import config; "
             "c = config.load((Path('/nonexistent/kiln.toml'),)); "
             "print(c.cgroup_parent, 'pydantic' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["kiln", "False"]


@pytest.fixture
def trusted_dir() -> Any:
    """A root-owned, 0755 directory chain (pytest tmp dirs sit under a 1777 /tmp)."""
    d = Path(f"/var/lib/kiln-helper-test-{os.getpid()}")
    d.mkdir(mode=0o755)
    try:
        yield d
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(d)], check=False)


@pytest.mark.root
def test_config_file_trust(trusted_dir: Path) -> None:
    f = trusted_dir / "config.toml"
    f.write_text("[pool]\ndirectory = '/var/lib/kiln-x'\n")
    f.chmod(0o644)
    assert config.load((f,)).pool_dir == Path("/var/lib/kiln-x")
    f.chmod(0o664)
    with pytest.raises(configbase.UntrustedConfig,
                       match=r"^refusing config .*writable only by root"):
        config.load((f,))
    f.chmod(0o644)
    os.chown(f, 65534, 0)
    with pytest.raises(configbase.UntrustedConfig, match=r"^refusing config"):
        config.load((f,))
    os.chown(f, 0, 0)
    link = trusted_dir / "link.toml"
    link.symlink_to(f)
    with pytest.raises(configbase.UntrustedConfig, match="it is a symlink"):
        config.load((link,))
    trusted_dir.chmod(0o775)
    with pytest.raises(configbase.UntrustedConfig, match=f"refusing {trusted_dir}: not root-owned"):
        config.load((f,))
    trusted_dir.chmod(0o755)
    assert config.load((trusted_dir / "absent.toml",)).path is None  # → built-in defaults


@pytest.mark.root
def test_tool_trust(trusted_dir: Path) -> None:
    tool = trusted_dir / "losetup"
    tool.write_bytes(b"#!/bin/sh\n")
    tool.chmod(0o755)
    assert configbase.check_tool("losetup", tool) == str(tool)
    os.chown(tool, 65534, 65534)
    with pytest.raises(configbase.UntrustedConfig, match="not a root-owned regular file"):
        configbase.check_tool("losetup", tool)
    os.chown(tool, 0, 0)
    tool.chmod(0o775)
    with pytest.raises(configbase.UntrustedConfig, match="not a root-owned regular file"):
        configbase.check_tool("losetup", tool)
    tool.chmod(0o755)
    with pytest.raises(configbase.UntrustedConfig, match="basename must be 'mount'"):
        configbase.check_tool("mount", tool)
    fc = trusted_dir / "fc-1.12"
    fc.write_bytes(b"")
    with pytest.raises(configbase.UntrustedConfig, match="basename must be 'firecracker'"):
        configbase.check_tool("firecracker", fc)
    with pytest.raises(NotFound, match="losetup not found at /nonexistent/losetup"):
        configbase.check_tool("losetup", Path("/nonexistent/losetup"))
    # A configured tool is checked at load time: the helper refuses to run at all.
    f = trusted_dir / "config.toml"
    f.write_text(f"[tools]\nlosetup = '{tool}'\n")
    os.chown(tool, 65534, 65534)
    with pytest.raises(configbase.UntrustedConfig):
        config.load((f,))


# -- safepath -----------------------------------------------------------------------------------


@pytest.mark.parametrize("walk", [False, True], ids=["openat2", "nofollow-walk"])
def test_safepath_refuses_symlinks_anywhere(tmp_path: Path, walk: bool) -> None:
    if not walk:
        assert safepath.openat2_available()  # this kernel has it: the fast path is tested
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("ok")
    (tmp_path / "out").symlink_to("/etc")
    (tmp_path / "d" / "ln").symlink_to("f")
    fd = safepath.open_beneath(tmp_path, "d/f", force_walk=walk)
    assert os.read(fd, 10) == b"ok"
    os.close(fd)
    for rel in ("out/passwd", "d/ln", "out"):
        with pytest.raises(UsageError, match="symlink"):
            safepath.open_beneath(tmp_path, rel, force_walk=walk)
    with pytest.raises(NotFound):
        safepath.open_beneath(tmp_path, "d/missing", force_walk=walk)
    with pytest.raises(UsageError, match="invalid path"):
        safepath.open_beneath(tmp_path, "../etc/passwd", force_walk=walk)


def test_safepath_hard_link_is_caught_by_fstat(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("x")
    os.link(tmp_path / "a", tmp_path / "b")
    fd = safepath.open_beneath(tmp_path, "b")
    try:
        with pytest.raises(UsageError, match="has 2 hard links"):
            safepath.fstat_kind(fd, "reg", "b", single_link=True)
    finally:
        os.close(fd)


@pytest.mark.parametrize("walk", [False, True], ids=["openat2", "nofollow-walk"])
def test_safepath_race_never_escapes(tmp_path: Path, walk: bool) -> None:
    """A thread swaps ``root/d`` between a real directory and a symlink to a directory
    outside the root; every open either fails or returns the file inside the root."""
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    (root / "real").mkdir(parents=True)
    outside.mkdir()
    (root / "real" / "f").write_text("inside")
    (outside / "f").write_text("OUTSIDE")
    (root / "evil").symlink_to(outside)
    stop = threading.Event()
    flips = [0]

    def swap() -> None:
        # root/d is, in turn: the real directory, absent, a symlink out of the root, absent.
        while not stop.is_set():
            os.rename(root / "real", root / "d")
            os.rename(root / "d", root / "real")
            os.rename(root / "evil", root / "d")
            os.rename(root / "d", root / "evil")
            flips[0] += 1

    t = threading.Thread(target=swap, daemon=True)
    t.start()
    got = {"inside": 0, "refused": 0, "symlink": 0}
    messages: set[str] = set()
    try:
        for _ in range(3000):
            try:
                fd = safepath.open_beneath(root, "d/f", force_walk=walk)
            except UsageError as e:
                messages.add(e.message.replace(str(root), "ROOT"))
                got["symlink"] += 1
                continue
            except NotFound:
                got["refused"] += 1
                continue
            data = os.read(fd, 20)
            os.close(fd)
            assert data == b"inside"
            got["inside"] += 1
    finally:
        stop.set()
        t.join()
    assert all("symlink" in m for m in messages), messages
    assert got["inside"] > 0  # the race happened both ways
    assert got["symlink"] > 0
    assert flips[0] > 0


# -- op functions in-process, on real objects -------------------------------------------------


def _ctx(area: Path) -> ops.Ctx:
    return ops.Ctx(cfg=config.parse(b""), area=area, caller_uid=0, caller_gid=0)


@pytest.mark.root
def test_ops_on_missing_objects_raise_not_found(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    cases = [
        ("pool-mount", {}),
        ("pool-list", {}),
        ("dm-remove", {"name": f"kiln-{root_key(str(tmp_path))}-pool"}),
        ("cgroup-kill", {"vm": "nosuchvm", "version": 2}),
        ("tap-delete", {"name": "kt-nosuch"}),
        ("pool-umount", {}),
        ("volume-remove", {"volume": "sha256:" + "0" * 64}),
        ("snapshot-remove", {"snapshot": "nosuch"}),
    ]
    for op, req in cases:
        with pytest.raises(NotFound):
            ops.run_op(ctx, op, ops.parse(op, json.dumps(req)))
    # Another area's device (or anyone else's) is refused before existence is even asked.
    with pytest.raises(UsageError, match="refusing device-mapper name 'kiln-00000000-pool'"):
        ops.run_op(ctx, "dm-remove", ops.parse("dm-remove", '{"name": "kiln-00000000-pool"}'))


@pytest.mark.root
def test_volume_import_rehashes_and_refuses_a_lie(tmp_path: Path) -> None:
    import hashlib

    vols = tmp_path / "pool" / "fs" / "volumes"
    vols.mkdir(parents=True)
    src = tmp_path / "src.ext4"
    data = b"\0" * (3 << 20) + b"volume" + b"\0" * 4096
    src.write_bytes(data)
    good = "sha256:" + hashlib.sha256(data).hexdigest()
    ctx = dataclasses.replace(_ctx(tmp_path), trusted=True)  # root's own pool directory
    fd = os.open(src, os.O_RDONLY)
    try:
        lie = ops.parse("volume-import", json.dumps({"volume": "sha256:" + "1" * 64,
                                                     "fd": fd}))
        with pytest.raises(KilnError, match="volume bytes hash to sha256:"):
            ops.run_op(ctx, "volume-import", lie)
        assert os.listdir(vols) == []  # nothing half-written, not even a temp name
        ok = ops.parse("volume-import", json.dumps({"volume": good, "fd": fd}))
        assert ops.run_op(ctx, "volume-import", ok) == {"created": True}
    finally:
        os.close(fd)
    out = vols / f"{good[7:]}.ext4"
    assert out.read_bytes() == data
    assert out.stat().st_mode & 0o777 == 0o444
    assert out.stat().st_blocks * 512 < len(data)  # zero runs stayed holes
