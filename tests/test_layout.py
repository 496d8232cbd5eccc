"""The resharding layout's pure rules (server.routing.layout): units, plans and routing mid-reshard.

No database: these check that any plan moves every pair that changes shard exactly
once, whatever the two counts, and that routing names the old or the new shard of a
pair by whether its unit has moved.
"""

from __future__ import annotations

import functools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.moves.reshard import plan_steps
from server.routing import NUM_BUCKETS, ShardRouter, calculate_shard, pair_hash
from server.routing.layout import Layout, moving_units, residue_modulus, unit_of, units_of_move

hashes = st.integers(min_value=0, max_value=2**64 - 1)
# Growing by buckets, full reshuffles both ways, shrinking to a divisor, and counts
# that do not divide 4096 on either side.
COUNT_PAIRS = [(4, 8), (4, 16), (4, 6), (6, 4), (8, 4), (4, 12), (6, 9), (3, 5), (16, 24)]


@pytest.mark.parametrize(("num_shards", "target_shards"), COUNT_PAIRS)
def test_plan_lists_every_moving_unit_once(num_shards: int, target_shards: int) -> None:
    steps = plan_steps(Layout(num_shards, target_shards), target_shards, 64)
    planned = [(b, s.source, s.target) for s in steps for b in s.buckets]
    assert len(planned) == len(set(planned)), "no unit moves twice"
    assert set(planned) == set(moving_units(num_shards, target_shards))
    assert all(s.source != s.target and 0 < len(s.buckets) <= 64 for s in steps)
    planned_units = set(planned)
    rng = random.Random(num_shards * 1000 + target_shards)
    for _ in range(20_000):
        hashed = rng.getrandbits(64)
        unit = unit_of(hashed, num_shards, target_shards)
        assert (unit in planned_units) == (hashed % num_shards != hashed % target_shards)


@functools.cache
def _units(num_shards: int, target_shards: int) -> tuple[tuple[int, int, int], ...]:
    return tuple(moving_units(num_shards, target_shards))


@functools.cache
def _all_moved(num_shards: int, target_shards: int) -> frozenset[tuple[int, int, int]]:
    return frozenset(_units(num_shards, target_shards))


@pytest.mark.parametrize(("num_shards", "target_shards"), COUNT_PAIRS)
@settings(max_examples=50, deadline=None)  # what it checks is routing, not speed
@given(hashed=hashes, seed=st.integers(min_value=0, max_value=2**16))
def test_routing_follows_the_flips(num_shards: int, target_shards: int, hashed: int, seed: int) -> None:
    units = _units(num_shards, target_shards)
    moved = frozenset(units[seed % 5 :: 2 + seed % 3])  # some units of every route
    layout = Layout(num_shards, target_shards, moved)
    old, new = hashed % num_shards, hashed % target_shards
    expected = new if unit_of(hashed, num_shards, target_shards) in moved else old
    assert layout.hash_shard(hashed) == expected
    assert Layout(num_shards, target_shards, _all_moved(num_shards, target_shards)).hash_shard(hashed) == new
    assert Layout(num_shards, target_shards).hash_shard(hashed) == old, "nothing moved yet"
    assert Layout(num_shards).hash_shard(hashed) == old


def test_a_unit_is_a_whole_bucket_exactly_when_the_new_count_divides_the_buckets() -> None:
    assert residue_modulus(8) is None and residue_modulus(4096) is None
    assert residue_modulus(6) == 6 and residue_modulus(12) == 12
    # 4 -> 8: a bucket decides source and target, so each bucket is one unit.
    assert len(moving_units(4, 8)) == NUM_BUCKETS // 2
    # 4 -> 6: a bucket's pairs on its source split between two other shards (same parity as it).
    assert {len({t for b, _, t in moving_units(4, 6) if b == bucket}) for bucket in range(8)} == {2}


def test_router_applies_flips_as_they_arrive() -> None:
    router = ShardRouter(4)
    a, b = next(
        (a, b)
        for a in range(1, 10_000)
        for b in [a + 1]
        if calculate_shard(a, b, 4) != calculate_shard(a, b, 6)
    )
    router.set_layout(Layout(4, 6))
    assert router.resolve(a, b).shard_id == calculate_shard(a, b, 4)
    bucket, source, target = unit_of(pair_hash(a, b), 4, 6)
    router.flip_units(units_of_move([bucket], source, target))
    assert router.resolve(a, b).shard_id == calculate_shard(a, b, 6)
    router.set_layout(Layout(6))
    assert router.resolve(a, b).shard_id == calculate_shard(a, b, 6) and router.target_shards is None
