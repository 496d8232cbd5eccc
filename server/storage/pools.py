"""Per-shard connection pools with explicit lifetimes.

`ShardSet` opens one psycopg_pool.AsyncConnectionPool per shard (even when
several shards share a database: each shard is its own failure domain and
its own resource budget), applies the schema, and closes them in reverse.
Startup fails fast with a message naming the shard and where it lives.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from server.config import PoolConfig, ShardConfig, describe_dsn
from server.errors import FailedPrecondition
from server.storage.batching import BatchingMessageStore
from server.storage.messages import MessageStore
from server.storage.schema import migrate_shard


class StartupError(RuntimeError):
    """A database needed at startup cannot be used; the message names which and why."""


def connect_failure_reason(exc: BaseException) -> str:
    """The part of a connection error an operator acts on, e.g. `Connection refused`."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    # libpq says "connection failed: connection to server at ..., port N failed: Connection refused";
    # the last clause is the part an operator acts on.
    return first.rsplit("failed: ", 1)[-1].strip() or first


async def open_pool(
    name: str, dsn: str, config: PoolConfig, *, min_size: int | None = None, max_size: int | None = None
) -> AsyncConnectionPool[Any]:
    """Connect once to report a clear error, then open a pool and wait for its first connections."""
    label = f"{name} ({describe_dsn(dsn)})"
    try:
        probe = await psycopg.AsyncConnection.connect(dsn, connect_timeout=max(1, int(config.open_timeout)))
    except psycopg.Error as exc:
        raise StartupError(f"{label}: {connect_failure_reason(exc)}") from None
    await probe.close()
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        dsn,
        min_size=config.min_size if min_size is None else min_size,
        max_size=config.max_size if max_size is None else max_size,
        open=False,
        name=name,
        timeout=config.acquire_timeout,
        kwargs={"autocommit": True, "prepare_threshold": 0, "application_name": f"dialog-shard {name}"},
    )
    try:
        await pool.open(wait=True, timeout=config.open_timeout)
    except Exception as exc:
        await pool.close()
        raise StartupError(f"{label}: {connect_failure_reason(exc)}") from None
    return pool


class ShardSet:
    """The shards' message stores; an async context manager owning their pools."""

    def __init__(self, shards: Sequence[ShardConfig], pool_config: PoolConfig) -> None:
        self._configs = tuple(shards)
        self._pool_config = pool_config
        self._stores: dict[int, MessageStore] = {}
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

    def __len__(self) -> int:
        return len(self._configs)

    async def open(self) -> None:
        results = await asyncio.gather(
            *(open_pool(f"shard-{c.shard_id}", c.dsn, self._pool_config) for c in self._configs),
            return_exceptions=True,
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        pools = [r for r in results if isinstance(r, AsyncConnectionPool)]
        if failures:
            await asyncio.gather(*(p.close() for p in pools))
            raise StartupError("; ".join(str(f) for f in failures))
        for config, pool in zip(self._configs, pools, strict=True):
            self._stack.push_async_callback(pool.close)
            async with pool.connection() as conn:
                await migrate_shard(conn, config.table)
            self._stores[config.shard_id] = self._store(config, pool)

    def _store(self, config: ShardConfig, pool: AsyncConnectionPool[Any]) -> MessageStore:
        batch = self._pool_config.max_write_batch
        if batch < 2:
            return MessageStore(config.shard_id, config.table, pool)
        store = BatchingMessageStore(config.shard_id, config.table, pool, max_batch=batch)
        # Registered after the pool: runs before it closes, so queued inserts finish first.
        self._stack.push_async_callback(store.drain)
        return store

    async def close(self) -> None:
        await self._stack.aclose()
        self._stores.clear()

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
