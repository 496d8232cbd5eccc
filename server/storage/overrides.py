"""The shard map (overrides) in the control database, and its in-memory mirror.

Writes go through `OverrideStore`, which changes `shard_map` and sends a
NOTIFY in the same transaction, so the notification is delivered exactly when
the change commits. `OverrideSync` keeps a `ShardRouter` coherent with the
table (and the layout, server.storage.layout) in every server process: it
LISTENs first and loads everything second (so no change falls between the
two), applies each notification, and on any connection trouble reconnects
with backoff and reloads everything.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from server.background import stop_task
from server.resilience.db_errors import shard_errors
from server.routing import Layout, Pair, ShardRouter
from server.routing.layout import units_of_move
from server.storage.channel import CHANNEL
from server.storage.layout import load_layout
from server.storage.pools import DatabaseStartupError, connect_failure_reason
from server.storage.schema import migrate_control

log = logging.getLogger(__name__)

#: application_name of the listener connection, to spot it in pg_stat_activity.
LISTENER_APPLICATION_NAME = "dialog-shard override-sync"
#: Shard id reported for control-database failures (ShardUnavailable metadata).
CONTROL_SHARD = -1


@dataclass(frozen=True, slots=True)
class OverrideRow:
    """One row of shard_map."""

    pair: Pair
    shard_id: int
    created_at: datetime


class OverrideStore:
    """SQL of the shard_map table."""

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self.pool = pool

    async def migrate(self) -> None:
        async with self.pool.connection() as conn:
            await migrate_control(conn)

    async def upsert(self, pair: Pair, shard_id: int) -> OverrideRow:
        async with shard_errors(CONTROL_SHARD), self.pool.connection() as conn, conn.transaction():
            return await upsert_override_in(conn, pair, shard_id)

    async def delete(self, pair: Pair) -> bool:
        """Remove the pair's override; False if it had none."""
        async with shard_errors(CONTROL_SHARD), self.pool.connection() as conn, conn.transaction():
            return await delete_override_in(conn, pair)

    async def all(self) -> dict[Pair, int]:
        """Every override: pair -> shard."""
        async with shard_errors(CONTROL_SHARD), self.pool.connection() as conn:
            cur = await conn.execute("SELECT user1, user2, shard_id FROM shard_map")
            return {Pair(r[0], r[1]): r[2] for r in await cur.fetchall()}

    async def get(self, pair: Pair) -> OverrideRow | None:
        """The pair's override as stored (the authority, unlike a process's mirror)."""
        async with shard_errors(CONTROL_SHARD), self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT shard_id, created_at FROM shard_map WHERE user1 = %s AND user2 = %s",
                (pair.low, pair.high),
            )
            row = await cur.fetchone()
        return OverrideRow(pair, row[0], row[1]) if row else None

    async def page(self, after: Pair | None, limit: int) -> list[OverrideRow]:
        """Overrides ordered by pair, strictly after `after`."""
        low, high = after if after is not None else (-1, -1)
        async with shard_errors(CONTROL_SHARD), self.pool.connection() as conn:
            cur = await conn.execute(
                """
                SELECT user1, user2, shard_id, created_at FROM shard_map
                WHERE (user1, user2) > (%s, %s) ORDER BY user1, user2 LIMIT %s
                """,
                (low, high, limit),
            )
            return [OverrideRow(Pair(r[0], r[1]), r[2], r[3]) for r in await cur.fetchall()]


async def upsert_override_in(conn: psycopg.AsyncConnection[Any], pair: Pair, shard_id: int) -> OverrideRow:
    """Pin the pair inside the caller's transaction; the NOTIFY goes out when it commits."""
    cur = await conn.execute(
        """
        INSERT INTO shard_map (user1, user2, shard_id) VALUES (%s, %s, %s)
        ON CONFLICT (user1, user2) DO UPDATE SET shard_id = EXCLUDED.shard_id, created_at = now()
        RETURNING created_at
        """,
        (pair.low, pair.high, shard_id),
    )
    row = await cur.fetchone()
    await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"set {pair.low} {pair.high} {shard_id}"))
    assert row is not None
    return OverrideRow(pair, shard_id, row[0])


