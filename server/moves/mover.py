"""Moving a unit's messages between shards online: copy -> fence -> catch up -> verify -> flip -> clean.

There is no transaction spanning the shards and the control database, and other
server processes may route by a stale mirror for a moment, so a move is a
sequence of idempotent steps recorded in `shard_moves` (server.storage.moves):

1. `copying`: the move is recorded, then the unit's rows are copied to the target in
   keyset chunks (`ON CONFLICT (message_id) DO NOTHING`) while writers go on writing
   to the source.
2. fence: on the source, wait for in-flight inserts of the bucket and commit a
   `fenced` row (server.storage.fences); from then on no insert of the unit commits
   there, and writers get a retryable UNAVAILABLE (DIALOG_MOVING). State `fenced`.
3. catch up and verify: copy what arrived meanwhile (an id comparison, not a time
   window: ids minted by other processes need not be ordered with ours), then compare
   counts and checksums of both copies.
4. flip: the target's replicas (if any) are waited for until they have replayed the copy, the
   target is opened (its own fence row for the unit, left by an earlier move
   away from it, is dropped), then shard_map changes with its NOTIFY and the move
   becomes `flipped`, in one control-database transaction.
5. clean: the source's fence becomes `moved` (stale readers there now get the
   retryable error rather than a dialog with holes), the source rows are deleted,
   and the move is `done`. The fence row stays, so a process that still routes
   to the source can never write there again.

A crash anywhere leaves a state from which `run` continues: the same RPC (or
`dialogctl`) re-run first completes any unfinished move of the unit. A failure
before the flip that is not a crash re-opens the source, so writers are paused
only while a move is actually running; a crash while `fenced` keeps the pair's
writes paused (with the retryable error) until the move is re-run.

Only one move runs at a time across all servers (a session advisory lock in the
control database): moves are rare operator actions, and serializing them keeps
overrides and resharding from interleaving.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from server.errors import CONTROL_SHARD, ControlUnavailable, FailedPrecondition, ShardUnavailable
from server.resilience.db_errors import describe_db_error, shard_errors
from server.routing import Pair, ShardRouter, bucket_of, pair_hash
from server.routing.layout import units_of_move
from server.storage import transfer
from server.storage.fences import FenceKey, FenceState, FenceStore, pair_fence_key
from server.storage.layout import Layout, load_layout
from server.storage.messages import MessageStore
from server.storage.moves import Flip, Move, MoveLog, MoveState
from server.storage.overrides import OverrideStore
from server.storage.pools import ShardSet

log = logging.getLogger(__name__)

#: Seconds a mover waits for its lock's session to answer before taking the lock as lost.
_LEASE_CONFIRM_SECONDS = 5.0
#: Session advisory lock (control database) held by the one running mover.
MOVER_LOCK = 0x6D6F7665
#: The step boundaries at which a Mover awaits its `after_step` hook, in order.
STEP_BOUNDARIES = ("copied", "fence_committed", "fenced", "target_opened", "flipped", "retired", "deleted")


@dataclass(frozen=True, slots=True)
class MoveResult:
    """Where the pair lives after the move and how many rows were moved."""

    shard_id: int
    copied_rows: int
    deleted_rows: int


class Mover:
    """Runs moves of pairs between shards; see the module docstring for the protocol.

    `after_step`, if given, is awaited with each of STEP_BOUNDARIES as a move passes it: the tests
    end a mover process there, to see the move resumed from each state a crash can leave.
    """

    def __init__(
        self,
        control_dsn: str,
        control_pool: AsyncConnectionPool[Any],
        shards: ShardSet,
        router: ShardRouter,
        *,
        lock_wait_seconds: float = 60.0,
        chunk_rows: int = 1000,
        replica_wait_seconds: float = 10.0,
        after_step: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self._control_dsn = control_dsn
        self._control_pool = control_pool
        self._log = MoveLog(control_pool)
        self._overrides = OverrideStore(control_pool)
        self._shards = shards
        self._router = router
        self._lock_wait_seconds = lock_wait_seconds
        self._chunk_rows = chunk_rows
        self._replica_wait_seconds = replica_wait_seconds
        self._after_step = after_step
        self._lease: MoverLease | None = None

    async def move_pair(self, pair: Pair, override: int | None, *, automatic: bool = False) -> MoveResult:
        """Route `pair` to shard `override` (None: its hash shard, no override), moving its messages.

        `automatic` (the rebalancer's moves): the override is marked automatic, and a pair an
        operator pinned is left alone (ManualPin, before anything is recorded).

        Shielded with its lock: a caller that gives up (an RPC deadline, an unavailable control
        database) neither abandons the move half-way nor lets another mover start before this one
        ends. But a move its caller gave up on before it was recorded is not started at all (the
        caller was told it failed): e.g. one still waiting for the lock on a hung control database.
        """
        gone = asyncio.Event()
        inner = asyncio.ensure_future(self._move_pair(pair, override, gone, automatic))
        try:
            return await asyncio.shield(inner)
        except asyncio.CancelledError:
            gone.set()
            inner.add_done_callback(_retrieve)
            raise

    async def _move_pair(
        self, pair: Pair, override: int | None, gone: asyncio.Event, automatic: bool
    ) -> MoveResult:
        async with self.exclusive():
            bucket = bucket_of(*pair)
            pending = await self._log.unfinished(bucket, pair.low, pair.high)
            if pending is not None:
                log.info("completing unfinished move %d of pair %s first", pending.move_id, pair)
                await self.run(pending)
            stored = await self._overrides.get(pair)
            if automatic and stored is not None and not stored.automatic:
                # Read under the movers' lock: an operator's pin made since the decision wins.
                raise ManualPin(f"the pair ({pair.low}, {pair.high}) is pinned by an operator")
            # The stored layout, not this process's mirror: a bucket may have flipped a moment ago.
            hash_shard = (await self.layout()).hash_shard(pair_hash(*pair))
            source = stored.shard_id if stored is not None else hash_shard
            target = override if override is not None else hash_shard
            flip = Flip.SET_OVERRIDE if override is not None else Flip.DELETE_OVERRIDE
            if gone.is_set():
                log.info("not moving pair %s: its caller gave up before the move was recorded", pair)
                raise asyncio.CancelledError
            if source == target:
                # No data moves; the shard map changes in one step.
                if override is not None:
                    await self._overrides.upsert(pair, override, automatic=automatic)
                    self._router.set(pair, override)
                elif stored is not None:
                    await self._overrides.delete(pair)
                    self._router.discard(pair)
                return MoveResult(target, 0, 0)
            self._refuse_unless_healthy(source, target)  # both must also be configured here
            move = await self._log.create(
                (bucket,), pair.low, pair.high, source, target, flip, automatic=automatic
            )
            return await self.run(move)

    async def move_buckets(
        self,
        buckets: tuple[int, ...],
        source: int,
        target: int,
        *,
        residue_modulus: int | None = None,
        source_modulus: int | None = None,
    ) -> MoveResult:
        """Move the buckets' messages (except pairs that overrides place) and flip them (resharding).

        With `residue_modulus` (`source_modulus`), only the buckets' pairs whose hash modulo it is
        `target` (`source`) move: a bucket that does not decide the shards alone. The caller holds
        `exclusive()` and has started the reshard in the layout.
        """
        self._refuse_unless_healthy(source, target)
        move = await self._log.create(
            buckets, 0, 0, source, target, Flip.BUCKET, residue_modulus, source_modulus
        )
        return await self.run(move)

    @property
    def log(self) -> MoveLog:
        return self._log

    @property
    def router(self) -> ShardRouter:
        return self._router

    def control_connection(self) -> contextlib.AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]:
        return self._control_pool.connection()

    async def layout(self) -> Layout:
        async with shard_errors(CONTROL_SHARD), self._control_pool.connection() as conn:
            return await load_layout(conn)

    async def run(self, move: Move) -> MoveResult:
        """Continue `move` from its recorded state to `done`; shielded from the caller's cancellation."""
        return await asyncio.shield(self._run(move))

    async def _unit(self, move: Move) -> tuple[transfer.Unit, list[FenceKey]]:
        """The unit a move carries, and the pairs a bucket fence on its source must leave writable."""
        if move.is_pair:
            return transfer.Unit.of_pair(move.pair, move.buckets[0]), []
        unit = transfer.Unit(
            move.buckets,
            residue=None if move.residue_modulus is None else (move.residue_modulus, move.target_shard),
            source_residue=None if move.source_modulus is None else (move.source_modulus, move.source_shard),
        )
        pinned = {p: s for p, s in (await self._overrides.all()).items() if unit.covers(p)}
        unit = dataclasses.replace(unit, pinned=tuple(sorted(pinned)))
        exempt = [pair_fence_key(p) for p, s in sorted(pinned.items()) if s == move.source_shard]
        return unit, exempt

    def _refuse_unless_healthy(self, *shard_ids: int) -> None:
        """Refuse at once, before anything is recorded, when a shard's primary is down or recovering.

        The mover takes its connections from the pools directly (its copy statements would not
        fit the gate's statement ceiling), so without this a move during an outage would wait out
        each pool's acquire timeout and then leave a recorded move for the resumer to finish
        later, long after the caller was told it failed. A breaker that is half-open does not
        count as healthy: its shard has not yet answered a probe since the outage.
        """
        for shard_id in shard_ids:
            gate = self._shards.store(shard_id).shard.primary
            if not gate.healthy:
                raise gate.unavailable()

    async def _run(self, move: Move) -> MoveResult:
        # A move that is flipped needs only its source (to retire and delete the old copy).
        copying = move.state in (MoveState.COPYING, MoveState.FENCED)
        self._refuse_unless_healthy(move.source_shard, *([move.target_shard] if copying else []))
        source = self._shards.store(move.source_shard)
        target = self._shards.store(move.target_shard)
        unit, exempt = await self._unit(move)
        copied = deleted = 0
        if move.state in (MoveState.COPYING, MoveState.FENCED):
            try:
                if move.state is MoveState.COPYING:
                    copied += await transfer.copy(source, target, unit, chunk_rows=self._chunk_rows)
                    await self._passed("copied")
                    await self._confirm_lease()
                    await self._fence(source, unit, FenceState.FENCED, move, exempt)
                    await self._passed("fence_committed")
                    move = await self._log.advance(move, MoveState.FENCED, copied_rows=copied)
                    await self._passed("fenced")
                caught_up = await transfer.sync(source, target, unit)
                copied += caught_up
                await transfer.verify(source, target, unit)
                await self._await_replicas(target)
                await self._confirm_lease()
                await self._open(target, unit)
                await self._passed("target_opened")
                await self._confirm_lease()
                move = await self._log.flip(move)
            except Exception:
                await self._reopen_after_failure(source, unit, move.move_id)
                raise
            log.info(
                "move %d: %s flipped from shard %d to %d (%d rows copied, %d in the catch-up)",
                move.move_id,
                move.unit,
                move.source_shard,
                move.target_shard,
                copied,
                caught_up,
            )
            self._apply_locally(move)
            await self._passed("flipped")
        if move.state is MoveState.FLIPPED:
            self._apply_locally(move)
            await self._confirm_lease()
            await self._fence(source, unit, FenceState.MOVED, move, exempt)
            await self._passed("retired")
            await self._confirm_lease()
            deleted = await transfer.delete(source, unit)
            await self._passed("deleted")
            move = await self._log.advance(move, MoveState.DONE, deleted_rows=deleted)
        return MoveResult(move.target_shard, copied, deleted)

    async def _passed(self, step: str) -> None:
        if self._after_step is not None:
            await self._after_step(step)

    async def _await_replicas(self, target: MessageStore) -> None:
        """Before the flip, the target's replicas must show the copy: a reader sent to a replica
        (within its lag bound) right after the flip would otherwise see a dialog with holes."""
        config = next(c for c in self._shards.configs if c.shard_id == target.shard_id)
        if not config.replica_dsns:
            return
        async with shard_errors(target.shard_id), target.pool.connection() as conn:
            row = await (await conn.execute("SELECT pg_current_wal_lsn()::text")).fetchone()
        assert row is not None
        deadline = asyncio.get_running_loop().time() + self._replica_wait_seconds
        for dsn in config.replica_dsns:
            try:
                conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True, connect_timeout=5)
            except psycopg.Error as exc:
                # Unreachable, so not serving reads either; it catches up before its lag allows reads.
                log.warning(
                    "shard %d: a replica is unreachable (%s); not waiting for it", target.shard_id, exc
                )
                continue
            async with conn:
                while True:
                    cur = await conn.execute(
                        "SELECT NOT pg_is_in_recovery() OR pg_last_wal_replay_lsn() >= %s::pg_lsn", (row[0],)
                    )
                    replayed = await cur.fetchone()
                    if replayed and replayed[0]:
                        break
                    if asyncio.get_running_loop().time() > deadline:
                        raise ShardUnavailable(
                            target.shard_id,
                            f"a replica has not replayed the copy within {self._replica_wait_seconds:g} s, "
                            "so the move was not flipped",
                        )
                    await asyncio.sleep(0.05)

    def _apply_locally(self, move: Move) -> None:
        # This process reads its own write at once; the NOTIFY reaches the others.
        if move.flip is Flip.SET_OVERRIDE:
            self._router.set(move.pair, move.target_shard)
        elif move.flip is Flip.DELETE_OVERRIDE:
            self._router.discard(move.pair)
        else:
            self._router.flip_units(units_of_move(move.buckets, move.source_shard, move.target_shard))

    async def _fence(
        self, store: MessageStore, unit: transfer.Unit, state: FenceState, move: Move, exempt: list[FenceKey]
    ) -> None:
        async with shard_errors(store.shard_id), store.pool.connection() as conn:
            await FenceStore(store.table).set(conn, unit.fence_keys(), state, move.move_id, exempt=exempt)

    async def _open(self, store: MessageStore, unit: transfer.Unit) -> None:
        keep = [pair_fence_key(p) for p in unit.pinned]
        async with shard_errors(store.shard_id), store.pool.connection() as conn:
            await FenceStore(store.table).open(conn, unit.fence_keys(), keep=keep)

    async def _reopen_after_failure(self, source: MessageStore, unit: transfer.Unit, move_id: int) -> None:
        """If routing certainly still names the source, let its writers in again; a re-run resumes the copy.

        The recorded state decides, not what this process believes: a flip whose commit was
        acknowledged ambiguously must never be followed by re-opening the old shard.
        """
        try:
            # Without the lock another mover may be running this very move: it owns the fence now.
            await self._confirm_lease()
            move = await self._log.get(move_id)
            if move.state not in (MoveState.COPYING, MoveState.FENCED):
                return
            await self._open(source, unit)
            if move.state is MoveState.FENCED:
                await self._log.advance(move, MoveState.COPYING)
        except Exception as exc:  # the original failure matters more; the fence waits for a re-run
            log.warning(
                "move %d: shard %d stays fenced until the move is re-run (%s)", move_id, source.shard_id, exc
            )

    @contextlib.asynccontextmanager
    async def exclusive(self, *, wait_seconds: float | None = None) -> AsyncIterator[MoverLease]:
        """Hold the cluster-wide mover lock (see `mover_lock`); MoverBusy after `wait_seconds`.

        While it is held, every step of `run` that changes a fence, the data or the move's record
        first confirms the lease: a mover whose lock went with its control connection stops there.
        """
        wait = self._lock_wait_seconds if wait_seconds is None else wait_seconds
        async with mover_lock(self._control_dsn, wait) as lease:
            outer, self._lease = self._lease, lease
            try:
                yield lease
            finally:
                self._lease = outer

    async def _confirm_lease(self) -> None:
        if self._lease is not None:
            await self._lease.confirm()


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Retrieve the outcome of a move nobody awaits any more, so asyncio does not log it as lost."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("a move its caller gave up on failed: %s", task.exception())


