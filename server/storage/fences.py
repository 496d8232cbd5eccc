"""Fences on a shard: which units (a pair, or a whole hash bucket) may be written or read there.

Moving a unit between shards has no cross-server transaction to lean on, and
other server processes may route by a stale shard-map mirror for a moment. So
the *source* shard itself refuses writes once the mover has fenced the unit:

- every insert runs `<table>_writable(bucket, low, high)` in its WHERE clause. The
  function takes `pg_advisory_xact_lock_shared(<table key>, bucket)` and only then
  reads the fence table. It is VOLATILE plpgsql, so that read takes a fresh snapshot
  after the lock was granted and cannot miss a fence committed while it waited.
  A batch insert runs `<table>_writable_batch(buckets, lows, highs)` once (an InitPlan):
  the same locks, then the same per-row check when a fence row can cover one of its pairs.
- the mover fences in its own transaction: `pg_advisory_xact_lock(<table key>, bucket)`
  waits for every in-flight insert of the bucket to commit, then the fence row is
  written and committed. No insert of the unit can commit on the source after that.
- a fenced insert raises SQLSTATE `DSM01`, which the service answers with UNAVAILABLE,
  reason `DIALOG_MOVING` and a RetryInfo: a retry (same request_id) is safe.
- every page read runs `<table>_readable(...)` once (an InitPlan): after the routing
  flip the source's fence becomes `moved`, and a reader whose mirror is still stale
  gets the same retryable error instead of the half-deleted dialog on the old shard.

Fence rows of a bucket, by (user_low, user_high):

- `(low, high)`, a pair (real user ids are >= 1);
- `(0, 0)`, the whole bucket (a reshard whose unit is a bucket);
- `(-m, r)`, the bucket's pairs whose `dialog_pair_hash(...) % m = r` (a full reshuffle's
  unit: the part of a bucket going to shard r of m).

A pair's state is its pair row if one exists, else the bucket's whole or residue row
that covers it, else open. A pair row `open` re-opens one pair inside a fenced bucket
(a pair pinned by an override to a shard its bucket left). The residue's hash is only
computed for a bucket that has residue rows, so inserts elsewhere never pay for it.

Invariants (every writer of these rows keeps them):

- a row is changed only under `pg_advisory_xact_lock(<table key>, bucket)`, so no insert
  of the bucket that already passed its check is in flight when the change commits;
- a pair is never refused on the shard its current routing names, except while a move
  (shard_moves, not `done`) of its unit runs: the mover fences only its source, opens
  its target (`open`) before the flip, and re-opens the source after a failure that
  left routing on it;
- a finished move leaves its source `moved` (not deleted): a server routing by a stale
  mirror can never write or read there again;
- routing that changes without a move (a restored or hand-edited shard_map, a restored
  layout) can break the second rule: `dialogctl verify` reports such rows as
  `stale_fence`, and `verify --repair` (which `restore --control` runs) reconciles them
  with `FenceStore.reconcile` under the movers' lock, skipping buckets of unfinished
  moves (server.routing.fencing decides which rows are stale and what replaces them).
"""

from __future__ import annotations

import enum
import zlib
from collections.abc import Callable, Sequence
from typing import Any

from psycopg import AsyncConnection

from server.resilience.db_errors import FENCED_SQLSTATE
from server.routing import Pair, bucket_of
from server.routing.fencing import BucketFix, FenceRow

#: user_low/user_high of a whole-bucket fence row.
WHOLE_BUCKET = 0
#: A fence row covering other fence rows' pairs (a whole bucket, or a residue of one).
_COVERS = """
    f.bucket = u.b AND f.user_low <= 0 AND (f.user_low = 0
        OR mod(dialog_pair_hash(u.lo, u.hi), -f.user_low) = f.user_high)
"""


class FenceState(enum.StrEnum):
    """The state of a unit on one shard."""

    #: Writes and reads allowed (used to re-open one pair inside a fenced bucket).
    OPEN = "open"
    #: Writes refused; reads allowed: the copy on the target is being completed.
    FENCED = "fenced"
    #: Writes and reads refused: routing names another shard and these rows are going away.
    MOVED = "moved"


def lock_key(table: str) -> int:
    """The first advisory-lock key of a shard table (the second is the bucket), as a signed int4."""
    value = zlib.crc32(table.encode())
    return value - (1 << 32) if value >= 1 << 31 else value


