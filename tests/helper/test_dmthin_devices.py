"""The dm-thin ops' parts that need no device-mapper, for real on this host: the operator's
``[pool]`` devices looked at by ``helper.storage.dmdev`` (real loop devices, a mounted one, a
regular file, a missing path), the devices' claim, the pool files and ``thin-clear``,
the checks ``dm-create`` and ``dm-import`` make before any dmsetup call, and the verified
copy of a volume. What needs dm-thin runs in the QEMU guest (``test_dmthin_vm.py``)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from helper import config, configbase
from helper.base.errors import Conflict, IntegrityError, KilnError, NotFound, UsageError
from helper.ops import dm as ops_dm
from helper.ops import registry as ops
from helper.storage import dmdev
from helper.storage import dmthin_core as core

pytestmark = pytest.mark.root


def _losetup(path: Path) -> str:
    return subprocess.run(["losetup", "--find", "--show", str(path)], capture_output=True,
                          text=True, check=True).stdout.strip()


def _sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@pytest.fixture
def loops(tmp_path: Path) -> Iterator[dict[str, str]]:
    """data (64 MiB), meta (8 MiB) and a mounted ext4 (16 MiB), all loop devices."""
    devs = {name: _losetup(_sparse(tmp_path / f"{name}.img", size)) for name, size in
            (("data", 64 << 20), ("meta", 8 << 20), ("mounted", 16 << 20))}
    subprocess.run(["mkfs.ext4", "-q", devs["mounted"]], check=True, capture_output=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", devs["mounted"], str(mnt)], check=True)
    try:
        yield devs
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        for dev in devs.values():
            subprocess.run(["losetup", "--detach", dev], check=False)


def _cfg(tmp_path: Path, data: str, meta: str) -> configbase.Config:
    return config.parse(f'[pool]\ndirectory = "{tmp_path / "helper"}"\n'
                        f'data_device = "{data}"\nmetadata_device = "{meta}"\n'.encode(),
                        Path("/etc/kiln/test-config.toml"))


@pytest.mark.loop
def test_block_facts_of_real_devices(tmp_path: Path, loops: dict[str, str]) -> None:
    data = dmdev.block_facts(Path(loops["data"]))
    st = os.stat(loops["data"])
    assert data == core.BlockFacts(loops["data"], "block device",
                                   f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}", 64 << 20)
    mounted = dmdev.block_facts(Path(loops["mounted"]))
    assert mounted.mounted_at == (str(tmp_path / "mnt"),)
    assert mounted.busy  # the O_EXCL open is refused while mounted
    assert mounted.size == 16 << 20  # from sysfs, since it could not be opened
    assert dmdev.block_facts(tmp_path / "data.img").kind == "regular file"
    assert dmdev.block_facts(tmp_path).kind == "directory"
    assert dmdev.block_facts(tmp_path / "nope").kind == "missing"


@pytest.mark.loop
def test_check_devices_exact_errors(tmp_path: Path, loops: dict[str, str]) -> None:
    good = dmdev.check_devices(_cfg(tmp_path, loops["data"], loops["meta"]), 128)
    assert (good.data, good.metadata, good.data_bytes, good.meta_bytes) == \
        (loops["data"], loops["meta"], 64 << 20, 8 << 20)
    hint = "fix [pool] in /etc/kiln/test-config.toml, or free the device"
    for data, meta, want in (
        (str(tmp_path / "data.img"), loops["meta"],
         f"[pool] data_device {tmp_path / 'data.img'} is not a block device (it is a "
         "regular file)"),
        (loops["mounted"], loops["meta"],
         f"[pool] data_device {loops['mounted']} is mounted at {tmp_path / 'mnt'}"),
        (loops["data"], "/dev/kiln-test-missing",
         "[pool] metadata_device /dev/kiln-test-missing does not exist"),
    ):
        with pytest.raises(UsageError) as e:
            dmdev.check_devices(_cfg(tmp_path, data, meta), 128)
        assert (e.value.message, e.value.hint) == (want, hint)
    # One device under two names (a symlink, like /dev/disk/by-id): the same major:minor.
    alias = tmp_path / "alias"
    alias.symlink_to(loops["data"])
    with pytest.raises(UsageError, match=r"are the same device \(7:"):
        dmdev.check_devices(_cfg(tmp_path, str(alias), loops["data"]), 128)


def test_config_pool_devices_syntax() -> None:
    cfg = config.parse(b'[pool]\ndata_device = "/dev/sdb"\nmetadata_device = "/dev/sdc"\n')
    assert (cfg.data_device, cfg.metadata_device) == (Path("/dev/sdb"), Path("/dev/sdc"))
    assert config.parse(b"").data_device is None
    for text, want in (
        (b'[pool]\ndata_device = "/dev/sdb"\n', "config: pool: Value error, data_device and "
         "metadata_device go together: set both or neither"),
        (b'[pool]\ndata_device = "/dev/sdb"\nmetadata_device = "/dev/sdb"\n',
         "config: pool: Value error, data_device and metadata_device must be different "
         "devices"),
        (b'[pool]\ndata_device = "/dev/../sdb"\nmetadata_device = "/dev/sdc"\n',
         "config: pool: Value error, device path '/dev/../sdb' contains '..'"),
        (b'[pool]\ndata_device = "sdb"\nmetadata_device = "/dev/sdc"\n',
         "config: pool.data_device: String should match pattern '^/[A-Za-z0-9._+/-]{1,255}$'"),
    ):
        with pytest.raises(configbase.UntrustedConfig) as e:
            config.parse(text)
        assert e.value.message == want


def test_claim_one_area_at_a_time(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "/dev/sdb", "/dev/sdc")
    mine, other = tmp_path / "mine", tmp_path / "other"
    mine.mkdir()
    other.mkdir()
    assert dmdev.claimed_by(cfg) is None
    with pytest.raises(Conflict) as e:  # unclaimed, not fresh: maybe an old pool's metadata
        dmdev.claim(cfg, mine, None, fresh=False)
    assert (e.value.message, e.value.hint) == (
        "the [pool] devices are not claimed by this pool: only a new pool (fresh) may take "
        "them, and it formats them", "run `kiln pool init` to make a new pool on them")
    assert dmdev.claimed_by(cfg) is None
    dmdev.claim(cfg, mine, None, fresh=True)
    claim = tmp_path / "helper" / "thin-devices.json"
    assert json.loads(claim.read_text()) == {"area": str(mine)}
    assert (claim.stat().st_uid, claim.stat().st_mode & 0o777) == (0, 0o644)
    dmdev.claim(cfg, mine, None, fresh=False)  # its own: fine
    for fresh in (True, False):
        with pytest.raises(Conflict, match=f"the .pool. devices hold the pool of {mine}$"):
            dmdev.claim(cfg, other, None, fresh=fresh)
    assert not dmdev.release(cfg, other)  # not the holder: nothing happens
    assert claim.exists()
    os.rmdir(mine)  # the claimant's area is gone: its claim is stale
    with pytest.raises(Conflict, match="were claimed by"):
        dmdev.claim(cfg, other, None, fresh=False)
    dmdev.claim(cfg, other, None, fresh=True)
    assert dmdev.claimed_by(cfg) == str(other)
    assert dmdev.release(cfg, other)
    assert not claim.exists()


def _ctx(area: Path, cfg: configbase.Config | None = None, *, trusted: bool = False) -> ops.Ctx:
    return ops.Ctx(cfg=cfg or config.parse(b""), area=area, caller_uid=1000,
                   caller_gid=1000, trusted=trusted)


def _run(ctx: ops.Ctx, op: str, request: dict[str, object]) -> dict[str, object]:
    return ops.run_op(ctx, op, ops.parse(op, json.dumps(request)))


def test_thin_files_and_clear(tmp_path: Path) -> None:
    area = tmp_path / "area"
    area.mkdir()
    ctx = _ctx(area, _cfg(tmp_path, "/dev/sdb", "/dev/sdc"))
    ops_dm.make_thin_files(ctx, 256 << 20, 16 << 20)
    data, meta = area / "pool/thin/data.img", area / "pool/thin/meta.img"
    for f, size in ((data, 256 << 20), (meta, 16 << 20)):
        st = f.stat()
        assert (st.st_uid, st.st_mode & 0o777, st.st_size, st.st_blocks) == (0, 0o600, size, 0)
    ops_dm.make_thin_files(ctx, 256 << 20, 16 << 20)  # the same sizes: kept
    with pytest.raises(Conflict, match=r"pool/thin/data\.img exists and is not a 536870912-"):
        ops_dm.make_thin_files(ctx, 512 << 20, 16 << 20)
    dmdev.record_base(area, 7)
    dmdev.claim(ctx.cfg, area, None, fresh=True)
    pool = core.pool_name(core.root_key(str(area)))
    assert _run(ctx, "thin-clear", {"pool": pool}) == {"removed": [], "released": True}
    assert not data.exists()
    assert not meta.exists()
    assert dmdev.base_ids(area) == set()
    assert dmdev.claimed_by(ctx.cfg) is None
    with pytest.raises(UsageError, match="is not a pool device name"):
        _run(ctx, "thin-clear", {"pool": core.snapshot_name(core.root_key(str(area)), "a")})


def test_dm_create_and_import_refuse_before_touching_anything(tmp_path: Path) -> None:
    area = tmp_path / "area"
    area.mkdir()
    ctx = _ctx(area)
    key = core.root_key(str(area))
    pool, snap = core.pool_name(key), core.snapshot_name(key, "abcd")
    vol = core.volume_name(key, "ab" * 32)
    dmdev.record_base(area, 5)
    cases: list[tuple[dict[str, object], type[KilnError], str]] = [
        ({"name": pool, "kind": "thin-pool", "grant": True}, UsageError,
         f"refusing to give {pool} to the caller: only snapshot devices are given"),
        ({"name": snap, "kind": "thin", "pool": pool, "thin_id": 5, "sectors": 8,
          "grant": True}, UsageError,
         "refusing to give thin device 5 to the caller: it holds a base volume"),
        ({"name": vol, "kind": "thin", "pool": pool, "thin_id": 6, "sectors": 8}, UsageError,
         f"{vol} is not a snap device name"),
        ({"name": snap, "kind": "thin-pool"}, UsageError, f"{snap} is not a pool device name"),
        ({"name": pool, "kind": "thin-pool", "source": "devices", "data_bytes": 1 << 30},
         UsageError, "the operator's devices come from [pool], not from the request"),
        ({"name": pool, "kind": "thin-pool", "fresh": True, "data_bytes": (1 << 20) - 1,
          "metadata_bytes": 16 << 20}, UsageError, "a new pool needs data_bytes of at least "
         "16 blocks and metadata_bytes of at least 2097152"),
        ({"name": pool, "kind": "thin-pool", "data_bytes": 1 << 30}, UsageError,
         "sizes are given only for a new pool (fresh)"),
        ({"name": pool, "kind": "thin-pool", "source": "devices"}, UsageError,
         "no [pool] data_device and metadata_device are configured"),
        ({"name": snap, "kind": "thin", "pool": pool, "thin_id": 6, "sectors": 8,
          "grant": True}, NotFound, f"device-mapper device {pool} does not exist"),
    ]
    for request, err, want in cases:
        with pytest.raises(err) as e:
            _run(ctx, "dm-create", request)
        assert e.value.message == want
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        for request, err, want in (
            ({"pool": pool, "name": core.volume_name(key, "cd" * 32),
              "volume": "sha256:" + "ab" * 32, "thin_id": 6, "fd": fd}, UsageError,
             f"{core.volume_name(key, 'cd' * 32)} is not the device name of "
             "sha256:abababababab"),
            ({"pool": pool, "name": vol, "volume": "sha256:" + "ab" * 32, "thin_id": 6,
              "fd": fd}, UsageError, f"file descriptor {fd} is not a non-empty regular file"),
            ({"pool": pool, "name": vol, "volume": "sha256:" + "ab" * 32, "thin_id": 6,
              "fd": 250}, NotFound, "file descriptor 250 is not open"),
        ):
            with pytest.raises(err) as e:
                _run(ctx, "dm-import", request)
            assert e.value.message == want
    finally:
        os.close(fd)
    assert dmdev.base_ids(area) == {5}  # nothing recorded by the refused imports


def test_copy_volume_writes_data_and_checks_the_hash(tmp_path: Path) -> None:
    src = tmp_path / "vol.ext4"
    with open(src, "wb") as f:
        f.truncate(8 << 20)
        f.seek(3 << 20)
        f.write(b"kiln" * 1000)
        f.seek(5 << 20)
        f.write(bytes(1 << 20))  # written zeros: hashed, never written out
    want = "sha256:" + hashlib.sha256(src.read_bytes()).hexdigest()
    for expect in (want, None):
        dst = tmp_path / f"dst-{expect is None}"
        sfd = os.open(src, os.O_RDONLY)
        dfd = os.open(dst, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(dfd, 8 << 20)
            dmdev.copy_volume(sfd, dfd, expect)
        finally:
            os.close(sfd)
            os.close(dfd)
        assert dst.read_bytes() == src.read_bytes()
        assert dst.stat().st_blocks * 512 <= 64 << 10  # only the non-zero data landed
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(tmp_path / "dst-bad", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with pytest.raises(IntegrityError) as e:
            dmdev.copy_volume(sfd, dfd, "sha256:" + "0" * 64)
    finally:
        os.close(sfd)
        os.close(dfd)
    assert e.value.message == f"volume bytes hash to {want[:19]}, not sha256:000000000000"


def test_reclaim_spares_the_configured_devices(tmp_path: Path) -> None:
    cfg = dataclasses.replace(config.parse(b""), data_device=tmp_path / "d",
                              metadata_device=tmp_path / "m")
    (tmp_path / "real").touch()
    (tmp_path / "d").symlink_to(tmp_path / "real")
    assert dmdev.spare_devices(cfg) == {str(tmp_path / "real"), str(tmp_path / "m")}
    assert dmdev.spare_devices(config.parse(b"")) == set()


@pytest.mark.loop
def test_a_failed_pool_leaves_no_loop_attached(tmp_path: Path) -> None:
    """On this host dmsetup cannot create the pool (no device-mapper): the files the helper
    made stay for the next try, the loops it attached for it are detached again."""
    area = tmp_path / "area"
    area.mkdir()
    ctx = _ctx(area)
    pool = core.pool_name(core.root_key(str(area)))
    before = _loops_under(area)
    with pytest.raises(Exception, match="dmsetup") as e:
        _run(ctx, "dm-create", {"name": pool, "kind": "thin-pool", "fresh": True,
                                "data_bytes": 64 << 20, "metadata_bytes": 8 << 20})
    assert type(e.value).__name__ in ("ToolError", "ToolNotFound")
    assert (area / "pool/thin/data.img").stat().st_size == 64 << 20
    assert _loops_under(area) == before == []


def _loops_under(path: Path) -> list[str]:
    out = subprocess.run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"],
                         capture_output=True, text=True, check=True).stdout
    devs = json.loads(out)["loopdevices"] if out.strip() else []
    return [d["name"] for d in devs if (d.get("back-file") or "").startswith(f"{path}/")]


def _superblock(dev: str) -> bytes:
    fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, core.SUPERBLOCK_BYTES, 0)
    finally:
        os.close(fd)


def _scribble(dev: str) -> None:
    """What a loaded pool leaves in its metadata superblock: anything but zeros."""
    fd = os.open(dev, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.pwrite(fd, b"A's thin-pool metadata " * 100, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.mark.loop
def test_next_area_never_inherits_the_previous_pool_on_the_devices(
        tmp_path: Path, loops: dict[str, str]) -> None:
    """The attack: A's pool on the operator's devices, A's `thin-clear`, then B's
    `dm-create thin-pool source=devices` without `fresh` would load A's metadata (and B could
    grant itself A's old thin ids). Now thin-clear formats before it releases the claim, and
    an unclaimed device is only taken fresh (formatted)."""
    cfg = _cfg(tmp_path, loops["data"], loops["meta"])
    area_a, area_b = tmp_path / "users/1000", tmp_path / "users/1001"
    area_a.mkdir(parents=True)
    area_b.mkdir()
    ctx_a, ctx_b = _ctx(area_a, cfg), _ctx(area_b, cfg)
    pool_a = core.pool_name(core.root_key(str(area_a)))
    pool_b = core.pool_name(core.root_key(str(area_b)))
    devs = dmdev.check_devices(cfg, 128)
    dmdev.claim(cfg, area_a, devs, fresh=True)  # A's pool init: formats, then claims
    assert _superblock(loops["meta"]) == bytes(core.SUPERBLOCK_BYTES)
    _scribble(loops["meta"])  # A's pool ran and wrote its metadata

    def b_load() -> Conflict:
        with pytest.raises(Conflict) as e:
            _run(ctx_b, "dm-create", {"name": pool_b, "kind": "thin-pool",
                                      "source": "devices"})
        return e.value

    assert b_load().message == f"the [pool] devices hold the pool of {area_a}"
    # thin-clear fails while the metadata device cannot be formatted (held open
    # exclusively): the claim stays A's, so the metadata stays out of B's reach.
    hold = os.open(loops["meta"], os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    try:
        with pytest.raises(UsageError) as ue:
            _run(ctx_a, "thin-clear", {"pool": pool_a})
    finally:
        os.close(hold)
    assert ue.value.message == (f"[pool] metadata_device {loops['meta']} is in use (another "
                                "program holds it open exclusively)")
    assert dmdev.claimed_by(cfg) == str(area_a)
    assert b_load().message == f"the [pool] devices hold the pool of {area_a}"
    assert _superblock(loops["meta"]) != bytes(core.SUPERBLOCK_BYTES)

    assert _run(ctx_a, "thin-clear", {"pool": pool_a}) == {"removed": [], "released": True}
    assert _superblock(loops["meta"]) == bytes(core.SUPERBLOCK_BYTES)  # formatted
    assert dmdev.claimed_by(cfg) is None
    refused = b_load()
    assert (refused.message, refused.hint) == (
        "the [pool] devices are not claimed by this pool: only a new pool (fresh) may take "
        "them, and it formats them", "run `kiln pool init` to make a new pool on them")
    assert dmdev.claimed_by(cfg) is None
    # Even metadata that survived (put back behind the helper's back) is gone once B takes
    # the devices: fresh formats before the claim is written. (dmsetup fails on this host.)
    _scribble(loops["meta"])
    with pytest.raises(KilnError, match="dmsetup"):
        _run(ctx_b, "dm-create", {"name": pool_b, "kind": "thin-pool", "source": "devices",
                                  "fresh": True})
    assert _superblock(loops["meta"]) == bytes(core.SUPERBLOCK_BYTES)
    assert dmdev.claimed_by(cfg) == str(area_b)
    # A's stale try on B's devices: B's area exists, so A is refused and formats nothing.
    _scribble(loops["meta"])
    with pytest.raises(Conflict, match=f"hold the pool of {area_b}$"):
        _run(ctx_a, "dm-create", {"name": pool_a, "kind": "thin-pool", "source": "devices",
                                  "fresh": True})
    assert _run(ctx_a, "thin-clear", {"pool": pool_a}) == {"removed": [], "released": False}
    assert _superblock(loops["meta"]) != bytes(core.SUPERBLOCK_BYTES)  # B's, untouched


def test_import_refuses_a_thin_id_that_holds_a_base(tmp_path: Path) -> None:
    """dm-import records the base before create_thin, exclusively: an id already recorded
    (another import of it under way, or a base) is refused and its record kept; a refused
    import leaves no record of its own."""
    area = tmp_path / "area"
    area.mkdir()
    ctx = _ctx(area)
    key = core.root_key(str(area))
    pool, vol = core.pool_name(key), core.volume_name(key, "ab" * 32)
    dmdev.record_base(area, 5)
    with pytest.raises(Conflict) as e:
        dmdev.record_base(area, 5)
    assert (e.value.message, e.value.hint) == (
        "thin device 5 already holds a base volume", "import into a free thin id")
    src = tmp_path / "vol.ext4"
    src.write_bytes(b"x" * 4096)
    fd = os.open(src, os.O_RDONLY)
    try:
        with pytest.raises(NotFound, match=f"device-mapper device {pool} does not exist"):
            _run(ctx, "dm-import", {"pool": pool, "name": vol, "volume": "sha256:" + "ab" * 32,
                                    "thin_id": 6, "fd": fd})
    finally:
        os.close(fd)
    assert dmdev.base_ids(area) == {5}


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs: its free space is known exactly."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0755", "kilntest", str(mnt)],
                   check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_pool_files_are_capped_for_a_sudo_caller(small_fs: Path) -> None:
    """Root-owned sparse files escape the caller's disk quota: dm-create (files) and
    pool-create refuse more than [limits] pool_bytes (64 GiB), or more than the space of
    the areas' filesystem not yet promised to any area's images less a 5 % margin, before
    any file exists. Root in-process sizes its own pool."""
    area = small_fs / "area"
    area.mkdir()
    ctx = _ctx(area)
    pool = core.pool_name(core.root_key(str(area)))
    st = os.statvfs(small_fs)
    room = (st.f_bavail * st.f_frsize - (64 << 20) * 5 // 100) >> 20
    for op, request, want in (
        ("dm-create", {"name": pool, "kind": "thin-pool", "fresh": True,
                       "data_bytes": 1 << 50, "metadata_bytes": 16 << 20},
         f"refusing the pool files of {((1 << 50) + (16 << 20)) >> 20} MiB: a caller's pool "
         "is at most 65536 MiB ([limits] pool_bytes)"),
        ("dm-create", {"name": pool, "kind": "thin-pool", "fresh": True,
                       "data_bytes": 62 << 20, "metadata_bytes": 2 << 20},
         f"refusing the pool files of 64 MiB: the pool directory's filesystem has {room} MiB "
         f"not yet promised to other images (free {st.f_bavail * st.f_frsize >> 20} MiB, "
         "promised 0 MiB, 5% kept free)"),
        ("pool-create", {"size": 65 << 30, "fs": "btrfs"},
         f"refusing a pool image of {65 << 10} MiB: a caller's pool is at most 65536 MiB "
         "([limits] pool_bytes)"),
    ):
        with pytest.raises(UsageError) as e:
            _run(ctx, op, request)
        assert e.value.message == want
        assert e.value.hint.startswith("use a smaller --size")
        assert sorted(p.name for p in area.rglob("*")) == []  # refused: nothing made
    ops_dm.make_thin_files(ctx, 32 << 20, 2 << 20)  # within the limits: made
    assert (area / "pool/thin/data.img").stat().st_size == 32 << 20
    # Root in-process (trusted) is not capped: its own pool, its own disk.
    root_area = small_fs / "root"
    root_area.mkdir()
    ops_dm.make_thin_files(_ctx(root_area, trusted=True), 1 << 40, 16 << 20)
    assert (root_area / "pool/thin/data.img").stat().st_size == 1 << 40
