"""SQL of `rebalance_decisions` (control database): what the automatic rebalancer saw, did and skipped.

One row per round (`round`: the loads it saw, its outcome and reason), per move made (`move`), per
candidate left alone (`skip`) and per move that failed (`failed`). The moves of the last hour are
the hourly budget of whichever server acts; `dialogctl rebalance --status` reads the rest. Rows
older than a day are pruned by the rebalancer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from server.errors import CONTROL_SHARD
from server.resilience.db_errors import shard_errors
from server.routing import Pair

#: Session advisory lock (control database) of the one server whose rebalancer acts.
REBALANCER_LOCK = 0x72626C6E
#: application_name of the leader's lock connection (`dialogctl rebalance --status` names it).
LEADER_APPLICATION_NAME = "dialog-shard rebalancer"
#: Rows older than this are pruned.
KEEP_SECONDS = 86400.0


@dataclass(frozen=True, slots=True)
class Entry:
    """One row of rebalance_decisions."""

    decision_id: int
    decided_at: datetime
    instance: str
    kind: str
    outcome: str
    pair: Pair | None
    source_shard: int | None
    target_shard: int | None
    load: float | None
    rows_moved: int | None
    reason: str
    loads: dict[str, float] | None


_COLUMNS = (
    "decision_id, decided_at, instance, kind, outcome, user_low, user_high, source_shard, target_shard, "
    "load, rows_moved, reason, loads"
)


def _entry(row: tuple[Any, ...]) -> Entry:
    pair = Pair(row[5], row[6]) if row[5] is not None else None
    return Entry(row[0], row[1], row[2], row[3], row[4], pair, *row[7:])


class RebalanceLog:
    """Writes and reads rebalance_decisions."""

    def __init__(self, pool: AsyncConnectionPool[Any], instance: str) -> None:
        self.pool = pool
        self.instance = instance

    async def add(
        self,
        kind: str,
        outcome: str,
        reason: str,
        *,
        pair: Pair | None = None,
        source: int | None = None,
        target: int | None = None,
        load: float | None = None,
        rows_moved: int | None = None,
        loads: Mapping[int, float] | None = None,
    ) -> None:
        async with shard_errors(CONTROL_SHARD), self.pool.connection() as conn:
            await conn.execute(
                """
                INSERT INTO rebalance_decisions (instance, kind, outcome, user_low, user_high, source_shard,
                    target_shard, load, rows_moved, reason, loads)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
                """,
                (
                    self.instance,
                    kind,
                    outcome,
                    pair.low if pair else None,
                    pair.high if pair else None,
                    source,
                    target,
                    load,
                    rows_moved,
                    reason,
                    Jsonb({str(s): v for s, v in sorted(loads.items())}) if loads is not None else None,
                ),
            )

    async def moves_within(self, seconds: float) -> int:
        """Moves made by any server's rebalancer within the last `seconds`."""
        async with shard_errors(CONTROL_SHARD), self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT count(*) FROM rebalance_decisions WHERE kind = 'move' "
                "AND decided_at > now() - make_interval(secs => %s)",
                (seconds,),
            )
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def prune(self) -> None:
        async with shard_errors(CONTROL_SHARD), self.pool.connection() as conn:
            await conn.execute(
                "DELETE FROM rebalance_decisions WHERE decided_at < now() - make_interval(secs => %s)",
                (KEEP_SECONDS,),
            )


async def latest_entries(
    conn: AsyncConnection[Any], *, moves_within: float = 3600.0, limit: int = 50
) -> tuple[Entry | None, list[Entry], list[Entry]]:
    """(the last round, its skips and failures, the moves within `moves_within` seconds, newest first)."""
    cur = await conn.execute(
        f"SELECT {_COLUMNS} FROM rebalance_decisions WHERE kind = 'round' ORDER BY decision_id DESC LIMIT 1"
    )
    row = await cur.fetchone()
    last = _entry(row) if row else None
    skipped: list[Entry] = []
    if last is not None:
        cur = await conn.execute(
            f"SELECT {_COLUMNS} FROM rebalance_decisions WHERE kind IN ('skip', 'failed') "
            "AND decision_id > %s ORDER BY decision_id LIMIT %s",
            (last.decision_id, limit),
        )
        skipped = [_entry(r) for r in await cur.fetchall()]
    cur = await conn.execute(
        f"SELECT {_COLUMNS} FROM rebalance_decisions WHERE kind IN ('move', 'failed') "
        "AND decided_at > now() - make_interval(secs => %s) ORDER BY decision_id DESC LIMIT %s",
        (moves_within, limit),
    )
    return last, skipped, [_entry(r) for r in await cur.fetchall()]


async def leader(conn: AsyncConnection[Any]) -> str | None:
    """The application_name of the session holding the rebalancer lock (None: no server acts)."""
    cur = await conn.execute(
        """
        SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
        WHERE l.locktype = 'advisory' AND l.granted AND l.database = (
            SELECT oid FROM pg_database WHERE datname = current_database())
          AND ((l.classid::bigint << 32) | l.objid::bigint) = %s
        """,
        (REBALANCER_LOCK,),
    )
    row = await cur.fetchone()
    return str(row[0]) if row else None