class MoverBusy(FailedPrecondition):
    """Another mover held the lock for longer than the caller would wait."""

    default_reason = "MOVE_IN_PROGRESS"


class ManualPin(FailedPrecondition):
    """An automatic move of a pair an operator pinned: the operator's pin stays."""

    default_reason = "PAIR_PINNED"


class MoverLease:
    """The mover lock as held by one session: valid exactly while that session is alive.

    A session advisory lock ends with its connection. If the control database drops the
    connection (a crash, a restart, a failover), another server's resumer may take the lock and
    run the same move: the old mover must find out before its next step, not carry on beside it.
    """

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._conn = conn

    async def confirm(self) -> None:
        """Return if the lock is still held (its session answers); MoverLockLost otherwise."""
        try:
            async with asyncio.timeout(_LEASE_CONFIRM_SECONDS):
                await self._conn.execute("SELECT 1")
        except (psycopg.Error, OSError, TimeoutError) as exc:
            cause = "no answer" if isinstance(exc, TimeoutError) else describe_db_error(exc)
            raise MoverLockLost(cause) from None


class MoverLockLost(ControlUnavailable):
    """The mover's lock went with its control-database session; the move stops where it is."""

    def __init__(self, cause: str) -> None:
        super().__init__(
            f"the mover lost its lock with its connection ({cause}); the move stops and is completed "
            "once the control database is back"
        )


