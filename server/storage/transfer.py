"""Copying, comparing and deleting one unit's messages between two shards.

A unit is one pair, or a group of hash buckets (in a full reshuffle, the part of
them going to one shard) minus the pairs that overrides place (they do not move
with their bucket). Every step is idempotent: the copy is
`INSERT ... ON CONFLICT (message_id) DO NOTHING` in keyset chunks, the sync
compares ids chunk by chunk and copies what is missing, the delete removes
chunks until none is left. Nothing here holds a transaction across shards.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from server.errors import FailedPrecondition
from server.resilience.db_errors import shard_errors
from server.routing import NUM_BUCKETS, Pair, bucket_of, pair_hash
from server.storage.fences import WHOLE_BUCKET, FenceKey
from server.storage.ids import MAX_ID, MIN_ID
from server.storage.messages import MessageStore

ROW_COLUMNS = (
    "message_id, user_low, user_high, bucket, from_user_id, to_user_id, text, created_at, request_id"
)
_ARRAY_TYPES = ("uuid", "bigint", "bigint", "smallint", "bigint", "bigint", "text", "timestamptz", "text")
# A row's fingerprint: independent of the session's time zone and of row order when summed.
ROW_FINGERPRINT = (
    "('x' || left(md5(concat_ws('|', message_id, user_low, user_high, bucket, from_user_id, to_user_id, "
    "text, (extract(epoch FROM created_at) * 1000000)::bigint, coalesce(request_id, '\\N'))), 15))"
    "::bit(60)::bigint"
)


@dataclass(frozen=True, slots=True)
class Unit:
    """What moves: one pair, or buckets except the `pinned` pairs (overrides place those).

    With a `residue` (modulus, remainder), only the buckets' pairs whose hash modulo
    `modulus` is `remainder`: the target's part of a bucket in a full reshuffle
    (server.routing.layout); fence rows name it. A `source_residue` narrows the
    selection the same way to the pairs whose old hash shard is the source, so that
    the target's own pairs of these buckets (and pairs other sources moved there) are
    not taken for the unit's.
    """

    buckets: tuple[int, ...]
    pair: Pair | None = None
    pinned: tuple[Pair, ...] = field(default=())
    residue: tuple[int, int] | None = None
    source_residue: tuple[int, int] | None = None

    @classmethod
    def of_pair(cls, pair: Pair, bucket: int) -> Unit:
        return cls((bucket,), pair)

    def fence_keys(self) -> list[FenceKey]:
        """The fence rows that stand for this unit on a shard."""
        if self.pair is not None:
            return [(self.buckets[0], self.pair.low, self.pair.high)]
        if self.residue is not None:
            modulus, remainder = self.residue
            return [(b, -modulus, remainder) for b in self.buckets]
        return [(b, WHOLE_BUCKET, WHOLE_BUCKET) for b in self.buckets]

    def covers(self, pair: Pair) -> bool:
        """Whether the pair's rows are this unit's (pinned pairs aside)."""
        if self.pair is not None:
            return pair == self.pair
        hashed = pair_hash(*pair)
        return hashed % NUM_BUCKETS in self.buckets and all(
            hashed % modulus == remainder for modulus, remainder in self._residues()
        )

    def _residues(self) -> list[tuple[int, int]]:
        return [r for r in (self.residue, self.source_residue) if r is not None]

    def split(self, groups: Sequence[Sequence[int]]) -> list[Unit]:
        """The unit as parts holding these groups of its buckets (each with its pinned pairs)."""
        parts = []
        for group in groups:
            if not group:
                continue
            in_group = set(group)
            pinned = tuple(p for p in self.pinned if bucket_of(*p) in in_group)
            parts.append(Unit(tuple(group), None, pinned, self.residue, self.source_residue))
        return parts

    def where(self) -> tuple[str, list[Any]]:
        """SQL condition selecting the unit's rows, and its parameters."""
        if self.pair is not None:
            return "user_low = %s AND user_high = %s", [self.pair.low, self.pair.high]
        clauses: list[str] = ["bucket = ANY(%s::smallint[])"]
        params: list[Any] = [list(self.buckets)]
        for modulus, remainder in self._residues():
            clauses.append("mod(dialog_pair_hash(user_low, user_high), %s) = %s")
            params += [modulus, remainder]
        if self.pinned:
            clauses.append("(user_low, user_high) NOT IN (SELECT * FROM unnest(%s::bigint[], %s::bigint[]))")
            params += [[p.low for p in self.pinned], [p.high for p in self.pinned]]
        return " AND ".join(clauses), params


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """Count and order-independent checksum of a unit's rows on one shard."""

    count: int
    checksum: int


