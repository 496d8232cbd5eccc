"""Online resharding from N to N' shards by moving hash buckets (server.mover does each move).

A pair's bucket is `hash % 4096`. When N divides N' and N' divides 4096, `bucket % N'`
is the seed's `hash % N'` and refines `bucket % N`: every bucket moves whole, from
shard `b % N` to shard `b % N'`, and only the fraction 1 - N/N' of the buckets moves
at all (each old shard sends to its own new shards). Buckets move in groups of
`buckets_per_step` sharing a source and a target; writes to a group pause only for
its final catch-up. Pairs that overrides place do not move with their bucket.

Progress lives in the control database: `shard_layout.target_shards` says a reshard
runs, `bucket_flips` lists the buckets already moved, `shard_moves` the group in
flight. Running the same reshard again continues where it stopped; when every
bucket has moved, the layout becomes N' and the flips are cleared.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from server.errors import FailedPrecondition
from server.mover import Mover
from server.routing import NUM_BUCKETS, Pair
from server.storage.errors import shard_errors
from server.storage.layout import Layout, begin_reshard_in, finish_reshard_in
from server.storage.moves import Flip
from server.storage.overrides import CONTROL_SHARD
from server.storage.pools import ShardSet


class ReshardRefused(FailedPrecondition):
    """The requested shard count cannot be reached by moving buckets; the message says why."""

    default_reason = "RESHARD_REFUSED"


@dataclass(frozen=True, slots=True)
class Step:
    """One group of buckets moving from one shard to another."""

    source: int
    target: int
    buckets: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Estimate:
    """What a reshard would move between one source and one target shard."""

    source: int
    target: int
    buckets: int
    messages: int
    pairs: int


@dataclass(slots=True)
class Progress:
    """Where a running reshard is."""

    steps_done: int
    steps_total: int
    rows_copied: int = 0
    rows_deleted: int = 0
    started: float = 0.0

    @property
    def rows_per_second(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.rows_copied / elapsed if elapsed > 0 else 0.0


def moving_fraction(num_shards: int, target_shards: int) -> float:
    """Share of pairs whose `hash % n` changes from num_shards to target_shards (hashes uniform)."""
    period = math.lcm(num_shards, target_shards)
    return sum(1 for r in range(period) if r % num_shards != r % target_shards) / period


def check_target(
    num_shards: int, target_shards: int, configured_shards: int, *, full_reshuffle: bool
) -> None:
    """Refuse shard counts that buckets cannot reach, explaining why and what it would cost."""
    if target_shards < num_shards:
        raise ReshardRefused(
            f"cannot shrink from {num_shards} to {target_shards} shards; only growing is supported"
        )
    if target_shards % num_shards != 0 or NUM_BUCKETS % target_shards != 0:
        share = moving_fraction(num_shards, target_shards)
        why = (
            f"{target_shards} is not a multiple of {num_shards}"
            if target_shards % num_shards
            else f"{target_shards} does not divide the {NUM_BUCKETS} hash buckets"
        )
        advice = (
            "--full-reshuffle is not implemented: it would have to move pairs one by one, not by bucket"
            if full_reshuffle
            else "pass --full-reshuffle to accept that"
        )
        raise ReshardRefused(
            f"{why}: growing by buckets needs the new count to be a multiple of the current one and a "
            f"divisor of {NUM_BUCKETS} (a power of two), so that each shard splits its buckets and only "
            f"{1 - num_shards / max(target_shards, 1):.0%} of the data moves. Going from {num_shards} to "
            f"{target_shards} shards is a full reshuffle: about {share:.0%} of all pairs would change shards "
            f"({advice}). A power of two such as {num_shards * 2} or {num_shards * 4} avoids it"
        )
    if target_shards > configured_shards:
        raise ReshardRefused(
            f"the config lists {configured_shards} shards; add [[shards]] entries for shards "
            f"{configured_shards}..{target_shards - 1} to every server's config, restart the servers so they "
            "know where those shards live, then run the reshard again"
        )


def plan_steps(layout: Layout, target_shards: int, buckets_per_step: int) -> list[Step]:
    """The groups of buckets still to move (buckets already flipped are skipped)."""
    by_route: dict[tuple[int, int], list[int]] = defaultdict(list)
    for bucket in range(NUM_BUCKETS):
        source, target = bucket % layout.num_shards, bucket % target_shards
        if source != target and bucket not in layout.flipped:
            by_route[(source, target)].append(bucket)
    steps = []
    for (source, target), buckets in sorted(by_route.items()):
        for i in range(0, len(buckets), buckets_per_step):
            steps.append(Step(source, target, tuple(buckets[i : i + buckets_per_step])))
    return steps


async def estimate(
    shards: ShardSet, layout: Layout, target_shards: int, pinned: Iterable[Pair]
) -> list[Estimate]:
    """Messages and pairs each (source, target) would move, from exact counts per bucket."""
    pinned = list(pinned)
    result = []
    for source in range(layout.num_shards):
        store = shards.store(source)
        async with shard_errors(source), store.pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT bucket, count(*), count(DISTINCT (user_low, user_high)) FROM {store.table} "
                "WHERE (user_low, user_high) NOT IN (SELECT * FROM unnest(%s::bigint[], %s::bigint[])) "
                "GROUP BY bucket",
                ([p.low for p in pinned], [p.high for p in pinned]),
            )
            rows = await cur.fetchall()
        totals: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])
        for bucket, messages, pairs in rows:
            target = bucket % target_shards
            if target != source and bucket not in layout.flipped:
                totals[target][1] += messages
                totals[target][2] += pairs
        for target in sorted(
            {b % target_shards for b in range(source, NUM_BUCKETS, layout.num_shards)} - {source}
        ):
            buckets = sum(
                1
                for b in range(NUM_BUCKETS)
                if b % layout.num_shards == source and b % target_shards == target and b not in layout.flipped
            )
            result.append(Estimate(source, target, buckets, totals[target][1], totals[target][2]))
    return result


class Resharder:
    """Grows the cluster to `target_shards`, one group of buckets at a time; resumable."""

    def __init__(self, mover: Mover, configured_shards: int) -> None:
        self._mover = mover
        self._configured_shards = configured_shards

    async def begin(self, target_shards: int, *, full_reshuffle: bool = False) -> Layout:
        """Record the reshard in the layout (or check it matches the one already running)."""
        async with self._mover.exclusive():
            layout = await self._mover.layout()
            if layout.target_shards is None:
                if layout.num_shards == target_shards:
                    return layout
                check_target(
                    layout.num_shards, target_shards, self._configured_shards, full_reshuffle=full_reshuffle
                )
                async with (
                    shard_errors(CONTROL_SHARD),
                    self._mover.control_connection() as conn,
                    conn.transaction(),
                ):
                    await begin_reshard_in(conn, layout.num_shards, target_shards)
            elif layout.target_shards != target_shards:
                raise ReshardRefused(
                    f"a reshard from {layout.num_shards} to {layout.target_shards} shards is in progress; "
                    f"finish it first (dialogctl reshard --shards {layout.target_shards})"
                )
            layout = await self._mover.layout()
            self._mover.router.set_layout(layout.num_shards, layout.target_shards, layout.flipped)
            return layout

    async def run(
        self,
        target_shards: int,
        *,
        buckets_per_step: int = 64,
        full_reshuffle: bool = False,
        on_progress: Callable[[Progress], None] = lambda p: None,
    ) -> Progress:
        """Move every bucket that changes shard, then make `target_shards` the layout."""
        layout = await self.begin(target_shards, full_reshuffle=full_reshuffle)
        progress = Progress(0, 0, started=time.monotonic())
        if layout.target_shards is None:
            return progress  # already there
        async with self._mover.exclusive():
            for pending in await self._mover.log.all_unfinished(flip=Flip.BUCKET):
                result = await self._mover.run(pending)
                progress.rows_copied += result.copied_rows
                progress.rows_deleted += result.deleted_rows
            layout = await self._mover.layout()
        steps = plan_steps(layout, target_shards, buckets_per_step)
        progress.steps_total = len(steps)
        on_progress(progress)
        for step in steps:
            # One step at a time under the lock, so override moves can run in between.
            async with self._mover.exclusive():
                result = await self._mover.move_buckets(step.buckets, step.source, step.target)
            progress.steps_done += 1
            progress.rows_copied += result.copied_rows
            progress.rows_deleted += result.deleted_rows
            on_progress(progress)
        async with self._mover.exclusive(), self._mover.control_connection() as conn, conn.transaction():
            await finish_reshard_in(conn, target_shards)
        self._mover.router.set_layout(target_shards, None)
        return progress