def fence_schema(table: str) -> list[str]:
    """Statements creating `<table>_fences` and its two guard functions (idempotent)."""
    key = lock_key(table)
    fences = f"{table}_fences"
    # One index range per call: the bucket's rows; the pair's own row sorts first
    # (user_low >= 1), then the whole-bucket row (0), then residue rows (< 0).
    state_of = f"""
        SELECT state INTO s FROM {fences}
        WHERE bucket = b AND ((user_low = lo AND user_high = hi) OR (user_low = 0 AND user_high = 0)
            OR (user_low < 0 AND mod(dialog_pair_hash(lo, hi), -user_low) = user_high))
        ORDER BY user_low DESC LIMIT 1;
    """
    refuse = f"""
            RAISE EXCEPTION 'the dialog of users % and % is moving to another shard', lo, hi
                USING ERRCODE = '{FENCED_SQLSTATE}', HINT = 'retry in a moment';
    """
    return [
        f"""
        CREATE TABLE IF NOT EXISTS {fences} (
            bucket SMALLINT NOT NULL,
            user_low BIGINT NOT NULL,
            user_high BIGINT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('open', 'fenced', 'moved')),
            move_id BIGINT,
            updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
            PRIMARY KEY (bucket, user_low, user_high)
        )
        """,
        f"""
        CREATE OR REPLACE FUNCTION {table}_writable(b integer, lo bigint, hi bigint) RETURNS boolean
        LANGUAGE plpgsql VOLATILE AS $fn$
        DECLARE s text;
        BEGIN
            PERFORM pg_advisory_xact_lock_shared({key}, b);
            {state_of}
            IF s IS NOT NULL AND s <> 'open' THEN {refuse} END IF;
            RETURN true;
        END
        $fn$
        """,
        # The batch insert's fence: one call per statement instead of one per row. The common
        # case (no fence row in the batch's buckets) costs the bucket locks and one index probe.
        # Every pair moved away by an override leaves a `moved` row on its old shard, so with
        # many overrides most buckets have some row: a second probe looks for the rows that can
        # cover the batch's own pairs (their pair rows, whole-bucket and residue rows), and only
        # then does every row go through `_writable` itself. Locks are taken in bucket order, as
        # the mover takes its exclusive ones.
        f"""
        CREATE OR REPLACE FUNCTION {table}_writable_batch(bs smallint[], los bigint[], his bigint[])
        RETURNS boolean LANGUAGE plpgsql VOLATILE AS $fn$
        BEGIN
            PERFORM pg_advisory_xact_lock_shared({key}, d.b)
            FROM (SELECT DISTINCT b FROM unnest(bs) AS b ORDER BY b) AS d;
            -- Two IFs, not one AND: the common case then never starts the second query.
            IF EXISTS (SELECT 1 FROM {fences} WHERE bucket = ANY(bs)) THEN
                IF EXISTS (
                    SELECT 1 FROM unnest(bs, los, his) AS k(b, lo, hi)
                    WHERE EXISTS (SELECT 1 FROM {fences} f
                                  WHERE f.bucket = k.b AND f.user_low = k.lo AND f.user_high = k.hi)
                       OR EXISTS (SELECT 1 FROM {fences} f WHERE f.bucket = k.b AND f.user_low <= 0))
                THEN
                    PERFORM {table}_writable(k.b, k.lo, k.hi) FROM unnest(bs, los, his) AS k(b, lo, hi);
                END IF;
            END IF;
            RETURN true;
        END
        $fn$
        """,
        f"""
        CREATE OR REPLACE FUNCTION {table}_readable(b integer, lo bigint, hi bigint) RETURNS boolean
        LANGUAGE plpgsql VOLATILE AS $fn$
        DECLARE s text;
        BEGIN
            {state_of}
            IF s = 'moved' THEN {refuse} END IF;
            RETURN true;
        END
        $fn$
        """,
    ]


_KEYS = "unnest(%s::smallint[], %s::bigint[], %s::bigint[]) AS u(b, lo, hi)"
#: A fence row's key: (bucket, user_low, user_high); user_low = user_high = 0 for a whole bucket.
FenceKey = tuple[int, int, int]


def pair_fence_key(pair: Pair) -> FenceKey:
    """The fence row key of one pair."""
    return bucket_of(*pair), pair.low, pair.high