class VerificationError(FailedPrecondition):
    """Source and target disagree after the sync; the message says how.

    The move is not flipped and the source is writable again: the data is where
    routing says. Something other than the mover wrote the unit's rows to the target
    (a misplaced row `dialogctl verify --repair` can settle), so retrying as is fails again.
    """

    default_reason = "MOVE_NOT_VERIFIED"


#: Rows a keyset walk of a bucket group may have to sort per chunk: buckets are packed into parts
#: up to this many rows, so a big shard's group is walked bucket by bucket and a small one at once.
PART_ROWS = 50_000


async def _parts(source: MessageStore, unit: Unit, part_rows: int = PART_ROWS) -> list[Unit]:
    """The unit in parts of about PART_ROWS rows on the source (one part for a pair or a small group)."""
    if unit.pair is not None or len(unit.buckets) == 1:
        return [unit]
    async with shard_errors(source.shard_id), source.pool.connection() as conn:
        cur = await conn.execute(
            f"SELECT bucket, count(*) FROM {source.table} WHERE bucket = ANY(%s::smallint[]) GROUP BY bucket",
            (list(unit.buckets),),
        )
        counts = {int(r[0]): int(r[1]) for r in await cur.fetchall()}
    groups: list[list[int]] = [[]]
    rows = 0
    for bucket in unit.buckets:
        if groups[-1] and rows + counts.get(bucket, 0) > part_rows:
            groups.append([])
            rows = 0
        groups[-1].append(bucket)
        rows += counts.get(bucket, 0)
    return unit.split(groups)


async def copy(
    source: MessageStore,
    target: MessageStore,
    unit: Unit,
    *,
    chunk_rows: int = 1000,
    part_rows: int = PART_ROWS,
) -> int:
    """Copy every row of the unit from source to target; returns rows newly inserted."""
    parts = await _parts(source, unit, part_rows)
    return sum([await _copy(source, target, part, chunk_rows=chunk_rows) for part in parts])


async def _copy(source: MessageStore, target: MessageStore, unit: Unit, *, chunk_rows: int) -> int:
    where, params = unit.where()
    after = MIN_ID
    inserted = 0
    while True:
        async with shard_errors(source.shard_id), source.pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT {ROW_COLUMNS} FROM {source.table} WHERE {where} AND message_id > %s "
                "ORDER BY message_id LIMIT %s",
                [*params, after, chunk_rows],
            )
            rows = await cur.fetchall()
        if not rows:
            return inserted
        inserted += await _insert_rows(target, rows)
        after = rows[-1][0]
        if len(rows) < chunk_rows:
            return inserted


async def sync(
    source: MessageStore,
    target: MessageStore,
    unit: Unit,
    *,
    chunk_ids: int = 5000,
    part_rows: int = PART_ROWS,
) -> int:
    """Make target hold exactly source's rows of the unit, comparing ids range by range.

    Returns rows copied. Raises VerificationError if the target holds rows the source
    lacks (nothing a move wrote; the target is not the unit's shard, so nobody else should).
    """
    parts = await _parts(source, unit, part_rows)
    return sum([await _sync(source, target, part, chunk_ids=chunk_ids) for part in parts])


