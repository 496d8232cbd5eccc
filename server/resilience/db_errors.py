"""Turns driver and pool failures of one shard into the domain's ShardUnavailable (or DialogMoving).

The gates, monitors and every storage module share this mapping, so it sits below them all.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg
from psycopg_pool import PoolTimeout, TooManyRequests

from server.errors import DialogMoving, unavailable

#: SQLSTATE raised by the move fence's functions (server.storage.fences; class "DS": dialog-shard's own).
FENCED_SQLSTATE = "DSM01"
#: SQLSTATE of a fence change whose wait for older writers ran out (server.storage.fences).
WRITERS_IN_FLIGHT_SQLSTATE = "DSM02"


def describe_db_error(exc: BaseException) -> str:
    """One line naming the failure, without SQL, parameters or credentials."""
    if isinstance(exc, PoolTimeout):
        return "no connection available in time"
    if isinstance(exc, TooManyRequests):
        return "too many requests waiting for a connection"
    text = " ".join(str(exc).split())
    for marker in ("Connection refused", "timeout expired", "terminating connection", "server closed"):
        if marker.lower() in text.lower():
            return marker.lower()
    return type(exc).__name__


@asynccontextmanager
async def shard_errors(shard_id: int) -> AsyncIterator[None]:
    """Map connection-level failures inside the block to ShardUnavailable(shard_id) (ControlUnavailable
    for CONTROL_SHARD), a fenced unit (server.storage.fences) to DialogMoving(shard_id), and a fence
    change whose writers did not finish in time to ShardUnavailable(shard_id) with that message."""
    try:
        yield
    except psycopg.Error as exc:
        if exc.sqlstate == FENCED_SQLSTATE:
            raise DialogMoving(shard_id) from None
        if exc.sqlstate == WRITERS_IN_FLIGHT_SQLSTATE:
            raise unavailable(shard_id, exc.diag.message_primary or "writers still in flight") from None
        if isinstance(exc, psycopg.OperationalError):
            raise unavailable(shard_id, describe_db_error(exc)) from exc
        raise
    except (PoolTimeout, TooManyRequests) as exc:
        raise unavailable(shard_id, describe_db_error(exc)) from exc
