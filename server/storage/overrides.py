"""The shard map (overrides) in the control database, and its in-memory mirror.

Writes go through `OverrideStore`, which changes `shard_map` and sends a
NOTIFY in the same transaction, so the notification is delivered exactly when
the change commits. `OverrideSync` keeps a `ShardRouter` coherent with the
table (and the layout, server.storage.layout) in every server process: it
LISTENs first and loads everything second (so no change falls between the
two), and on any trouble reconnects with backoff and reloads everything.

A notification is only a hint of *what* changed, never the new state: any role
that can connect to the control database can send one. For each batch of hints
the listener re-reads the named pairs (or the whole layout) from the tables and
applies what it finds, so a forged NOTIFY costs a query and changes nothing; a
malformed one is logged and ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from server.background import stop_task
from server.errors import CONTROL_SHARD
from server.resilience.db_errors import shard_errors
from server.resilience.gate import Interrupted, within
from server.routing import Pair, ShardRouter
from server.storage.channel import CHANNEL
from server.storage.layout import load_layout
from server.storage.pools import DatabaseStartupError, connect_failure_reason
from server.storage.schema import migrate_control

log = logging.getLogger(__name__)

#: application_name of the listener connection, to spot it in pg_stat_activity.
LISTENER_APPLICATION_NAME = "dialog-shard override-sync"
#: No budget of the listener's own for one round: `_follow_once` bounds its own waits.
_NO_CEILING = 86400.0


@dataclass(frozen=True, slots=True)
class OverrideRow:
    """One row of shard_map."""

    pair: Pair
    shard_id: int
    created_at: datetime
    #: Made by the automatic rebalancer (which moves only its own overrides), not an operator.
    automatic: bool = False


class OverrideStore:
    """SQL of the shard_map table."""

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self.pool = pool

    async def migrate(self) -> None:
        async with self.pool.connection() as conn:
            await migrate_control(conn)

    async def upsert(self, pair: Pair, shard_id: int, *, automatic: bool = False) -> OverrideRow:
        async with shard_errors(CONTROL_SHARD), self.pool.connection() as conn, conn.transaction():
            return await upsert_override_in(conn, pair, shard_id, automatic=automatic)

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
                "SELECT shard_id, created_at, automatic FROM shard_map WHERE user1 = %s AND user2 = %s",
                (pair.low, pair.high),
            )
            row = await cur.fetchone()
        return OverrideRow(pair, row[0], row[1], row[2]) if row else None

    async def of_pairs(self, pairs: list[Pair]) -> dict[Pair, OverrideRow]:
        """The stored overrides of these pairs (pairs without one are left out)."""
        async with shard_errors(CONTROL_SHARD), self.pool.connection() as conn:
            cur = await conn.execute(
                """
                SELECT m.user1, m.user2, m.shard_id, m.created_at, m.automatic
                FROM unnest(%s::bigint[], %s::bigint[]) AS p (low, high)
                JOIN shard_map m ON m.user1 = p.low AND m.user2 = p.high
                """,
                ([p.low for p in pairs], [p.high for p in pairs]),
            )
            rows = await cur.fetchall()
        return {Pair(r[0], r[1]): OverrideRow(Pair(r[0], r[1]), r[2], r[3], r[4]) for r in rows}

    async def page(self, after: Pair | None, limit: int) -> list[OverrideRow]:
        """Overrides ordered by pair, strictly after `after`."""
        low, high = after if after is not None else (-1, -1)
        async with shard_errors(CONTROL_SHARD), self.pool.connection() as conn:
            cur = await conn.execute(
                """
                SELECT user1, user2, shard_id, created_at, automatic FROM shard_map
                WHERE (user1, user2) > (%s, %s) ORDER BY user1, user2 LIMIT %s
                """,
                (low, high, limit),
            )
            return [OverrideRow(Pair(r[0], r[1]), r[2], r[3], r[4]) for r in await cur.fetchall()]


async def upsert_override_in(
    conn: psycopg.AsyncConnection[Any], pair: Pair, shard_id: int, *, automatic: bool = False
) -> OverrideRow:
    """Pin the pair inside the caller's transaction; the NOTIFY goes out when it commits.

    `automatic` marks a pin of the rebalancer; an operator's pin (the default) clears the mark."""
    cur = await conn.execute(
        """
        INSERT INTO shard_map (user1, user2, shard_id, automatic) VALUES (%s, %s, %s, %s)
        ON CONFLICT (user1, user2) DO UPDATE
            SET shard_id = EXCLUDED.shard_id, created_at = now(), automatic = EXCLUDED.automatic
        RETURNING created_at
        """,
        (pair.low, pair.high, shard_id, automatic),
    )
    row = await cur.fetchone()
    await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"set {pair.low} {pair.high} {shard_id}"))
    assert row is not None
    return OverrideRow(pair, shard_id, row[0], automatic)


async def delete_override_in(conn: psycopg.AsyncConnection[Any], pair: Pair) -> bool:
    """Drop the pair's override inside the caller's transaction; False if it had none."""
    cur = await conn.execute("DELETE FROM shard_map WHERE user1 = %s AND user2 = %s", (pair.low, pair.high))
    if cur.rowcount == 0:
        return False
    await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"del {pair.low} {pair.high}"))
    return True


_USER_ID_RE = re.compile(r"-?[0-9]{1,19}")
_BUCKET_LIST_RE = re.compile(r"[0-9]{1,4}(,[0-9]{1,4})*")