class FenceStore:
    """The mover's side of one shard table's fences."""

    def __init__(self, table: str) -> None:
        self.table = table
        self._fences = f"{table}_fences"
        self._key = lock_key(table)

    async def set(
        self,
        conn: AsyncConnection[Any],
        keys: Sequence[FenceKey],
        state: FenceState,
        move_id: int | None,
        *,
        exempt: Sequence[FenceKey] = (),
    ) -> None:
        """Set the units' state once no insert of their buckets is in flight (commits on return).

        `exempt` pairs (pinned here by an override inside a fenced bucket) stay writable.
        """
        async with conn.transaction():
            # Waits for every insert of these buckets that passed the check to commit.
            for bucket in sorted({k[0] for k in keys}):
                await conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (self._key, bucket))
            await conn.execute(
                f"""
                INSERT INTO {self._fences} (bucket, user_low, user_high, state, move_id)
                SELECT b, lo, hi, %s, %s FROM {_KEYS}
                ON CONFLICT (bucket, user_low, user_high)
                    DO UPDATE SET state = EXCLUDED.state, move_id = EXCLUDED.move_id, updated_at = now()
                """,
                (str(state), move_id, *_columns(keys)),
            )
            if exempt:
                await conn.execute(
                    f"""
                    INSERT INTO {self._fences} (bucket, user_low, user_high, state)
                    SELECT b, lo, hi, 'open' FROM {_KEYS}
                    ON CONFLICT (bucket, user_low, user_high) DO NOTHING
                    """,
                    _columns(exempt),
                )

    async def open(
        self, conn: AsyncConnection[Any], keys: Sequence[FenceKey], *, keep: Sequence[FenceKey] = ()
    ) -> None:
        """Let the units be written here: drop their rows; a pair inside a fenced bucket is marked open.

        A bucket unit coming (back) here also drops what earlier moves away from this shard
        left in its part of the bucket: whole and residue rows of earlier reshards (except
        the running reshard's own residue rows, same modulus, which still turn away writers
        with a stale layout) and the rows of pairs that overrides once moved away and that
        now come back with the unit. The `keep` pairs (pinned elsewhere, they do not come
        with the unit) keep theirs.
        """
        async with conn.transaction():
            await conn.execute(
                f"""
                DELETE FROM {self._fences} WHERE (bucket, user_low, user_high) IN
                    (SELECT * FROM unnest(%s::smallint[], %s::bigint[], %s::bigint[]))
                """,
                _columns(keys),
            )
            parts = [k for k in keys if k[1] <= WHOLE_BUCKET]
            if parts:
                await conn.execute(
                    f"""
                    DELETE FROM {self._fences} f USING {_KEYS}
                    WHERE f.bucket = u.b AND f.user_low <= 0 AND (u.lo = 0 OR f.user_low <> u.lo)
                    """,
                    _columns(parts),
                )
                await conn.execute(
                    f"""
                    DELETE FROM {self._fences} f USING {_KEYS}
                    WHERE f.bucket = u.b AND f.user_low > 0
                      AND (u.lo = 0 OR mod(dialog_pair_hash(f.user_low, f.user_high), -u.lo) = u.hi)
                      AND (f.user_low, f.user_high) NOT IN
                          (SELECT * FROM unnest(%s::bigint[], %s::bigint[]))
                    """,
                    (*_columns(parts), [k[1] for k in keep], [k[2] for k in keep]),
                )
            pairs = [k for k in keys if k[1] > WHOLE_BUCKET]
            if pairs:
                await conn.execute(
                    f"""
                    INSERT INTO {self._fences} (bucket, user_low, user_high, state)
                    SELECT b, lo, hi, 'open' FROM {_KEYS}
                    WHERE EXISTS (SELECT 1 FROM {self._fences} f WHERE {_COVERS} AND f.state <> 'open')
                    """,
                    _columns(pairs),
                )

    async def rows(self, conn: AsyncConnection[Any]) -> list[FenceRow]:
        """Every fence row of the table, in key order."""
        cur = await conn.execute(
            f"SELECT bucket, user_low, user_high, state FROM {self._fences} "
            "ORDER BY bucket, user_low, user_high"
        )
        return [FenceRow(int(r[0]), int(r[1]), int(r[2]), str(r[3])) for r in await cur.fetchall()]

    async def reconcile(
        self, conn: AsyncConnection[Any], bucket: int, plan: Callable[[list[FenceRow]], BucketFix | None]
    ) -> BucketFix | None:
        """Apply `plan` (server.routing.fencing.plan_bucket) to the bucket's rows as they are under its lock.

        The bucket's exclusive advisory lock is taken first, as `set` does, and the rows are read
        again under it, so the fix is decided on what it changes; commits on return.
        """
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (self._key, bucket))
            cur = await conn.execute(
                f"SELECT bucket, user_low, user_high, state FROM {self._fences} WHERE bucket = %s", (bucket,)
            )
            fix = plan([FenceRow(int(r[0]), int(r[1]), int(r[2]), str(r[3])) for r in await cur.fetchall()])
            if fix is None:
                return None
            if fix.delete:
                await conn.execute(
                    f"""
                    DELETE FROM {self._fences} WHERE (bucket, user_low, user_high) IN
                        (SELECT * FROM unnest(%s::smallint[], %s::bigint[], %s::bigint[]))
                    """,
                    _columns(fix.delete),
                )
            if fix.put:
                await conn.execute(
                    f"""
                    INSERT INTO {self._fences} (bucket, user_low, user_high, state)
                    SELECT b, lo, hi, s FROM unnest(%s::smallint[], %s::bigint[], %s::bigint[], %s::text[])
                        AS u(b, lo, hi, s)
                    ON CONFLICT (bucket, user_low, user_high)
                        DO UPDATE SET state = EXCLUDED.state, move_id = NULL, updated_at = now()
                    """,
                    (*_columns([r.key for r in fix.put]), [r.state for r in fix.put]),
                )
            return fix


def _columns(keys: Sequence[FenceKey]) -> tuple[list[int], list[int], list[int]]:
    return [k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys]
