"""SQL of `dialogctl hotspots`: messages per shard and per pair, in all and within a recent window."""

from __future__ import annotations

from dataclasses import dataclass

from server.resilience.db_errors import shard_errors
from server.routing import Pair
from server.storage.messages import MessageStore


@dataclass(frozen=True, slots=True)
class Load:
    """Messages of a shard or a pair: all of them, and those created within the window."""

    messages: int
    recent: int


async def shard_load(store: MessageStore, window_seconds: float) -> Load:
    async with shard_errors(store.shard_id), store.pool.connection() as conn:
        cur = await conn.execute(
            f"SELECT count(*), count(*) FILTER (WHERE created_at > now() - make_interval(secs => %s)) "
            f"FROM {store.table}",
            (window_seconds,),
        )
        row = await cur.fetchone()
    assert row is not None
    return Load(int(row[0]), int(row[1]))


async def heaviest_pairs(
    store: MessageStore, window_seconds: float, *, top: int, by_recent: bool
) -> list[tuple[Pair, Load]]:
    """The `top` pairs of the shard with the most messages (or the most recent ones)."""
    order = "recent" if by_recent else "messages"
    async with shard_errors(store.shard_id), store.pool.connection() as conn:
        cur = await conn.execute(
            f"""
            SELECT user_low, user_high, count(*) AS messages,
                   count(*) FILTER (WHERE created_at > now() - make_interval(secs => %s)) AS recent
            FROM {store.table} GROUP BY user_low, user_high
            ORDER BY {order} DESC, user_low, user_high LIMIT %s
            """,
            (window_seconds, top),
        )
        return [(Pair(r[0], r[1]), Load(int(r[2]), int(r[3]))) for r in await cur.fetchall()]
