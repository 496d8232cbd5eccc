"""A shard's message log (server.storage.events) read while transactions commit out of order."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import psycopg

from server.config import PoolConfig, ShardConfig
from server.dev.embedded_pg import EmbeddedPostgres
from server.storage.events import EventCursor, EventLog
from server.storage.ids import MessageIdGenerator
from server.storage.pools import ShardSet

_ids = MessageIdGenerator()


async def _log_event(conn: psycopg.AsyncConnection[object], table: str, text: str) -> uuid.UUID:
    message_id = _ids.next()
    await conn.execute(
        f"INSERT INTO {table}_events (message_id, user_low, user_high, from_user_id, to_user_id, text, "
        "created_at) VALUES (%s, 1, 2, 1, 2, %s, %s)",
        (message_id, text, datetime.now(UTC)),
    )
    return message_id


async def test_a_reader_never_passes_a_transaction_that_commits_after_a_later_one(
    pg_server: EmbeddedPostgres,
) -> None:
    pg_server.create_database("message_log")
    dsn = pg_server.dsn_for("message_log")
    config = ShardConfig(0, dsn, "messages_0")
    async with (
        ShardSet([config], PoolConfig(min_size=1, max_size=2)) as shards,
        await psycopg.AsyncConnection.connect(dsn) as slow,
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as quick,
        await psycopg.AsyncConnection.connect(dsn) as aborted,
    ):
        log = EventLog(0, config.table, shards.store(0).shard)
        start = await log.horizon()
        # The slow transaction takes its id first and commits last; another one rolls back.
        first = await _log_event(slow, config.table, "slow")
        await _log_event(aborted, config.table, "rolled back")
        second = await _log_event(quick, config.table, "quick")
        page = await log.read(start, limit=10)
        assert page.events == [] and not page.full and page.held_back
        # Nothing behind the slow transaction is read, so the cursor stays before it.
        assert page.next_cursor < EventCursor(2**64 - 1, first)
        await aborted.rollback()
        await slow.commit()
        page = await log.read(page.next_cursor, limit=10)
        assert [e.message_id for e in page.events] == [first, second]
        assert [e.text for e in page.events] == ["slow", "quick"]
        # Read past both: nothing again, and a page that is full says so.
        assert (await log.read(page.next_cursor, limit=10)).events == []
        assert (await log.read(start, limit=1)).full
        # One user's events only, and up to a bound.
        mine = await log.read(start, limit=10, user_id=2, upto=page.events[0].cursor)
        assert [e.message_id for e in mine.events] == [first] and mine.next_cursor == page.events[0].cursor
        assert (await log.read(start, limit=10, user_id=3)).events == []
