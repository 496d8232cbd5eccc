"""The control database's record of moves: one row per unit moving between shards.

A move goes `copying -> fenced -> flipped -> done`; each state says which steps
are certainly complete, so a re-run after a crash continues from there. At most
one unfinished move exists per unit (a pair, or a bucket with user_low =
user_high = 0). The routing flip and the `flipped` state commit in one
transaction with the shard_map change and its NOTIFY.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from server.errors import CONTROL_SHARD, FailedPrecondition
from server.resilience.db_errors import shard_errors
from server.routing import Pair
from server.storage.layout import flip_units_in
from server.storage.overrides import delete_override_in, upsert_override_in


class MoveTakenOver(FailedPrecondition):
    """The move's record is no longer in the state this mover left it in: another mover runs it."""

    default_reason = "MOVE_IN_PROGRESS"


class MoveState(enum.StrEnum):
    COPYING = "copying"
    FENCED = "fenced"
    FLIPPED = "flipped"
    DONE = "done"


class Flip(enum.StrEnum):
    """What changes in routing when the move flips."""

    #: shard_map pins the pair to the target shard.
    SET_OVERRIDE = "set_override"
    #: the pair's shard_map row goes away: the target is its hash shard.
    DELETE_OVERRIDE = "delete_override"
    #: the buckets' units move to their shard under the new shard count (resharding).
    BUCKET = "bucket"


@dataclass(frozen=True, slots=True)
class Move:
    """One row of shard_moves."""

    move_id: int
    bucket: int
    low: int
    high: int
    source_shard: int
    target_shard: int
    flip: Flip
    state: MoveState
    copied_rows: int
    #: The buckets of a bucket move (resharding); a pair move's is its pair's bucket.
    buckets: tuple[int, ...]
    #: A full reshuffle's bucket move takes only the pairs with `hash % residue_modulus`
    #: equal to the target shard; None: all of the buckets' pairs on the source.
    residue_modulus: int | None = None
    #: ... and, with `source_modulus`, `hash % source_modulus` equal to the source shard.
    source_modulus: int | None = None
    #: Seconds since the record last changed, when it was read.
    idle_seconds: float = 0.0
    #: A move of the automatic rebalancer: the override it sets is marked automatic.
    automatic: bool = False

    @property
    def pair(self) -> Pair:
        return Pair(self.low, self.high)

    @property
    def is_pair(self) -> bool:
        return self.low != 0

    @property
    def unit(self) -> str:
        """What moves, for logs: the pair, or how many buckets."""
        return f"pair ({self.low}, {self.high})" if self.is_pair else f"{len(self.buckets)} bucket(s)"

    def with_state(self, state: MoveState) -> Move:
        return dataclasses.replace(self, state=state)


_COLUMNS = (
    "move_id, bucket, user_low, user_high, source_shard, target_shard, flip, state, copied_rows, buckets, "
    "residue_modulus, source_modulus, extract(epoch FROM now() - updated_at)::float8, automatic"
)


def _move(row: tuple[Any, ...]) -> Move:
    buckets = tuple(row[9]) if row[9] else (row[1],)
    return Move(*row[:6], Flip(row[6]), MoveState(row[7]), row[8], buckets, *row[10:])  # type: ignore[call-arg]


