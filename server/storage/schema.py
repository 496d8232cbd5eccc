"""Idempotent schema migrations for the control database and each shard.

Every statement is `IF NOT EXISTS`, so applying the schema again is a no-op;
an advisory lock serializes concurrent server starts against one database.
"""

from __future__ import annotations

from collections.abc import Sequence

from psycopg import AsyncConnection

from server.storage.fences import fence_schema

# Arbitrary constant: the advisory lock key that serializes migrations.
_MIGRATION_LOCK = 0x6469616C6F67

# shard_map: the overrides. shard_layout: the number of shards the hash routes over,
# and while a reshard runs the number it moves to; bucket_flips: buckets already moved
# to their shard under target_shards (server.storage.layout).
CONTROL_SCHEMA = """
CREATE TABLE IF NOT EXISTS shard_map (
    user1 BIGINT NOT NULL,
    user2 BIGINT NOT NULL,
    shard_id INTEGER NOT NULL CHECK (shard_id >= 0),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (user1, user2),
    CHECK (user1 < user2)
);
CREATE TABLE IF NOT EXISTS shard_layout (
    singleton BOOLEAN PRIMARY KEY DEFAULT true CHECK (singleton),
    num_shards INTEGER NOT NULL CHECK (num_shards > 0),
    target_shards INTEGER CHECK (target_shards > 0),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS bucket_flips (
    bucket SMALLINT PRIMARY KEY CHECK (bucket >= 0 AND bucket < 4096)
);
"""

# One row per unit (a pair, or a group of buckets with user_low = user_high = 0 and
# `bucket` its first bucket) moving between shards; at most one unfinished move per
# unit. See server.storage.moves.
MOVES_SCHEMA = """
CREATE TABLE IF NOT EXISTS shard_moves (
    move_id BIGSERIAL PRIMARY KEY,
    bucket SMALLINT NOT NULL,
    user_low BIGINT NOT NULL,
    user_high BIGINT NOT NULL,
    source_shard INTEGER NOT NULL,
    target_shard INTEGER NOT NULL,
    flip TEXT NOT NULL CHECK (flip IN ('set_override', 'delete_override', 'bucket')),
    state TEXT NOT NULL CHECK (state IN ('copying', 'fenced', 'flipped', 'done')),
    copied_rows BIGINT NOT NULL DEFAULT 0,
    deleted_rows BIGINT NOT NULL DEFAULT 0,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX IF NOT EXISTS shard_moves_unfinished_idx
    ON shard_moves (bucket, user_low, user_high) WHERE state <> 'done';
ALTER TABLE shard_moves ADD COLUMN IF NOT EXISTS buckets SMALLINT[];
"""

# The pair is stored ordered (user_low < user_high) with its hash bucket, so a
# dialog is one index range and a resharding unit (bucket) is cheap to select.
# message_id is a UUIDv7, so (pair, message_id) is the (pair, time, id) order.
SHARD_SCHEMA = """
CREATE TABLE IF NOT EXISTS {table} (
    message_id UUID NOT NULL PRIMARY KEY,
    user_low BIGINT NOT NULL,
    user_high BIGINT NOT NULL,
    bucket SMALLINT NOT NULL CHECK (bucket >= 0 AND bucket < 4096),
    from_user_id BIGINT NOT NULL,
    to_user_id BIGINT NOT NULL,
    text TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    request_id TEXT,
    CHECK (user_low < user_high),
    CHECK ((from_user_id = user_low AND to_user_id = user_high)
        OR (from_user_id = user_high AND to_user_id = user_low))
);
CREATE INDEX IF NOT EXISTS {table}_dialog_idx ON {table} (user_low, user_high, message_id);
CREATE UNIQUE INDEX IF NOT EXISTS {table}_request_idx
    ON {table} (user_low, user_high, from_user_id, request_id) WHERE request_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS {table}_bucket_idx ON {table} (bucket);
"""


async def _apply(conn: AsyncConnection[object], script: str, extra: Sequence[str] = ()) -> None:
    """Run the `;`-separated script, then the `extra` statements (which may contain `;`)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        for statement in [*filter(None, (s.strip() for s in script.split(";"))), *extra]:
            await conn.execute(statement)


async def migrate_control(conn: AsyncConnection[object]) -> None:
    """Create the control tables (shard_map, shard_moves)."""
    await _apply(conn, CONTROL_SCHEMA + MOVES_SCHEMA)


async def migrate_shard(conn: AsyncConnection[object], table: str) -> None:
    """Create one shard's message table, indexes and fences; `table` is a validated identifier."""
    await _apply(conn, SHARD_SCHEMA.format(table=table), fence_schema(table))
