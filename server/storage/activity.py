"""SQL of a shard's recent-activity table (`<table>_activity`, server.storage.schema).

Writers are the server processes' activity flushers (server.observability.activity): each adds
its counts of one window of time with one additive upsert per shard, so any number of processes
and servers add up. Readers (`dialogctl hotspots`, the rebalancer) read a time range of it, which
is one range of its primary key: nothing here ever scans the message table, except
`pair_messages`, which counts one pair's rows along the dialog index.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg_pool import AsyncConnectionPool

from server.resilience.db_errors import shard_errors
from server.routing import Pair
from server.storage.messages import MessageStore

#: user_low = user_high = 0 marks a bucket's total (no pair has low = high).
TOTAL = Pair(0, 0)


@dataclass(frozen=True, slots=True)
class ActivityRow:
    """Counts of one bucket's total (pair TOTAL) or of one pair, as added to the table."""

    bucket: int
    pair: Pair
    messages: int
    bytes: int
    reads: int


@dataclass(frozen=True, slots=True)
class ShardActivity:
    """A shard's activity over a window: its totals and its heaviest pairs (by messages)."""

    shard_id: int
    messages: int
    bytes: int
    reads: int
    pairs: tuple[ActivityRow, ...]


def _upsert_sql(table: str) -> str:
    return f"""
        INSERT INTO {table}_activity (window_start, bucket, user_low, user_high, messages, bytes, reads)
        SELECT %s, r.* FROM unnest(%s::smallint[], %s::bigint[], %s::bigint[], %s::bigint[],
                                   %s::bigint[], %s::bigint[]) AS r
        ON CONFLICT (window_start, bucket, user_low, user_high) DO UPDATE SET
            messages = {table}_activity.messages + EXCLUDED.messages,
            bytes = {table}_activity.bytes + EXCLUDED.bytes,
            reads = {table}_activity.reads + EXCLUDED.reads
    """


async def add_activity(
    pool: AsyncConnectionPool[Any], table: str, window_start: datetime, rows: Sequence[ActivityRow]
) -> None:
    """Add `rows` to the window's counts in one statement (one round trip, one commit).

    Rows go in key order, so two processes adding to the same rows lock them in the same order
    and never deadlock; the caller gives each key once (a statement may not update a row twice).
    """
    ordered = sorted(rows, key=lambda r: (r.bucket, r.pair))
    async with pool.connection() as conn:
        await conn.execute(
            _upsert_sql(table),
            (
                window_start,
                [r.bucket for r in ordered],
                [r.pair.low for r in ordered],
                [r.pair.high for r in ordered],
                [r.messages for r in ordered],
                [r.bytes for r in ordered],
                [r.reads for r in ordered],
            ),
        )


async def prune_activity(pool: AsyncConnectionPool[Any], table: str, keep_seconds: float) -> int:
    """Delete the windows that started more than `keep_seconds` ago; returns the rows deleted."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            f"DELETE FROM {table}_activity WHERE window_start < now() - make_interval(secs => %s)",
            (keep_seconds,),
        )
        return int(cur.rowcount)


async def shard_activity(store: MessageStore, window_seconds: float, *, top: int) -> ShardActivity:
    """The shard's counts over the windows that started within the last `window_seconds`, and its
    `top` pairs by messages written (ties: by reads, then by pair)."""
    since = "window_start >= now() - make_interval(secs => %s)"
    async with shard_errors(store.shard_id), store.pool.connection() as conn:
        cur = await conn.execute(
            f"SELECT coalesce(sum(messages), 0), coalesce(sum(bytes), 0), coalesce(sum(reads), 0) "
            f"FROM {store.table}_activity WHERE {since} AND user_low = 0 AND user_high = 0",
            (window_seconds,),
        )
        totals = await cur.fetchone()
        cur = await conn.execute(
            f"""
            SELECT bucket, user_low, user_high, sum(messages), sum(bytes), sum(reads)
            FROM {store.table}_activity WHERE {since} AND (user_low, user_high) <> (0, 0)
            GROUP BY bucket, user_low, user_high
            ORDER BY sum(messages) DESC, sum(reads) DESC, user_low, user_high LIMIT %s
            """,
            (window_seconds, top),
        )
        pairs = await cur.fetchall()
    assert totals is not None
    return ShardActivity(
        store.shard_id,
        int(totals[0]),
        int(totals[1]),
        int(totals[2]),
        tuple(ActivityRow(r[0], Pair(r[1], r[2]), int(r[3]), int(r[4]), int(r[5])) for r in pairs),
    )


async def pair_messages(store: MessageStore, pair: Pair) -> int:
    """The pair's stored messages on this shard, counted along the dialog index (one range of it)."""
    async with shard_errors(store.shard_id), store.pool.connection() as conn:
        cur = await conn.execute(
            f"SELECT count(*) FROM {store.table} WHERE user_low = %s AND user_high = %s",
            (pair.low, pair.high),
        )
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def pairs_messages(store: MessageStore, pairs: Sequence[Pair]) -> dict[Pair, int]:
    """`pair_messages` of each pair (concurrently, on the shard's pool)."""
    counts = await asyncio.gather(*(pair_messages(store, p) for p in pairs))
    return dict(zip(pairs, counts, strict=True))
