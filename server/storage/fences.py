"""Fences on a shard: which units (a pair, or a whole hash bucket) may be written or read there.

Moving a unit between shards has no cross-server transaction to lean on, and
other server processes may route by a stale shard-map mirror for a moment. So
the *source* shard itself refuses writes once the mover has fenced the unit:

- every insert carries `write_guard` in its WHERE clause: plain SQL that the planner runs
  once per statement (an InitPlan), one probe of the fence table's primary key for a row
  that can cover the pair (its own row, or a whole or residue row of its bucket; the rows
  of the bucket's other pairs, which moves by override leave behind, cannot). Only when
  there is one does it call `<table>_fence_check` (plpgsql, STABLE: the same snapshot),
  which finds the pair's state as described below and raises unless it is open (or, for a
  read, unless it is not `moved`). No lock,
  no function call in the common case. A batch insert runs the same guard over its rows,
  one probe per row, still once per statement.
- the guard reads the fence table with its statement's snapshot, and a statement whose
  snapshot was taken just before a fence committed does not see it. So a writer of fence
  rows (`FenceStore.set`, `FenceStore.reconcile`), right after committing a change that
  makes some unit less writable, waits out every transaction that may still write with
  such a snapshot, as CREATE INDEX CONCURRENTLY waits out older snapshots
  (`dialog_await_writers`): it reads from pg_locks the virtual transactions of the other
  backends that hold RowExclusiveLock on the messages table, then polls (backing off from
  1 ms to 50 ms) until they are all gone. A READ COMMITTED statement takes its relation
  locks before its snapshot (PostgreSQL's exec_simple_query and exec_bind_message lock
  while parsing or revalidating the cached plan, and take the execution snapshot after),
  and keeps them to the end of its transaction: an insert in flight with an older snapshot
  is in that list; one that locks the table later takes its snapshot later and sees the
  fence. Writers of message tables must therefore use READ COMMITTED (the service does:
  autocommit statements); a REPEATABLE READ transaction could insert with a snapshot taken
  before it locked the table. pg_locks is readable by every role (no superuser needed).
  When writers are still in flight after `wait_seconds` (a transaction left open) the wait
  fails with SQLSTATE `DSM02`, which the caller answers with UNAVAILABLE: the fence stays
  committed and the mover stops (and re-opens the source when it may).
- so once `FenceStore.set` returns, no insert of the unit commits on the source any more;
  the mover's catch-up copy starts only then.
- a fenced insert raises SQLSTATE `DSM01`, which the service answers with UNAVAILABLE,
  reason `DIALOG_MOVING` and a RetryInfo: a retry (same request_id) is safe.
- every page read runs `read_guard` once (an InitPlan): a call of `<table>_fence_check`, which
  makes the same probe first and refuses only `moved` (page reads are planned anew at each
  execution, and the call costs less than planning the probe inline). After the routing flip
  the source's fence becomes `moved`, and a reader whose mirror is still stale gets the same
  retryable error instead of the dialog on the old shard. Reads need no wait: the mover deletes the
  source's rows only after `moved` committed, so a snapshot that misses the fence misses
  the deletions too and reads the dialog whole, as it stood before the flip.

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

- a row that refuses (`fenced`, `moved`) is written only by a writer that waits out the
  older writers after its commit; `writers_awaited` says so, and the table's check
  `<table>_fences_wait` refuses such a row without it (see "Rolling upgrades");
- a row is changed only under `pg_advisory_xact_lock(<table key>, bucket)`, so no insert
  of an earlier version (which takes the shared lock) that already passed its check is in
  flight when the change commits;
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

Rolling upgrades. Earlier versions checked every insert with `<table>_writable` (plpgsql:
the bucket's shared advisory lock, then a fresh snapshot), every batch with
`<table>_writable_batch` and every page with `<table>_readable`, and their movers took the
bucket's exclusive lock, wrote the row and committed, without waiting afterwards. While
both versions run against one shard:

- an earlier server's insert stays safe: the schema keeps its three functions unchanged
  (`CREATE OR REPLACE` with the same bodies), and this version's writers of fence rows
  still take the exclusive lock, cheap for them, besides waiting; its insert holds
  RowExclusiveLock too, so it is waited out as well;
- an earlier mover (a move, the resumer, `verify --repair` of an earlier dialogctl) would
  not wait, and this version's inserts take no lock: such a pair could lose a message
  inserted with a snapshot from just before its fence. So the fence table refuses what it
  writes: its rows leave `writers_awaited` NULL, and the check `<table>_fences_wait`
  (added NOT VALID, so rows already there stay) refuses a `fenced` or `moved` row without
  it. The earlier mover's step fails, its move re-opens or stays where it is, and a server
  of this version completes it. A hand-written fence row needs `writers_awaited` and a
  call of `dialog_await_writers` after its commit for the same reason.
- the earlier functions can go once no server of an earlier version runs.
"""

from __future__ import annotations

import enum
import zlib
from collections.abc import Callable, Sequence
from typing import Any

