"""One shard as the service sees it: its primary, its replicas, where reads go, and its state.

Writes go to the primary's gate. Reads that may be slightly stale (dialog pages) go to a
replica whose measured lag is within `replica_max_lag` when `replica_reads` is on, else to the
primary; when the primary is unavailable they go to any available replica whatever its lag, so a
shard whose primary is down stays readable while its writes fail with UNAVAILABLE.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from psycopg_pool import AsyncConnectionPool

from server.config import ResilienceConfig
from server.errors import ShardUnavailable
from server.resilience.breaker import BreakerState
from server.resilience.gate import Operation, ShardGate, T
from server.resilience.monitor import EndpointMonitor


@dataclass(frozen=True, slots=True)
class EndpointState:
    """A snapshot of one endpoint (primary or replica) of a shard."""

    role: str
    #: host:port/dbname, never credentials.
    location: str
    #: Calls are let through (breaker not open, reached at least once).
    available: bool
    breaker: BreakerState
    #: Failed calls in a row (reset by a success).
    consecutive_failures: int
    #: Times the breaker opened since the server started.
    breaker_trips: int
    #: Why the last call or probe failed; None while healthy.
    last_error: str | None
    #: Replication lag in seconds (replicas only; None when unknown).
    lag_seconds: float | None


@dataclass(frozen=True, slots=True)
class ShardState:
    """A snapshot of a shard: what health checks, metrics and the admin API report."""

    shard_id: int
    primary: EndpointState
    replicas: tuple[EndpointState, ...]

    @property
    def writable(self) -> bool:
        return self.primary.available

    @property
    def readable(self) -> bool:
        return self.primary.available or any(r.available for r in self.replicas)


def _endpoint_state(monitor: EndpointMonitor) -> EndpointState:
    gate = monitor.gate
    return EndpointState(
        role=gate.role,
        location=gate.location,
        available=gate.available,
        breaker=gate.breaker.state,
        consecutive_failures=gate.breaker.consecutive_failures,
        breaker_trips=gate.breaker.trips,
        last_error=gate.last_error,
        lag_seconds=monitor.lag_seconds,
    )


class Shard:
    """The gates and monitors of one shard's primary and replicas."""

    def __init__(
        self, primary: EndpointMonitor, replicas: list[EndpointMonitor], resilience: ResilienceConfig
    ) -> None:
        self.shard_id = primary.gate.shard_id
        self.primary = primary.gate
        self._monitors = [primary, *replicas]
        self._replicas = replicas
        self._resilience = resilience
        self._next_replica = itertools.count()

    @classmethod
    def of_pool(
        cls,
        shard_id: int,
        pool: AsyncConnectionPool[Any],
        resilience: ResilienceConfig | None = None,
        *,
        acquire_timeout: float = 5.0,
    ) -> Shard:
        """A shard whose primary is an open pool, without replicas; its monitor is not started
        (for tools and tests that drive a store directly)."""
        resilience = resilience or ResilienceConfig()
        gate = ShardGate(shard_id, pool, resilience, acquire_timeout=acquire_timeout)
        return cls(EndpointMonitor(gate, str(pool.conninfo), resilience), [], resilience)

    @property
    def monitors(self) -> list[EndpointMonitor]:
        return self._monitors

    def state(self) -> ShardState:
        return ShardState(
            shard_id=self.shard_id,
            primary=_endpoint_state(self._monitors[0]),
            replicas=tuple(_endpoint_state(m) for m in self._replicas),
        )

    async def write(self, op: Operation[T], *, idempotent: bool) -> T:
        """Run `op` on the primary."""
        return await self.primary.run(op, idempotent=idempotent)

    async def read(self, op: Operation[T], *, stale_ok: bool) -> T:
        """Run a read-only `op`: on the primary, or on a replica when `stale_ok` allows (see above)."""
        gate = self._reader() if stale_ok else self.primary
        try:
            return await gate.run(op, idempotent=True)
        except ShardUnavailable:
            if not stale_ok:
                raise
            fallback = self.primary if gate is not self.primary else self._any_replica()
            if fallback is None or not fallback.available:
                raise
            return await fallback.run(op, idempotent=True)

    def _any_replica(self) -> ShardGate | None:
        replicas = [m.gate for m in self._replicas if m.gate.available]
        return replicas[next(self._next_replica) % len(replicas)] if replicas else None

    def _reader(self) -> ShardGate:
        primary_healthy = self.primary.healthy
        if primary_healthy and not self._resilience.replica_reads:
            return self.primary
        replicas = [m for m in self._replicas if m.gate.available]
        if primary_healthy:
            limit = self._resilience.replica_max_lag
            replicas = [m for m in replicas if m.lag_seconds is not None and m.lag_seconds <= limit]
        if not replicas:
            return self.primary
        return replicas[next(self._next_replica) % len(replicas)].gate