class MoveLog:
    """SQL of the shard_moves table."""

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self.pool = pool

    async def unfinished(self, bucket: int, low: int, high: int) -> Move | None:
        async with shard_errors(CONTROL_SHARD), self.pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT {_COLUMNS} FROM shard_moves WHERE bucket = %s AND user_low = %s AND user_high = %s"
                " AND state <> 'done'",
                (bucket, low, high),
            )
            row = await cur.fetchone()
        return _move(row) if row else None

    async def all_unfinished(self, *, flip: Flip | None = None) -> list[Move]:
        async with shard_errors(CONTROL_SHARD), self.pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT {_COLUMNS} FROM shard_moves WHERE state <> 'done' "
                "AND (%s::text IS NULL OR flip = %s) ORDER BY move_id",
                (flip and str(flip), flip and str(flip)),
            )
            return [_move(r) for r in await cur.fetchall()]

    async def stale(self, idle_seconds: float) -> list[Move]:
        """Unfinished moves whose record has not changed for `idle_seconds`, oldest first."""
        async with shard_errors(CONTROL_SHARD), self.pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT {_COLUMNS} FROM shard_moves WHERE state <> 'done' "
                "AND updated_at < now() - make_interval(secs => %s) ORDER BY move_id",
                (idle_seconds,),
            )
            return [_move(r) for r in await cur.fetchall()]

    async def get(self, move_id: int) -> Move:
        async with shard_errors(CONTROL_SHARD), self.pool.connection() as conn:
            cur = await conn.execute(f"SELECT {_COLUMNS} FROM shard_moves WHERE move_id = %s", (move_id,))
            row = await cur.fetchone()
        assert row is not None
        return _move(row)

    async def create(
        self,
        buckets: tuple[int, ...],
        low: int,
        high: int,
        source_shard: int,
        target_shard: int,
        flip: Flip,
        residue_modulus: int | None = None,
        source_modulus: int | None = None,
        *,
        automatic: bool = False,
    ) -> Move:
        async with shard_errors(CONTROL_SHARD), self.pool.connection() as conn:
            cur = await conn.execute(
                f"""
                INSERT INTO shard_moves (bucket, buckets, user_low, user_high, source_shard, target_shard,
                                         flip, state, residue_modulus, source_modulus, automatic)
                VALUES (%s, %s, %s, %s, %s, %s, %s, 'copying', %s, %s, %s) RETURNING {_COLUMNS}
                """,
                (
                    buckets[0],
                    list(buckets),
                    low,
                    high,
                    source_shard,
                    target_shard,
                    str(flip),
                    residue_modulus,
                    source_modulus,
                    automatic,
                ),
            )
            row = await cur.fetchone()
        assert row is not None
        return _move(row)

    async def advance(
        self, move: Move, state: MoveState, *, copied_rows: int = 0, deleted_rows: int = 0
    ) -> Move:
        async with shard_errors(CONTROL_SHARD), self.pool.connection() as conn:
            await self._set_state(conn, move, state, copied_rows, deleted_rows)
        return move.with_state(state)

    async def flip(self, move: Move) -> Move:
        """Change routing (shard_map or unit_flips, with NOTIFY) and mark the move flipped, atomically."""
        async with shard_errors(CONTROL_SHARD), self.pool.connection() as conn, conn.transaction():
            # The state first: if another mover moved the record on, nothing of the flip commits.
            await self._set_state(conn, move, MoveState.FLIPPED, 0, 0)
            if move.flip is Flip.SET_OVERRIDE:
                await upsert_override_in(conn, move.pair, move.target_shard, automatic=move.automatic)
            elif move.flip is Flip.DELETE_OVERRIDE:
                await delete_override_in(conn, move.pair)
            else:
                await flip_units_in(conn, move.buckets, move.source_shard, move.target_shard)
        return move.with_state(MoveState.FLIPPED)

    @staticmethod
    async def _set_state(
        conn: AsyncConnection[Any], move: Move, state: MoveState, copied_rows: int, deleted_rows: int
    ) -> None:
        """Move the record from the state `move` says it is in to `state` (compare and set)."""
        cur = await conn.execute(
            """
            UPDATE shard_moves SET state = %s, copied_rows = copied_rows + %s,
                   deleted_rows = deleted_rows + %s, updated_at = now()
            WHERE move_id = %s AND state = %s
            """,
            (str(state), copied_rows, deleted_rows, move.move_id, str(move.state)),
        )
        if cur.rowcount != 1:
            raise MoveTakenOver(
                f"move {move.move_id} is no longer {move.state}: another mover has taken it over"
            )