async def _sync(source: MessageStore, target: MessageStore, unit: Unit, *, chunk_ids: int) -> int:
    where, params = unit.where()
    after = MIN_ID
    copied = 0
    while True:
        async with shard_errors(source.shard_id), source.pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT message_id FROM {source.table} WHERE {where} AND message_id > %s "
                "ORDER BY message_id LIMIT %s",
                [*params, after, chunk_ids],
            )
            source_ids = [r[0] for r in await cur.fetchall()]
        last = len(source_ids) < chunk_ids
        upto = MAX_ID if last else source_ids[-1]
        async with shard_errors(target.shard_id), target.pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT message_id FROM {target.table} WHERE {where} AND message_id > %s "
                "AND message_id <= %s",
                [*params, after, upto],
            )
            target_ids = {r[0] for r in await cur.fetchall()}
        extra = target_ids.difference(source_ids)
        if extra:
            raise VerificationError(
                f"shard {target.shard_id} holds {len(extra)} message(s) of the unit that shard "
                f"{source.shard_id} lacks, e.g. {sorted(extra)[0]}; nothing was moved: run "
                "`dialogctl verify --repair`, then the move again"
            )
        missing = [i for i in source_ids if i not in target_ids]
        if missing:
            copied += await copy_ids(source, target, missing)
        if last:
            return copied
        after = upto


async def copy_ids(source: MessageStore, target: MessageStore, ids: Sequence[uuid.UUID]) -> int:
    """Copy the rows with these ids from source to target (ON CONFLICT DO NOTHING)."""
    async with shard_errors(source.shard_id), source.pool.connection() as conn:
        cur = await conn.execute(
            f"SELECT {ROW_COLUMNS} FROM {source.table} WHERE message_id = ANY(%s) ORDER BY message_id",
            (list(ids),),
        )
        rows = await cur.fetchall()
    return await _insert_rows(target, rows) if rows else 0


async def fingerprint(store: MessageStore, unit: Unit) -> Fingerprint:
    where, params = unit.where()
    async with shard_errors(store.shard_id), store.pool.connection() as conn:
        cur = await conn.execute(
            f"SELECT count(*), coalesce(sum({ROW_FINGERPRINT}), 0) FROM {store.table} WHERE {where}", params
        )
        row = await cur.fetchone()
    assert row is not None
    return Fingerprint(int(row[0]), int(row[1]))


async def verify(source: MessageStore, target: MessageStore, unit: Unit) -> Fingerprint:
    """Compare counts and checksums of the unit on both shards; raise VerificationError if they differ."""
    on_source = await fingerprint(source, unit)
    on_target = await fingerprint(target, unit)
    if on_source != on_target:
        raise VerificationError(
            f"the unit differs between shard {source.shard_id} ({on_source.count} messages) and shard "
            f"{target.shard_id} ({on_target.count} messages) after copying; nothing was moved: "
            "`dialogctl verify` names the differing messages"
        )
    return on_source


async def delete(store: MessageStore, unit: Unit, *, chunk_rows: int = 5000) -> int:
    """Delete the unit's rows from the shard in chunks; returns rows deleted."""
    where, params = unit.where()
    deleted = 0
    while True:
        async with shard_errors(store.shard_id), store.pool.connection() as conn:
            cur = await conn.execute(
                f"DELETE FROM {store.table} WHERE message_id IN "
                f"(SELECT message_id FROM {store.table} WHERE {where} LIMIT %s)",
                [*params, chunk_rows],
            )
        count: int = cur.rowcount
        deleted += count
        if count < chunk_rows:
            return deleted


async def _insert_rows(target: MessageStore, rows: Sequence[Sequence[Any]]) -> int:
    columns = [list(c) for c in zip(*rows, strict=True)]
    arrays = ", ".join(f"%s::{t}[]" for t in _ARRAY_TYPES)
    async with shard_errors(target.shard_id), target.pool.connection() as conn:
        cur = await conn.execute(
            f"INSERT INTO {target.table} ({ROW_COLUMNS}) SELECT * FROM unnest({arrays}) "
            "ON CONFLICT (message_id) DO NOTHING",
            columns,
        )
    count: int = cur.rowcount
    return count
