"""The current RPC's deadline, carried from the gRPC edge to the shard calls in a contextvar.

`DeadlineInterceptor` sets it from `context.time_remaining()`; `ShardGate` reads it
to bound pool waits, statement time and retries. Outside an RPC (startup, tools)
there is no deadline and only the configured ceilings apply.
"""

from __future__ import annotations

import time
from contextvars import ContextVar

#: Absolute `time.monotonic()` by which the current RPC must answer; None: no deadline.
rpc_deadline: ContextVar[float | None] = ContextVar("rpc_deadline", default=None)


def remaining(ceiling: float) -> tuple[float, bool]:
    """Seconds left for the next step, at most `ceiling`; and whether the RPC deadline is the bound."""
    deadline = rpc_deadline.get()
    if deadline is None:
        return ceiling, False
    left = deadline - time.monotonic()
    if left < ceiling:
        return left, True
    return ceiling, False
