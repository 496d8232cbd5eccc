"""The shard layout in the control database: how many shards the hash routes over.

`shard_layout` holds `num_shards` and, while a reshard runs, `target_shards`;
`bucket_flips` lists the buckets already moved to their shard under
`target_shards`. Every change sends a NOTIFY on the shard map's channel in the
same transaction (`layout N T|-`, `flip b,b,...`), so each server's mirror
(server.storage.overrides.OverrideSync) applies it exactly when it commits, in
order with override changes.

Every server's config lists every shard, with its DSN (the new ones too, before
a reshard starts); the layout says how many of them the hash uses. The first
server to start on an empty control database records its configured count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from server.routing import NUM_BUCKETS
from server.storage.channel import CHANNEL


@dataclass(frozen=True, slots=True)
class Layout:
    """The routing layout: the shard count, the one a running reshard moves to, and the moved buckets."""

    num_shards: int
    target_shards: int | None
    flipped: frozenset[int]

    def hash_shard(self, hashed: int) -> int:
        """The shard of a pair hash without override (see server.routing.router)."""
        if self.target_shards is not None and hashed % NUM_BUCKETS in self.flipped:
            return hashed % self.target_shards
        return hashed % self.num_shards

    @property
    def active_shards(self) -> int:
        """Shards that may hold messages right now."""
        return max(self.num_shards, self.target_shards or 0)


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
    flips = await (await conn.execute("SELECT bucket FROM bucket_flips")).fetchall()
    return Layout(row[0], row[1], frozenset(r[0] for r in flips) if row[1] is not None else frozenset())


async def begin_reshard_in(conn: psycopg.AsyncConnection[Any], num_shards: int, target_shards: int) -> None:
    await conn.execute(
        "UPDATE shard_layout SET target_shards = %s, updated_at = now() WHERE num_shards = %s",
        (target_shards, num_shards),
    )
    await conn.execute("DELETE FROM bucket_flips")
    await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"layout {num_shards} {target_shards}"))


async def flip_buckets_in(conn: psycopg.AsyncConnection[Any], buckets: Sequence[int]) -> None:
    await conn.execute(
        "INSERT INTO bucket_flips (bucket) SELECT unnest(%s::smallint[]) ON CONFLICT DO NOTHING",
        (list(buckets),),
    )
    await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, "flip " + ",".join(map(str, buckets))))


async def finish_reshard_in(conn: psycopg.AsyncConnection[Any], target_shards: int) -> None:
    await conn.execute(
        "UPDATE shard_layout SET num_shards = target_shards, target_shards = NULL, updated_at = now() "
        "WHERE target_shards = %s",
        (target_shards,),
    )
    await conn.execute("DELETE FROM bucket_flips")
    await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"layout {target_shards} -"))
