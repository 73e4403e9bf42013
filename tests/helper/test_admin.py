"""``reclaim-all``: what no caller comes back for — a departed user's everything, and what
a previous boot left in a live user's area — reclaimed by root, and only by root."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.firecracker import BIN_DIR
from tests.support.oci import User, make_user
from tests.support.sudo import BASE, GOOD_CONFIG, _write_config, helper_as, sudoers

pytestmark = [pytest.mark.root, pytest.mark.loop]

OLD_BOOT = "00000000-0000-4000-8000-000000000000"


def mounts_under(path: Path) -> list[str]:
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return [ln.split()[4] for ln in lines if ln.split()[4].startswith(f"{path}/")]


@pytest.fixture
def departing(installed: str) -> Iterator[User]:
    with make_user("kilnd") as user, sudoers(user):
        yield user


def test_only_root_may_reclaim_all(sudo_user: User) -> None:
    res = helper_as(sudo_user, "reclaim-all", {})
    assert res.returncode == 1
    assert "reclaim-all is for root" in res.stderr


def test_a_departed_users_pool_and_area_go(departing: User) -> None:
    area = BASE / "users" / str(departing.uid)
    res = helper_as(departing, "pool-create", {"size": 256 << 20, "fs": "btrfs"})
    assert res.returncode == 0, res.stderr
    assert mounts_under(area) == [str(area / "pool" / "fs")]
    subprocess.run(["userdel", departing.name], check=True, capture_output=True)
    res = helper_as(None, "reclaim-all", {})
    assert res.returncode == 0, res.stderr
    assert str(departing.uid) in json.loads(res.stdout)["removed"]
    assert mounts_under(area) == []
    assert not area.exists()


def _plant_claim(area: Path, kind: str, name: str, doc: dict[str, object]) -> Path:
    d = area / kind
    d.mkdir(mode=0o700, exist_ok=True)
    p = d / name
    p.write_text(json.dumps(doc))
    p.chmod(0o600)
    return p


@pytest.mark.firecracker
def test_a_previous_boots_claims_go_and_nobody_elses_object(sudo_user: User) -> None:
    """A cgroup claim of a previous boot only goes (its cgroup went with the boot); a jail
    claim of a previous boot takes its directory only when that is still the very one."""
    _write_config(GOOD_CONFIG + f'\n[tools]\nfirecracker = "{BIN_DIR}/firecracker"\n'
                  f'jailer = "{BIN_DIR}/jailer"\n')
    try:
        helper_as(sudo_user, "area", {})
        area = BASE / "users" / str(sudo_user.uid)
        cg = _plant_claim(area, "cgroups", "oldvm", {"boot": OLD_BOOT, "version": 2,
                                                      "dirs": {}})
        jails = BASE / "jails" / "firecracker"
        mine, other = jails / "oldjail", jails / "reused"
        for d in (mine, other):
            d.mkdir(parents=True, exist_ok=True)
        st = mine.stat()
        j1 = _plant_claim(area, "jails", "oldjail", {
            "boot": OLD_BOOT, "dirs": {str(mine): [st.st_dev, st.st_ino]}})
        j2 = _plant_claim(area, "jails", "reused", {  # the name now holds another inode
            "boot": OLD_BOOT, "dirs": {str(other): [st.st_dev, 1]}})
        res = helper_as(None, "reclaim-all", {})
        assert res.returncode == 0, res.stderr
        assert not cg.exists()
        assert not j1.exists()
        assert not j2.exists()
        assert not mine.exists()
        assert other.exists()  # not the claimed inode: someone else's, untouched
        os.rmdir(other)
    finally:
        _write_config(GOOD_CONFIG)