async def reload_mirrors_in(conn: psycopg.AsyncConnection[Any]) -> int:
    """End the servers' listener connections to this control database; each reconnects and reloads
    the whole shard map and layout (a change made without a NOTIFY). Returns how many were ended."""
    cur = await conn.execute(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE application_name = %s AND datname = current_database()",
        (LISTENER_APPLICATION_NAME,),
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0


@dataclass(slots=True)
class RoutingHints:
    """What a batch of notifications says has changed: pairs of shard_map, and/or the layout."""

    pairs: set[Pair] = field(default_factory=set)
    layout: bool = False

    def __bool__(self) -> bool:
        return self.layout or bool(self.pairs)

    def add(self, payload: str) -> bool:
        """Note what `payload` names as changed; False (and nothing noted) if it is malformed.

        Payloads: `set low high shard` / `del low high` (a pair of shard_map), `layout n t|-` and
        `flip s t b,b,...` (the layout). Only their shape is checked: the values are re-read.
        """
        parts = payload.split(" ")
        if parts[0] in ("set", "del") and len(parts) == (4 if parts[0] == "set" else 3):
            if not all(_USER_ID_RE.fullmatch(p) for p in parts[1:]):
                return False
            low, high = int(parts[1]), int(parts[2])
            if not 0 <= low <= high < 2**63:
                return False
            self.pairs.add(Pair(low, high))
            return True
        if (parts[0] == "layout" and len(parts) == 3) or (
            parts[0] == "flip" and len(parts) == 4 and _BUCKET_LIST_RE.fullmatch(parts[3])
        ):
            self.layout = True
            return True
        return False


async def refresh_from_tables(
    conn: psycopg.AsyncConnection[Any], router: ShardRouter, hints: RoutingHints
) -> None:
    """Apply the stored state of what `hints` names (one consistent snapshot) to `router`."""
    async with conn.transaction():
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        layout = await load_layout(conn) if hints.layout else None
        stored: list[tuple[int, int, int | None]] = []
        if hints.pairs:
            pairs = sorted(hints.pairs)
            cur = await conn.execute(
                """
                SELECT p.low, p.high, m.shard_id
                FROM unnest(%s::bigint[], %s::bigint[]) AS p (low, high)
                LEFT JOIN shard_map m ON m.user1 = p.low AND m.user2 = p.high
                """,
                ([p.low for p in pairs], [p.high for p in pairs]),
            )
            stored = await cur.fetchall()
    if layout is not None:
        router.set_layout(layout)
    for low, high, shard_id in stored:
        if shard_id is None:
            router.discard(Pair(low, high))
        else:
            router.set(Pair(low, high), shard_id)


class OverrideSync:
    """Mirrors shard_map into a ShardRouter via LISTEN/NOTIFY, reloading on reconnect.

    The control database's monitor (server.placement) tells it about outages it cannot see on its
    own connection: `lost()` when the database is declared down or hung (a hung server leaves the
    connection open and silent: it is dropped, and the mirror is reloaded from a new one), and
    `wake()` when it answers again (the reconnection is tried at once, not after its backoff).
    """

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
        # Completed by lost(): ends the following of the current connection.
        self._lost: asyncio.Future[None] | None = None
        self._retry_now = asyncio.Event()
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

    def lost(self) -> None:
        """The control database is down or hung: drop the connection, reload from a new one."""
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    def wake(self) -> None:
        """The control database answers again: reconnect (and reload) now if not connected."""
        self._retry_now.set()

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
        """Follow the hints on `conn`; after any failure, reconnect and reload everything."""
        backoff = 0.1
        while True:
            lost = self._lost = asyncio.get_running_loop().create_future()
            try:
                while True:
                    # In a task of its own, so that lost() ends it at once even on a hung server
                    # (its cancellation then finishes in the background).
                    await within(_NO_CEILING, self._follow_once(conn), interrupt=lost)
                    backoff = 0.1
            except Interrupted:
                log.warning("shard map listener: the control database is unavailable; reconnecting")
            except (psycopg.Error, OSError, TimeoutError) as exc:
                log.warning(
                    "shard map listener lost its connection (%s); reconnecting", connect_failure_reason(exc)
                )
            except Exception:
                # Supervised: whatever went wrong, a reload from the tables is the way back.
                log.exception("shard map listener failed; reconnecting and reloading")
            finally:
                self._lost = None
                await conn.close()  # never waits for the server
            self._retry_now.clear()
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(backoff * (0.5 + random.random())):
                        await self._retry_now.wait()
                if self._retry_now.is_set():
                    self._retry_now.clear()
                    backoff = 0.1
                else:
                    backoff = min(backoff * 2, self._max_backoff)
                try:
                    conn = await self._connect_and_load()
                    break
                except (psycopg.Error, OSError) as exc:
                    log.warning("shard map reload failed (%s); retrying", connect_failure_reason(exc))
                except Exception:
                    log.exception("shard map reload failed; retrying")

    async def _follow_once(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Wait for the next hints and apply what the tables say; with none, check the connection."""
        hints = RoutingHints()
        # stop_after: hand the first packet's hints over at once; later ones queue in the connection.
        async for notification in conn.notifies(timeout=self._liveness_interval, stop_after=1):
            if not hints.add(notification.payload):
                log.warning("ignoring malformed shard_map notification %r", notification.payload[:200])
        # asyncio.timeout, not wait_for: before Python 3.12 wait_for can swallow a cancellation
        # that comes as the query completes, and this loop would then outlive stop().
        async with asyncio.timeout(self._liveness_interval):
            if hints:
                await refresh_from_tables(conn, self._router, hints)
            else:
                # Quiet for a while: make sure the connection is alive, since a hung
                # server would otherwise leave the mirror silently stale.
                await conn.execute("SELECT 1")
