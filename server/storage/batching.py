"""Per-shard write batching: concurrent SendMessage inserts share one statement and one commit.

Under load most of a server's time per message goes to round trips and commits, not to the row.
`BatchingMessageStore` queues the inserts of one shard and sends them together as one multi-row
INSERT in one autocommit statement: those that arrive while a statement runs go with the next
one, and a full queue (`max_batch`) starts another statement at once, up to `max_in_flight`.

When nothing runs, whether an insert waits for company is learnt from the shard's own traffic
(`CompanyForecast`): callers that a batch answers come back, so the next batch can expect as
many inserts as the last ones had.

- While a shard's inserts come alone, an insert goes at once, alone in its caller's task through
  `MessageStore.insert`: no added latency at low load.
- Once batches of several form, the queue waits until it holds as many inserts as the largest of
  the last 8 batches, or until its first insert has waited `max_wait` (4 ms by default).
  One batch in 4 waits out `max_wait` whatever it holds, so that more callers show up in the
  forecast (a batch that leaves once the expected number is there would never show them).
- A wait that brought no company at all sends its insert and goes back to sending at once.
- Two callers of a shard whose inserts never happen to overlap would never form a batch, so
  while a shard's inserts go alone, one in 64 that starts while the server has other inserts in
  progress waits for one companion. A lone caller, with nothing else in progress, never waits.

Waiting costs no CPU, and on a server whose CPU is the bottleneck the CPU saved per message
(one statement, one round trip and one commit for many messages) is what raises throughput: in
the benchmark (32 requests in flight over 4 shards and 2 workers, ~4 per shard and worker) the
batches grew from ~1.5 to ~4-6 messages. `max_wait = 0` never waits: batches then form only from
inserts that arrive while a statement runs.

What a single insert guarantees holds per message:

- Durability: a caller's result is set only after the statement (and so its commit) returned.
- Idempotency: the batch statement is the single-row statement over the batch's rows, with the
  same `ON CONFLICT ... DO NOTHING` on the request index and the same read of the earlier row.
  Two messages of one batch with the same (pair, sender, request_id) are one insert: the later
  ones get the first one's stored row as a replay (the service then answers ALREADY_EXISTS if
  their text or recipient differ, as for any replay).
- The move fence: a batch checks each of its pairs as its single inserts would, once per
  statement (server.storage.fences.write_guard over the batch's rows).
- Per-message errors: if the batch statement fails with a database error (a fenced dialog, a
  bad row), nothing was committed (one statement is atomic), and each message of the batch is
  retried alone through `MessageStore.insert`, so one message gets its own error (DialogMoving
  for a moving dialog) and the others are stored. A connection-level failure is not retried (the
  commit may have happened): every caller of that batch gets UNAVAILABLE, as a single insert
  would, and retries with a request_id are safe.
- A caller that gives up (deadline, cancellation) while its insert waits in the queue takes it
  out: it is not stored. Once its statement was sent, the others still need the statement, so
  it goes on, and the message may be stored after its caller left (as a single insert's may be
  when the cancel comes too late); a retry with the same request_id is safe either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import psycopg
from psycopg import AsyncConnection

from server.errors import DialogMoving
from server.resilience import Shard
from server.resilience.deadline import rpc_deadline
from server.storage.events import log_inserted
from server.storage.fences import write_guard
from server.storage.ids import EPOCH
from server.storage.messages import InsertResult, MessageStore, NewMessage, StoredMessage

#: Default largest number of messages in one statement.
DEFAULT_MAX_BATCH = 64
#: Default most batch statements of one shard running at once (each holds a pool connection).
DEFAULT_MAX_IN_FLIGHT = 2
#: Default longest wait (seconds) of a queued insert for the company the shard's last batch had.
DEFAULT_MAX_WAIT = 0.004


class _Rejected(Exception):
    """The batch statement failed with a database error: nothing of it was committed."""


#: The batch's units, as the fence guard reads them.
_BATCH_UNITS = "(SELECT bucket AS b, user_low AS lo, user_high AS hi FROM batch)"


def batch_insert_sql(table: str) -> str:
    """The multi-row form of `MessageStore.insert_sql`: one result row per message stored or replayed.

    The rows come as one JSON array of objects (`batch_rows`): json.dumps builds it in C, where
    psycopg would dump ten array parameters element by element in Python, and
    `json_to_recordset` parses it into typed columns in C. `created_at` travels as
    microseconds since the epoch, converted exactly (integer microseconds, no float).

    The move fence is the single insert's guard (server.storage.fences.write_guard) over the
    batch's rows, run once for the whole statement: one index probe of the fence table per row.
    A fenced row makes the whole statement fail, and the batch is then retried message by message.

    What is stored is logged to the shard's message log in the same statement, as by the single
    insert (server.storage.events).

    A stored row comes back as its index alone (the caller has its values: what was sent is
    what is stored); a replay comes back with the earlier row's columns.
    """
    return f"""
        WITH batch AS (
            SELECT (e.ord - 1)::int4 AS ord, e.i AS message_id, e.l AS user_low, e.h AS user_high,
                   e.b AS bucket, e.f AS from_user_id, e.t AS to_user_id, e.x AS text,
                   timestamptz '1970-01-01 00:00:00+00' + e.c * interval '1 microsecond'
                       AS created_at,
                   e.r AS request_id
            FROM ROWS FROM (json_to_recordset(%(rows)s::json) AS (i uuid, l int8, h int8, b int2,
                                                                  f int8, t int8, x text, c int8,
                                                                  r text))
                 WITH ORDINALITY AS e(i, l, h, b, f, t, x, c, r, ord)
        ),
        inserted AS (
            INSERT INTO {table} (message_id, user_low, user_high, bucket, from_user_id,
                                 to_user_id, text, created_at, request_id)
            SELECT message_id, user_low, user_high, bucket, from_user_id, to_user_id, text,
                   created_at, request_id
            FROM batch
            WHERE {write_guard(table, _BATCH_UNITS, many=True)}
            ORDER BY ord
            ON CONFLICT (user_low, user_high, from_user_id, request_id)
                WHERE request_id IS NOT NULL DO NOTHING
            RETURNING message_id, user_low, user_high, from_user_id, to_user_id, text, created_at
        ),
        logged AS ({log_inserted(table, "inserted")})
        SELECT b.ord, NULL::uuid, NULL::int8, NULL::int8, NULL::text, NULL::timestamptz, false
        FROM inserted i JOIN batch b ON b.message_id = i.message_id
        UNION ALL
        SELECT b.ord, m.message_id, m.from_user_id, m.to_user_id, m.text, m.created_at, true
        FROM batch b JOIN {table} m
          ON m.user_low = b.user_low AND m.user_high = b.user_high
         AND m.from_user_id = b.from_user_id AND m.request_id = b.request_id
        WHERE b.request_id IS NOT NULL
    """


@dataclass(slots=True)
class BatchStats:
    """Counters of one shard's batching (read by tests and the benchmark)."""

    #: Statements that carried more than one message.
    batches: int = 0
    #: Messages stored or replayed through those statements.
    batched_messages: int = 0
    #: Inserts sent alone (nothing else was waiting).
    single: int = 0
    #: Batches that failed with a database error and were retried message by message.
    split: int = 0
    #: Largest batch so far.
    largest: int = 0