async def delete_override_in(conn: psycopg.AsyncConnection[Any], pair: Pair) -> bool:
    """Drop the pair's override inside the caller's transaction; False if it had none."""
    cur = await conn.execute("DELETE FROM shard_map WHERE user1 = %s AND user2 = %s", (pair.low, pair.high))
    if cur.rowcount == 0:
        return False
    await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"del {pair.low} {pair.high}"))
    return True


def apply_notification(router: ShardRouter, payload: str) -> None:
    """Apply a `set low high shard` / `del low high` / `layout n t|-` / `flip s t b,b` payload."""
    parts = payload.split()
    if len(parts) == 4 and parts[0] == "set":
        router.set(Pair(int(parts[1]), int(parts[2])), int(parts[3]))
    elif len(parts) == 3 and parts[0] == "del":
        router.discard(Pair(int(parts[1]), int(parts[2])))
    elif len(parts) == 3 and parts[0] == "layout":
        router.set_layout(Layout(int(parts[1]), None if parts[2] == "-" else int(parts[2])))
    elif len(parts) == 4 and parts[0] == "flip":
        source, target = int(parts[1]), int(parts[2])
        router.flip_units(units_of_move((int(b) for b in parts[3].split(",")), source, target))
    else:
        log.warning("ignoring malformed shard_map notification %r", payload)


class OverrideSync:
    """Mirrors shard_map into a ShardRouter via LISTEN/NOTIFY, reloading on reconnect."""

    def __init__(
        self,
        dsn: str,
        router: ShardRouter,
        *,
        liveness_interval: float = 5.0,
        max_backoff: float = 10.0,
    ) -> None:
        self._dsn = dsn
        self._router = router
        self._liveness_interval = liveness_interval
        self._max_backoff = max_backoff
        self._task: asyncio.Task[None] | None = None
        #: Full reloads done so far (the first load included).
        self.reloads = 0

    async def start(self) -> None:
        """Load the shard map once (failing fast) and keep following it in the background."""
        try:
            conn = await self._connect_and_load()
        except psycopg.Error as exc:
            raise DatabaseStartupError(f"control database: {connect_failure_reason(exc)}") from None
        self._task = asyncio.create_task(self._follow(conn), name="override-sync")

    async def stop(self) -> None:
        await stop_task(self._task)
        self._task = None

    async def _connect_and_load(self) -> psycopg.AsyncConnection[Any]:
        conn = await psycopg.AsyncConnection.connect(
            self._dsn, autocommit=True, connect_timeout=5, application_name=LISTENER_APPLICATION_NAME
        )
        try:
            await conn.execute(f"LISTEN {CHANNEL}")
            async with conn.transaction():
                # One snapshot for the overrides and the layout.
                await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                cur = await conn.execute("SELECT user1, user2, shard_id FROM shard_map")
                rows = await cur.fetchall()
                layout = await load_layout(conn)
        except BaseException:
            await conn.close()
            raise
        self._router.set_layout(layout)
        self._router.replace_all((Pair(r[0], r[1]), r[2]) for r in rows)
        self.reloads += 1
        log.info("loaded %d shard overrides", len(rows))
        return conn

    async def _follow(self, conn: psycopg.AsyncConnection[Any]) -> None:
        backoff = 0.1
        while True:
            try:
                async with conn:
                    while True:
                        async for notification in conn.notifies(timeout=self._liveness_interval):
                            apply_notification(self._router, notification.payload)
                        # Quiet for a while: make sure the connection is alive, since a
                        # hung server would otherwise leave the mirror silently stale.
                        # asyncio.timeout, not wait_for: before Python 3.12 wait_for can swallow
                        # a cancellation that comes as the query completes, and this loop
                        # would then outlive stop().
                        async with asyncio.timeout(self._liveness_interval):
                            await conn.execute("SELECT 1")
                        backoff = 0.1
            except (psycopg.Error, OSError, TimeoutError) as exc:
                log.warning(
                    "shard map listener lost its connection (%s); reconnecting", connect_failure_reason(exc)
                )
            while True:
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, self._max_backoff)
                try:
                    conn = await self._connect_and_load()
                    break
                except (psycopg.Error, OSError) as exc:
                    log.warning("shard map reload failed (%s); retrying", connect_failure_reason(exc))
