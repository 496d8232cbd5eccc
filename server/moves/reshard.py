"""Online resharding from N to N' shards by moving units (server.moves.mover does each move).

A unit is the pairs of one hash bucket going from one source shard to one target
shard (server.routing.layout). Only pairs whose `hash % n` changes move. When N'
is a multiple of N and divides 4096, a unit is a whole bucket of its source, and
each old shard only sends to its own new shards. Any other N' (4 -> 6, shrinking
8 -> 4 ...) is a *full reshuffle*: every old shard may send to every new one, a
bucket's pairs on a source split by `hash % N'`, and most pairs move (about 67% for
4 -> 6); it needs `full_reshuffle=True`. Units move in groups of `buckets_per_step`
buckets sharing a source and a target; writes to a group pause only for its final
catch-up. Pairs that overrides place do not move with their bucket.

Progress lives in the control database: `shard_layout.target_shards` says a reshard
runs, `unit_flips` lists the units already moved, `shard_moves` the group in
flight. Running the same reshard again continues where it stopped; when every
unit has moved, the layout becomes N' and the flips are cleared.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from server.errors import CONTROL_SHARD, FailedPrecondition
from server.moves.mover import Mover
from server.resilience.db_errors import shard_errors
from server.routing import NUM_BUCKETS, Pair, pair_hash
from server.routing.layout import (
    Layout,
    moving_fraction,
    moving_units,
    residue_modulus,
    unit_of,
    unit_period,
)
from server.storage.layout import begin_reshard_in, finish_reshard_in
from server.storage.moves import Flip
from server.storage.pools import ShardSet
from server.storage.presence import LiveServer, live_servers

__all__ = [
    "Estimate",
    "Progress",
    "ReshardRefused",
    "Resharder",
    "Step",
    "check_servers",
    "check_target",
    "estimate",
    "moving_fraction",
    "plan_steps",
]


class ReshardRefused(FailedPrecondition):
    """The requested shard count needs a consent or a config change first; the message says which."""

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


def check_target(
    num_shards: int, target_shards: int, configured_shards: int, *, full_reshuffle: bool
) -> None:
    """Refuse shard counts that need a consent or a config change, explaining why and what it costs."""
    if target_shards > configured_shards:
        raise ReshardRefused(
            f"the config lists {configured_shards} shards; add [[shards]] entries for shards "
            f"{configured_shards}..{target_shards - 1} to every server's config, restart the servers so they "
            "know where those shards live, then run the reshard again"
        )
    if target_shards % num_shards != 0 and not full_reshuffle:
        share = moving_fraction(num_shards, target_shards)
        if target_shards < num_shards:
            raise ReshardRefused(
                f"shrinking from {num_shards} to {target_shards} shards moves about {share:.0%} of all pairs "
                f"onto the remaining shards; pass --full-reshuffle to accept that"
            )
        double, quadruple = num_shards * 2, num_shards * 4
        raise ReshardRefused(
            f"{target_shards} is not a multiple of {num_shards}, so growing to it is a full reshuffle: "
            f"every old shard hands pairs to every new one and about {share:.0%} of all pairs change shards. "
            f"Growing to a multiple such as {double} or {quadruple} moves "
            f"{moving_fraction(num_shards, double):.0%} or {moving_fraction(num_shards, quadruple):.0%}, "
            "each old shard handing pairs only to its own new shards. Pass --full-reshuffle to accept that"
        )
    try:
        unit_period(num_shards, target_shards)
    except ValueError as exc:
        raise ReshardRefused(str(exc)) from None


def check_servers(live: Iterable[LiveServer], target_shards: int) -> None:
    """Refuse while a live server's config lists fewer shards than the reshard routes to."""
    behind = [s for s in live if s.configured_shards < target_shards]
    if behind:
        names = "; ".join(f"{s} lists {s.configured_shards}" for s in behind)
        raise ReshardRefused(
            f"{len(behind)} running server process(es) cannot reach all {target_shards} shards ({names}): "
            f"give every server's config the [[shards]] entries of shards 0..{target_shards - 1} and restart "
            "it, then run the reshard again (otherwise those servers would refuse the dialogs moved to "
            "the new shards)"
        )


