"""Shard resolution: an override from the shard map wins, else the seed's hash.

The router is pure and in memory: resolving a shard never touches a database.
Keeping `overrides` and the layout coherent with the control database is the job
of `server.storage.overrides.OverrideSync`, which calls `replace_all`, `set`,
`discard`, `set_layout` and `flip_buckets` here.

Layout: the hash shard is `hash % num_shards`. While a reshard to `target_shards`
runs, a bucket already moved ("flipped") uses `hash % target_shards` instead. Both
counts divide NUM_BUCKETS, so a bucket's pairs all share one shard under either.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from server.routing.hash import NUM_BUCKETS, Pair, pair_hash


class ShardSource(enum.Enum):
    """Why a pair lives on its shard."""

    HASH = "hash"
    OVERRIDE = "override"


@dataclass(frozen=True, slots=True)
class Resolution:
    """Where a pair's dialog lives and why."""

    pair: Pair
    shard_id: int
    source: ShardSource
    hash_shard_id: int
    bucket: int


class ShardRouter:
    """Maps pairs to shard ids: override first, then `pair_hash % num_shards`."""

    def __init__(self, num_shards: int, overrides: Mapping[Pair, int] | None = None) -> None:
        if num_shards <= 0:
            raise ValueError(f"num_shards must be positive, got {num_shards}")
        self.num_shards = num_shards
        #: The shard count a running reshard moves to; None when none runs.
        self.target_shards: int | None = None
        self._flipped: frozenset[int] = frozenset()
        self._overrides: dict[Pair, int] = dict(overrides or {})
        #: Bumped by every change, so callers can tell a reload happened.
        self.version = 0

    def hash_shard(self, hashed: int) -> int:
        """The shard of a pair hash without override, under the current layout."""
        if self.target_shards is not None and hashed % NUM_BUCKETS in self._flipped:
            return hashed % self.target_shards
        return hashed % self.num_shards

    def resolve(self, user_id_1: int, user_id_2: int) -> Resolution:
        pair = Pair.of(user_id_1, user_id_2)
        hashed = pair_hash(pair.low, pair.high)
        hash_shard = self.hash_shard(hashed)
        override = self._overrides.get(pair)
        if override is None:
            return Resolution(pair, hash_shard, ShardSource.HASH, hash_shard, hashed % NUM_BUCKETS)
        return Resolution(pair, override, ShardSource.OVERRIDE, hash_shard, hashed % NUM_BUCKETS)

    def override_of(self, pair: Pair) -> int | None:
        return self._overrides.get(pair)

    def overrides(self) -> Mapping[Pair, int]:
        """A read-only view of the current overrides."""
        return MappingProxyType(self._overrides)

    @property
    def override_count(self) -> int:
        return len(self._overrides)

    def set(self, pair: Pair, shard_id: int) -> None:
        self._overrides[pair] = shard_id
        self.version += 1

    def discard(self, pair: Pair) -> None:
        self._overrides.pop(pair, None)
        self.version += 1

    def replace_all(self, overrides: Iterable[tuple[Pair, int]]) -> None:
        self._overrides = dict(overrides)
        self.version += 1

    def set_layout(self, num_shards: int, target_shards: int | None, flipped: Iterable[int] = ()) -> None:
        """Route by `num_shards`, and by `target_shards` for the `flipped` buckets of a running reshard."""
        if num_shards <= 0 or (target_shards is not None and target_shards <= 0):
            raise ValueError(f"shard counts must be positive, got {num_shards} and {target_shards}")
        self.num_shards = num_shards
        self.target_shards = target_shards
        self._flipped = frozenset(flipped) if target_shards is not None else frozenset()
        self.version += 1

    def flip_buckets(self, buckets: Iterable[int]) -> None:
        """These buckets have moved to their shard under `target_shards`."""
        self._flipped = self._flipped | frozenset(buckets)
        self.version += 1

    @property
    def flipped_buckets(self) -> frozenset[int]:
        return self._flipped
