"""The dm-thin backend's pure parts: names, table lines, messages, ids, sizes, status and
the reclaim order (hypothesis properties: reclaim never removes a non-kiln device or a
kept one; a snapshot always goes before its origin; dependents before dependencies)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helper.storage import dmthin_core as core
from helper.storage import poolfs

RK = core.root_key("/var/lib/kiln")
OTHER = core.root_key("/srv/other-root")
HEX = "ab" * 32


def test_names_round_trip_and_validation() -> None:
    assert core.root_key("/var/lib/kiln") == RK
    assert len(RK) == 8
    assert core.pool_name(RK) == f"kiln-{RK}-pool"
    assert core.parse_name(core.volume_name(RK, HEX)) == core.DmName(RK, "vol", HEX)
    assert core.parse_name(core.snapshot_name(RK, "abc234")) == core.DmName(RK, "snap", "abc234")
    for bad in ["kiln-pool", f"kiln-{RK}-snap-../x", f"kiln-{RK}-snap-a/b", f"kiln-{RK}-snap-",
                f"kiln-{RK}-snap-ABC", f"kiln-{RK}-snap-a1", f"kiln-{RK}-vol-{HEX[:-1]}",
                f"-kiln-{RK}-pool", f"kiln-{RK}-pool\n", "docker-8:1-123-pool", "",
                f"kiln-{RK}-snap-{'a' * 33}", f"kiln-{RK.upper()}-pool"]:
        assert core.parse_name(bad) is None, bad
    with pytest.raises(ValueError, match="not a valid kiln device name"):
        core.snapshot_name(RK, "../etc")


def test_table_lines_and_messages_exact() -> None:
    assert core.thin_pool_table("/dev/loop1", "/dev/loop2", 41943040) == \
        "0 41943040 thin-pool /dev/loop1 /dev/loop2 128 32768 0"
    assert core.thin_table("/dev/mapper/kiln-x-pool", 7, 2048) == \
        "0 2048 thin /dev/mapper/kiln-x-pool 7"
    assert core.msg_create_thin(3) == "create_thin 3"
    assert core.msg_create_snap(4, 3) == "create_snap 4 3"
    assert core.msg_delete(4) == "delete 4"
    with pytest.raises(ValueError, match="own id"):
        core.msg_create_snap(3, 3)
    with pytest.raises(ValueError, match="out of range"):
        core.msg_delete(1 << 24)
    with pytest.raises(ValueError, match="multiple of the block size"):
        core.thin_pool_table("/dev/loop1", "/dev/loop2", 1000)
    assert core.thin_id_of_table("0 2048 thin 253:0 7") == 7
    for bad in ["0 2048 thin-pool 7:1 7:2 128 32 0", "0 2048 linear 8:0 0", "",
                f"0 2048 thin 253:0 {1 << 24}", "0 2048 thin 253:0 7 extra", "0 8 thin x -1"]:
        assert core.thin_id_of_table(bad) is None, bad
    assert core.valid_message("create_snap 4 3")
    for bad in ["delete 1; rm", "create_thin -1", "set_transaction_id 0 1",
                f"delete {1 << 24}", "delete 1\n", "create_snap 1"]:
        assert not core.valid_message(bad), bad


def test_sizes_and_status_parse() -> None:
    sectors, meta = core.pool_sizes(20 << 30)
    assert sectors == (20 << 30) // 512
    assert sectors % 128 == 0
    assert 16 << 20 <= meta <= 16 << 30
    assert meta % 4096 == 0
    assert core.sectors_of(1) == 1
    assert core.sectors_of(1024) == 2
    u = core.parse_pool_status(
        "0 41943040 thin-pool 1 152/4096 2048/327680 - rw discard_passdown "
        "queue_if_no_space - 1024")
    assert (u.used_data_blocks, u.total_data_blocks, u.read_only) == (2048, 327680, False)
    assert core.parse_pool_status("0 41943040 thin-pool Fail").needs_check
    with pytest.raises(ValueError, match="not a thin-pool status line"):
        core.parse_pool_status("0 2048 linear 8:0 0")


@given(st.integers(min_value=0, max_value=core.THIN_ID_LIMIT * 2),
       st.sets(st.integers(min_value=0, max_value=core.THIN_ID_LIMIT - 1), max_size=50))
def test_allocated_id_is_never_in_use(counter: int, used: set[int]) -> None:
    got, nxt = core.allocate_id(counter, used)
    assert got not in used
    assert 0 <= got < core.THIN_ID_LIMIT
    assert nxt == got + 1


@given(st.lists(st.one_of(st.just("alloc"), st.just("restart"), st.integers(0, 30)),
                max_size=60))
def test_ids_never_collide_across_restarts_and_frees(ops: list[object]) -> None:
    """Model: the counter is persisted before use; a restart reloads it (and may lose the
    in-memory copy); frees return ids. No live id is ever handed out twice."""
    persisted = 0
    counter = 0
    live: set[int] = set()
    for op in ops:
        if op == "alloc":
            got, counter = core.allocate_id(counter, live)
            persisted = counter
            assert got not in live
            live.add(got)
        elif op == "restart":
            counter = persisted
        else:
            assert isinstance(op, int)
            live.discard(sorted(live)[op % len(live)] if live else -1)


_ls_names = st.sampled_from(["snap-aaaa", "snap-bbbb", "snap-cccc", f"vol-{HEX}",
                             f"vol-{'cd' * 32}", "pool"])


@st.composite
def listings(draw: st.DrawFn) -> tuple[list[core.DmDevice], set[str]]:
    """Random hosts: this root's pool/vol/snap devices (thin devices reference the pool),
    another root's devices, foreign devices (some stacked on kiln ones), and a keep set."""
    devs: list[core.DmDevice] = []
    minor = 0

    def add(name: str, deps: frozenset[str]) -> str:
        nonlocal minor
        devno = f"253:{minor}"
        minor += 1
        devs.append(core.DmDevice(name, devno, deps))
        return devno

    for key in (RK, OTHER):
        if draw(st.booleans()):
            pool = add(f"kiln-{key}-pool", frozenset({"7:1", "7:2"}))
            for suffix in sorted(draw(st.sets(_ls_names.filter(lambda s: s != "pool")))):
                add(f"kiln-{key}-{suffix}", frozenset({pool}))
    for i in range(draw(st.integers(0, 3))):
        target = draw(st.sampled_from([d.devno for d in devs] or ["8:0"]))
        add(draw(st.sampled_from([f"foreign{i}", f"kiln-{RK}", f"kilnx-{RK}-pool"])),
            frozenset({target}))
    names = [d.name for d in devs]
    keep = set(draw(st.lists(st.sampled_from(names), max_size=3))) if names else set()
    return devs, keep


