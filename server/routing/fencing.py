"""Which fence rows on a shard are stale under the current routing, and what replaces them (pure).

A fence row on shard s (server.storage.fences) refuses writes (`fenced`) or writes
and reads (`moved`) of its unit's pairs. It is *stale* when it refuses a pair that
current routing (overrides, then the layout) sends to s: nothing would ever lift it,
and that dialog would get DIALOG_MOVING for good. Finished moves leave `moved` rows
behind on purpose (stale writers must never write to a shard again), so a routing
change that is not a move (a control-table restore, a hand edit of shard_map) can
turn them stale. `plan_bucket` decides one bucket of one shard:

- a pair row `(low, high)` that refuses is stale iff the pair routes to s. It is
  dropped, or set `open` when a whole-bucket or residue row would still refuse it;
- whole-bucket `(0, 0)` and residue `(-m, r)` rows, only while no reshard runs (its
  units are decided by the reshard): with `n` shards, a pair of bucket b (hash ≡ b
  mod 4096) has hash shard `hash % n`, which can be s iff `s ≡ b (mod gcd(4096, n))`.
  A refusing row covering such a pair (a solvable system of congruences) is stale;
  the bucket's whole and residue rows are then replaced by the canonical ones: a
  residue row `(-n, r)` `moved` for each other shard r the bucket's pairs can hash to
  (none when n divides 4096: the bucket then lives on s alone);
- a pair that an override pins to s but that a whole or residue row refuses gets a
  pair row `open` (as a move's `exempt` pairs do), and the covering row is reported;
  a pair pinned elsewhere that the replaced rows refused keeps being refused by a pair
  row of its own.

Rows that refuse only pairs routed elsewhere stay: they keep stale writers out. The
caller skips buckets an unfinished move owns (its fences are the move's business).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from server.routing.hash import NUM_BUCKETS, Pair, bucket_of, pair_hash
from server.routing.layout import Layout

OPEN = "open"
FENCED = "fenced"
MOVED = "moved"

#: A fence row's key: (bucket, user_low, user_high).
FenceKey = tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class FenceRow:
    """One row of a shard's fence table."""

    bucket: int
    low: int
    high: int
    state: str

    @property
    def key(self) -> FenceKey:
        return self.bucket, self.low, self.high

    @property
    def refuses(self) -> bool:
        return self.state != OPEN

    @property
    def unit(self) -> str:
        """What the row covers, for people: a pair, the bucket, or a residue of it."""
        if self.low > 0:
            return f"pair ({self.low}, {self.high})"
        if self.low == 0:
            return f"bucket {self.bucket}"
        return f"bucket {self.bucket} hash % {-self.low} = {self.high}"


@dataclass(frozen=True, slots=True)
class BucketFix:
    """The stale fence rows of one bucket on one shard, and the change that reconciles them."""

    shard_id: int
    bucket: int
    stale: tuple[FenceRow, ...]
    delete: tuple[FenceKey, ...]
    put: tuple[FenceRow, ...]


def state_of(rows: Mapping[tuple[int, int], str], pair: Pair) -> str | None:
    """A pair's state among one bucket's rows, as `<table>_writable` decides it (None: no row).

    Its pair row, else the whole-bucket row, else the matching residue row with the
    smallest modulus (the SQL's `ORDER BY user_low DESC LIMIT 1`).
    """
    own = rows.get((pair.low, pair.high))
    if own is not None:
        return own
    whole = rows.get((0, 0))
    if whole is not None:
        return whole
    hashed = pair_hash(*pair)
    best: tuple[int, str] | None = None
    for (low, high), state in rows.items():
        if low < 0 and hashed % -low == high and (best is None or low > best[0]):
            best = (low, state)
    return best[1] if best is not None else None


def _solvable(congruences: Sequence[tuple[int, int]]) -> bool:
    """Whether x ≡ a_i (mod m_i) for all i has a solution (pairwise compatibility suffices)."""
    return all(
        (a - b) % math.gcd(m, k) == 0 for i, (a, m) in enumerate(congruences) for b, k in congruences[i + 1 :]
    )


def hash_reaches(bucket: int, shard_id: int, num_shards: int) -> bool:
    """Whether some pair of `bucket` has hash shard `shard_id` among `num_shards`."""
    return shard_id < num_shards and _solvable([(bucket, NUM_BUCKETS), (shard_id, num_shards)])


