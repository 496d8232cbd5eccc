"""Live delivery in one server process: the shards' message logs read once, fanned out to subscribers.

Per shard, one reader (`_Tail`) follows the shard's log (server.storage.events) from a cursor,
woken by a NOTIFY (server.delivery.wakeups), by a send of this process, or by its poll, and hands
each event to the subscribers of its sender and recipient. While nobody subscribes it reads
nothing. A subscriber costs a few small objects and a dict entry: no connection, no task, no
query of its own, until it resumes from a token.

A subscription starts at each reader's cursor `C` at the moment it registers (every event after
it reaches the subscriber live). Resuming from a token's cursor `P`, it first reads its own events
in `(P, C]` from the log, then the live ones it was handed meanwhile (after `C`). Each event it
passes on advances its position in that shard, which is what the next resume token says, so a
subscriber that reconnects with its last token gets what it missed once, wherever it reconnects.

Live events wait in a bounded queue (`stream_buffer`); a subscriber that falls further behind
(its connection does not take them) is cut off with RESOURCE_EXHAUSTED, SUBSCRIBER_TOO_SLOW, and
resumes with its last token.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
from collections import defaultdict, deque
from collections.abc import Callable, Mapping

from server.background import repeat_every, stop_task
from server.config import DeliveryConfig, ShardConfig
from server.delivery.relay import InboxRelay
from server.delivery.wakeups import Notifier, WakeupListener
from server.errors import FailedPrecondition, OutOfRange, ResourceExhausted, ServerStopping, ServiceError
from server.resilience import Shard
from server.storage.events import ORIGIN, Event, EventCursor, EventLog, EventPage
from server.storage.inbox import InboxStore

log = logging.getLogger(__name__)

#: Events one read of a shard's log returns at most (a full page is followed by another at once).
TAIL_PAGE = 512
#: Seconds before a reader looks again when a running transaction held its horizon back (doubling).
_FIRST_RECHECK = 0.002
_LAST_RECHECK = 0.05
#: Events of one subscriber's catch-up read at once.
CATCH_UP_PAGE = 256
#: Events one pruning statement deletes at most.
PRUNE_BATCH = 10_000
#: What a subscriber that was cut off should do.
RESUME_HINT = "subscribe again with the last resume_token received"


class Subscription:
    """One subscriber's stream of events: its catch-up from the log, then the live ones."""

    __slots__ = (
        "_buffer",
        "_catch_up",
        "_failed",
        "_failure",
        "_hub",
        "_live",
        "_pending",
        "_seen",
        "_waiter",
        "positions",
        "started",
        "user_id",
    )

    def __init__(self, hub: DeliveryHub, user_id: int, buffer: int) -> None:
        self._hub = hub
        self.user_id = user_id
        self._buffer = buffer
        #: Per shard, the cursor of what this subscriber has been given (what a token resumes from).
        self.positions: dict[int, EventCursor] = {}
        #: Per registered shard, the cursor up to which events are covered (live ones beyond it).
        self._seen: dict[int, EventCursor] = {}
        #: Log ranges still to read, per shard: (after, up to).
        self._catch_up: deque[tuple[int, EventCursor, EventCursor]] = deque()
        #: Read from the log, not yet passed on: (shard, cursor, event or None for a position only).
        self._pending: deque[tuple[int, EventCursor, Event | None]] = deque()
        self._live: deque[tuple[int, Event]] = deque()
        #: Set while next() waits for an event.
        self._waiter: asyncio.Future[None] | None = None
        self._failure: ServiceError | None = None
        #: Done when the subscription fails, once someone asked (failed()).
        self._failed: asyncio.Future[None] | None = None
        #: Registered on every shard: everything stored from now on reaches it.
        self.started = False

    def start_at(self, shard_id: int, after: EventCursor, now: EventCursor) -> None:
        """Register on a shard whose reader is at `now`, resuming `after` (`now` for a new stream)."""
        self.positions[shard_id] = after
        self._seen[shard_id] = max(after, now)
        if after < now:
            self._catch_up.append((shard_id, after, now))

    def offer(self, shard_id: int, event: Event) -> None:
        """A live event of this subscriber's user (called by the shard's reader, in log order)."""
        seen = self._seen.get(shard_id)
        if seen is None or event.cursor <= seen or self._failure is not None:
            return  # not registered on that shard yet (catch-up covers it), or already had it
        self._seen[shard_id] = event.cursor
        if len(self._live) >= self._buffer:
            self.fail(
                ResourceExhausted(
                    f"the subscriber fell {self._buffer} messages behind; {RESUME_HINT}",
                    retry_after_seconds=0.0,
                    reason="SUBSCRIBER_TOO_SLOW",
                )
            )
            return
        self._live.append((shard_id, event))
        self._wake()

    def fail(self, error: ServiceError) -> None:
        """End the subscription with `error` (raised by the next `next()`)."""
        if self._failure is None:
            self._failure = error
            self._wake()
            if self._failed is not None and not self._failed.done():
                self._failed.set_result(None)

    @property
    def failure(self) -> ServiceError | None:
        return self._failure

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def failed(self) -> asyncio.Future[None]:
        """A future done once the subscription fails (to stop a write its client does not take);
        a plain future, not a task: an idle subscriber costs none."""
        if self._failed is None:
            self._failed = asyncio.get_running_loop().create_future()
            if self._failure is not None:
                self._failed.set_result(None)
        return self._failed

    async def next(self) -> tuple[int, Event]:
        """The next event and its shard; raises the subscription's failure."""
        while True:
            if self._failure is not None:
                raise self._failure
            if self._pending:
                shard_id, cursor, event = self._pending.popleft()
                self.positions[shard_id] = max(self.positions[shard_id], cursor)
                if event is not None:
                    return shard_id, event
                continue
            if self._catch_up:
                rest = await self._read_range(*self._catch_up.popleft())
                if rest is not None:
                    self._catch_up.appendleft(rest)
                continue
            if self._live:
                shard_id, event = self._live.popleft()
                self.positions[shard_id] = event.cursor
                return shard_id, event
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter

    async def prefetch(self) -> None:
        """Read the first page of every range to catch up on: a token older than the retention
        fails here, before the stream starts."""
        ranges = list(self._catch_up)
        self._catch_up.clear()
        for shard_id, after, upto in ranges:
            rest = await self._read_range(shard_id, after, upto)
            if rest is not None:
                self._catch_up.append(rest)

    async def _read_range(
        self, shard_id: int, after: EventCursor, upto: EventCursor
    ) -> tuple[int, EventCursor, EventCursor] | None:
        """Read the first page of a range to catch up on; the rest of the range, if any."""
        page = await self._hub.log(shard_id).read(after, limit=CATCH_UP_PAGE, user_id=self.user_id, upto=upto)
        if page.pruned > after:
            raise OutOfRange(
                "resume_token is older than the messages the server keeps for resuming: read the "
                "dialogs with GetDialog to re-sync, then subscribe without a resume_token",
                reason="RESUME_TOKEN_EXPIRED",
                metadata={"shard_id": str(shard_id)},
            )
        self._pending.extend((shard_id, e.cursor, e) for e in page.events)
        if page.full:
            return shard_id, page.next_cursor, upto
        self._pending.append((shard_id, upto, None))
        return None


