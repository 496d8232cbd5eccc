"""The inbox relay: applies every shard's message log to the inbox shards (server.storage.inbox).

Every server process relays, woken as the log readers are (a send here, a NOTIFY, the poll):
per source shard and inbox shard, one transaction at a time takes the source's relay lock,
reads the next events and adds them up, so the work is shared and each event counts once. The
relay's lag (`lag_seconds`: how old the newest event was when it was applied) is what ListDialogs
can be behind the messages; with the shards reachable it is bounded by the wake-up latency, or
by `[delivery] poll_interval` when a wake-up is lost.

It reads the logs' deletion events too (DeleteMessage): a deleted last message is replaced by the
dialog's newest surviving one, which `newest_message` reads (set by the server to GetDialog's
newest-first read of one message, hot or archived).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Mapping
from datetime import UTC, datetime

from server.routing.inbox import inbox_shard
from server.storage.events import EventCursor, EventLog, EventPage
from server.storage.inbox import InboxStore, NewestMessage

log = logging.getLogger(__name__)

#: Events of one relay round (one transaction on an inbox shard).
RELAY_PAGE = 1000


class InboxRelay:
    """Relays the message logs to the inbox in this process, one task per source shard."""

    def __init__(
        self, logs: Mapping[int, EventLog], inboxes: Mapping[int, InboxStore], *, poll_interval: float
    ) -> None:
        self._logs = dict(logs)
        self._inboxes = dict(inboxes)
        self._poll_interval = poll_interval
        self._wakes = {source: asyncio.Event() for source in self._logs}
        self._tasks: list[asyncio.Task[None]] = []
        #: How old the newest event applied last was, in seconds (0 when caught up).
        self.lag_seconds = 0.0
        #: Events applied by this process.
        self.applied = 0
        #: Sources whose log was pruned past a cursor: the inbox misses events until rebuilt.
        self.lost: set[int] = set()
        #: Reads a dialog's newest surviving message when its last one was deleted.
        self.newest_message: NewestMessage | None = None

    def wake(self, source: int) -> None:
        self._wakes[source].set()

    def start(self) -> None:
        for source in self._logs:
            self._tasks.append(asyncio.create_task(self._run(source), name=f"inbox-relay-{source}"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def _run(self, source: int) -> None:
        wake = self._wakes[source]
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_interval):
                    await wake.wait()
            wake.clear()
            try:
                if await self.relay_source(source):
                    wake.set()
            except Exception as exc:
                # Supervised like the log readers: the next wake-up or poll tries again.
                log.warning("relaying shard %d's messages to the inbox failed (%s); retrying", source, exc)

    async def relay_source(self, source: int) -> bool:
        """One round of `source`'s log to every inbox shard; whether more events wait."""
        event_log = self._logs[source]
        count = len(self._inboxes)

        async def read(cursor: EventCursor) -> EventPage:
            return await event_log.read(cursor, limit=RELAY_PAGE, with_deletions=True)

        more = False
        for inbox_id, inbox in self._inboxes.items():
            done = await inbox.relay(
                source, read, functools.partial(_owns, inbox_id, count), self.newest_message
            )
            if done is None:
                continue  # another process relays this pair now
            self.applied += done.events
            more = more or done.full
            if done.lost and source not in self.lost:
                self.lost.add(source)
                log.error(
                    "shard %d's message log was pruned before the inbox relay read it: run "
                    "`dialogctl rebuild-inbox`",
                    source,
                )
            if done.newest is not None:
                self.lag_seconds = (datetime.now(UTC) - done.newest).total_seconds()
            elif not done.full:
                self.lag_seconds = 0.0
        return more

    async def erase_user(self, user_id: int) -> int:
        """Delete the erased user's inbox and the peers' rows of the user (after the user's
        events left the logs); the rows deleted."""
        erased = 0
        for inbox in self._inboxes.values():
            erased += await inbox.erase_user(user_id, self._logs)
        return erased

    async def catch_up(self) -> None:
        """Relay until no source has events waiting (tests and tools)."""
        for source in self._logs:
            while await self.relay_source(source):
                pass


def _owns(inbox_id: int, inbox_shards: int, user_id: int) -> bool:
    return inbox_shard(user_id, inbox_shards) == inbox_id
