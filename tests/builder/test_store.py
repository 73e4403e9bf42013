"""The volume store: commit, id prefixes, removal, verification, dangling keys."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from pathlib import Path

import pytest

from builder.root import Root
from builder.store import Store, hash_file
from helper.base.errors import Conflict, IntegrityError, NotFound, UsageError


def _commit(store: Store, data: bytes, key: str | None = None) -> str:
    with store.root.workdir("test") as wd:
        stage = wd / "stage"
        stage.mkdir()
        (stage / "volume.ext4").write_bytes(data)
        vid = hash_file(stage / "volume.ext4")
        store.commit(stage, vid, {"source": "docker://x/y:1", "size": len(data),
                                  "created": "2026-01-01T00:00:00Z", "build_key": key})
    if key:
        store.set_key(key, vid)
    return vid


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(Root(tmp_path).ensure())


def test_commit_makes_readonly_volume_with_meta(store: Store) -> None:
    vid = _commit(store, b"hello")
    assert vid == "sha256:" + hashlib.sha256(b"hello").hexdigest()
    v = store.get(vid)
    assert v.path.read_bytes() == b"hello"
    assert v.path.stat().st_mode & 0o777 == 0o444
    assert json.loads((v.dir / "meta.json").read_text())["id"] == vid
    assert os.listdir(store.root.tmp) == []
    assert [x.id for x in store.list()] == [vid]


def test_commit_of_same_bytes_twice_keeps_one(store: Store) -> None:
    a = _commit(store, b"same")
    b = _commit(store, b"same")
    assert a == b
    assert len(store.list()) == 1


def _two_with_common_prefix() -> tuple[bytes, bytes, str]:
    seen: dict[str, bytes] = {}
    for i in itertools.count():
        data = f"v{i}".encode()
        p = hashlib.sha256(data).hexdigest()[:4]
        if p in seen:
            return seen[p], data, p
        seen[p] = data
    raise AssertionError


def test_prefix_resolution_and_ambiguity(store: Store) -> None:
    a, b, prefix = _two_with_common_prefix()
    ida, idb = _commit(store, a), _commit(store, b)
    assert store.get(ida[7:19]).id == ida
    assert store.get("sha256:" + idb[7:19]).id == idb
    with pytest.raises(Conflict) as e:
        store.get(prefix)
    assert e.value.message.startswith(f"volume id {prefix!r} is ambiguous: ")
    assert ida[:19] in e.value.message
    assert idb[:19] in e.value.message


@pytest.mark.parametrize("bad", ["abc", "xyz123", "sha256:", "sha512:abcd", "../etc"])
def test_invalid_ids_are_usage_errors(store: Store, bad: str) -> None:
    with pytest.raises(UsageError) as e:
        store.get(bad)
    assert e.value.message == f"invalid volume id {bad!r}"


def test_unknown_id_not_found(store: Store) -> None:
    with pytest.raises(NotFound) as e:
        store.get("beef")
    assert e.value.message == "no volume matches 'beef'"


def test_remove_drops_volume_and_its_keys(store: Store) -> None:
    key = "sha256:" + "1" * 64
    vid = _commit(store, b"x", key)
    assert store.lookup_key(key) is not None
    store.remove(store.get(vid))
    assert store.list() == []
    assert store.lookup_key(key) is None
    assert os.listdir(store.root.keys) == []
    assert os.listdir(store.root.tmp) == []


def test_verify_detects_corruption(store: Store) -> None:
    vid = _commit(store, b"original bytes")
    v = store.get(vid)
    store.verify(v)
    os.chmod(v.path, 0o644)
    v.path.write_bytes(b"tampered bytes")
    with pytest.raises(IntegrityError) as e:
        store.verify(v)
    assert e.value.message.startswith(f"volume {vid[:19]} is corrupt: its bytes hash to sha256:")


def test_dangling_key_is_reported(store: Store) -> None:
    key = "sha256:" + "2" * 64
    vid = _commit(store, b"y", key)
    os.chmod(store.get(vid).dir, 0o755)
    import shutil

    shutil.rmtree(store.get(vid).dir)
    assert store.lookup_key(key) is None
    assert [p.name for p in store.dangling_keys()] == ["2" * 64]