@dataclass(slots=True)
class _Pending:
    message: NewMessage
    #: The caller's RPC deadline (`time.monotonic()`), None without one.
    deadline: float | None = field(default_factory=rpc_deadline.get)
    done: asyncio.Future[InsertResult] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


def _batch_deadline(batch: Sequence[_Pending]) -> float | None:
    """The latest deadline of the batch's callers (None if one has none): no caller's short
    deadline cuts the statement the others still wait for; each caller stops waiting at its own."""
    deadlines = [p.deadline for p in batch]
    if any(d is None for d in deadlines):
        return None
    return max(d for d in deadlines if d is not None)


class CompanyForecast:
    """How many inserts a shard's queue waits for before its batch leaves (pure bookkeeping).

    `expected` is the largest of the last `window` batches (1 until batches of several form).
    Every `probe_every`-th batch is a probe: it waits out the whole wait whatever it holds, so a
    rise in callers shows up. A batch that left after a whole wait with a single insert clears
    the history: nobody else is sending to the shard, and inserts go at once again.

    While inserts go alone, one in `alone_probe_every` of those that start while the server has
    other inserts in progress waits for one companion (`probe_alone`): two callers of a shard
    whose inserts never overlap by chance would otherwise never be batched, though the server
    is busy. A lone caller (nothing else in progress) never waits.
    """

    __slots__ = ("_alone", "_alone_probe_every", "_left", "_probe_every", "_recent", "expected")

    def __init__(self, *, window: int = 8, probe_every: int = 4, alone_probe_every: int = 64) -> None:
        if window < 1 or probe_every < 1 or alone_probe_every < 1:
            raise ValueError("window, probe_every and alone_probe_every must be >= 1")
        self._probe_every = probe_every
        self._alone_probe_every = alone_probe_every
        self._recent: deque[int] = deque(maxlen=window)
        self._left = 0
        self._alone = 0
        self.expected = 1

    def probe_alone(self, *, others_in_progress: bool) -> bool:
        """For an insert that would go alone: whether it should wait for one companion instead."""
        if not others_in_progress:
            return False
        self._alone += 1
        if self._alone % self._alone_probe_every:
            return False
        self.expected = 2
        return True

    def waits_for_more(self, queued: int) -> bool:
        """Whether a queue of `queued` inserts, with nothing running, should wait for more."""
        if self.expected == 1:
            return False
        return queued < self.expected or (self._left + 1) % self._probe_every == 0

    def batch_left(self, size: int, *, waited_out: bool) -> None:
        """Record a batch of `size` inserts that left (`waited_out`: on the timer, short of the forecast)."""
        self._left += 1
        if waited_out and size == 1:
            self._recent.clear()
            self.expected = 1
            return
        self._recent.append(size)
        self.expected = max(self._recent)


