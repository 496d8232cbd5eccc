"""Placement of pairs on shards: the router, its shard-map mirror and override changes.

`Placement` owns the control database's pool and the LISTEN/NOTIFY mirror; it
resolves pairs without I/O and changes overrides only when that cannot strand
a pair's existing messages (moving them comes with the resharding work).
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from psycopg_pool import AsyncConnectionPool

from server.config import PoolConfig
from server.errors import FailedPrecondition, NotFound
from server.routing import Pair, Resolution, ShardRouter
from server.storage.overrides import OverrideRow, OverrideStore, OverrideSync
from server.storage.pools import ShardSet, open_pool


class Placement:
    """Router + shard map; an async context manager owning the control pool and listener."""

    def __init__(self, control_dsn: str, num_shards: int, pool_config: PoolConfig) -> None:
        self.router = ShardRouter(num_shards)
        self._control_dsn = control_dsn
        self._pool_config = pool_config
        self._pool: AsyncConnectionPool[Any] | None = None
        self._sync = OverrideSync(control_dsn, self.router)

    @property
    def store(self) -> OverrideStore:
        if self._pool is None:
            raise RuntimeError("Placement is not open")
        return OverrideStore(self._pool)

    @property
    def reloads(self) -> int:
        return self._sync.reloads

    async def __aenter__(self) -> Placement:
        self._pool = await open_pool("control", self._control_dsn, self._pool_config, min_size=1, max_size=4)
        try:
            await self.store.migrate()
            await self._sync.start()
        except BaseException:
            await self._pool.close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._sync.stop()
        if self._pool is not None:
            await self._pool.close()

    def resolve(self, user_id_1: int, user_id_2: int) -> Resolution:
        return self.router.resolve(user_id_1, user_id_2)

    async def set_override(self, pair: Pair, shard_id: int, shards: ShardSet) -> OverrideRow:
        """Pin `pair` to `shard_id`, refusing while its messages live on another shard."""
        current = self.router.resolve(*pair)
        await self._refuse_if_stranding(pair, current.shard_id, shard_id, shards)
        previous = self.router.override_of(pair)
        row = await self.store.upsert(pair, shard_id)
        # Apply locally now so this process reads its own write; the NOTIFY
        # reaches the other processes (and this one again, harmlessly).
        self.router.set(pair, shard_id)
        # A message may have been written by a process that had not seen the
        # change yet: re-check, and undo the override rather than hide it.
        try:
            await self._refuse_if_stranding(pair, current.shard_id, shard_id, shards)
        except FailedPrecondition:
            await self._restore(pair, previous)
            raise
        return row

    async def delete_override(self, pair: Pair, shards: ShardSet, *, allow_missing: bool) -> int:
        """Drop the pair's override; returns the shard the pair lives on afterwards."""
        override = self.router.override_of(pair)
        hash_shard = self.router.resolve(*pair).hash_shard_id
        if override is None:
            if allow_missing:
                return hash_shard
            raise NotFound(
                f"the pair ({pair.low}, {pair.high}) has no shard override", reason="OVERRIDE_NOT_FOUND"
            )
        await self._refuse_if_stranding(pair, override, hash_shard, shards)
        if not await self.store.delete(pair) and not allow_missing:
            raise NotFound(
                f"the pair ({pair.low}, {pair.high}) has no shard override", reason="OVERRIDE_NOT_FOUND"
            )
        self.router.discard(pair)
        return hash_shard

    async def _restore(self, pair: Pair, previous: int | None) -> None:
        if previous is None:
            await self.store.delete(pair)
            self.router.discard(pair)
        else:
            await self.store.upsert(pair, previous)
            self.router.set(pair, previous)

    @staticmethod
    async def _refuse_if_stranding(pair: Pair, source: int, target: int, shards: ShardSet) -> None:
        if source != target and await shards.store(source).has_messages(pair):
            raise FailedPrecondition(
                f"the pair ({pair.low}, {pair.high}) has messages on shard {source}; routing it to shard "
                f"{target} would hide them. Moving a pair's messages between shards is not supported yet, "
                "so overrides can only be changed for pairs without messages",
                reason="PAIR_HAS_MESSAGES",
                metadata={"source_shard_id": str(source), "target_shard_id": str(target)},
            )