def refuses_hash_pairs(row: FenceRow, shard_id: int, num_shards: int) -> bool:
    """Whether a refusing whole or residue row covers some pair of its bucket hashed to `shard_id`."""
    if not row.refuses or row.low > 0 or shard_id >= num_shards:
        return False
    congruences = [(row.bucket, NUM_BUCKETS), (shard_id, num_shards)]
    if row.low < 0:
        congruences.append((row.high, -row.low))
    return _solvable(congruences)


def canonical_parts(bucket: int, shard_id: int, num_shards: int) -> tuple[FenceRow, ...]:
    """The rows that refuse, on `shard_id`, exactly the bucket's pairs hashed to other shards."""
    step = math.gcd(NUM_BUCKETS, num_shards)
    return tuple(
        FenceRow(bucket, -num_shards, r, MOVED)
        for r in range(bucket % step, num_shards, step)
        if r != shard_id
    )


def plan_bucket(
    shard_id: int,
    bucket: int,
    rows: Iterable[FenceRow],
    *,
    layout: Layout,
    route: Callable[[Pair], int],
    pinned: Iterable[Pair] = (),
) -> BucketFix | None:
    """The fix of one bucket's fence rows on `shard_id` (None when none is stale); see the module doc.

    `route` is current routing (overrides, then `layout`); `pinned` the pairs that overrides
    place (any shard; those of other buckets are ignored).
    """
    pinned = sorted(p for p in set(pinned) if bucket_of(*p) == bucket)
    before = {(r.low, r.high): r.state for r in rows if r.bucket == bucket}
    parts = {k: s for k, s in before.items() if k[0] <= 0}
    stale: dict[tuple[int, int], FenceRow] = {}
    if layout.target_shards is None:
        refusing = [
            FenceRow(bucket, *k, s)
            for k, s in sorted(parts.items())
            if refuses_hash_pairs(FenceRow(bucket, *k, s), shard_id, layout.num_shards)
        ]
        if refusing:
            stale.update(((r.low, r.high), r) for r in refusing)
            parts = {(r.low, r.high): r.state for r in canonical_parts(bucket, shard_id, layout.num_shards)}
    after = dict(parts)
    for (low, high), state in sorted(before.items()):
        if low <= 0:
            continue
        pair = Pair(low, high)
        if state == OPEN or route(pair) != shard_id:
            after[(low, high)] = state
            continue
        stale[(low, high)] = FenceRow(bucket, low, high, state)
        if state_of(parts, pair) not in (None, OPEN):
            after[(low, high)] = OPEN
    for pair in pinned:
        if (pair.low, pair.high) in after:
            continue
        was, now = state_of(before, pair), state_of(parts, pair)
        if route(pair) != shard_id:
            # Pinned elsewhere: if the rewritten bucket rows no longer refuse it, its own row must.
            if was not in (None, OPEN) and now in (None, OPEN):
                after[(pair.low, pair.high)] = was
            continue
        if now in (None, OPEN):
            continue
        after[(pair.low, pair.high)] = OPEN
        if was not in (None, OPEN):
            key = _covering_key(before, pair)
            stale.setdefault(key, FenceRow(bucket, *key, before[key]))
    if not stale:
        return None
    delete = tuple((bucket, *k) for k in sorted(before) if k not in after)
    put = tuple(FenceRow(bucket, *k, s) for k, s in sorted(after.items()) if before.get(k) != s)
    return BucketFix(shard_id, bucket, tuple(stale[k] for k in sorted(stale)), delete, put)


def _covering_key(rows: Mapping[tuple[int, int], str], pair: Pair) -> tuple[int, int]:
    """The key of the whole or residue row that decides `pair`'s state (one must exist)."""
    if (0, 0) in rows:
        return 0, 0
    hashed = pair_hash(*pair)
    return max(k for k in rows if k[0] < 0 and hashed % -k[0] == k[1])


__all__ = [
    "FENCED",
    "MOVED",
    "OPEN",
    "BucketFix",
    "FenceKey",
    "FenceRow",
    "canonical_parts",
    "hash_reaches",
    "plan_bucket",
    "refuses_hash_pairs",
    "state_of",
]
