"""Which servers are alive, and how many shards each one's config lists (the control database).

Every server process keeps a row in `server_presence` fresh while it runs and drops it
when it stops. A reshard to N' shards reads it first: a server still running with a
config that lists fewer than N' shards could not reach the units moved to the new
shards (it would refuse those dialogs with SHARD_NOT_CONFIGURED), so the reshard is
refused until every live server has been restarted with the new shards' entries.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from server.background import repeat_every, stop_task

log = logging.getLogger(__name__)

#: Seconds between refreshes of a server's row.
REFRESH_SECONDS = 5.0
#: A row refreshed within this many seconds is a live server.
LIVE_SECONDS = 3 * REFRESH_SECONDS


@dataclass(frozen=True, slots=True)
class LiveServer:
    """A server process that refreshed its row recently."""

    host: str
    pid: int
    configured_shards: int
    seen_seconds_ago: float

    def __str__(self) -> str:
        return f"the server process {self.pid} on {self.host} (seen {self.seen_seconds_ago:.0f} s ago)"


async def live_servers(conn: psycopg.AsyncConnection[Any]) -> list[LiveServer]:
    cur = await conn.execute(
        "SELECT host, pid, configured_shards, extract(epoch FROM now() - seen_at)::float8 "
        "FROM server_presence WHERE seen_at > now() - make_interval(secs => %s) ORDER BY host, pid",
        (LIVE_SECONDS,),
    )
    return [LiveServer(r[0], r[1], r[2], r[3]) for r in await cur.fetchall()]


class PresenceBeacon:
    """Keeps this process's row in `server_presence` fresh until `stop()`."""

    def __init__(self, pool: AsyncConnectionPool[Any], configured_shards: int) -> None:
        self._pool = pool
        self._configured_shards = configured_shards
        self._instance = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._refresh()
        self._task = repeat_every(
            REFRESH_SECONDS,
            self._refresh,
            name="presence",
            # The control database is down: try again next time.
            retry_on=(psycopg.Error,),
            on_failure=lambda exc: log.warning("could not refresh this server's presence row: %s", exc),
        )

    async def stop(self) -> None:
        await stop_task(self._task)
        self._task = None
        try:
            async with asyncio.timeout(2.0), self._pool.connection() as conn:
                await conn.execute("DELETE FROM server_presence WHERE instance = %s", (self._instance,))
        except (psycopg.Error, TimeoutError) as exc:  # the row goes stale on its own
            log.warning("could not withdraw this server's presence row: %r", exc)

    async def _refresh(self) -> None:
        async with self._pool.connection() as conn:
            await conn.execute(
                """
                INSERT INTO server_presence (instance, host, pid, configured_shards) VALUES (%s, %s, %s, %s)
                ON CONFLICT (instance) DO UPDATE SET seen_at = now()
                """,
                (self._instance, socket.gethostname(), os.getpid(), self._configured_shards),
            )
            # Rows of servers that died without withdrawing them.
            await conn.execute("DELETE FROM server_presence WHERE seen_at < now() - interval '1 day'")