@settings(max_examples=300)
@given(listings())
def test_reclaim_plan_properties(case: tuple[list[core.DmDevice], set[str]]) -> None:
    devs, keep = case
    plan = core.reclaim_plan(devs, RK, keep)
    by_name = {d.name: d for d in devs}
    assert len(plan) == len(set(plan))
    for name in plan:
        parsed = core.parse_name(name)
        assert parsed is not None
        assert parsed.rootkey == RK
        assert name not in keep
    pos = {n: i for i, n in enumerate(plan)}
    # A snapshot is always removed before its origin (base volumes) and the pool.
    for n in plan:
        for m in plan:
            pn, pm = core.parse_name(n), core.parse_name(m)
            assert pn
            assert pm
            if pn.kind == "snap" and pm.kind in ("vol", "pool"):
                assert pos[n] < pos[m]
    # Dependents go before what they reference; nothing a survivor references is removed.
    survivors = [d for d in devs if d.name not in pos]
    for n in plan:
        d = by_name[n]
        for other in devs:
            if d.devno in other.deps:
                assert other.name in pos
                assert pos[other.name] < pos[n]
    for s in survivors:
        for n in plan:
            assert by_name[n].devno not in s.deps


def test_reclaim_plan_example_and_listing_parse() -> None:
    ls = (f"kiln-{RK}-snap-abcd\t(253:2)\nkiln-{RK}-pool\t(253:0)\n"
          f"kiln-{RK}-vol-{HEX}\t(253, 1)\nvg0-root\t(253:3)\n")
    table = (f"kiln-{RK}-snap-abcd: 0 2048 thin 253:0 2\n"
             f"kiln-{RK}-pool: 0 41943040 thin-pool 7:1 7:2 128 32768 0\n"
             f"kiln-{RK}-vol-{HEX}: 0 2048 thin 253:0 1\n"
             "vg0-root: 0 100 linear 8:2 2048\n")
    devs = core.parse_listing(ls, table)
    assert {d.name: d.devno for d in devs}[f"kiln-{RK}-vol-{HEX}"] == "253:1"
    assert core.reclaim_plan(devs, RK) == [f"kiln-{RK}-snap-abcd", f"kiln-{RK}-vol-{HEX}",
                                           f"kiln-{RK}-pool"]
    keep = {f"kiln-{RK}-pool", f"kiln-{RK}-snap-abcd"}
    assert core.reclaim_plan(devs, RK, keep) == [f"kiln-{RK}-vol-{HEX}"]
    assert core.reclaim_plan(devs, OTHER) == []
    assert core.parse_listing("No devices found\n", "No devices found\n") == []


