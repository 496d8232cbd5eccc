"""Which fence rows are stale and what replaces them (server.routing.fencing): pure, no database.

The rule checked over random fence tables: after the fix, every pair that routing sends
to the shard is open there, every pair routed elsewhere that was refused is still
refused, and a second plan finds nothing.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import pytest

from server.routing import NUM_BUCKETS, Layout, Pair, ShardRouter, bucket_of, pair_hash
from server.routing.fencing import (
    FENCED,
    MOVED,
    OPEN,
    BucketFix,
    FenceRow,
    canonical_parts,
    hash_reaches,
    plan_bucket,
    refuses_hash_pairs,
    state_of,
)

COUNTS = [1, 2, 3, 4, 5, 6, 8, 12, 16]


def pairs_of_bucket(bucket: int, count: int, start: int = 1_000) -> list[Pair]:
    """`count` pairs whose hash bucket is `bucket`."""
    found: list[Pair] = []
    high = start
    while len(found) < count:
        high += 1
        if bucket_of(start, high) == bucket:
            found.append(Pair(start, high))
    return found


def router_of(num_shards: int, overrides: dict[Pair, int] | None = None) -> Callable[[Pair], int]:
    router = ShardRouter(num_shards, overrides or {})
    return lambda pair: router.resolve(*pair).shard_id


def apply(rows: list[FenceRow], fix: BucketFix | None) -> list[FenceRow]:
    if fix is None:
        return rows
    changed = {r.key for r in fix.put} | set(fix.delete)
    return [r for r in rows if r.key not in changed] + list(fix.put)


def states(rows: list[FenceRow]) -> dict[tuple[int, int], str]:
    return {(r.low, r.high): r.state for r in rows}


@pytest.mark.parametrize("num_shards", COUNTS)
def test_hash_reaches_is_the_brute_force_answer(num_shards: int) -> None:
    for bucket in [0, 1, 5, 6, 7, 4095, *random.Random(num_shards).sample(range(NUM_BUCKETS), 20)]:
        for shard in range(num_shards + 2):
            # Hashes of the bucket are bucket + 4096 k; their residues mod n repeat with period n.
            brute = any((bucket + NUM_BUCKETS * k) % num_shards == shard for k in range(num_shards))
            assert hash_reaches(bucket, shard, num_shards) == brute, (bucket, shard)


@pytest.mark.parametrize("num_shards", COUNTS)
@pytest.mark.parametrize("modulus", [2, 3, 4, 6, 8, 9, 12])
def test_a_residue_row_refuses_hash_pairs_exactly_when_some_hash_solves_it(
    num_shards: int, modulus: int
) -> None:
    period = math.lcm(num_shards, modulus)
    for bucket in random.Random(num_shards * 100 + modulus).sample(range(NUM_BUCKETS), 12):
        for shard in range(num_shards):
            for remainder in range(modulus):
                row = FenceRow(bucket, -modulus, remainder, MOVED)
                hashes = [bucket + NUM_BUCKETS * k for k in range(period)]
                brute = any(h % num_shards == shard and h % modulus == remainder for h in hashes)
                assert refuses_hash_pairs(row, shard, num_shards) == brute
    assert not refuses_hash_pairs(FenceRow(1, -modulus, 1, OPEN), 1, num_shards), "open rows refuse nothing"


def test_state_of_follows_the_sql_order() -> None:
    (pair,) = pairs_of_bucket(77, 1)
    hashed = pair_hash(*pair)
    residue = (-6, hashed % 6)
    assert state_of({}, pair) is None
    assert state_of({residue: MOVED, (-4, hashed % 4): FENCED}, pair) == FENCED, "smallest modulus first"
    assert state_of({residue: MOVED, (0, 0): FENCED}, pair) == FENCED, "the whole bucket before residues"
    assert state_of({(0, 0): MOVED, (pair.low, pair.high): OPEN}, pair) == OPEN, "the pair's own row first"
    assert state_of({(-6, (hashed + 1) % 6): MOVED}, pair) is None, "another residue does not cover it"


def test_a_moved_pair_row_is_stale_only_on_the_shard_routing_names() -> None:
    (pair,) = pairs_of_bucket(12, 1)
    home = pair_hash(*pair) % 4
    row = FenceRow(12, pair.low, pair.high, MOVED)
    fix = plan_bucket(home, 12, [row], layout=Layout(4), route=router_of(4))
    assert fix == BucketFix(home, 12, (row,), ((12, pair.low, pair.high),), ())
    elsewhere = (home + 1) % 4
    assert plan_bucket(elsewhere, 12, [row], layout=Layout(4), route=router_of(4)) is None
    # Pinned to the other shard by an override: the row on the hash shard is right again.
    pinned = router_of(4, {pair: elsewhere})
    assert plan_bucket(home, 12, [row], layout=Layout(4), route=pinned, pinned=[pair]) is None


def test_a_stale_pair_row_inside_a_fenced_bucket_becomes_open() -> None:
    # Shard 5 is not a hash shard of bucket 12 under 4 shards: its whole-bucket row stays.
    (pair,) = pairs_of_bucket(12, 1)
    rows = [FenceRow(12, 0, 0, MOVED), FenceRow(12, pair.low, pair.high, MOVED)]
    fix = plan_bucket(5, 12, rows, layout=Layout(4), route=router_of(4, {pair: 5}), pinned=[pair])
    assert fix is not None
    assert fix.stale == (rows[1],)
    assert (fix.delete, fix.put) == ((), (FenceRow(12, pair.low, pair.high, OPEN),))


def test_a_pinned_pair_under_a_moved_bucket_gets_an_open_row_and_the_bucket_row_is_named() -> None:
    (pair,) = pairs_of_bucket(12, 1)
    rows = [FenceRow(12, 0, 0, MOVED)]
    fix = plan_bucket(5, 12, rows, layout=Layout(4), route=router_of(4, {pair: 5}), pinned=[pair])
    assert fix is not None and fix.stale == (rows[0],)
    assert fix.put == (FenceRow(12, pair.low, pair.high, OPEN),) and fix.delete == ()


def test_a_whole_bucket_row_on_its_hash_shard_goes_or_narrows_to_the_other_shards() -> None:
    whole = FenceRow(12, 0, 0, MOVED)
    # 4 divides 4096: bucket 12 lives on shard 0 alone, so the row simply goes.
    fix = plan_bucket(0, 12, [whole], layout=Layout(4), route=router_of(4))
    assert fix is not None and (fix.stale, fix.delete, fix.put) == ((whole,), ((12, 0, 0),), ())
    # Under 6 shards bucket 12's pairs hash to shards 0, 2 and 4: shard 2 keeps refusing 0 and 4.
    fix = plan_bucket(2, 12, [whole], layout=Layout(6), route=router_of(6))
    assert fix is not None and fix.delete == ((12, 0, 0),)
    assert fix.put == (FenceRow(12, -6, 0, MOVED), FenceRow(12, -6, 4, MOVED))
    assert canonical_parts(12, 2, 6) == fix.put
    # Not a hash shard of the bucket: nothing routes here, the row is right.
    assert plan_bucket(1, 12, [whole], layout=Layout(6), route=router_of(6)) is None
    assert plan_bucket(4, 12, [whole], layout=Layout(4), route=router_of(4)) is None


def test_bucket_rows_wait_while_a_reshard_runs() -> None:
    whole = FenceRow(12, 0, 0, MOVED)
    assert plan_bucket(0, 12, [whole], layout=Layout(4, 8), route=router_of(4)) is None


@pytest.mark.parametrize("seed", range(60))
def test_random_fence_tables_end_open_for_their_pairs_and_closed_for_the_others(seed: int) -> None:
    rng = random.Random(seed)
    num_shards = rng.choice(COUNTS)
    bucket = rng.randrange(NUM_BUCKETS)
    shard = rng.randrange(num_shards + 1)
    pairs = pairs_of_bucket(bucket, 24, start=rng.randrange(1, 10**9))
    overrides = {p: rng.randrange(num_shards + 1) for p in rng.sample(pairs, 6)}
    route = router_of(num_shards, overrides)
    rows: list[FenceRow] = []
    if rng.random() < 0.5:
        rows.append(FenceRow(bucket, 0, 0, rng.choice([MOVED, FENCED])))
    for _ in range(rng.randrange(3)):
        modulus = rng.choice([2, 3, 4, 6, 8, 12])
        rows.append(FenceRow(bucket, -modulus, rng.randrange(modulus), rng.choice([MOVED, FENCED])))
    for pair in rng.sample(pairs, 8):
        rows.append(FenceRow(bucket, pair.low, pair.high, rng.choice([MOVED, FENCED, OPEN])))
    rows = list({r.key: r for r in rows}.values())
    other_bucket = FenceRow((bucket + 1) % NUM_BUCKETS, 0, 0, MOVED)

    fix = plan_bucket(
        shard, bucket, [*rows, other_bucket], layout=Layout(num_shards), route=route, pinned=overrides
    )
    after = apply(rows, fix)
    for pair in pairs:
        was, now = state_of(states(rows), pair), state_of(states(after), pair)
        if route(pair) == shard:
            assert now in (None, OPEN), (pair, was, now)
        elif was not in (None, OPEN):
            assert now not in (None, OPEN), (pair, was, now)
    if fix is not None:
        assert fix.stale and all(r.bucket == bucket and r in rows for r in fix.stale)
        assert other_bucket.key not in fix.delete
    again = plan_bucket(shard, bucket, after, layout=Layout(num_shards), route=route, pinned=overrides)
    assert again is None, "a fixed bucket has no stale row"