class _Tail:
    """Follows one shard's log for this process's subscribers."""

    def __init__(self, hub: DeliveryHub, log: EventLog, poll_interval: float) -> None:
        self._hub = hub
        self.log = log
        self._poll_interval = poll_interval
        #: Everything up to here has been handed out; None while nobody subscribes.
        self.cursor: EventCursor | None = None
        self.lock = asyncio.Lock()
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def position(self) -> EventCursor:
        """The cursor a subscriber registering now starts after (call with `lock` held)."""
        if self.cursor is None:
            self.cursor = await self.log.horizon()
        return self.cursor

    async def _hand_out(self) -> EventPage | None:
        """Read the next page of the log and hand its events to their subscribers (None: no reader
        position, nobody subscribes)."""
        async with self.lock:
            if self.cursor is None:
                return None
            page = await self.log.read(self.cursor, limit=TAIL_PAGE)
            for event in page.events:
                self._hub.fan_out(self.log.shard_id, event)
            self.cursor = page.next_cursor
            return page

    async def run(self) -> None:
        backoff = 0.1
        recheck = _FIRST_RECHECK
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_interval):
                    await self._wake.wait()
            self._wake.clear()
            if not self._hub.has_subscribers():
                self.cursor = None
                continue
            try:
                page = await self._hand_out()
            except Exception as exc:
                # Supervised: a shard that is down, or a table a restore has not brought back yet,
                # must not end the reader for good.
                shard_id = self.log.shard_id
                log.warning("shard %d's message log cannot be read (%s); retrying", shard_id, exc)
                # Outside the lock: subscribers keep registering meanwhile.
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, self._poll_interval)
                self._wake.set()
                continue
            backoff = 0.1
            if page is None:
                continue
            if page.full:
                self._wake.set()
            elif page.held_back:
                # Whatever transaction holds the horizon back, look again soon, less and less often.
                asyncio.get_running_loop().call_later(recheck, self._wake.set)
                recheck = min(recheck * 2, _LAST_RECHECK, self._poll_interval)
            else:
                recheck = _FIRST_RECHECK