_names = st.one_of(
    st.sampled_from([f"kiln-{RK}-pool", f"kiln-{RK}-snap-abcd", f"kiln-{RK}-vol-{HEX}",
                     f"kiln-{OTHER}-snap-abcd", f"kiln-{OTHER}-pool", "vg0-root", "docker-1",
                     f"kiln-{RK}", f"kiln-{RK}-snap-", ""]),
    st.text(max_size=40))


@given(st.lists(_names, max_size=8), st.lists(_names, max_size=4))
def test_needs_reclaim_iff_an_unkept_device_of_this_root(names: list[str],
                                                         keep: list[str]) -> None:
    """kiln skips the helper's reclaim exactly when the plan would have nothing to do."""
    want = any(core.parse_name(n) is not None and core.parse_name(n).rootkey == RK  # type: ignore[union-attr]
               and n not in keep for n in names)
    assert core.needs_reclaim(names, RK, keep) is want


# -- the operator's devices -------------------------------------------------------------------

BLOCK = core.DEFAULT_BLOCK_SECTORS * core.SECTOR


def _dev(path: str = "/dev/loop7", **kw: object) -> core.BlockFacts:
    base: dict[str, object] = {"kind": "block device", "devno": "7:7", "size": 64 << 20}
    base.update(kw)
    return core.BlockFacts(path, **base)  # type: ignore[arg-type]


def test_device_problems_exact() -> None:
    meta = _dev("/dev/loop8", devno="7:8", size=8 << 20)
    cases = {
        "missing": (_dev("/dev/sdz", kind="missing"),
                    "[pool] data_device /dev/sdz does not exist"),
        "file": (_dev("/srv/data.img", kind="regular file"),
                 "[pool] data_device /srv/data.img is not a block device (it is a regular "
                 "file)"),
        "dir": (_dev("/srv", kind="directory"),
                "[pool] data_device /srv is not a block device (it is a directory)"),
        "mounted": (_dev(mounted_at=("/mnt/a", "/mnt/b"), busy=True),
                    "[pool] data_device /dev/loop7 is mounted at /mnt/a"),
        "held": (_dev(holders=("dm-3", "dm-4"), busy=True),
                 "[pool] data_device /dev/loop7 is in use (held by dm-3, dm-4)"),
        "busy": (_dev(busy=True), "[pool] data_device /dev/loop7 is in use (another program "
                 "holds it open exclusively)"),
        "small": (_dev(size=16 * BLOCK - 1), "[pool] data_device /dev/loop7 is too small: "
                  f"{16 * BLOCK - 1} bytes, at least {16 * BLOCK} needed"),
        "same": (_dev("/dev/disk/by-id/x", devno="7:8"), "[pool] data_device "
                 "/dev/disk/by-id/x and metadata_device /dev/loop8 are the same device (7:8)"),
    }
    for what, (data, want) in cases.items():
        assert core.devices_problem(data, meta) == want, what
    assert core.devices_problem(_dev(), meta) is None
    assert core.devices_problem(_dev(), _dev("/dev/loop8", devno="7:8", size=(2 << 20) - 1)) \
        == f"[pool] metadata_device /dev/loop8 is too small: {(2 << 20) - 1} bytes, at " \
        f"least {2 << 20} needed"


_facts = st.builds(
    core.BlockFacts, path=st.sampled_from(["/dev/loop1", "/dev/sdb", "/srv/x"]),
    kind=st.sampled_from(["block device", "regular file", "missing", "directory"]),
    devno=st.sampled_from(["7:1", "7:2", "8:16"]),
    size=st.sampled_from([0, 1 << 20, 2 << 20, 64 << 20]),
    mounted_at=st.sampled_from([(), ("/mnt",)]), holders=st.sampled_from([(), ("dm-0",)]),
    busy=st.booleans())


