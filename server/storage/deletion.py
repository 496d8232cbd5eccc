"""SQL of deleting messages on one shard: a sender's message (DeleteMessage), a user's dialogs
(EraseUser). A delete of a pair's message passes the move fence as an insert does (see
server.storage.fences): while the pair's messages move away, it is refused as DIALOG_MOVING and
served by the new shard after the flip. Before the fence, a move may already have copied the
message: the delete removes that copy on the move's target too (`move_targets`, `delete_copy`), or
the move's verification would find a message its source lacks.

Every delete logs its deletion in the shard's message log (server.storage.events) by the same
statement, so the inbox relay takes the message off its dialog's inbox rows; EraseUser deletes the
user's log events right after their messages."""

from __future__ import annotations

import uuid
from typing import Any

from psycopg import AsyncConnection

from server.resilience.db_errors import shard_errors
from server.routing import Pair, bucket_of
from server.storage.events import erase_user_sql, log_archived_deletion_sql, log_deleted
from server.storage.messages import MessageStore

#: What a deleted row's deletion event is made of (server.storage.events.log_deleted).
_RETURNING = "RETURNING message_id, user_low, user_high, from_user_id, to_user_id"


async def sender_of(store: MessageStore, pair: Pair, message_id: uuid.UUID) -> int | None:
    """The sender of the pair's message on this shard, None when the shard does not hold it."""

    async def op(conn: AsyncConnection[Any]) -> int | None:
        row = await (
            await conn.execute(
                f"SELECT from_user_id FROM {store.table} "
                "WHERE message_id = %s AND user_low = %s AND user_high = %s",
                (message_id, pair.low, pair.high),
            )
        ).fetchone()
        return None if row is None else int(row[0])

    return await store.shard.read(op, stale_ok=False)


async def delete_sent(store: MessageStore, pair: Pair, message_id: uuid.UUID, sender: int) -> bool:
    """Delete the pair's message if `sender` sent it; whether a row was deleted."""

    async def op(conn: AsyncConnection[Any]) -> bool:
        cur = await conn.execute(
            f"WITH gone AS (DELETE FROM {store.table} "
            "WHERE message_id = %s AND user_low = %s AND user_high = %s "
            f"AND from_user_id = %s AND {store.table}_writable(%s, %s, %s) {_RETURNING}) "
            + log_deleted(store.table, "gone"),
            (message_id, pair.low, pair.high, sender, bucket_of(*pair), pair.low, pair.high),
        )
        return cur.rowcount == 1

    return await store.shard.write(op, idempotent=True)


async def erase_user(store: MessageStore, user_id: int) -> int:
    """Delete every message of the user's dialogs on this shard (one scan); returns rows deleted."""
    async with shard_errors(store.shard_id), store.pool.connection() as conn:
        cur = await conn.execute(
            f"DELETE FROM {store.table} WHERE user_low = %s OR user_high = %s", (user_id, user_id)
        )
        deleted: int = cur.rowcount
        # Its own transaction: the log's scan does not hold the message table's lock (which a
        # move's fence waits out). A crash in between leaves events an EraseUser again deletes.
        await conn.execute(erase_user_sql(store.table), (user_id, user_id))
        return deleted


async def log_archived_deletion(
    store: MessageStore, pair: Pair, message_id: uuid.UUID, sender: int, recipient: int
) -> None:
    """Log the deletion of a message only the archive holds (its tombstone hides it already)."""

    async def op(conn: AsyncConnection[Any]) -> None:
        await conn.execute(
            log_archived_deletion_sql(store.table), (message_id, pair.low, pair.high, sender, recipient)
        )

    await store.shard.write(op, idempotent=True)


async def move_targets(conn: AsyncConnection[Any], pair: Pair) -> list[int]:
    """The target shards of the unfinished moves that take the pair's messages (a pair's move, or a
    reshard's bucket move): a copy made before a delete must be deleted there too."""
    cur = await conn.execute(
        "SELECT DISTINCT target_shard FROM shard_moves WHERE state <> 'done' AND "
        "((user_low = %s AND user_high = %s) OR "
        "(user_low = 0 AND user_high = 0 AND %s = ANY(coalesce(buckets, ARRAY[bucket]))))",
        (pair.low, pair.high, bucket_of(*pair)),
    )
    return [int(r[0]) for r in await cur.fetchall()]


async def delete_copy(store: MessageStore, pair: Pair, message_id: uuid.UUID) -> bool:
    """Delete a moving message's copy on the move's target shard (no fence: it is the copy's shard)."""

    async def op(conn: AsyncConnection[Any]) -> bool:
        cur = await conn.execute(
            f"WITH gone AS (DELETE FROM {store.table} "
            f"WHERE message_id = %s AND user_low = %s AND user_high = %s {_RETURNING}) "
            + log_deleted(store.table, "gone"),
            (message_id, pair.low, pair.high),
        )
        return cur.rowcount == 1

    return await store.shard.write(op, idempotent=True)