from psycopg import AsyncConnection

from server.resilience.db_errors import FENCED_SQLSTATE, WRITERS_IN_FLIGHT_SQLSTATE
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


#: Default longest wait (seconds) of a fence change for the inserts that may have missed it.
WRITERS_WAIT_SECONDS = 5.0


def _may_refuse(table: str, bucket: str, low: str, high: str) -> str:
    """SQL: whether a fence row can cover the pair (SQL expressions): its own row, or a whole or
    residue row of its bucket (rows of the bucket's other pairs cannot). One range of the primary
    key: the bucket's rows up to the pair's own (user_low <= 0 sort first)."""
    return f"""EXISTS (SELECT 1 FROM {table}_fences f
        WHERE f.bucket = {bucket} AND f.user_low <= {low}
          AND (f.user_low <= 0 OR (f.user_low = {low} AND f.user_high = {high})))"""


def write_guard(table: str, units: str, *, many: bool = False) -> str:
    """SQL: true, or raises DSM01 when one of `units` (a FROM item with columns b, lo, hi; one row
    unless `many`) is fenced here. For an insert's WHERE clause (see the module docstring for why
    no lock is needed)."""
    # A scalar subquery without outer references: the planner makes it an InitPlan, run once per
    # statement (for one unit of parameters, its probe too). The CASE keeps the order: a unit no
    # fence row can cover, the common case, costs one probe of the primary key and no call.
    check = f"{table}_fence_check(u.b, u.lo, u.hi, false)"
    each = f"CASE WHEN {_may_refuse(table, 'u.b', 'u.lo', 'u.hi')} THEN {check} ELSE true END"
    if many:
        return f"(SELECT coalesce(bool_and({each}), true) FROM {units} AS u)"
    return f"(SELECT {each} FROM {units} AS u)"


def read_guard(table: str, bucket: str, low: str, high: str) -> str:
    """SQL: true, or raises DSM01 when the pair (`bucket`, `low`, `high`: SQL expressions) has moved
    away from here. For a page read's WHERE clause, run once (an InitPlan).

    Unlike `write_guard` it calls `<table>_fence_check` every time, which then makes the same
    probe: a page read is planned anew at each execution (its custom plans win: they fit the
    pair's size), and planning the probe inline costs more than the call.
    """
    return f"(SELECT {table}_fence_check({bucket}, {low}, {high}, true))"


def params_unit(bucket: str, low: str, high: str) -> str:
    """A one-row FROM item (b, lo, hi) of three statement parameters, for `write_guard` and `read_guard`."""
    return f"(SELECT {bucket}::smallint AS b, {low}::bigint AS lo, {high}::bigint AS hi)"


#: The wait after a fence change (see the module docstring), one function per database. The
#: virtual transactions are read once, right after the caller's commit; a transaction that
#: locks the table later takes its snapshot later. `pid IS DISTINCT FROM`: a prepared
#: transaction has no pid, and is waited for too.
AWAIT_WRITERS_FUNCTION = f"""
CREATE OR REPLACE FUNCTION dialog_await_writers(rel regclass, wait_seconds double precision)
RETURNS integer LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    writers text[];
    deadline timestamptz := clock_timestamp() + make_interval(secs => wait_seconds);
    pause double precision := 0.001;
BEGIN
    SELECT coalesce(array_agg(DISTINCT l.virtualtransaction), '{{}}') INTO writers FROM pg_locks l
    WHERE l.locktype = 'relation' AND l.relation = rel AND l.mode = 'RowExclusiveLock' AND l.granted
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND l.pid IS DISTINCT FROM pg_backend_pid();
    WHILE EXISTS (SELECT 1 FROM pg_locks l WHERE l.virtualtransaction = ANY(writers)) LOOP
        IF clock_timestamp() >= deadline THEN
            RAISE EXCEPTION 'writers that may have missed a fence still run after % s (left open?)',
                wait_seconds USING ERRCODE = '{WRITERS_IN_FLIGHT_SQLSTATE}';
        END IF;
        PERFORM pg_sleep(least(pause, greatest(0, extract(epoch FROM deadline - clock_timestamp()))));
        pause := least(pause * 2, 0.05);
    END LOOP;
    RETURN cardinality(writers);
END
$fn$
"""


