"""Recent activity: per-pair and per-bucket counts made in memory on the call path, flushed to the shards.

`ActivityRecorder` is what SendMessage and GetDialog call: a few dictionary operations per call,
no I/O, no lock (one event loop). It keeps, for the current flush period,

- exact totals per (shard, bucket of the layout): messages, bytes of text, reads;
- the heavy pairs per shard in a frequent-items summary (`FrequentPairs`, Misra-Gries) of a fixed
  capacity: a pair written or read more than 1/(capacity + 1) of the period's calls is certainly
  in it, and its counts are low by at most that much. Light pairs may be missing (their calls
  still count in their bucket's total).

`ActivityFlusher` (an async context manager: started with the server, a last flush when it
stops) takes the recorder's counts every `flush_seconds` and adds them, one statement per shard,
to the shard's `<table>_activity` rows of the current window (server.storage.activity), then
prunes windows past the retention. Each server process (each `--workers` worker) flushes its own
counts; the upserts add up. A flush that fails (the shard down, hung or refusing) drops that
shard's counts of the period, counts them in `dropped_events`, and logs once per outage: memory
never grows with an outage, and calls never wait for a flush.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType

import psycopg

from server.background import repeat_every, stop_task
from server.routing import Pair
from server.storage.activity import TOTAL, ActivityRow, add_activity, prune_activity
from server.storage.pools import ShardSet

log = logging.getLogger(__name__)

#: A flush statement that takes longer than this is abandoned (its counts are dropped).
_FLUSH_TIMEOUT = 5.0


class FrequentPairs:
    """The Misra-Gries summary of one flush period: at most `capacity` tracked (shard, pair) keys.

    A tracked key's counts are exact from the moment it was tracked. A call of an untracked key
    when the summary is full lowers every tracked key's weight by one and forgets those that reach
    zero (the call itself is not tracked). Each such round takes back `capacity` units that earlier
    calls added, so the work per call is O(1) amortized; a key's weight is low by at most
    calls / (capacity + 1).
    """

    __slots__ = ("_entries", "capacity", "rounds")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        #: (shard, pair) -> [weight, bucket, messages, bytes, reads]
        self._entries: dict[tuple[int, Pair], list[int]] = {}
        #: Decrement rounds so far (each drops a call's pair-level counts).
        self.rounds = 0

    def add(self, shard_id: int, pair: Pair, bucket: int, messages: int, nbytes: int, reads: int) -> None:
        key = (shard_id, pair)
        entry = self._entries.get(key)
        if entry is not None:
            entry[0] += 1
            entry[2] += messages
            entry[3] += nbytes
            entry[4] += reads
            return
        if len(self._entries) < self.capacity:
            self._entries[key] = [1, bucket, messages, nbytes, reads]
            return
        self.rounds += 1
        for tracked in list(self._entries):
            weight = self._entries[tracked]
            weight[0] -= 1
            if weight[0] == 0:
                del self._entries[tracked]

    def __len__(self) -> int:
        return len(self._entries)

    def rows(self) -> Iterator[tuple[int, ActivityRow]]:
        """(shard, row) of every tracked pair."""
        for (shard_id, pair), (_, bucket, messages, nbytes, reads) in self._entries.items():
            yield shard_id, ActivityRow(bucket, pair, messages, nbytes, reads)


@dataclass(slots=True)
class ActivityPeriod:
    """What the recorder counted since its last `take()`: bucket totals and the heavy pairs."""

    started: float
    pairs: FrequentPairs
    #: (shard, bucket) -> [messages, bytes, reads]
    totals: dict[tuple[int, int], list[int]] = field(default_factory=dict)

    @property
    def events(self) -> int:
        return sum(t[0] + t[2] for t in self.totals.values())

    def by_shard(self) -> dict[int, list[ActivityRow]]:
        """The rows to add to each shard's table: every bucket's total, then the tracked pairs."""
        rows: dict[int, list[ActivityRow]] = {}
        for (shard_id, bucket), (messages, nbytes, reads) in self.totals.items():
            rows.setdefault(shard_id, []).append(ActivityRow(bucket, TOTAL, messages, nbytes, reads))
        for shard_id, row in self.pairs.rows():
            rows.setdefault(shard_id, []).append(row)
        return rows


class ActivityRecorder:
    """Counts calls per pair and bucket in memory (see the module docstring); no I/O."""

    def __init__(self, *, max_pairs: int = 512, clock: Callable[[], float] = time.time) -> None:
        self._max_pairs = max_pairs
        self._clock = clock
        self._period = self._new_period()

    def _new_period(self) -> ActivityPeriod:
        return ActivityPeriod(self._clock(), FrequentPairs(self._max_pairs))

    def sent(self, shard_id: int, pair: Pair, bucket: int, nbytes: int) -> None:
        """A message of `nbytes` bytes of text was stored on `shard_id`."""
        period = self._period
        total = period.totals.get((shard_id, bucket))
        if total is None:
            period.totals[shard_id, bucket] = [1, nbytes, 0]
        else:
            total[0] += 1
            total[1] += nbytes
        period.pairs.add(shard_id, pair, bucket, 1, nbytes, 0)

    def read(self, shard_id: int, pair: Pair, bucket: int) -> None:
        """A page of the pair's dialog was read from `shard_id`."""
        period = self._period
        total = period.totals.get((shard_id, bucket))
        if total is None:
            period.totals[shard_id, bucket] = [0, 0, 1]
        else:
            total[2] += 1
        period.pairs.add(shard_id, pair, bucket, 0, 0, 1)

    def take(self) -> ActivityPeriod:
        """The counts so far; counting goes on in a fresh period."""
        period, self._period = self._period, self._new_period()
        return period