class DeliveryHub:
    """This process's live delivery: one reader per shard log, the subscribers by user."""

    def __init__(
        self,
        shards: Mapping[int, tuple[ShardConfig, Shard]],
        config: DeliveryConfig,
        *,
        inboxes: Mapping[int, InboxStore] | None = None,
    ) -> None:
        self._config = config
        self._logs = {sid: EventLog(sid, cfg.table, shard) for sid, (cfg, shard) in shards.items()}
        self._tails = {sid: _Tail(self, log, config.poll_interval) for sid, log in self._logs.items()}
        self._notifiers = {sid: Notifier(log.notify) for sid, log in self._logs.items()}
        #: Keeps the inbox (ListDialogs) current from the same logs, woken with their readers.
        self.relay = (
            None if inboxes is None else InboxRelay(self._logs, inboxes, poll_interval=config.poll_interval)
        )
        by_dsn: dict[str, dict[str, Callable[[], None]]] = defaultdict(dict)
        for sid, (cfg, _) in shards.items():
            by_dsn[cfg.dsn][self._logs[sid].channel] = functools.partial(self._woken, sid)
        self.listeners = [WakeupListener(dsn, wakeups) for dsn, wakeups in by_dsn.items()]
        self._by_user: dict[int, list[Subscription]] = {}
        #: Subscriptions registered or registering (the readers read while there are any).
        self._count = 0
        self._started = 0
        self._tasks: list[asyncio.Task[None]] = []
        #: Stopped: sends still draining wake nobody (their NOTIFY would outlive the pools).
        self._stopped = False

    def log(self, shard_id: int) -> EventLog:
        return self._logs[shard_id]

    def has_subscribers(self) -> bool:
        return self._count > 0

    @property
    def subscribers(self) -> int:
        """Subscriptions started (registered on every shard)."""
        return self._started

    async def start(self) -> None:
        for listener in self.listeners:
            listener.start()
        if self.relay is not None:
            self.relay.start()
        for sid, tail in self._tails.items():
            self._tasks.append(asyncio.create_task(tail.run(), name=f"message-log-tail-{sid}"))
        self._tasks.append(
            repeat_every(
                self._config.prune_interval,
                self.prune,
                name="message-log-prune",
                retry_on=(ServiceError,),
                on_failure=lambda exc: log.warning("pruning the message logs failed: %s", exc),
            )
        )

    async def stop(self) -> None:
        """End every subscription (UNAVAILABLE, resume elsewhere) and stop reading."""
        self._stopped = True
        for subscriptions in self._by_user.values():
            for subscription in subscriptions:
                subscription.fail(
                    ServerStopping(f"this server is shutting down; {RESUME_HINT} (any server will do)")
                )
        for task in self._tasks:
            await stop_task(task)
        if self.relay is not None:
            await self.relay.stop()
        for listener in self.listeners:
            await listener.stop()
        for notifier in self._notifiers.values():
            await notifier.stop()

    def _woken(self, shard_id: int) -> None:
        self._tails[shard_id].wake()
        if self.relay is not None:
            self.relay.wake(shard_id)

    def written(self, shard_id: int) -> None:
        """A message was stored on `shard_id` by this process: wake its readers here and elsewhere."""
        if self._stopped:
            return  # the other servers' readers poll
        self._woken(shard_id)
        self._notifiers[shard_id].notify()

    def fan_out(self, shard_id: int, event: Event) -> None:
        for user_id in (event.from_user_id, event.to_user_id):
            for subscription in self._by_user.get(user_id, ()):
                subscription.offer(shard_id, event)

    async def subscribe(self, user_id: int, resume: Mapping[int, EventCursor] | None) -> Subscription:
        """A new subscription of `user_id`, from now or (with `resume`) from a token's positions.
        Call `unsubscribe` when it ends."""
        if resume is not None:
            unknown = sorted(set(resume) - set(self._tails))
            if unknown:
                raise FailedPrecondition(
                    f"resume_token names shards this server does not have ({unknown}); "
                    "subscribe without a resume_token after re-syncing with GetDialog",
                    reason="RESUME_TOKEN_UNKNOWN_SHARD",
                )
        subscription = Subscription(self, user_id, self._config.stream_buffer)
        self._by_user.setdefault(user_id, []).append(subscription)
        self._count += 1
        try:
            await asyncio.gather(*(self._register(subscription, sid, resume) for sid in self._tails))
            await subscription.prefetch()
        except BaseException:
            self.unsubscribe(subscription)
            raise
        subscription.started = True
        self._started += 1
        return subscription

    async def _register(
        self, subscription: Subscription, shard_id: int, resume: Mapping[int, EventCursor] | None
    ) -> None:
        tail = self._tails[shard_id]
        async with tail.lock:
            now = await tail.position()
            # A shard the token does not know (added since) is read from the start of its log.
            subscription.start_at(shard_id, now if resume is None else resume.get(shard_id, ORIGIN), now)
        tail.wake()

    def unsubscribe(self, subscription: Subscription) -> None:
        subscriptions = self._by_user.get(subscription.user_id)
        if subscriptions is None or subscription not in subscriptions:
            return
        subscriptions.remove(subscription)
        if not subscriptions:
            del self._by_user[subscription.user_id]
        self._count -= 1
        self._started -= subscription.started

    async def prune(self) -> None:
        """Delete the events older than the retention from every shard's log."""
        for event_log in self._logs.values():
            while await event_log.prune(self._config.retention_seconds, limit=PRUNE_BATCH) == PRUNE_BATCH:
                pass