def fence_schema(table: str) -> list[str]:
    """Statements creating `<table>_fences`, the guard's function and the waiting function (idempotent)."""
    key = lock_key(table)
    fences = f"{table}_fences"
    refuse = f"""
            RAISE EXCEPTION 'the dialog of users % and % is moving to another shard', lo, hi
                USING ERRCODE = '{FENCED_SQLSTATE}', HINT = 'retry in a moment';
    """
    # The checks of earlier versions (see "Rolling upgrades"), unchanged.
    state_of = f"""
        SELECT state INTO s FROM {fences}
        WHERE bucket = b AND ((user_low = lo AND user_high = hi) OR (user_low = 0 AND user_high = 0)
            OR (user_low < 0 AND mod(dialog_pair_hash(lo, hi), -user_low) = user_high))
        ORDER BY user_low DESC LIMIT 1;
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
        f"ALTER TABLE {fences} ADD COLUMN IF NOT EXISTS writers_awaited BOOLEAN",
        # No ADD CONSTRAINT IF NOT EXISTS in PostgreSQL 15. NOT VALID: rows already there stay.
        f"""
        DO $add$
        BEGIN
            IF NOT EXISTS (SELECT 1 FROM pg_constraint
                           WHERE conrelid = '{fences}'::regclass AND conname = '{table}_fences_wait') THEN
                ALTER TABLE {fences} ADD CONSTRAINT {table}_fences_wait
                    CHECK (state = 'open' OR writers_awaited IS TRUE) NOT VALID;
            END IF;
        END
        $add$
        """,
        # The guards' check where a fence row can cover the unit: true, or raises DSM01. STABLE:
        # it reads with its statement's snapshot, as the guard's probe does.
        f"""
        CREATE OR REPLACE FUNCTION {table}_fence_check(b integer, lo bigint, hi bigint, reading boolean)
        RETURNS boolean LANGUAGE plpgsql STABLE AS $fn$
        DECLARE s text;
        BEGIN
            IF NOT {_may_refuse(table, "b", "lo", "hi")} THEN
                RETURN true;
            END IF;
            {state_of}
            IF s = 'moved' OR (s = 'fenced' AND NOT reading) THEN {refuse} END IF;
            RETURN true;
        END
        $fn$
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
        AWAIT_WRITERS_FUNCTION,
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
        wait_seconds: float = WRITERS_WAIT_SECONDS,
    ) -> None:
        """Set the units' state, then wait until no insert that may have missed it is in flight.

        Commits before it waits; `exempt` pairs (pinned here by an override inside a fenced
        bucket) stay writable. Raises DSM02 (psycopg.Error) when writers still run after
        `wait_seconds`: the change stays committed.
        """
        async with conn.transaction():
            # Waits for every insert of an earlier version that passed its check to commit.
            for bucket in sorted({k[0] for k in keys}):
                await conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (self._key, bucket))
            await conn.execute(
                f"""
                INSERT INTO {self._fences} (bucket, user_low, user_high, state, move_id, writers_awaited)
                SELECT b, lo, hi, %s, %s, %s FROM {_KEYS}
                ON CONFLICT (bucket, user_low, user_high)
                    DO UPDATE SET state = EXCLUDED.state, move_id = EXCLUDED.move_id,
                                  writers_awaited = EXCLUDED.writers_awaited, updated_at = now()
                """,
                (str(state), move_id, _refuses(state), *_columns(keys)),
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
        if _refuses(state):
            await self.await_writers(conn, wait_seconds)

    async def await_writers(self, conn: AsyncConnection[Any], wait_seconds: float) -> int:
        """Wait until every transaction holding a write lock on the message table now has ended.

        Call it right after committing a fence change (see the module docstring); returns how
        many were waited for. Raises DSM02 (psycopg.Error) when some still run after `wait_seconds`.
        """
        async with conn.transaction():
            cur = await conn.execute(
                "SELECT dialog_await_writers(%s::regclass, %s)", (self.table, wait_seconds)
            )
            row = await cur.fetchone()
        return int(row[0]) if row else 0

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
        self,
        conn: AsyncConnection[Any],
        bucket: int,
        plan: Callable[[list[FenceRow]], BucketFix | None],
        *,
        wait_seconds: float = WRITERS_WAIT_SECONDS,
    ) -> BucketFix | None:
        """Apply `plan` (server.routing.fencing.plan_bucket) to the bucket's rows as they are under its lock.

        The bucket's exclusive advisory lock is taken first, as `set` does, and the rows are read
        again under it, so the fix is decided on what it changes; commits, then waits as `set`
        does when the fix writes a row that refuses.
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
                    INSERT INTO {self._fences} (bucket, user_low, user_high, state, writers_awaited)
                    SELECT b, lo, hi, s, NULLIF(s <> 'open', false)
                    FROM unnest(%s::smallint[], %s::bigint[], %s::bigint[], %s::text[]) AS u(b, lo, hi, s)
                    ON CONFLICT (bucket, user_low, user_high)
                        DO UPDATE SET state = EXCLUDED.state, move_id = NULL,
                                      writers_awaited = EXCLUDED.writers_awaited, updated_at = now()
                    """,
                    (*_columns([r.key for r in fix.put]), [r.state for r in fix.put]),
                )
        if any(_refuses(FenceState(r.state)) for r in fix.put):
            await self.await_writers(conn, wait_seconds)
        return fix


def _refuses(state: FenceState) -> bool | None:
    """`writers_awaited` of a row in `state`: true where it refuses, NULL where it does not."""
    return True if state is not FenceState.OPEN else None


def _columns(keys: Sequence[FenceKey]) -> tuple[list[int], list[int], list[int]]:
    return [k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys]
