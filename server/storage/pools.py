"""Per-shard connection pools with explicit lifetimes.

`ShardSet` opens one psycopg_pool.AsyncConnectionPool per shard (even when
several shards share a database: each shard is its own failure domain and
its own resource budget), applies the schema, and closes them in reverse.
Startup fails fast with a message naming the shard and where it lives when
`require_all_shards` is set or no shard at all can be reached; otherwise a shard
that cannot be reached starts unavailable (its calls answer UNAVAILABLE) and
joins when its monitor reaches it.
Every statement goes through the shard's gate (server.resilience).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from server.config import PoolConfig, ResilienceConfig, ShardConfig, describe_dsn
from server.errors import FailedPrecondition, StartupError
from server.resilience import EndpointMonitor, Shard, ShardGate, ShardState
from server.storage.batching import BatchingMessageStore, BatchStats, WriteActivity
from server.storage.messages import MessageStore
from server.storage.schema import migrate_shard

log = logging.getLogger(__name__)


class _MostRecentFirst(deque[Any]):
    """Idle connections handed out most recently returned first (a stack, not a queue)."""

    def popleft(self) -> Any:
        return self.pop()


class LifoConnectionPool(AsyncConnectionPool[Any]):
    """An AsyncConnectionPool that lends the connection returned last (SQLAlchemy's pool_use_lifo).

    psycopg_pool lends its idle connections in turn, so under steady load every connection of a
    shard, and every PostgreSQL backend behind them, serves every other statement or so. Lent
    most recent first, one backend serves one statement after another while it is still warm
    in the CPU's caches, which cuts PostgreSQL's CPU per SendMessage (docs/performance.md, "The
    pool lends the connection returned last"). Connections left at the bottom of the stack
    go idle, and psycopg_pool closes those above `min_size` after `max_idle`.

    psycopg_pool has no option for this: the pool's deque of idle connections (`_pool`, which it
    takes from with `popleft` and returns to with `append`) is replaced by one whose `popleft`
    takes the newest. tests/test_gate.py checks the order, so that a psycopg_pool release that
    changes this shows up there; a release without that deque (the dependency allows any 3.x)
    still serves, lending in turn, with a warning at startup (`lend_most_recent_first`). (Its
    shrinking also takes with `popleft`, so the connection it closes after `max_idle` is a
    recently used one: a reconnect, nothing more.)
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not lend_most_recent_first(self):
            log.warning(
                "pool %s: this psycopg_pool keeps its idle connections differently; "
                "they are lent in turn instead of most recent first (slower, not wrong)",
                self.name,
            )


def lend_most_recent_first(pool: object) -> bool:
    """Make `pool` (an AsyncConnectionPool) lend its newest idle connection first; False if its
    idle connections are not kept where and how this expects, leaving the pool as it was."""
    idle = getattr(pool, "_pool", None)
    if type(idle) is not deque and not isinstance(idle, _MostRecentFirst):
        return False
    pool._pool = _MostRecentFirst(idle)  # type: ignore[attr-defined]
    return True


class DatabaseStartupError(StartupError):
    """A database needed at startup cannot be used (unreachable, or routing over shards not configured).

    The message names which database and why.
    """


def connect_failure_reason(exc: BaseException) -> str:
    """The part of a connection error an operator acts on, e.g. `Connection refused`."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    # libpq says "connection failed: connection to server at ..., port N failed: Connection refused";
    # the last clause is the part an operator acts on.
    return first.rsplit("failed: ", 1)[-1].strip() or first


def make_pool(
    name: str,
    dsn: str,
    config: PoolConfig,
    *,
    min_size: int | None = None,
    max_size: int | None = None,
    statement_timeout: float | None = None,
    reconnect_timeout: float = 300.0,
) -> AsyncConnectionPool[Any]:
    """An unopened pool; `statement_timeout` (seconds) becomes each connection's server-side ceiling."""
    kwargs: dict[str, Any] = {
        "autocommit": True,
        "prepare_threshold": 0,
        "application_name": f"dialog-shard {name}",
    }
    # Sessions in UTC: psycopg then gives timestamps a fixed UTC offset (`datetime.timezone.utc`)
    # instead of a ZoneInfo of the server's zone (e.g. `Etc/UTC`), whose per-value conversions
    # cost CPU on every timestamp read (docs/performance-history.md, "Levers, one by one"). The
    # values are the same instants either way.
    options = "-c TimeZone=UTC"
    if statement_timeout is not None:
        options += f" -c statement_timeout={max(1, round(statement_timeout * 1000))}"
    kwargs["options"] = options
    return LifoConnectionPool(
        dsn,
        min_size=config.min_size if min_size is None else min_size,
        max_size=config.max_size if max_size is None else max_size,
        open=False,
        name=name,
        timeout=config.acquire_timeout,
        # Short: a slot whose reconnection gives up is refilled on demand, at once, when the server
        # is back, instead of after the pool's exponential backoff (which grows with the outage).
        reconnect_timeout=reconnect_timeout,
        kwargs=kwargs,
    )


async def open_pool(
    name: str,
    dsn: str,
    config: PoolConfig,
    *,
    min_size: int | None = None,
    max_size: int | None = None,
    statement_timeout: float | None = None,
    reconnect_timeout: float = 300.0,
) -> AsyncConnectionPool[Any]:
    """Connect once to report a clear error, then open a pool and wait for its first connections."""
    label = f"{'the control database' if name == 'control' else name} ({describe_dsn(dsn)})"
    try:
        probe = await psycopg.AsyncConnection.connect(dsn, connect_timeout=max(1, int(config.open_timeout)))
    except psycopg.Error as exc:
        raise DatabaseStartupError(f"{label}: {connect_failure_reason(exc)}") from None
    await probe.close()
    pool = make_pool(
        name,
        dsn,
        config,
        min_size=min_size,
        max_size=max_size,
        statement_timeout=statement_timeout,
        reconnect_timeout=reconnect_timeout,
    )
    try:
        await pool.open(wait=True, timeout=config.open_timeout)
    except Exception as exc:
        await pool.close()
        raise DatabaseStartupError(f"{label}: {connect_failure_reason(exc)}") from None
    return pool


class ShardSet:
    """The shards' message stores; an async context manager owning their pools and monitors."""

    def __init__(
        self,
        shards: Sequence[ShardConfig],
        pool_config: PoolConfig,
        resilience: ResilienceConfig | None = None,
    ) -> None:
        self._configs = tuple(shards)
        self._pool_config = pool_config
        # Without a policy (tools such as dialogctl) every shard must be reachable, as before;
        # the server passes its configured one, which by default starts degraded.
        self._resilience = resilience or ResilienceConfig(require_all_shards=True)
        self._stores: dict[int, MessageStore] = {}
        #: Inserts in progress over all shards: a lone insert with peers may wait for company.
        self._write_activity = WriteActivity()
        self._shards: dict[int, Shard] = {}
        self._stack = AsyncExitStack()

    @property
    def configs(self) -> tuple[ShardConfig, ...]:
        return self._configs

    def store(self, shard_id: int) -> MessageStore:
        try:
            return self._stores[shard_id]
        except KeyError:
            # Only a shard_map row naming a shard this server is not configured with gets here.
            raise FailedPrecondition(
                f"shard {shard_id} is not configured on this server ({len(self._configs)} shards are); "
                "check the shard map and the server's shard list",
                reason="SHARD_NOT_CONFIGURED",
            ) from None

    def state(self, shard_id: int) -> ShardState:
        """A snapshot of the shard's primary and replicas (availability, breaker, lag)."""
        return self._shards[shard_id].state()

    def states(self) -> list[ShardState]:
        """Snapshots of every shard, by shard id."""
        return [self._shards[c.shard_id].state() for c in self._configs]

    def batch_stats(self) -> dict[int, BatchStats]:
        """The write batching counters of the shards that batch (none when batching is off)."""
        return {
            shard_id: store.stats
            for shard_id, store in self._stores.items()
            if isinstance(store, BatchingMessageStore)
        }

    def __len__(self) -> int:
        return len(self._configs)

    async def open(self) -> None:
        resilience = self._resilience
        results = await asyncio.gather(
            *(self._open_primary(c) for c in self._configs),
            return_exceptions=True,
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        unexpected = [f for f in failures if not isinstance(f, DatabaseStartupError)]
        # Degraded start needs at least one shard: none reachable is more likely a wrong config.
        if unexpected or (failures and (resilience.require_all_shards or len(failures) == len(results))):
            await asyncio.gather(*(r.close() for r in results if isinstance(r, AsyncConnectionPool)))
            if unexpected:
                raise unexpected[0]
            raise DatabaseStartupError("; ".join(str(f) for f in failures))
        for config, result in zip(self._configs, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("starting without %s; it joins when it can be reached", result)
                pool = make_pool(
                    f"shard-{config.shard_id}",
                    config.dsn,
                    self._pool_config,
                    statement_timeout=resilience.statement_timeout,
                    reconnect_timeout=resilience.reconnect_timeout,
                )
                await pool.open(wait=False)
                ready = False
            else:
                pool, ready = result, True
            self._stack.push_async_callback(pool.close)
            shard = Shard(
                self._monitor(config, config.dsn, pool, ready=ready, replica=False),
                [await self._open_replica(config, dsn) for dsn in config.replica_dsns],
                resilience,
            )
            self._shards[config.shard_id] = shard
            self._stores[config.shard_id] = self._store(config, shard)
        for shard in self._shards.values():
            for monitor in shard.monitors:
                monitor.start()
                self._stack.push_async_callback(monitor.stop)

    async def _open_primary(self, config: ShardConfig) -> AsyncConnectionPool[Any]:
        pool = await open_pool(
            f"shard-{config.shard_id}",
            config.dsn,
            self._pool_config,
            statement_timeout=self._resilience.statement_timeout,
            reconnect_timeout=self._resilience.reconnect_timeout,
        )
        try:
            async with await psycopg.AsyncConnection.connect(config.dsn, autocommit=True) as conn:
                await migrate_shard(conn, config.table)
        except BaseException:
            await pool.close()
            raise
        return pool

    async def _open_replica(self, config: ShardConfig, dsn: str) -> EndpointMonitor:
        # Replicas never block startup: they serve reads once their monitor reaches them.
        pool = make_pool(
            f"shard-{config.shard_id}-replica",
            dsn,
            self._pool_config,
            statement_timeout=self._resilience.statement_timeout,
            reconnect_timeout=self._resilience.reconnect_timeout,
        )
        await pool.open(wait=False)
        self._stack.push_async_callback(pool.close)
        return self._monitor(config, dsn, pool, ready=False, replica=True)

    def _monitor(
        self, config: ShardConfig, dsn: str, pool: AsyncConnectionPool[Any], *, ready: bool, replica: bool
    ) -> EndpointMonitor:
        gate = ShardGate(
            config.shard_id,
            pool,
            self._resilience,
            acquire_timeout=self._pool_config.acquire_timeout,
            role="replica" if replica else "primary",
            location=describe_dsn(dsn),
            ready=ready,
        )

        async def migrate(conn: psycopg.AsyncConnection[Any]) -> None:
            await migrate_shard(conn, config.table)

        return EndpointMonitor(
            gate, dsn, self._resilience, replica=replica, prepare=None if replica else migrate
        )

    def _store(self, config: ShardConfig, shard: Shard) -> MessageStore:
        batch = self._pool_config.max_write_batch
        if batch < 2:
            return MessageStore(config.shard_id, config.table, shard)
        store = BatchingMessageStore(
            config.shard_id,
            config.table,
            shard,
            max_batch=batch,
            max_wait=self._pool_config.max_write_batch_wait_ms / 1000,
            activity=self._write_activity,
        )
        # Registered after the pool: runs before it closes, so queued inserts finish first.
        self._stack.push_async_callback(store.drain)
        return store

    async def close(self) -> None:
        started = time.monotonic()
        await self._stack.aclose()
        self._stores.clear()
        self._shards.clear()
        log.info("shard pools closed in %.2f s", time.monotonic() - started)

    async def __aenter__(self) -> ShardSet:
        try:
            await self.open()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