@contextlib.asynccontextmanager
async def mover_lock(
    control_dsn: str, wait_seconds: float = 60.0, *, application_name: str = "dialog-shard mover"
) -> AsyncIterator[MoverLease]:
    """Hold the cluster-wide mover lock (a session advisory lock on its own connection).

    Moves, reshard steps, `dialogctl verify --repair` and `dialogctl backup` of more than one item
    take it, so none of them sees another's half-done unit. `application_name` names the holder in
    pg_stat_activity.
    """
    try:
        conn = await psycopg.AsyncConnection.connect(
            control_dsn, autocommit=True, connect_timeout=10, application_name=application_name
        )
    except psycopg.Error as exc:
        raise ControlUnavailable(describe_db_error(exc)) from None
    async with conn:
        deadline = asyncio.get_running_loop().time() + wait_seconds
        while True:
            row = await (await conn.execute("SELECT pg_try_advisory_lock(%s)", (MOVER_LOCK,))).fetchone()
            if row and row[0]:
                break
            if asyncio.get_running_loop().time() > deadline:
                raise MoverBusy(
                    "another move, reshard, repair or backup holds the movers' lock and did not "
                    f"finish within {wait_seconds:g} s; retry when it is done"
                )
            await asyncio.sleep(0.1)
        try:
            yield MoverLease(conn)
        finally:
            with contextlib.suppress(psycopg.Error):
                await conn.execute("SELECT pg_advisory_unlock(%s)", (MOVER_LOCK,))
