"""ShardGate's retry decisions against a real PostgreSQL: which failures are retried, and when not."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
import pytest_asyncio
from psycopg import errors as pg_errors

from server.config import PoolConfig, ResilienceConfig
from server.errors import ShardUnavailable
from server.resilience import BreakerState, ShardGate
from server.storage.pools import open_pool

RESILIENCE = ResilienceConfig(
    failure_threshold=5, retry_attempts=3, retry_backoff=0.01, retry_backoff_max=0.05
)


@pytest_asyncio.fixture
async def gate(pg_server) -> AsyncIterator[ShardGate]:
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


async def test_lost_connection_is_retried_for_an_idempotent_call(gate):
    op = Flaky(2, "terminate")
    assert await gate.run(op, idempotent=True) == 3
    assert gate.breaker.state is BreakerState.CLOSED and gate.breaker.consecutive_failures == 0


async def test_lost_connection_is_not_retried_when_the_outcome_is_unknown(gate):
    op = Flaky(1, "terminate")
    with pytest.raises(ShardUnavailable) as caught:
        await gate.run(op, idempotent=False)
    assert op.attempts == 1 and caught.value.retry_after_seconds > 0
    assert gate.breaker.consecutive_failures == 1
    assert await gate.run(Flaky(0, ""), idempotent=False) == 1  # the next call gets a good connection
    assert gate.breaker.consecutive_failures == 0


async def test_serialization_failure_is_retried_even_when_not_idempotent(gate):
    op = Flaky(1, "serialization")
    assert await gate.run(op, idempotent=False) == 2
    assert gate.breaker.consecutive_failures == 0  # the server was fine


async def test_statement_errors_pass_through_without_retry(gate):
    op = Flaky(1, "refused")
    with pytest.raises(pg_errors.UniqueViolation):
        await gate.run(op, idempotent=True)
    assert op.attempts == 1 and gate.breaker.consecutive_failures == 0


async def test_attempts_are_bounded(gate):
    op = Flaky(10, "terminate")
    with pytest.raises(ShardUnavailable):
        await gate.run(op, idempotent=True)
    assert op.attempts == RESILIENCE.retry_attempts
    assert gate.breaker.consecutive_failures == RESILIENCE.retry_attempts