@settings(max_examples=300)
@given(_facts, _facts)
def test_devices_accepted_only_when_both_are_free_distinct_block_devices(
        data: core.BlockFacts, meta: core.BlockFacts) -> None:
    def usable(f: core.BlockFacts, minimum: int) -> bool:
        return (f.kind == "block device" and not f.mounted_at and not f.holders
                and not f.busy and f.size >= minimum)

    ok = usable(data, 16 * BLOCK) and usable(meta, 2 << 20) and data.devno != meta.devno
    problem = core.devices_problem(data, meta)
    assert (problem is None) is ok
    if problem is not None:
        assert problem.startswith("[pool] ")


def test_device_pool_sectors_and_claims() -> None:
    assert core.device_pool_sectors(64 << 20) == (64 << 20) // 512
    assert core.device_pool_sectors((64 << 20) + 1000) == (64 << 20) // 512  # whole blocks
    with pytest.raises(ValueError, match="at least 16 data blocks"):
        core.device_pool_sectors(16 * BLOCK - 1)
    me, other = "/var/lib/kiln/users/1000", "/var/lib/kiln/users/1001"
    for fresh in (True, False):
        assert core.claim_problem(me, me, True, fresh) is None
        assert core.claim_problem(other, me, True, fresh) == \
            f"the [pool] devices hold the pool of {other}"
    assert core.claim_problem(None, me, False, True) is None
    assert core.claim_problem(other, me, False, True) is None  # a stale claim: area gone
    assert core.claim_problem(other, me, False, False) == \
        f"the [pool] devices were claimed by {other}, not by this pool"
    # Unclaimed devices may still hold an earlier pool's metadata (its thin ids, its
    # volumes): only a fresh pool, which formats them, may take them.
    assert core.claim_problem(None, me, False, False) == \
        "the [pool] devices are not claimed by this pool: only a new pool (fresh) may " \
        "take them, and it formats them"


@given(st.sampled_from([None, "/a", "/b"]), st.booleans(), st.booleans())
def test_unformatted_devices_only_ever_reach_their_own_claimant(
        holder: str | None, exists: bool, fresh: bool) -> None:
    """Whoever is let in without formatting (not fresh) is the area the claim names."""
    problem = core.claim_problem(holder, "/a", exists, fresh)
    if problem is None and not fresh:
        assert holder == "/a"
    assert (problem is None) is (holder == "/a" or (fresh and not (holder and exists)))


def test_promised_space_exact() -> None:
    """A new sparse image fits when free space less the margin less what other images
    may still grow by covers it (``poolfs.promise_problem``)."""
    gib = 1 << 30
    # 10 GiB free on a 100 GiB filesystem, 5 GiB of it the margin, 2 GiB promised.
    assert poolfs.promise_problem("a pool image", 3 * gib, 2 * gib, 10 * gib, 100 * gib,
                                  5) is None
    assert poolfs.promise_problem("a pool image", 3 * gib + 1, 2 * gib, 10 * gib, 100 * gib,
                                  5) == (
        "refusing a pool image of 3072 MiB: the pool directory's filesystem has 3072 MiB not "
        "yet promised to other images (free 10240 MiB, promised 2048 MiB, 5% kept free)")
    assert poolfs.promise_problem("a pool image", 1, 0, 0, 100 * gib, 5) is not None


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 1 << 44), st.integers(0, 1 << 44), st.integers(0, 1 << 44),
       st.integers(1, 1 << 45), st.integers(0, 90))
def test_promises_never_exceed_free_space(size: int, promised: int, free: int,
                                          capacity: int, margin: int) -> None:
    if poolfs.promise_problem("x", size, promised, free, capacity, margin) is None:
        assert size + promised <= free - capacity * margin // 100


@given(st.sampled_from([f"kiln-{RK}-pool", f"kiln-{RK}-snap-abcd", f"kiln-{RK}-vol-{HEX}",
                        "vg0-root"]),
       st.integers(0, 20), st.sets(st.integers(0, 20), max_size=5))
def test_only_snapshots_that_are_not_bases_are_granted(name: str, thin_id: int,
                                                       bases: set[int]) -> None:
    problem = core.grant_problem(name, thin_id, bases)
    is_snap = name.endswith("-snap-abcd")
    assert (problem is None) is (is_snap and thin_id not in bases)
    if not is_snap:
        assert problem == f"refusing to give {name} to the caller: only snapshot devices " \
            "are given"
    elif thin_id in bases:
        assert problem == f"refusing to give thin device {thin_id} to the caller: it holds " \
            "a base volume"
