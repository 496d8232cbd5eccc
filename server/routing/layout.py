"""The shard layout: how many shards the hash routes over, and which units a running reshard moved.

Without a reshard a pair's hash shard is the seed's `hash % num_shards`. A reshard to
`target_shards` moves pairs in *units*: the pairs with one hash bucket (`hash % 4096`)
that go from one source shard (`hash % num_shards`) to one target shard
(`hash % target_shards`). A unit is named by the triple `(bucket, source, target)`.
Once a unit has moved ("flipped"), its pairs route by `hash % target_shards`; every
other pair still routes by `hash % num_shards`. When every unit has moved, the
layout becomes `target_shards` and the flips are forgotten.

Why these units work for any pair of counts:

- When `target_shards` divides 4096 (a power of two), the bucket decides the target,
  so a unit is all of a bucket's pairs on its source.
- Otherwise (4 -> 6, 4 -> 12, shrinking 6 -> 4 ...) one bucket's pairs on a source split
  among several targets, and the unit is the part of the bucket whose
  `hash % target_shards` is the target (`residue_modulus`).

Either way only the pairs whose `hash % n` changes move: `moving_fraction` of them, the
least any placement by the seed's hash can move (1 - N/N' when N divides N').

Pure: no I/O. `server.storage.layout` stores the layout in the control database.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from server.routing.hash import NUM_BUCKETS

#: A resharding unit: (bucket, source shard, target shard).
UnitKey = tuple[int, int, int]

#: Units a plan may enumerate (lcm(4096, N, N') residues): beyond this the counts are refused.
MAX_RESIDUES = 1 << 22


def unit_of(hashed: int, num_shards: int, target_shards: int) -> UnitKey:
    """The unit of a pair hash moving from `num_shards` to `target_shards`."""
    return hashed % NUM_BUCKETS, hashed % num_shards, hashed % target_shards


def residue_modulus(target_shards: int) -> int | None:
    """The modulus that splits a bucket into units (None when the bucket decides the target).

    `hash % target_shards` is a function of the bucket exactly when target_shards divides
    4096; otherwise a unit is selected by `hash % target_shards == target` within its bucket.
    """
    return None if NUM_BUCKETS % target_shards == 0 else target_shards


def moving_fraction(num_shards: int, target_shards: int) -> float:
    """Share of pairs whose `hash % n` changes from num_shards to target_shards (hashes uniform)."""
    period = math.lcm(num_shards, target_shards)
    return sum(1 for r in range(period) if r % num_shards != r % target_shards) / period


def unit_period(num_shards: int, target_shards: int) -> int:
    """lcm(4096, N, N'): a hash's residue modulo it decides its unit. Refuses absurd periods."""
    period = math.lcm(NUM_BUCKETS, num_shards, target_shards)
    if period > MAX_RESIDUES:
        raise ValueError(
            f"going from {num_shards} to {target_shards} shards would walk {period:,} hash residues to "
            f"plan its units; choose counts whose least common multiple with {NUM_BUCKETS} is at most "
            f"{MAX_RESIDUES:,} (for example with fewer odd factors)"
        )
    return period


def moving_units(num_shards: int, target_shards: int) -> list[UnitKey]:
    """Every unit whose pairs change shard, in (source, target, bucket) order.

    A hash's residue modulo lcm(4096, N, N') decides its bucket, source and target, so
    walking those residues lists every unit that can hold a pair, each once.
    """
    period = unit_period(num_shards, target_shards)
    units = {unit_of(r, num_shards, target_shards) for r in range(period)}
    return sorted((u for u in units if u[1] != u[2]), key=lambda u: (u[1], u[2], u[0]))


@dataclass(frozen=True, slots=True)
class Layout:
    """The routing layout: the shard count, the one a running reshard moves to, and the moved units."""

    num_shards: int
    target_shards: int | None = None
    flipped: frozenset[UnitKey] = frozenset()

    def __post_init__(self) -> None:
        if self.num_shards <= 0 or (self.target_shards is not None and self.target_shards <= 0):
            raise ValueError(f"shard counts must be positive, got {self.num_shards} and {self.target_shards}")

    def hash_shard(self, hashed: int) -> int:
        """The shard of a pair hash without override."""
        source = hashed % self.num_shards
        if self.target_shards is None:
            return source
        target = hashed % self.target_shards
        if target != source and (hashed % NUM_BUCKETS, source, target) in self.flipped:
            return target
        return source

    @property
    def active_shards(self) -> int:
        """Shards that may hold messages by hash right now."""
        return max(self.num_shards, self.target_shards or 0)

    def with_flips(self, units: Iterable[UnitKey]) -> Layout:
        """This layout with more units moved (ignored when no reshard runs)."""
        if self.target_shards is None:
            return self
        return Layout(self.num_shards, self.target_shards, self.flipped | frozenset(units))


def units_of_move(buckets: Iterable[int], source: int, target: int) -> list[UnitKey]:
    """The unit keys of a move of `buckets` from `source` to `target`."""
    return [(b, source, target) for b in buckets]
