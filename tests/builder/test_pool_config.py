"""ROOT/pool/config.json: kiln's own state, checked field by field when read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builder.pool.base import PoolConfig, read_config
from helper.base.errors import IntegrityError

GOOD = {"backend": "reflink", "reason": "the root's filesystem has reflinks", "fs": "host",
        "size": 0, "created": "2026-11-23T00:00:00.000000Z", "block_sectors": 128}


def test_round_trip(tmp_path: Path) -> None:
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "config.json").write_text(json.dumps(GOOD))
    cfg = read_config(tmp_path)
    assert cfg is not None
    assert cfg.as_json() == GOOD
    assert read_config(tmp_path / "elsewhere") is None
    no_block = {k: v for k, v in GOOD.items() if k != "block_sectors"}
    assert PoolConfig.from_json(no_block).block_sectors == 128


@pytest.mark.parametrize(("change", "message"), [
    ({"backend": "lvm"}, "backend must be one of dm-thin, reflink, copy, not 'lvm'"),
    ({"fs": "ext4"}, "fs must be one of btrfs, xfs, host, not 'ext4'"),
    ({"size": "1G"}, "size must be int, not str"),
    ({"size": True}, "size must be int, not bool"),
    ({"size": -1}, "size must be >= 0 and block_sectors >= 128"),
    ({"block_sectors": 8}, "size must be >= 0 and block_sectors >= 128"),
    ({"extra": 1}, "unknown field 'extra'"),
    ({"created": None}, "created must be str, not NoneType"),
])
def test_bad_field_is_one_clear_error(tmp_path: Path, change: dict[str, object],
                                      message: str) -> None:
    (tmp_path / "pool").mkdir()
    path = tmp_path / "pool" / "config.json"
    path.write_text(json.dumps({**GOOD, **change}))
    with pytest.raises(IntegrityError) as e:
        read_config(tmp_path)
    assert e.value.message == f"pool config {path} is invalid: {message}"
    assert e.value.hint == "run `kiln pool destroy --force` and `kiln pool init`"


def test_missing_field_and_non_object(tmp_path: Path) -> None:
    (tmp_path / "pool").mkdir()
    path = tmp_path / "pool" / "config.json"
    path.write_text(json.dumps({k: v for k, v in GOOD.items() if k != "reason"}))
    with pytest.raises(IntegrityError, match="field 'reason' is missing"):
        read_config(tmp_path)
    path.write_text("[1]")
    with pytest.raises(IntegrityError, match="is invalid: not a JSON object"):
        read_config(tmp_path)
