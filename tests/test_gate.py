"""ShardGate's retry decisions against a real PostgreSQL: which failures are retried, and when not."""

from __future__ import annotations

import asyncio
import secrets
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg
import pytest
import pytest_asyncio
from psycopg import errors as pg_errors

from server.config import PoolConfig, ResilienceConfig
from server.dev.embedded_pg import EmbeddedPostgres
from server.errors import ShardUnavailable
from server.resilience import BreakerState, Shard, ShardGate
from server.routing import ShardRouter
from server.storage.batching import BatchingMessageStore
from server.storage.ids import MessageIdGenerator, id_time
from server.storage.messages import MessageStore, NewMessage
from server.storage.pools import LifoConnectionPool, lend_most_recent_first, open_pool
from server.storage.schema import migrate_shard

RESILIENCE = ResilienceConfig(
    failure_threshold=5, retry_attempts=3, retry_backoff=0.01, retry_backoff_max=0.05
)


@pytest_asyncio.fixture
async def gate(pg_server: EmbeddedPostgres) -> AsyncIterator[ShardGate]:
    pool = await open_pool("gate-test", pg_server.dsn, PoolConfig(min_size=1, max_size=2))
    try:
        yield ShardGate(0, pool, RESILIENCE, acquire_timeout=2.0)
    finally:
        await pool.close()


class Flaky:
    """An operation whose first `failures` attempts fail in the given way, then answers its attempt."""

    def __init__(self, failures: int, how: str) -> None:
        self.failures = failures
        self.how = how
        self.attempts = 0

    async def __call__(self, conn: psycopg.AsyncConnection[Any]) -> int:
        self.attempts += 1
        if self.attempts <= self.failures:
            if self.how == "terminate":  # the server drops the connection: 57P01, outcome unknown
                await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
            elif self.how == "serialization":  # rolled back: safe to retry
                await conn.execute("DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$")
            elif self.how == "refused":  # a statement error: never retried
                await conn.execute("DO $$ BEGIN RAISE EXCEPTION 'no' USING ERRCODE = '23505'; END $$")
        return self.attempts


async def test_lost_connection_is_retried_for_an_idempotent_call(gate: ShardGate) -> None:
    op = Flaky(2, "terminate")
    assert await gate.run(op, idempotent=True) == 3
    assert gate.breaker.state is BreakerState.CLOSED and gate.breaker.consecutive_failures == 0


async def test_lost_connection_is_not_retried_when_the_outcome_is_unknown(gate: ShardGate) -> None:
    op = Flaky(1, "terminate")
    with pytest.raises(ShardUnavailable) as caught:
        await gate.run(op, idempotent=False)
    assert op.attempts == 1 and caught.value.retry_after_seconds > 0
    assert gate.breaker.consecutive_failures == 1
    assert await gate.run(Flaky(0, ""), idempotent=False) == 1  # the next call gets a good connection
    assert gate.breaker.consecutive_failures == 0


async def test_serialization_failure_is_retried_even_when_not_idempotent(gate: ShardGate) -> None:
    op = Flaky(1, "serialization")
    assert await gate.run(op, idempotent=False) == 2
    assert gate.breaker.consecutive_failures == 0  # the server was fine


async def test_statement_errors_pass_through_without_retry(gate: ShardGate) -> None:
    op = Flaky(1, "refused")
    with pytest.raises(pg_errors.UniqueViolation):
        await gate.run(op, idempotent=True)
    assert op.attempts == 1 and gate.breaker.consecutive_failures == 0


async def test_attempts_are_bounded(gate: ShardGate) -> None:
    op = Flaky(10, "terminate")
    with pytest.raises(ShardUnavailable):
        await gate.run(op, idempotent=True)
    assert op.attempts == RESILIENCE.retry_attempts
    assert gate.breaker.consecutive_failures == RESILIENCE.retry_attempts


async def test_an_insert_repeated_after_an_unknown_outcome_is_stored_once(
    pg_server: EmbeddedPostgres, new_pair: Callable[[], tuple[int, int]]
) -> None:
    """The gate retries SendMessage's insert even without a request_id: the retry carries the same
    message_id, and finding it stored means the earlier attempt committed."""
    table = f"gate_{secrets.token_hex(6)}"
    pool = await open_pool("gate-insert", pg_server.dsn, PoolConfig(min_size=1, max_size=2))
    try:
        async with pool.connection() as conn:
            await migrate_shard(conn, table)
        shard = Shard.of_pool(0, pool, RESILIENCE)
        single, batching = MessageStore(0, table, shard), BatchingMessageStore(0, table, shard, max_batch=4)
        ids = MessageIdGenerator()
        router = ShardRouter(1)

        def message(text: str) -> NewMessage:
            a, b = new_pair()
            where, message_id = router.resolve(a, b), ids.next()
            return NewMessage(message_id, where.pair, where.bucket, a, b, text, id_time(message_id), None)

        first = message("once")
        stored = await single.insert(first)
        again = await single.insert(first)  # what the gate's retry sends
        assert again == stored and not again.replayed
        # The same through a batch: the stored message fails the batch statement on its primary
        # key, the batch is split, and each message alone finds its row or is stored.
        other = message("with company")
        results = await asyncio.gather(batching.insert(first), batching.insert(other), batching.insert(first))
        assert results[0].message == results[2].message == stored.message
        assert results[1].message.text == "with company"
        async with pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT message_id, count(*) FROM {table} GROUP BY message_id ORDER BY message_id"
            )
            assert sorted(await cur.fetchall()) == sorted([(first.message_id, 1), (other.message_id, 1)])
        await batching.drain()
    finally:
        await pool.close()


async def test_the_pool_lends_the_connection_returned_last(pg_server: EmbeddedPostgres) -> None:
    # Most recent first keeps one PostgreSQL backend serving back-to-back statements (warm caches);
    # psycopg_pool's own order would lend `first` next. See LifoConnectionPool.
    pool = await open_pool("lifo-test", pg_server.dsn, PoolConfig(min_size=3, max_size=3))
    try:
        assert isinstance(pool, LifoConnectionPool)
        first, second = await pool.getconn(), await pool.getconn()
        await pool.putconn(first)
        await pool.putconn(second)
        lent = [await pool.getconn() for _ in range(3)]
        assert lent[0] is second and lent[1] is first
        for conn in reversed(lent):
            await pool.putconn(conn)
        again = await pool.getconn()
        assert again is lent[0]
        await pool.putconn(again)
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT 1")
            assert await cur.fetchone() == (1,)
    finally:
        await pool.close()


def test_a_pool_without_the_expected_idle_deque_is_left_lending_in_turn() -> None:
    # The dependency allows any psycopg_pool 3.x: one that keeps its idle connections otherwise
    # must still start (FIFO), not fail on a missing private attribute.
    class NoDeque:
        pass

    class OtherContainer:
        _pool: list[str] = ["a", "b"]

    assert lend_most_recent_first(NoDeque()) is False
    other = OtherContainer()
    assert lend_most_recent_first(other) is False
    assert other._pool == ["a", "b"]

    class Expected:
        def __init__(self) -> None:
            self._pool: deque[str] = deque(["older", "newer"])

    pool = Expected()
    assert lend_most_recent_first(pool) is True
    assert pool._pool.popleft() == "newer"
    assert lend_most_recent_first(pool) is True  # idempotent: still a stack
    assert pool._pool.popleft() == "older"
