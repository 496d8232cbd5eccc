"""Completing moves whose mover died, from any server (server.moves.mover).

A move that crashed after fencing its unit keeps that unit's writes paused (the
retryable DIALOG_MOVING) until someone runs it again. So every server looks, every
few seconds, for unfinished moves whose record has not changed for
`resilience.move_resume_after` seconds. If the movers' lock is free, no mover is
alive (a session advisory lock dies with its process's connection): the server
takes the lock and runs those moves to the end, exactly as a re-run would.

Only the move in flight is completed. A reshard's remaining steps wait for the
operator's `dialogctl reshard` (routing is correct in between, just mixed).
"""

from __future__ import annotations

import asyncio
import logging

from server.background import repeat_every, stop_task
from server.moves.mover import Mover, MoverBusy
from server.resilience import ShardGate

log = logging.getLogger(__name__)


class MoveResumer:
    """Background task: completes stale unfinished moves when no mover holds the lock."""

    def __init__(self, mover: Mover, *, after: float, control: ShardGate | None = None) -> None:
        self._mover = mover
        # The control database's gate: while it is down, there is nothing to look at (nor a
        # warning to log every round); once it is back, the next round completes the moves.
        self._control = control
        self._after = after
        self._interval = min(max(after / 2, 0.2), 10.0)
        self._task: asyncio.Task[None] | None = None
        #: Moves this process completed.
        self.resumed = 0

    async def start(self) -> None:
        if self._after > 0:
            self._task = repeat_every(
                self._interval,
                self.resume_once,
                name="move-resumer",
                # A shard or the control database is down: try again next time.
                retry_on=(Exception,),
                on_failure=lambda exc: log.warning(
                    "resuming unfinished moves failed (%s); retrying in %.1f s", exc, self._interval
                ),
            )

    async def stop(self) -> None:
        await stop_task(self._task)
        self._task = None

    async def resume_once(self) -> int:
        """Complete the stale unfinished moves if no mover is alive; returns how many."""
        if self._control is None:
            return await self._resume_once()
        if not self._control.available:
            return 0
        return await self._control.guard(self._resume_once())

    async def _resume_once(self) -> int:
        if not await self._mover.log.stale(self._after):
            return 0
        try:
            async with self._mover.exclusive(wait_seconds=0):
                # Re-read under the lock: the mover that held it a moment ago may have finished.
                stale = await self._mover.log.stale(self._after)
                for move in stale:
                    log.warning(
                        "move %d (shard %d -> %d, %s) was left %s by a mover that is gone; completing it",
                        move.move_id,
                        move.source_shard,
                        move.target_shard,
                        move.unit,
                        move.state,
                    )
                    await self._mover.run(move)
                    self.resumed += 1
                return len(stale)
        except MoverBusy:
            return 0  # a mover is alive: it owns its move
