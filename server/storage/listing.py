"""SQL of the operator's message listing (AdminService.ListMessages): one shard, keyset by message id.

Without a pair the walk follows the primary key; with a pair it is a range of the dialog index.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from psycopg import AsyncConnection

from server.routing import Pair
from server.storage.ids import MIN_ID
from server.storage.messages import MessageStore, StoredMessage

_COLUMNS = "message_id, from_user_id, to_user_id, text, created_at, user_low, user_high, bucket"


@dataclass(frozen=True, slots=True)
class ListedMessage:
    """A stored message with the pair and bucket its row records."""

    message: StoredMessage
    pair: Pair
    bucket: int


def _sql(table: str, by_pair: bool) -> str:
    if by_pair:
        return (
            f"SELECT {_COLUMNS} FROM {table} WHERE user_low = %s AND user_high = %s AND message_id > %s "
            "ORDER BY user_low, user_high, message_id LIMIT %s"
        )
    return f"SELECT {_COLUMNS} FROM {table} WHERE message_id > %s ORDER BY message_id LIMIT %s"


async def list_messages(
    store: MessageStore, *, pair: Pair | None, after: uuid.UUID | None, limit: int
) -> list[ListedMessage]:
    """Up to `limit` messages of the shard (of `pair` only, if given) with ids after `after`."""
    cursor = after if after is not None else MIN_ID
    params: tuple[object, ...] = (cursor, limit) if pair is None else (pair.low, pair.high, cursor, limit)
    sql = _sql(store.table, pair is not None)

    async def op(conn: AsyncConnection[Any]) -> list[tuple[Any, ...]]:
        return await (await conn.execute(sql, params)).fetchall()

    # Through the shard's gate like the service's own reads: a down or hung shard fails fast
    # (breaker, the call's deadline) instead of holding the operator's call until it times out.
    rows = await store.shard.read(op, stale_ok=False)
    return [ListedMessage(StoredMessage(*row[:5]), Pair(row[5], row[6]), row[7]) for row in rows]
