"""Wake-ups of the message-log readers: LISTEN on each shard database, NOTIFY after a send.

A wake-up carries nothing: it only says "read the log now", and the log (server.storage.events)
says what to deliver. So a lost wake-up costs latency (the readers also poll), never a message.
The NOTIFY is sent after the insert has committed, by the server that stored the message, on a
connection of its own pool, at most one at a time per shard (sends that come meanwhile are
folded into one more): it is not part of the insert's transaction, whose commit it would
otherwise serialize with every other notifying commit of the database.

One listening connection per database (not per subscriber, nor per shard when shards share a
database) serves every subscriber of the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Mapping
from typing import Any

import psycopg

from server.background import stop_task
from server.storage.pools import connect_failure_reason

log = logging.getLogger(__name__)

#: What the listening connections call themselves in pg_stat_activity.
LISTENER_APPLICATION_NAME = "dialog-shard message-log listener"


class WakeupListener:
    """Listens on one database for the channels of its shards' logs and calls their wake-ups."""

    def __init__(
        self,
        dsn: str,
        wakeups: Mapping[str, Callable[[], None]],
        *,
        liveness_interval: float = 5.0,
        max_backoff: float = 5.0,
    ) -> None:
        self._dsn = dsn
        self._wakeups = dict(wakeups)
        self._liveness_interval = liveness_interval
        self._max_backoff = max_backoff
        self._task: asyncio.Task[None] | None = None
        #: Connections made so far (the first included): tests and metrics read it.
        self.connects = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="message-log-listener")

    async def stop(self) -> None:
        await stop_task(self._task)
        self._task = None

    def _wake_all(self) -> None:
        for wake in self._wakeups.values():
            wake()

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self._dsn, autocommit=True, connect_timeout=5, application_name=LISTENER_APPLICATION_NAME
                )
            except (psycopg.Error, OSError) as exc:
                log.warning("message-log listener cannot connect (%s); retrying", connect_failure_reason(exc))
            else:
                try:
                    for channel in self._wakeups:
                        await conn.execute(f'LISTEN "{channel}"')
                    self.connects += 1
                    # What was sent while nobody listened is in the logs: read them now.
                    self._wake_all()
                    backoff = 0.1
                    await self._follow(conn)
                except (psycopg.Error, OSError, TimeoutError) as exc:
                    reason = connect_failure_reason(exc)
                    log.warning("message-log listener lost its connection (%s); reconnecting", reason)
                except Exception:
                    # Supervised: the readers poll meanwhile, and a new connection starts afresh.
                    log.exception("message-log listener failed; reconnecting")
                finally:
                    await conn.close()
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, self._max_backoff)

    async def _follow(self, conn: psycopg.AsyncConnection[Any]) -> None:
        while True:
            async for notification in conn.notifies(timeout=self._liveness_interval):
                wake = self._wakeups.get(notification.channel)
                if wake is not None:
                    wake()
            # Quiet for a while: make sure the connection is alive (a hung server would
            # otherwise leave the readers on their polls alone without anyone noticing).
            async with asyncio.timeout(self._liveness_interval):
                await conn.execute("SELECT 1")


class Notifier:
    """Sends one shard's wake-up NOTIFY, one at a time, folding the ones asked for meanwhile."""

    def __init__(self, send: Callable[[], Any]) -> None:
        self._send = send
        self._task: asyncio.Task[None] | None = None
        self._again = False

    def notify(self) -> None:
        if self._task is not None:
            self._again = True
            return
        self._task = asyncio.create_task(self._run(), name="message-log-notify")

    async def _run(self) -> None:
        try:
            while True:
                self._again = False
                try:
                    await self._send()
                except Exception as exc:
                    # Only latency is lost: the other servers' readers poll.
                    log.debug("message-log wake-up not sent: %s", exc)
                    return
                if not self._again:
                    return
        finally:
            self._task = None

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await stop_task(self._task)
