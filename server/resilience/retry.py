"""Which shard failures are worth another attempt, and how long to wait before it.

Pure functions; `ShardGate.run` applies them inside the RPC's deadline.
"""

from __future__ import annotations

import random

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import PoolTimeout, TooManyRequests

#: Errors after which the statement certainly did not run (no connection was ever handed out).
NOT_SENT = (PoolTimeout, TooManyRequests)
#: Errors that roll the whole statement back: a retry is safe even for a write.
ROLLED_BACK = (pg_errors.SerializationFailure, pg_errors.DeadlockDetected)


def is_shard_failure(exc: BaseException) -> bool:
    """The shard (its server or the way to it) failed, as opposed to the statement being refused.

    Counted by the circuit breaker: a lost connection, an administrator shutdown (57P01),
    a server that does not accept connections, a pool that cannot hand one out in time.
    """
    if isinstance(exc, ROLLED_BACK):  # OperationalError subclasses, but the server is fine
        return False
    return isinstance(exc, psycopg.OperationalError | PoolTimeout | TooManyRequests)


def is_transient(exc: BaseException) -> bool:
    """Another attempt may succeed: a shard failure, or a serialization failure or deadlock."""
    return is_shard_failure(exc) or isinstance(exc, ROLLED_BACK)


def may_have_run(exc: BaseException) -> bool:
    """Whether the statement may have taken effect before `exc` (outcome unknown)."""
    return not isinstance(exc, NOT_SENT + ROLLED_BACK)


def backoff(attempt: int, *, base: float, maximum: float, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff before attempt `attempt + 1` (attempt counts from 1)."""
    cap = min(maximum, base * (2 ** (attempt - 1)))
    return (rng or random).uniform(0.0, cap)
