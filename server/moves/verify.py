"""Checking (and repairing) that every message is stored once, on the shard routing names (like Vitess VDiff).

`verify` scans every shard once, grouping rows by pair: count and an order-independent
checksum per (pair, shard). A pair stored anywhere but its routed shard is a
finding; for those pairs the message ids on each shard are compared, so the report
names them:

- `misplaced`: a message only on a wrong shard (readers never see it);
- `duplicate`: a message on a wrong shard that the routed shard also holds, identically;
- `conflict`: the same message id on two shards with different content (never repaired);
- `bad_bucket`: rows whose stored bucket is not the pair's hash bucket (reported only).

Pairs with an unfinished move are skipped (the move owns them; re-run it first).
`repair` first fences every pair it repairs `moved` on each wrong shard (as a finished move
leaves its source, so a server still routing there retries instead of writing a new
stray; a chunk of pairs at a time, each followed by one wait for older inserts), then, pair by
pair, copies misplaced messages to the routed shard and deletes the wrong-shard
copies that the routed shard now holds identically.

`check_fences` reads every shard's fence rows: a `stale_fence` refuses pairs that
routing sends to that shard (server.routing.fencing decides which, and what replaces
them); its repair rewrites the bucket's rows under the bucket's advisory lock
(FenceStore.reconcile). Buckets of unfinished moves are always skipped: their fences
belong to the move.
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from server.resilience.db_errors import shard_errors
from server.routing import Pair, ShardRouter, bucket_of
from server.routing.fencing import FenceRow, plan_bucket
from server.storage import transfer
from server.storage.fences import FenceKey, FenceState, FenceStore, pair_fence_key
from server.storage.messages import MessageStore
from server.storage.pools import ShardSet

#: How many message ids a finding lists (the counts are always complete).
MAX_IDS_PER_FINDING = 20
#: Misplaced pairs fenced per transaction by a repair (each followed by one wait for older inserts).
_RETIRE_CHUNK = 1000


@dataclass(frozen=True, slots=True)
class Finding:
    """Messages of one pair on one shard that are not where they should be."""

    kind: str
    pair: Pair
    shard_id: int
    expected_shard_id: int
    count: int
    message_ids: tuple[uuid.UUID, ...]


@dataclass(frozen=True, slots=True)
class StaleFence:
    """A fence row on a shard that refuses pairs routing sends to that shard."""

    shard_id: int
    row: FenceRow


@dataclass(slots=True)
class Report:
    """What a verification found, and what a repair changed."""

    shards_scanned: int = 0
    pairs: int = 0
    messages: int = 0
    skipped_moving_pairs: int = 0
    findings: list[Finding] = field(default_factory=list)
    copied: int = 0
    deleted: int = 0
    fence_rows: int = 0
    skipped_moving_buckets: int = 0
    stale_fences: list[StaleFence] = field(default_factory=list)
    #: Buckets whose fence rows a repair rewrote.
    fences_repaired: int = 0
    #: Servers whose shard-map mirrors a repair made reload.
    mirrors_reloaded: int = 0

    @property
    def clean(self) -> bool:
        return not self.findings and not self.stale_fences


#: Heap blocks of a shard one summary statement reads (8 KiB each: some 15,000 short messages).
SCAN_CHUNK_BLOCKS = 256


class Pacer:
    """Keeps a scan at or below `rows_per_second` (0: as fast as it goes) by sleeping between chunks."""

    def __init__(self, rows_per_second: float) -> None:
        self._rate = rows_per_second
        self._rows = 0
        self._started = time.monotonic()

    async def account(self, rows: int) -> None:
        """`rows` were just read: wait until the scan is back within its rate."""
        self._rows += rows
        if self._rate > 0:
            ahead = self._rows / self._rate - (time.monotonic() - self._started)
            if ahead > 0:
                await asyncio.sleep(ahead)


async def _pair_summaries(
    store: MessageStore, rows_per_second: float, chunk_blocks: int = SCAN_CHUNK_BLOCKS
) -> list[tuple[int, int, int, int, int]]:
    """(low, high, bucket, count, checksum) of every pair on the shard, at most `rows_per_second`
    (0: unbounded).

    The table is read in physical order, `chunk_blocks` heap blocks per statement (TID range
    scans: sequential reads, no index, no sort), and each chunk's per-pair counts and checksums
    are added up here, since both are sums. Walking the dialog index instead reads the heap in
    random order and cost several times as much on a large shard (docs/operations.md, Operator reads).
    Rows appended after the scan started, beyond the blocks it counted, are not read.
    """
    pacer = Pacer(rows_per_second)
    totals: dict[tuple[int, int, int], list[int]] = {}
    async with shard_errors(store.shard_id), store.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT pg_relation_size(to_regclass(%s)) / current_setting('block_size')::bigint", (store.table,)
        )
        row = await cur.fetchone()
    blocks = int(row[0]) if row and row[0] is not None else 0
    for first in range(0, blocks, chunk_blocks):
        async with shard_errors(store.shard_id), store.pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT user_low, user_high, bucket, count(*), sum({transfer.ROW_FINGERPRINT}) "
                f"FROM {store.table} WHERE ctid >= %s::tid AND ctid < %s::tid "
                "GROUP BY user_low, user_high, bucket",
                (f"({first},0)", f"({first + chunk_blocks},0)"),
            )
            chunk = await cur.fetchall()
        for low, high, bucket, count, checksum in chunk:
            total = totals.setdefault((low, high, bucket), [0, 0])
            total[0] += int(count)
            total[1] += int(checksum)
        await pacer.account(sum(int(r[3]) for r in chunk))
    return [(low, high, bucket, n, checksum) for (low, high, bucket), (n, checksum) in totals.items()]


async def _fingerprints(store: MessageStore, pair: Pair) -> dict[uuid.UUID, int]:
    async with shard_errors(store.shard_id), store.pool.connection() as conn:
        cur = await conn.execute(
            f"SELECT message_id, {transfer.ROW_FINGERPRINT} FROM {store.table} "
            "WHERE user_low = %s AND user_high = %s",
            (pair.low, pair.high),
        )
        return {r[0]: int(r[1]) for r in await cur.fetchall()}


def _finding(kind: str, pair: Pair, shard: int, expected: int, ids: Iterable[uuid.UUID]) -> Finding:
    ordered = sorted(ids)
    return Finding(kind, pair, shard, expected, len(ordered), tuple(ordered[:MAX_IDS_PER_FINDING]))


async def verify(
    shards: ShardSet,
    route: Callable[[Pair], int],
    *,
    moving: Callable[[Pair], bool] = lambda pair: False,
    repair: bool = False,
    report: Report | None = None,
    rows_per_second: float = 0.0,
) -> Report:
    """Scan every shard (each at most `rows_per_second`, 0: unbounded); report (and with `repair`,
    fix) messages stored off their routed shard."""
    report = Report() if report is None else report
    stores = [shards.store(c.shard_id) for c in shards.configs]
    summaries = await asyncio.gather(*(_pair_summaries(s, rows_per_second) for s in stores))
    where: dict[Pair, dict[int, int]] = defaultdict(dict)
    for store, rows in zip(stores, summaries, strict=True):
        report.shards_scanned += 1
        for low, high, bucket, count, _checksum in rows:
            pair = Pair(low, high)
            where[pair][store.shard_id] = where[pair].get(store.shard_id, 0) + count
            report.messages += count
            if bucket != bucket_of(low, high):
                report.findings.append(_finding("bad_bucket", pair, store.shard_id, store.shard_id, ()))
    report.pairs = len(where)
    misplaced: list[tuple[Pair, int, list[int]]] = []
    for pair, per_shard in sorted(where.items()):
        if moving(pair):
            report.skipped_moving_pairs += 1
            continue
        expected = route(pair)
        strays = [s for s in per_shard if s != expected]
        if strays:
            misplaced.append((pair, expected, strays))
    if repair:
        await _retire(shards, misplaced)
    for pair, expected, strays in misplaced:
        await _check_pair(shards, pair, expected, strays, report, repair=repair)
    return report


async def _check_pair(
    shards: ShardSet, pair: Pair, expected: int, strays: list[int], report: Report, *, repair: bool
) -> None:
    home = shards.store(expected)
    at_home = await _fingerprints(home, pair)
    for shard_id in sorted(strays):
        stray = shards.store(shard_id)
        there = await _fingerprints(stray, pair)
        misplaced = [i for i in there if i not in at_home]
        duplicate = [i for i in there if i in at_home and at_home[i] == there[i]]
        conflict = [i for i in there if i in at_home and at_home[i] != there[i]]
        for kind, ids in (("misplaced", misplaced), ("duplicate", duplicate), ("conflict", conflict)):
            if ids:
                report.findings.append(_finding(kind, pair, shard_id, expected, ids))
        if repair and (misplaced or duplicate):
            report.copied += await transfer.copy_ids(stray, home, misplaced) if misplaced else 0
            at_home = await _fingerprints(home, pair)
            settled = [i for i in there if at_home.get(i) == there[i]]
            report.deleted += await _delete_ids(stray, settled)


async def _delete_ids(store: MessageStore, ids: list[uuid.UUID]) -> int:
    if not ids:
        return 0
    async with shard_errors(store.shard_id), store.pool.connection() as conn:
        cur = await conn.execute(f"DELETE FROM {store.table} WHERE message_id = ANY(%s)", (ids,))
    count: int = cur.rowcount
    return count


async def _retire(shards: ShardSet, misplaced: Iterable[tuple[Pair, int, list[int]]]) -> None:
    """Fence the misplaced pairs `moved` on the shards routing does not name, before their rows
    are compared and copied home: inserts that missed the fence are waited out once per chunk of
    pairs, not once per pair."""
    by_shard: dict[int, list[FenceKey]] = defaultdict(list)
    for pair, _expected, strays in misplaced:
        for shard_id in strays:
            by_shard[shard_id].append(pair_fence_key(pair))
    for shard_id, keys in sorted(by_shard.items()):
        store = shards.store(shard_id)
        for start in range(0, len(keys), _RETIRE_CHUNK):
            async with shard_errors(store.shard_id), store.pool.connection() as conn:
                await FenceStore(store.table).set(
                    conn, keys[start : start + _RETIRE_CHUNK], FenceState.MOVED, None
                )


async def check_fences(
    shards: ShardSet,
    router: ShardRouter,
    report: Report,
    *,
    moving_pairs: Iterable[Pair] = (),
    moving_buckets: Iterable[int] = (),
    repair: bool = False,
) -> None:
    """Report (and with `repair`, reconcile) fence rows that refuse pairs routed to their shard.

    `router` holds routing as stored (overrides and layout); buckets of unfinished moves
    (`moving_pairs`' buckets and `moving_buckets`) are skipped.
    """
    busy = set(moving_buckets) | {bucket_of(*p) for p in moving_pairs}
    pinned: dict[int, list[Pair]] = defaultdict(list)
    pinned_to: dict[int, set[int]] = defaultdict(set)
    for pair, shard_id in router.overrides().items():
        pinned[bucket_of(*pair)].append(pair)
        pinned_to[shard_id].add(bucket_of(*pair))

    def route(pair: Pair) -> int:
        return router.resolve(*pair).shard_id

    for config in shards.configs:
        store = shards.store(config.shard_id)
        fences = FenceStore(store.table)
        async with shard_errors(store.shard_id), store.pool.connection() as conn:
            rows = await fences.rows(conn)
        report.fence_rows += len(rows)
        by_bucket: dict[int, list[FenceRow]] = defaultdict(list)
        for row in rows:
            by_bucket[row.bucket].append(row)
        for bucket in sorted(set(by_bucket) | pinned_to[config.shard_id]):
            if bucket in busy:
                report.skipped_moving_buckets += 1
                continue
            plan = functools.partial(
                plan_bucket,
                config.shard_id,
                bucket,
                layout=router.layout,
                route=route,
                pinned=tuple(pinned.get(bucket, ())),
            )
            fix = plan(by_bucket.get(bucket, []))
            if fix is not None and repair:
                async with shard_errors(store.shard_id), store.pool.connection() as conn:
                    fix = await fences.reconcile(conn, bucket, plan)
                report.fences_repaired += fix is not None
            if fix is not None:
                report.stale_fences += [StaleFence(fix.shard_id, row) for row in fix.stale]