@dataclass(slots=True)
class FlushStats:
    """What the flusher did, for the metrics."""

    flushes: int = 0
    failures: int = 0
    dropped_events: int = 0
    pruned_rows: int = 0


def window_start(moment: float, window_seconds: float) -> datetime:
    """The start of the window of `window_seconds` (aligned to the epoch) that holds `moment`."""
    return datetime.fromtimestamp(moment - moment % window_seconds, UTC)


class ActivityFlusher:
    """Flushes an ActivityRecorder to the shards' activity tables; an async context manager."""

    def __init__(
        self,
        recorder: ActivityRecorder,
        shards: ShardSet,
        *,
        flush_seconds: float = 10.0,
        window_seconds: float = 60.0,
        retention_seconds: float = 3600.0,
    ) -> None:
        self._recorder = recorder
        self._shards = shards
        self._flush_seconds = flush_seconds
        self._window_seconds = window_seconds
        self._retention_seconds = retention_seconds
        self._task: asyncio.Task[None] | None = None
        self._failing: set[int] = set()
        self._last_prune = time.monotonic()
        self.stats = FlushStats()

    async def __aenter__(self) -> ActivityFlusher:
        self._task = repeat_every(
            self._flush_seconds,
            self.flush,
            name="activity-flusher",
            # flush() handles a shard's failure itself; anything else must not end the flushing.
            retry_on=(Exception,),
            on_failure=lambda exc: log.exception("recent-activity flush failed", exc_info=exc),
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await stop_task(self._task)
        self._task = None
        await self.flush()  # the last period's counts, each shard within _FLUSH_TIMEOUT

    async def flush(self) -> None:
        """Add the counts since the last flush to the shards' tables (and prune, now and then)."""
        period = self._recorder.take()
        start = window_start(period.started, self._window_seconds)
        await asyncio.gather(
            *(self._flush_shard(s, start, rows) for s, rows in period.by_shard().items()),
        )
        self.stats.flushes += 1
        if time.monotonic() - self._last_prune >= self._window_seconds:
            self._last_prune = time.monotonic()
            await asyncio.gather(*(self._prune(c.shard_id, c.table) for c in self._shards.configs))

    async def _flush_shard(self, shard_id: int, start: datetime, rows: list[ActivityRow]) -> None:
        events = sum(r.messages + r.reads for r in rows if r.pair == TOTAL)
        try:
            store = self._shards.store(shard_id)
            if not store.shard.primary.available:
                raise store.shard.primary.unavailable()
            async with asyncio.timeout(_FLUSH_TIMEOUT):
                await add_activity(store.pool, store.table, start, rows)
        except Exception as exc:  # a signal, not data: dropped, counted, logged once per outage
            self.stats.failures += 1
            self.stats.dropped_events += events
            if shard_id not in self._failing:
                self._failing.add(shard_id)
                log.warning(
                    "shard %d: recent-activity counts not flushed, dropped until it answers (%s)",
                    shard_id,
                    exc if not isinstance(exc, TimeoutError) else "no answer",
                )
            return
        if shard_id in self._failing:
            self._failing.discard(shard_id)
            log.info("shard %d: recent-activity counts flushed again", shard_id)

    async def _prune(self, shard_id: int, table: str) -> None:
        store = self._shards.store(shard_id)
        if not store.shard.primary.available:
            return
        try:
            async with asyncio.timeout(_FLUSH_TIMEOUT):
                deleted = await prune_activity(store.pool, table, self._retention_seconds)
            # Added after the await: `+= await` would add to a total read before the other shards' prunes.
            self.stats.pruned_rows += deleted
        except (psycopg.Error, OSError, TimeoutError) as exc:
            log.info("shard %d: old recent-activity windows not pruned yet (%s)", shard_id, exc)