def plan_steps(layout: Layout, target_shards: int, buckets_per_step: int) -> list[Step]:
    """The groups of units still to move (units already flipped are skipped)."""
    by_route: dict[tuple[int, int], list[int]] = defaultdict(list)
    for bucket, source, target in moving_units(layout.num_shards, target_shards):
        if (bucket, source, target) not in layout.flipped:
            by_route[(source, target)].append(bucket)
    steps = []
    for (source, target), buckets in sorted(by_route.items()):
        for i in range(0, len(buckets), buckets_per_step):
            steps.append(Step(source, target, tuple(buckets[i : i + buckets_per_step])))
    return steps


async def estimate(
    shards: ShardSet, layout: Layout, target_shards: int, pinned: Iterable[Pair]
) -> list[Estimate]:
    """Messages and pairs each (source, target) would move, from exact counts per pair."""
    pinned = list(pinned)
    steps = plan_steps(layout, target_shards, NUM_BUCKETS)
    buckets = Counter({(s.source, s.target): len(s.buckets) for s in steps})
    messages: Counter[tuple[int, int]] = Counter()
    pairs: Counter[tuple[int, int]] = Counter()
    for source in range(layout.num_shards):
        store = shards.store(source)
        async with shard_errors(source), store.pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT user_low, user_high, count(*) FROM {store.table} "
                "WHERE (user_low, user_high) NOT IN (SELECT * FROM unnest(%s::bigint[], %s::bigint[])) "
                "GROUP BY user_low, user_high",
                ([p.low for p in pinned], [p.high for p in pinned]),
            )
            rows = await cur.fetchall()
        for low, high, count in rows:
            unit = unit_of(pair_hash(low, high), layout.num_shards, target_shards)
            if unit[1] == source and unit[2] != source and unit not in layout.flipped:
                messages[(source, unit[2])] += count
                pairs[(source, unit[2])] += 1
    return [Estimate(s, t, n, messages[(s, t)], pairs[(s, t)]) for (s, t), n in sorted(buckets.items())]


class Resharder:
    """Moves the cluster to `target_shards` shards, one group of units at a time; resumable."""

    def __init__(self, mover: Mover, configured_shards: int) -> None:
        self._mover = mover
        self._configured_shards = configured_shards

    async def begin(self, target_shards: int, *, full_reshuffle: bool = False) -> Layout:
        """Record the reshard in the layout (or check it matches the one already running)."""
        async with self._mover.exclusive():
            layout = await self._mover.layout()
            if layout.num_shards != target_shards or layout.target_shards is not None:
                async with shard_errors(CONTROL_SHARD), self._mover.control_connection() as conn:
                    check_servers(await live_servers(conn), layout.target_shards or target_shards)
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
            self._mover.router.set_layout(layout)
            return layout

    async def run(
        self,
        target_shards: int,
        *,
        buckets_per_step: int = 64,
        full_reshuffle: bool = False,
        on_progress: Callable[[Progress], None] = lambda p: None,
    ) -> Progress:
        """Move every unit that changes shard, then make `target_shards` the layout."""
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
                result = await self._mover.move_buckets(
                    step.buckets,
                    step.source,
                    step.target,
                    residue_modulus=residue_modulus(target_shards),
                    source_modulus=residue_modulus(layout.num_shards),
                )
            progress.steps_done += 1
            progress.rows_copied += result.copied_rows
            progress.rows_deleted += result.deleted_rows
            on_progress(progress)
        async with self._mover.exclusive(), self._mover.control_connection() as conn, conn.transaction():
            await finish_reshard_in(conn, target_shards)
        self._mover.router.set_layout(Layout(target_shards))
        return progress
