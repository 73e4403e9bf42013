"""The gc decision core: property tests of its safety rules."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from builder.gc import VolumeFacts, plan_gc

digests = st.sampled_from([f"sha256:{i:064x}" for i in range(12)])
volume = st.builds(
    VolumeFacts,
    id=st.sampled_from([f"sha256:{i:064x}" for i in range(100, 110)]),
    last_used=st.floats(min_value=0, max_value=1000),
    referenced=st.booleans(),
    blobs=st.frozensets(digests, max_size=5),
)


@given(st.lists(volume, max_size=8, unique_by=lambda v: v.id), st.sets(digests),
       st.floats(min_value=0, max_value=1000))
def test_plan_never_removes_what_is_used_or_needed(vols: list[VolumeFacts], blobs: set[str],
                                                   keep: float) -> None:
    plan = plan_gc(vols, blobs, keep_seconds=keep, now=1000.0)
    removed = set(plan.volumes)
    for v in vols:
        if v.referenced or 1000.0 - v.last_used <= keep:
            assert v.id not in removed
        else:
            assert v.id in removed
    kept_needs = set().union(*(v.blobs for v in vols if v.id not in removed)) if vols else set()
    assert not kept_needs & set(plan.blobs)
    assert set(plan.blobs) == blobs - kept_needs


def test_plan_example() -> None:
    a = VolumeFacts("sha256:" + "a" * 64, last_used=0, referenced=False,
                    blobs=frozenset({"sha256:" + "1" * 64, "sha256:" + "2" * 64}))
    b = VolumeFacts("sha256:" + "b" * 64, last_used=990, referenced=False,
                    blobs=frozenset({"sha256:" + "2" * 64}))
    plan = plan_gc([a, b], {"sha256:" + "1" * 64, "sha256:" + "2" * 64, "sha256:" + "3" * 64},
                   keep_seconds=100, now=1000)
    assert plan.volumes == (a.id,)
    assert plan.blobs == ("sha256:" + "1" * 64, "sha256:" + "3" * 64)
