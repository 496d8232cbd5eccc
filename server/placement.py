"""Placement of pairs on shards: the router, its shard-map mirror and override changes.

`Placement` owns the control database's pool and the LISTEN/NOTIFY mirror; it
resolves pairs without I/O and changes overrides through `server.moves.mover`, which
moves a pair's existing messages to its new shard online.

The control database is a failure domain of its own, watched like a shard's primary: a
`ShardGate` with its breaker and an `EndpointMonitor` probing it (server.resilience). Sending
and reading never touch it (routing is the in-memory mirror); override changes and listings go
through the gate (`ShardGate.guard`), so while it is down or hung they get UNAVAILABLE
(CONTROL_UNAVAILABLE, with RetryInfo) at once, or as soon as the monitor finds it hung. The
monitor also tells the mirror's listener to drop a hung connection and to reconnect and reload
at once when the database answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar

from psycopg_pool import AsyncConnectionPool

from server.config import PoolConfig, ResilienceConfig, describe_dsn
from server.errors import CONTROL_SHARD, DialogMoving, FailedPrecondition, NotFound
from server.moves.mover import Mover
from server.observability.call_context import current_shard
from server.resilience import EndpointMonitor, ShardGate
from server.resilience.deadline import remaining
from server.routing import Pair, Resolution, ShardRouter
from server.storage.layout import ensure_layout, load_layout
from server.storage.overrides import OverrideRow, OverrideStore, OverrideSync
from server.storage.pools import DatabaseStartupError, ShardSet, open_pool
from server.storage.presence import PresenceBeacon

log = logging.getLogger(__name__)

T = TypeVar("T")
#: Left of the RPC's deadline when a wait gives up, so the caller gets DIALOG_MOVING, not a timeout.
_DEADLINE_MARGIN = 0.05


class Placement:
    """Router + shard map; an async context manager owning the control pool and listener."""

    def __init__(
        self,
        control_dsn: str,
        num_shards: int,
        pool_config: PoolConfig,
        *,
        moving_wait: float = 0.0,
        resilience: ResilienceConfig | None = None,
    ) -> None:
        self.router = ShardRouter(num_shards)
        self._moving_wait = moving_wait
        self._resilience = resilience or ResilienceConfig()
        self._monitor: EndpointMonitor | None = None
        #: Calls that found their dialog moving and waited for routing to change.
        self.moving_waits = 0
        self._configured_shards = num_shards
        self._control_dsn = control_dsn
        self._pool_config = pool_config
        self._pool: AsyncConnectionPool[Any] | None = None
        self._sync = OverrideSync(control_dsn, self.router)
        # Set, and replaced by a fresh one, whenever the routing changes: wakes calls waiting out a move.
        self._routing_changed = asyncio.Event()
        self.router.add_change_listener(self._wake_routing_waiters)

    @property
    def store(self) -> OverrideStore:
        if self._pool is None:
            raise RuntimeError("Placement is not open")
        return OverrideStore(self._pool)

    @property
    def control_dsn(self) -> str:
        return self._control_dsn

    @property
    def control_pool(self) -> AsyncConnectionPool[Any]:
        """The control database's pool (statements should go through `control`'s guard)."""
        if self._pool is None:
            raise RuntimeError("Placement is not open")
        return self._pool

    @property
    def reloads(self) -> int:
        return self._sync.reloads

    @property
    def control(self) -> ShardGate:
        """The control database's gate: its breaker, availability and last error."""
        if self._monitor is None:
            raise RuntimeError("Placement is not open")
        return self._monitor.gate

    async def __aenter__(self) -> Placement:
        resilience = self._resilience
        self._pool = await open_pool(
            "control",
            self._control_dsn,
            self._pool_config,
            min_size=1,
            max_size=4,
            reconnect_timeout=resilience.reconnect_timeout,
        )
        self._presence = PresenceBeacon(self._pool, self._configured_shards)
        gate = ShardGate(
            CONTROL_SHARD,
            self._pool,
            resilience,
            acquire_timeout=self._pool_config.acquire_timeout,
            location=describe_dsn(self._control_dsn),
        )
        self._monitor = EndpointMonitor(
            gate, self._control_dsn, resilience, on_available=self._sync.wake, on_down=self._sync.lost
        )
        try:
            await self.store.migrate()
            await self._check_layout()
            await self._sync.start()
            await self._presence.start()
            self._monitor.start()
        except BaseException:
            await self._sync.stop()
            await self._pool.close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        started = time.monotonic()
        await self._presence.stop()
        await self._sync.stop()
        if self._monitor is not None:
            await self._monitor.stop()
        if self._pool is not None:
            await self._pool.close()
        # Each closing step has its own bound; the time says which one a slow shutdown spent.
        log.info("shard map and presence closed in %.2f s", time.monotonic() - started)

    async def _check_layout(self) -> None:
        """Record the layout on a fresh control database; refuse to route over shards not configured here."""
        assert self._pool is not None
        async with self._pool.connection() as conn:
            await ensure_layout(conn, self._configured_shards)
            layout = await load_layout(conn)
        if layout.active_shards > self._configured_shards:
            raise DatabaseStartupError(
                f"the control database routes over {layout.active_shards} shards but this server's config "
                f"lists {self._configured_shards}: add the missing [[shards]] entries (every server needs "
                "every shard's DSN)"
            )

    def resolve(self, user_id_1: int, user_id_2: int) -> Resolution:
        """Where the pair lives; also records the shard as the current RPC's (metrics, logs)."""
        where = self.router.resolve(user_id_1, user_id_2)
        current_shard.set(where.shard_id)
        return where

    async def through_moves(self, where: Resolution, call: Callable[[int], Awaitable[T]]) -> T:
        """`call(shard_id)` on the pair's shard, waiting out a move of its dialog.

        A dialog in a move's final catch-up, or one this process still routes to its old
        shard, is refused there (DialogMoving). Rather than hand every caller that retry, wait
        until this process's routing changes (the flip's NOTIFY) and call the shard it names
        then, for up to `moving_wait` seconds within the RPC's deadline; past that the last
        DialogMoving goes to the caller (UNAVAILABLE with a RetryInfo, safe to retry).
        """
        version = self.router.version
        try:
            return await call(where.shard_id)
        except DialogMoving as refused:
            moving = refused
        self.moving_waits += 1
        budget, by_deadline = remaining(self._moving_wait)
        give_up = time.monotonic() + budget - (_DEADLINE_MARGIN if by_deadline else 0.0)
        while True:
            while self.router.version == version:
                left = give_up - time.monotonic()
                if left <= 0:
                    raise moving
                changed = self._routing_changed
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await changed.wait()
            version = self.router.version
            where = self.resolve(where.pair.low, where.pair.high)
            try:
                return await call(where.shard_id)
            except DialogMoving as refused:
                moving = refused

    def _wake_routing_waiters(self) -> None:
        changed, self._routing_changed = self._routing_changed, asyncio.Event()
        changed.set()

    def mover(self, shards: ShardSet, **options: float) -> Mover:
        """A mover of pairs on these shards (options: Mover's keyword arguments)."""
        if self._pool is None:
            raise RuntimeError("Placement is not open")
        return Mover(self._control_dsn, self._pool, shards, self.router, **options)  # type: ignore[arg-type]

    async def list_overrides(self, after: Pair | None, limit: int) -> list[OverrideRow]:
        """A page of the stored overrides (see OverrideStore.page), through the control gate."""
        return await self.control.guard(self.store.page(after, limit))

    async def set_override(self, pair: Pair, shard_id: int, shards: ShardSet) -> OverrideRow:
        """Pin `pair` to `shard_id`, moving its messages there (server.moves.mover)."""
        return await self.control.guard(self._set_override(pair, shard_id, shards))

    async def delete_override(self, pair: Pair, shards: ShardSet, *, allow_missing: bool) -> int:
        """Drop the pair's override, moving its messages back to the hash shard; returns that shard."""
        return await self.control.guard(self._delete_override(pair, shards, allow_missing=allow_missing))

    async def _set_override(self, pair: Pair, shard_id: int, shards: ShardSet) -> OverrideRow:
        await self.mover(shards).move_pair(pair, shard_id)
        row = await self.store.get(pair)
        if row is None or row.shard_id != shard_id:  # pragma: no cover - changed by a concurrent call
            raise FailedPrecondition(
                f"the override of pair ({pair.low}, {pair.high}) was changed concurrently; list it and retry",
                reason="OVERRIDE_CHANGED",
            )
        return row

    async def _delete_override(self, pair: Pair, shards: ShardSet, *, allow_missing: bool) -> int:
        if await self.store.get(pair) is None and not allow_missing:
            raise NotFound(
                f"the pair ({pair.low}, {pair.high}) has no shard override", reason="OVERRIDE_NOT_FOUND"
            )
        result = await self.mover(shards).move_pair(pair, None)
        return result.shard_id