class WriteActivity:
    """Inserts in progress in one server process, over all its shards (shared by their stores)."""

    __slots__ = ("in_progress",)

    def __init__(self) -> None:
        self.in_progress = 0


class BatchingMessageStore(MessageStore):
    """A MessageStore whose `insert` coalesces concurrent calls into multi-row statements."""

    def __init__(
        self,
        shard_id: int,
        table: str,
        shard: Shard,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_wait: float = DEFAULT_MAX_WAIT,
        activity: WriteActivity | None = None,
        forecast: CompanyForecast | None = None,
    ) -> None:
        super().__init__(shard_id, table, shard)
        if max_batch < 2 or max_in_flight < 1 or max_wait < 0:
            raise ValueError("max_batch must be >= 2, max_in_flight >= 1 and max_wait >= 0")
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self.max_wait = max_wait
        self.batch_sql = batch_insert_sql(table)
        self.stats = BatchStats()
        self._queue: list[_Pending] = []
        self._running: set[asyncio.Task[None]] = set()
        #: An insert is running alone in its caller's task.
        self._alone = False
        #: How many inserts the queue waits for when nothing runs.
        self.forecast = forecast or CompanyForecast()
        #: The inserts in progress on every shard of this server (whether a lone insert has peers).
        self.activity = activity or WriteActivity()
        #: When the oldest queued insert arrived (the event loop's clock).
        self._queued_since = 0.0
        #: Ends the wait for company (set while the queue waits with nothing running).
        self._wait_timer: asyncio.TimerHandle | None = None
        #: Draining: queued inserts go at once, nothing waits for company any more.
        self._closing = False

    async def insert(self, message: NewMessage) -> InsertResult:
        """Store `message` (alone or with others waiting), or return the earlier replayed row."""
        activity = self.activity
        activity.in_progress += 1
        try:
            return await self._insert(message)
        finally:
            activity.in_progress -= 1

    async def _insert(self, message: NewMessage) -> InsertResult:
        if (
            self.forecast.expected == 1
            and not self._alone
            and not self._running
            and not self._queue
            and not self.forecast.probe_alone(others_in_progress=self.activity.in_progress > 1)
        ):
            # Nothing runs and no company is expected: this insert goes alone at once, in the
            # caller's own task (no batch task, no future to hand the result over); a caller that
            # gives up cancels its own statement, as without batching. Inserts arriving
            # meanwhile queue behind it.
            self._alone = True
            self.stats.single += 1
            try:
                return await super().insert(message)
            finally:
                self._alone = False
                self._maybe_flush()
        pending = _Pending(message)
        if not self._queue:
            self._queued_since = asyncio.get_running_loop().time()
        self._queue.append(pending)
        self._maybe_flush()
        # A caller that gives up cancels only its own future: the batch (queued or running, not a
        # task of this caller) goes on for the others, and settling skips a cancelled future.
        return await pending.done

    async def drain(self) -> None:
        """Send what waits for company now, and wait for every running batch (before the pool closes)."""
        self._closing = True
        self._maybe_flush()
        while self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    def _maybe_flush(self) -> None:
        """Start a batch when none runs and the expected company is there (or waited for long
        enough), or when a full batch waits and another may run."""
        loop = asyncio.get_running_loop()
        while self._queue:
            idle = not (self._running or self._alone)
            short = len(self._queue) < self.max_batch and self.forecast.waits_for_more(len(self._queue))
            if idle and short and not self._closing:
                waited_out = self._queued_since + self.max_wait - loop.time()
                if waited_out > 0:
                    if self._wait_timer is None:
                        self._wait_timer = loop.call_later(waited_out, self._wait_over)
                    return
            elif not idle and not (
                len(self._queue) >= self.max_batch and len(self._running) + self._alone < self.max_in_flight
            ):
                return
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            self.forecast.batch_left(len(batch), waited_out=idle and short)
            self._queued_since = loop.time()
            if self._wait_timer is not None:
                self._wait_timer.cancel()
                self._wait_timer = None
            # A caller that gave up before its statement left is not stored (as a single
            # insert's caller that gives up cancels its statement).
            batch = [pending for pending in batch if not pending.done.cancelled()]
            if not batch:
                continue
            task = loop.create_task(self._flush(batch))
            self._running.add(task)
            task.add_done_callback(self._flushed)

    def _wait_over(self) -> None:
        self._wait_timer = None
        self._maybe_flush()

    def _flushed(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._maybe_flush()

    async def _flush(self, batch: list[_Pending]) -> None:
        # The task runs in a copy of whichever context started it; the batch's own deadline
        # replaces the deadline found there (set here, it stays local to this task).
        rpc_deadline.set(_batch_deadline(batch))
        try:
            if len(batch) == 1:
                self.stats.single += 1
                _settle(batch[0], await super().insert(batch[0].message))
            else:
                await self._flush_many(batch)
        except BaseException as exc:
            for pending in batch:
                _fail(pending, exc)
            if not isinstance(exc, Exception):
                raise

    async def _flush_many(self, batch: list[_Pending]) -> None:
        # One insert per (pair, sender, request_id): later duplicates replay the first one's row.
        leaders: list[_Pending] = []
        followers: dict[int, list[_Pending]] = {}
        first_of: dict[tuple[int, int, int, str], int] = {}
        for pending in batch:
            m = pending.message
            if m.request_id is not None:
                key = (m.pair.low, m.pair.high, m.from_user_id, m.request_id)
                if key in first_of:
                    followers.setdefault(first_of[key], []).append(pending)
                    continue
                first_of[key] = len(leaders)
            leaders.append(pending)
        try:
            results = await self._insert_many([p.message for p in leaders])
        except _Rejected:
            # Nothing was committed: each message alone gets its own result or error (a fenced
            # dialog its DialogMoving, a bad row its own error). Connection failures are not
            # _Rejected: the commit may have happened, so they fail the batch without a retry.
            self.stats.split += 1
            results = list(
                await asyncio.gather(
                    *(super(BatchingMessageStore, self).insert(p.message) for p in leaders),
                    return_exceptions=True,
                )
            )
        self.stats.batches += 1
        self.stats.batched_messages += len(batch)
        self.stats.largest = max(self.stats.largest, len(batch))
        for index, (pending, result) in enumerate(zip(leaders, results, strict=True)):
            if isinstance(result, BaseException):
                _fail(pending, result)
                for follower in followers.get(index, ()):
                    _fail(follower, result)
                continue
            _settle(pending, result)
            for follower in followers.get(index, ()):
                _settle(follower, InsertResult(result.message, replayed=True))

    async def _insert_many(self, messages: Sequence[NewMessage]) -> list[InsertResult | BaseException]:
        params = {"rows": batch_rows(messages)}
        found: dict[int, InsertResult] = {}

        async def op(conn: AsyncConnection[Any]) -> list[tuple[Any, ...]]:
            return await (await conn.execute(self.batch_sql, params, binary=True)).fetchall()

        # Through the shard's gate like every statement (breaker, deadline, retries: a retry is safe,
        # as a message_id already stored fails the statement, which is then split and each message
        # alone finds its row). Connection failures come out as ShardUnavailable; what is left of
        # psycopg's errors, and DialogMoving, rejected the statement as a whole.
        try:
            rows = await self.shard.write(op, idempotent=True)
        except (DialogMoving, psycopg.Error) as exc:
            raise _Rejected from exc
        for row in rows:
            index = row[0]
            if index in found:
                continue
            if row[6]:
                found[index] = InsertResult(StoredMessage(*row[1:6]), replayed=True)
            else:
                found[index] = InsertResult(messages[index].stored(), replayed=False)
        results: list[InsertResult | BaseException] = []
        for index, message in enumerate(messages):
            if index in found:
                results.append(found[index])
                continue
            # Not inserted and no earlier row visible to the statement's snapshot: a concurrent
            # insert with the same request_id committed meanwhile. The single-row path reads it.
            try:
                results.append(await super().insert(message))
            except Exception as exc:
                results.append(exc)
        return results


_MICROSECOND = timedelta(microseconds=1)


def batch_rows(messages: Sequence[NewMessage]) -> str:
    """The `rows` parameter of `batch_insert_sql`: one JSON object per message, in order."""
    return json.dumps(
        [
            {
                "i": str(m.message_id),
                "l": m.pair.low,
                "h": m.pair.high,
                "b": m.bucket,
                "f": m.from_user_id,
                "t": m.to_user_id,
                "x": m.text,
                "c": (m.created_at - EPOCH) // _MICROSECOND,
                "r": m.request_id,
            }
            for m in messages
        ],
        # ASCII with \u escapes: any str gets through the encoding; one PostgreSQL cannot store
        # (a NUL, a lone surrogate) fails the statement, which is then split message by message.
        separators=(",", ":"),
    )


def _settle(pending: _Pending, result: InsertResult) -> None:
    if not pending.done.done():
        pending.done.set_result(result)


def _fail(pending: _Pending, exc: BaseException) -> None:
    if not pending.done.done():
        pending.done.set_exception(exc)
        # A caller that gave up never reads it; don't let asyncio report it as unretrieved.
        with contextlib.suppress(BaseException):
            pending.done.exception()
