"""The automatic rebalancer: moves hot pairs off a hot shard, one server of the cluster at a time.

Every server runs one (with `[rebalance] auto = true`); each round (`interval` seconds) it tries to
hold the rebalancer's session advisory lock on a connection of its own to the control database.
The one that holds it acts; the lock goes with that connection, so when its server dies (or loses
the control database) another server takes it at its next round.

A round of the leader:

1. pauses (and says why) while the control database is unavailable, a routed shard's primary is
   not healthy, a reshard runs, or a move is unfinished;
2. reads the signals: each routed shard's recent activity (server.storage.activity, one index
   range per shard) or, `by = "size"`, PostgreSQL's row estimate per shard and an index count per
   candidate pair; activity recorded before a pair moved counts where the pair is now;
3. decides (server.routing.rebalance.decide) with the pairs pinned by an operator or moved within
   the cool-down frozen, and at most what the budgets leave (moves per hour over all servers,
   counted in rebalance_decisions; moves per round);
4. records the round, every skipped candidate and every move in rebalance_decisions, logs one
   line per decision (logger `server.moves.rebalancer`, with its fields), and counts it;
5. makes the moves through the online mover (`Mover.move_pair(automatic=True)`: the override is
   marked automatic, a pair an operator pinned meanwhile is left alone), never waiting for the
   movers' lock, and waits after each move so rows move at most at `rows_per_second` on average.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from server.background import repeat_every, stop_task
from server.config import RebalanceConfig
from server.moves.mover import ManualPin, Mover, MoverBusy
from server.observability.metrics import RebalancerStats
from server.resilience import ShardGate
from server.routing import Pair
from server.routing.rebalance import (
    Decision,
    Outcome,
    PairLoad,
    Policy,
    Proposal,
    attribute,
    decide,
    moves_allowed,
    pause_after,
)
from server.storage.activity import pairs_messages, shard_activity
from server.storage.overrides import OverrideRow, OverrideStore
from server.storage.pools import ShardSet
from server.storage.rebalance_log import LEADER_APPLICATION_NAME, REBALANCER_LOCK, RebalanceLog

log = logging.getLogger(__name__)

#: Seconds the lock's connection may take to answer before leadership counts as lost.
_LEASE_CONFIRM_SECONDS = 5.0
#: Seconds a round's reading of the signals may take.
_SIGNALS_TIMEOUT = 30.0


class LeaderLease:
    """The rebalancer lock, held by a session on a dedicated control-database connection."""

    def __init__(self, control_dsn: str, instance: str) -> None:
        self._dsn = control_dsn
        self._instance = instance
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self.held = False

    async def hold(self) -> bool:
        """True while this process holds the lock: confirm it, or try to take it."""
        try:
            async with asyncio.timeout(_LEASE_CONFIRM_SECONDS):
                if self._conn is None or self._conn.closed:
                    self._conn = await psycopg.AsyncConnection.connect(
                        self._dsn,
                        autocommit=True,
                        connect_timeout=5,
                        application_name=f"{LEADER_APPLICATION_NAME} {self._instance}"[:63],
                    )
                    self.held = False
                if self.held:
                    await self._conn.execute("SELECT 1")
                else:
                    cur = await self._conn.execute("SELECT pg_try_advisory_lock(%s)", (REBALANCER_LOCK,))
                    row = await cur.fetchone()
                    self.held = bool(row and row[0])
                    if self.held:
                        log.info("this server's rebalancer acts for the cluster (it holds the lock)")
        except (psycopg.Error, OSError, TimeoutError) as exc:
            if self.held:
                log.warning("the rebalancer lost its lock with its connection (%s)", exc)
            await self.release()
        return self.held

    async def release(self) -> None:
        """Give the lock up (closing the connection ends the session, and the lock with it)."""
        self.held = False
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                await conn.close()


class Rebalancer:
    """The automatic rebalancer's background task; an async context manager (see the module doc)."""

    def __init__(
        self,
        config: RebalanceConfig,
        mover: Mover,
        shards: ShardSet,
        *,
        control: ShardGate,
        control_pool: AsyncConnectionPool[Any],
        control_dsn: str,
        instance: str | None = None,
    ) -> None:
        """`mover` should not wait for the movers' lock (`lock_wait_seconds=0`): a busy lock skips
        the round's moves. `control` is the control database's gate, `control_pool` its pool."""
        self._config = config
        self._mover = mover
        self._router = mover.router
        self._shards = shards
        self._control = control
        self._overrides = OverrideStore(control_pool)
        self.instance = instance or f"{socket.gethostname()}:{os.getpid()}"
        self._lease = LeaderLease(control_dsn, self.instance)
        self._log = RebalanceLog(control_pool, self.instance)
        self._task: asyncio.Task[None] | None = None
        self.stats = RebalancerStats()

    async def __aenter__(self) -> Rebalancer:
        self._task = repeat_every(
            self._config.interval,
            self.round,
            name="rebalancer",
            # A shard or the control database failing mid-round: the next round starts afresh.
            retry_on=(Exception,),
            on_failure=lambda exc: log.warning(
                "rebalance round failed (%s); next in %g s", exc, self._config.interval
            ),
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await stop_task(self._task)
        self._task = None
        await self._lease.release()
        self.stats.leader = False

    async def round(self) -> Decision | None:
        """One round: act if this process holds the lock; None when another server does."""
        self.stats.leader = await self._lease.hold()
        if not self.stats.leader:
            return None
        paused = await self._paused()
        if paused is not None:
            decision = Decision(Outcome.PAUSED, paused, {})
        else:
            async with asyncio.timeout(_SIGNALS_TIMEOUT):
                decision = await self._decide()
        await self._report(decision)
        if decision.moves:
            await self._make_moves(decision)
        return decision

    async def _paused(self) -> str | None:
        if not self._control.available:
            return "the control database is unavailable"
        router = self._router
        unhealthy = [s for s in range(router.num_shards) if not self._shards.store(s).shard.primary.healthy]
        if unhealthy:
            return f"shard(s) {', '.join(map(str, unhealthy))} not healthy"
        if router.target_shards is not None:
            return f"a reshard to {router.target_shards} shards runs"
        unfinished = await self._control.guard(self._mover.log.all_unfinished())
        if unfinished:
            return f"move {unfinished[0].move_id} ({unfinished[0].unit}) is unfinished"
        return None

    async def _decide(self) -> Decision:
        config = self._config
        router = self._router
        routed = range(router.num_shards)
        stores = [self._shards.store(s) for s in routed]
        activity = await asyncio.gather(
            *(shard_activity(s, config.window, top=config.candidates) for s in stores)
        )

        def route(pair: Pair) -> int:
            return router.resolve(pair.low, pair.high).shard_id

        if config.by == "rate":
            recorded = {a.shard_id: a.messages / config.window for a in activity}
            recorded_pairs = [
                PairLoad(r.pair, a.shard_id, r.messages / config.window) for a in activity for r in a.pairs
            ]
        else:
            estimates = await asyncio.gather(*(s.estimate() for s in stores))
            recorded = {s.shard_id: float(n) for s, n in zip(stores, estimates, strict=True)}
            where: dict[int, list[Pair]] = {}
            for pair in {r.pair for a in activity for r in a.pairs}:
                where.setdefault(route(pair), []).append(pair)
            sizes = await asyncio.gather(
                *(pairs_messages(self._shards.store(s), ps) for s, ps in where.items() if s in recorded)
            )
            recorded_pairs = [PairLoad(p, route(p), float(n)) for found in sizes for p, n in found.items()]
        loads, candidates = attribute(recorded, recorded_pairs, route)
        frozen = self._frozen(
            await self._control.guard(self._overrides.of_pairs([c.pair for c in candidates]))
        )
        done = await self._control.guard(self._log.moves_within(3600.0))
        allowed = moves_allowed(
            done, per_hour=config.max_moves_per_hour, per_round=config.max_moves_per_round
        )
        policy = Policy(config.threshold, config.settle, config.min_improvement, allowed)
        return decide(loads, candidates, policy, frozen=frozen)

    def _frozen(self, overrides: Mapping[Pair, OverrideRow]) -> dict[Pair, str]:
        frozen: dict[Pair, str] = {}
        now = datetime.now(UTC)
        for pair, row in overrides.items():
            if not row.automatic:
                frozen[pair] = f"pinned to shard {row.shard_id} by an operator"
                continue
            age = (now - row.created_at).total_seconds()
            if age < self._config.cooldown:
                frozen[pair] = (
                    f"moved by the rebalancer {age:.0f} s ago (cool-down {self._config.cooldown:g} s)"
                )
        return frozen

    async def _report(self, decision: Decision) -> None:
        stats = self.stats
        stats.rounds[decision.outcome] += 1
        stats.imbalance = decision.ratio
        stats.last_round_at, stats.last_outcome, stats.last_reason = (
            time.time(),
            decision.outcome,
            decision.reason,
        )
        stats.skipped += len(decision.skipped)
        fields = {
            "outcome": str(decision.outcome),
            "loads": {str(s): round(v, 6) for s, v in sorted(decision.loads.items())},
            "moves": [[m.pair.low, m.pair.high, m.source, m.target] for m in decision.moves],
        }
        level = logging.DEBUG if decision.outcome in (Outcome.BALANCED, Outcome.IDLE) else logging.INFO
        log.log(level, "rebalance: %s: %s", decision.outcome, decision.reason, extra=fields)
        for skip in decision.skipped:
            log.info(
                "rebalance: left pair (%d, %d) on shard %d: %s",
                skip.pair.low,
                skip.pair.high,
                skip.shard_id,
                skip.reason,
                extra={"outcome": "skip", "pair": [skip.pair.low, skip.pair.high], "shard": skip.shard_id},
            )
        if decision.outcome is Outcome.PAUSED and not self._control.available:
            return  # nowhere to record it; the log line and the metrics say it
        await self._control.guard(self._record(decision))

    async def _record(self, decision: Decision) -> None:
        await self._log.add("round", decision.outcome, decision.reason, loads=decision.loads)
        for skip in decision.skipped:
            await self._log.add(
                "skip", "skipped", skip.reason, pair=skip.pair, source=skip.shard_id, load=skip.load
            )
        await self._log.prune()

    async def _make_moves(self, decision: Decision) -> None:
        mover = self._mover
        for move in decision.moves:
            try:
                result = await self._control.guard(mover.move_pair(move.pair, move.target, automatic=True))
            except ManualPin as exc:
                self.stats.skipped += 1
                log.info("rebalance: left pair (%d, %d): %s", move.pair.low, move.pair.high, exc.message)
                await self._control.guard(self._log_move("skip", exc.message, move))
                continue
            except MoverBusy:
                reason = "another move, reshard, repair or backup holds the movers' lock; next round"
                self.stats.skipped += 1
                log.info("rebalance: stopped: %s", reason)
                await self._control.guard(self._log_move("skip", reason, move))
                return
            except Exception as exc:
                self.stats.failed_moves += 1
                log.warning("rebalance: moving pair (%d, %d) failed: %s", move.pair.low, move.pair.high, exc)
                with contextlib.suppress(Exception):
                    await self._control.guard(self._log_move("failed", str(exc), move))
                return
            rows = result.copied_rows
            self.stats.moves += 1
            self.stats.rows_moved += rows
            log.info(
                "rebalance: moved pair (%d, %d) from shard %d to %d (%d rows, load %.3g)",
                move.pair.low,
                move.pair.high,
                move.source,
                move.target,
                rows,
                move.load,
                extra={"outcome": "moved", "pair": [move.pair.low, move.pair.high], "rows": rows},
            )
            await self._control.guard(self._log_move("move", decision.reason, move, rows))
            await asyncio.sleep(pause_after(rows, self._config.rows_per_second))

    async def _log_move(self, kind: str, reason: str, move: Proposal, rows: int | None = None) -> None:
        outcome = {"move": "moved", "skip": "skipped"}.get(kind, kind)
        await self._log.add(
            kind,
            outcome,
            reason,
            pair=move.pair,
            source=move.source,
            target=move.target,
            load=move.load,
            rows_moved=rows,
        )
