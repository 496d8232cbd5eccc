"""Shard resolution: an override from the shard map wins, else the seed's hash.

The router is pure and in memory: resolving a shard never touches a database.
Keeping `overrides` and the layout coherent with the control database is the job
of `server.storage.overrides.OverrideSync`, which calls `replace_all`, `set`,
`discard` and `set_layout` here with what it reads from the tables; a move calls
`flip_units` to route by its own flip at once.

Layout (server.routing.layout): the hash shard is `hash % num_shards`. While a
reshard to `target_shards` runs, a pair whose unit has already moved ("flipped")
uses `hash % target_shards` instead.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from server.routing.hash import NUM_BUCKETS, Pair, pair_hash
from server.routing.layout import Layout, UnitKey


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
        self._layout = Layout(num_shards)
        self._overrides: dict[Pair, int] = dict(overrides or {})
        #: Bumped by every change, so callers can tell a reload happened.
        self.version = 0
        self._change_listeners: list[Callable[[], None]] = []

    @property
    def layout(self) -> Layout:
        return self._layout

    @property
    def num_shards(self) -> int:
        return self._layout.num_shards

    @property
    def target_shards(self) -> int | None:
        """The shard count a running reshard moves to; None when none runs."""
        return self._layout.target_shards

    def hash_shard(self, hashed: int) -> int:
        """The shard of a pair hash without override, under the current layout."""
        return self._layout.hash_shard(hashed)

    def resolve(self, user_id_1: int, user_id_2: int) -> Resolution:
        pair = Pair.of(user_id_1, user_id_2)
        hashed = pair_hash(pair.low, pair.high)
        hash_shard = self._layout.hash_shard(hashed)
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

    def add_change_listener(self, listener: Callable[[], None]) -> None:
        """Call `listener()` after every change (from the thread that made it)."""
        self._change_listeners.append(listener)

    def _changed(self) -> None:
        self.version += 1
        for listener in self._change_listeners:
            listener()

    def set(self, pair: Pair, shard_id: int) -> None:
        self._overrides[pair] = shard_id
        self._changed()

    def discard(self, pair: Pair) -> None:
        self._overrides.pop(pair, None)
        self._changed()

    def replace_all(self, overrides: Iterable[tuple[Pair, int]]) -> None:
        self._overrides = dict(overrides)
        self._changed()

    def set_layout(self, layout: Layout) -> None:
        """Route by `layout` from now on."""
        self._layout = layout
        self._changed()

    def flip_units(self, units: Iterable[UnitKey]) -> None:
        """These units have moved to their shard under the running reshard's `target_shards`."""
        self._layout = self._layout.with_flips(units)
        self._changed()
