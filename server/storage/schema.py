"""Idempotent schema migrations for the control database and each shard.

Every statement is `IF NOT EXISTS`, so applying the schema again is a no-op;
an advisory lock serializes concurrent server starts against one database.
"""

from __future__ import annotations

from collections.abc import Sequence

from psycopg import AsyncConnection

from server.storage.events import events_schema
from server.storage.fences import fence_schema
from server.storage.inbox import INBOX_LAYOUT_SCHEMA, inbox_schema
from server.storage.tombstones import TOMBSTONE_SCHEMA

# Arbitrary constant: the advisory lock key that serializes migrations.
_MIGRATION_LOCK = 0x6469616C6F67

# shard_map: the overrides. shard_layout: the number of shards the hash routes over,
# and while a reshard runs the number it moves to; unit_flips: units (bucket, source,
# target) already moved to their shard under target_shards (server.routing.layout);
# server_presence: the live servers and their configured shard counts
# (server.storage.presence).
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
CREATE TABLE IF NOT EXISTS server_presence (
    instance TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    configured_shards INTEGER NOT NULL,
    started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    seen_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS unit_flips (
    bucket SMALLINT NOT NULL CHECK (bucket >= 0 AND bucket < 4096),
    source_shard INTEGER NOT NULL,
    target_shard INTEGER NOT NULL,
    PRIMARY KEY (bucket, source_shard, target_shard)
);
"""

# Earlier versions kept whole moved buckets in bucket_flips; a reshard in progress keeps them.
_FLIPS_UPGRADE = """
DO $upgrade$
BEGIN
    IF to_regclass('bucket_flips') IS NOT NULL THEN
        INSERT INTO unit_flips (bucket, source_shard, target_shard)
        SELECT f.bucket, f.bucket % l.num_shards, f.bucket % l.target_shards
        FROM bucket_flips f, shard_layout l WHERE l.target_shards IS NOT NULL
        ON CONFLICT DO NOTHING;
        DROP TABLE bucket_flips;
    END IF;
END
$upgrade$
"""

# One row per unit (a pair, or a group of buckets with user_low = user_high = 0 and
# `bucket` its first bucket, limited to hash % residue_modulus = target_shard and
# hash % source_modulus = source_shard when those are set) moving between shards; at
# most one unfinished move per unit. See server.storage.moves.
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
ALTER TABLE shard_moves ADD COLUMN IF NOT EXISTS residue_modulus INTEGER;
ALTER TABLE shard_moves ADD COLUMN IF NOT EXISTS source_modulus INTEGER;
ALTER TABLE shard_moves ADD COLUMN IF NOT EXISTS automatic BOOLEAN NOT NULL DEFAULT false;
"""

# Overrides the automatic rebalancer made are marked (it never touches the others, and an
# operator's pin of the same pair clears the mark). rebalance_decisions: what the rebalancer saw,
# did and skipped, and why (server.storage.rebalance_log).
REBALANCE_SCHEMA = """
ALTER TABLE shard_map ADD COLUMN IF NOT EXISTS automatic BOOLEAN NOT NULL DEFAULT false;
CREATE TABLE IF NOT EXISTS rebalance_decisions (
    decision_id BIGSERIAL PRIMARY KEY,
    decided_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    instance TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('round', 'move', 'skip', 'failed')),
    outcome TEXT NOT NULL,
    user_low BIGINT,
    user_high BIGINT,
    source_shard INTEGER,
    target_shard INTEGER,
    load DOUBLE PRECISION,
    rows_moved BIGINT,
    reason TEXT NOT NULL,
    loads JSONB
);
CREATE INDEX IF NOT EXISTS rebalance_decisions_time_idx ON rebalance_decisions (decided_at);
CREATE INDEX IF NOT EXISTS rebalance_decisions_kind_idx ON rebalance_decisions (kind, decision_id);
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

# Recent activity of the shard (server.storage.activity): messages, bytes and reads added up per
# window of time, per bucket (user_low = user_high = 0: the bucket's total) and per heavy pair.
# Every server process adds its counts to the same rows, so the primary key leads with the window:
# a time range is one index range, and pruning deletes from its start.
ACTIVITY_SCHEMA = """
CREATE TABLE IF NOT EXISTS {table}_activity (
    window_start TIMESTAMPTZ NOT NULL,
    bucket SMALLINT NOT NULL CHECK (bucket >= 0 AND bucket < 4096),
    user_low BIGINT NOT NULL,
    user_high BIGINT NOT NULL,
    messages BIGINT NOT NULL DEFAULT 0,
    bytes BIGINT NOT NULL DEFAULT 0,
    reads BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (window_start, bucket, user_low, user_high)
);
"""


# The seed's pair hash in SQL, bit for bit (server.routing.hash), as a numeric in
# 0..2^64-1: a full reshuffle selects the pairs of a bucket that go to one shard by
# `mod(dialog_pair_hash(user_low, user_high), N')`. PostgreSQL has no unsigned 64-bit
# type: products are taken modulo 2^64 in numeric, and the xor-shifts on the same
# bits as a signed bigint (`>>` sign-extends, so the shifted value is masked to 48 bits).
PAIR_HASH_FUNCTION = """
CREATE OR REPLACE FUNCTION dialog_pair_hash(lo bigint, hi bigint) RETURNS numeric
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $fn$
DECLARE
    two64 CONSTANT numeric := 18446744073709551616;
    v numeric;
    x bigint;
BEGIN
    v := mod(mod(lo + two64, two64) * 2654435761 + mod(hi + two64, two64) * 2654435789, two64);
    x := (CASE WHEN v >= 9223372036854775808 THEN v - two64 ELSE v END)::bigint;
    x := x # ((x >> 16) & 281474976710655);
    v := mod(mod(x + two64, two64) * 2654435761, two64);
    x := (CASE WHEN v >= 9223372036854775808 THEN v - two64 ELSE v END)::bigint;
    x := x # ((x >> 16) & 281474976710655);
    RETURN mod(x + two64, two64);
END
$fn$
"""


async def _apply(conn: AsyncConnection[object], script: str, extra: Sequence[str] = ()) -> None:
    """Run the `;`-separated script, then the `extra` statements (which may contain `;`)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        for statement in [*filter(None, (s.strip() for s in script.split(";"))), *extra]:
            await conn.execute(statement)


async def migrate_control(conn: AsyncConnection[object]) -> None:
    """Create the control tables (shard_map, shard_moves)."""
    await _apply(
        conn,
        CONTROL_SCHEMA + MOVES_SCHEMA + REBALANCE_SCHEMA + TOMBSTONE_SCHEMA,
        [_FLIPS_UPGRADE, INBOX_LAYOUT_SCHEMA],
    )


async def migrate_shard(conn: AsyncConnection[object], table: str) -> None:
    """Create one shard's message table, indexes, fences, recent-activity table and message log;
    `table` is a validated identifier."""
    await _apply(
        conn,
        SHARD_SCHEMA.format(table=table) + ACTIVITY_SCHEMA.format(table=table),
        [PAIR_HASH_FUNCTION, *fence_schema(table), *events_schema(table), *inbox_schema(table)],
    )
