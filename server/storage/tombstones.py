"""Deleted messages (DeleteMessage) as the control database records them: tombstones.

A message deleted by its sender may also sit in an archive file (archived earlier, or archived by
a run that took it just before the delete). Files are not rewritten per delete: the tombstone
hides the message from every page that reads the archive, and an archive run later rewrites the
files holding tombstoned messages without them and drops those tombstones (compaction).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from psycopg import AsyncConnection

from server.routing import Pair

TOMBSTONE_SCHEMA = """
CREATE TABLE IF NOT EXISTS message_tombstones (
    message_id UUID PRIMARY KEY,
    user_low BIGINT NOT NULL,
    user_high BIGINT NOT NULL,
    deleted_by BIGINT NOT NULL,
    deleted_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS message_tombstones_pair_idx ON message_tombstones (user_low, user_high);
"""


async def record(conn: AsyncConnection[Any], message_id: uuid.UUID, pair: Pair, deleted_by: int) -> bool:
    """Record the message as deleted; False when it already was."""
    cur = await conn.execute(
        "INSERT INTO message_tombstones (message_id, user_low, user_high, deleted_by) "
        "VALUES (%s, %s, %s, %s) ON CONFLICT (message_id) DO NOTHING",
        (message_id, pair.low, pair.high, deleted_by),
    )
    return cur.rowcount == 1


async def deleted_among(conn: AsyncConnection[Any], ids: Sequence[str]) -> set[str]:
    """Which of these message ids (canonical text) are tombstoned."""
    cur = await conn.execute(
        "SELECT message_id::text FROM message_tombstones WHERE message_id = ANY(%s::uuid[])", (list(ids),)
    )
    return {str(r[0]) for r in await cur.fetchall()}


async def all_ids(conn: AsyncConnection[Any]) -> set[uuid.UUID]:
    """Every tombstoned message id (compaction's list: deletes are rare)."""
    cur = await conn.execute("SELECT message_id FROM message_tombstones")
    return {r[0] for r in await cur.fetchall()}


async def all_tombstones(conn: AsyncConnection[Any]) -> list[tuple[uuid.UUID, tuple[int, int]]]:
    """Every tombstoned message with its pair (low, high): an inbox rebuild's list."""
    cur = await conn.execute("SELECT message_id, user_low, user_high FROM message_tombstones")
    return [(r[0], (int(r[1]), int(r[2]))) for r in await cur.fetchall()]


async def drop(conn: AsyncConnection[Any], ids: Sequence[uuid.UUID]) -> int:
    cur = await conn.execute(
        "DELETE FROM message_tombstones WHERE message_id = ANY(%s::uuid[])", (list(ids),)
    )
    return cur.rowcount


async def drop_user(conn: AsyncConnection[Any], user_id: int) -> int:
    """Drop the tombstones of a user's dialogs (their messages are erased)."""
    cur = await conn.execute(
        "DELETE FROM message_tombstones WHERE user_low = %s OR user_high = %s", (user_id, user_id)
    )
    return cur.rowcount
