"""The shard layout in the control database: how many shards the hash routes over.

`shard_layout` holds `num_shards` and, while a reshard runs, `target_shards`;
`unit_flips` lists the units (bucket, source, target) already moved to their shard
under `target_shards` (server.routing.layout). Every change sends a NOTIFY on the
shard map's channel in the same transaction (`layout N T|-`, `flip S T b,b,...`), so
each server's mirror (server.storage.overrides.OverrideSync) applies it exactly when
it commits, in order with override changes.

Every server's config lists every shard, with its DSN (the new ones too, before
a reshard starts); the layout says how many of them the hash uses. The first
server to start on an empty control database records its configured count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from server.routing.layout import Layout
from server.storage.channel import CHANNEL

_BUCKETS_PER_NOTIFY = 1000

__all__ = [
    "Layout",
    "begin_reshard_in",
    "ensure_layout",
    "finish_reshard_in",
    "flip_units_in",
    "load_layout",
]


async def ensure_layout(conn: psycopg.AsyncConnection[Any], configured_shards: int) -> None:
    """Record `configured_shards` as the layout unless one is recorded already."""
    await conn.execute(
        "INSERT INTO shard_layout (num_shards) VALUES (%s) ON CONFLICT (singleton) DO NOTHING",
        (configured_shards,),
    )


async def load_layout(conn: psycopg.AsyncConnection[Any]) -> Layout:
    """The layout as stored (run inside the caller's transaction for a consistent view)."""
    row = await (await conn.execute("SELECT num_shards, target_shards FROM shard_layout")).fetchone()
    if row is None:
        raise LookupError("the control database has no shard layout yet")
    if row[1] is None:
        return Layout(row[0])
    flips = await (await conn.execute("SELECT bucket, source_shard, target_shard FROM unit_flips")).fetchall()
    return Layout(row[0], row[1], frozenset((r[0], r[1], r[2]) for r in flips))


async def begin_reshard_in(conn: psycopg.AsyncConnection[Any], num_shards: int, target_shards: int) -> None:
    await conn.execute(
        "UPDATE shard_layout SET target_shards = %s, updated_at = now() WHERE num_shards = %s",
        (target_shards, num_shards),
    )
    await conn.execute("DELETE FROM unit_flips")
    await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"layout {num_shards} {target_shards}"))


async def flip_units_in(
    conn: psycopg.AsyncConnection[Any], buckets: Sequence[int], source: int, target: int
) -> None:
    """Route the units of `buckets` moving from `source` to `target` to the target from now on."""
    await conn.execute(
        "INSERT INTO unit_flips (bucket, source_shard, target_shard) "
        "SELECT unnest(%s::smallint[]), %s, %s ON CONFLICT DO NOTHING",
        (list(buckets), source, target),
    )
    # A NOTIFY payload must stay under 8,000 bytes: at most 5 bytes per bucket in each.
    for i in range(0, len(buckets), _BUCKETS_PER_NOTIFY):
        payload = f"flip {source} {target} " + ",".join(map(str, buckets[i : i + _BUCKETS_PER_NOTIFY]))
        await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))


async def finish_reshard_in(conn: psycopg.AsyncConnection[Any], target_shards: int) -> None:
    await conn.execute(
        "UPDATE shard_layout SET num_shards = target_shards, target_shards = NULL, updated_at = now() "
        "WHERE target_shards = %s",
        (target_shards,),
    )
    await conn.execute("DELETE FROM unit_flips")
    await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"layout {target_shards} -"))
