"""A heartbeat per database endpoint: detects a dead or hung server without waiting for traffic.

Each `EndpointMonitor` keeps one connection of its own to its endpoint and runs a tiny query every
`probe_interval` seconds, or at once when its gate reports a failed call. A probe that fails
declares the endpoint down (`ShardGate.declare_down`: the breaker opens and the calls waiting on
it fail at once; its connection is dropped and made again next time): at once when the server
refused or dropped the connection, after `hung_after_probes` probes in a row without an answer
within `probe_timeout` when it just went silent (each unanswered probe is followed by the next at
once, on a fresh connection, so one slow answer on a busy machine is no outage but a hang is found
within `probe_interval` + `hung_after_probes` x `probe_timeout`). A probe that
succeeds while the breaker is open first discards the pool's broken
connections (`pool.check()`), then closes the breaker. On a replica the probe also reads its
replication lag. An endpoint that was down at startup gets its schema applied (`prepare`) the
first time it is reached, and only then becomes ready. `on_down` and `on_available` tell others
what the monitor found (the control database's tell the shard-map listener).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

from server.background import stop_task
from server.config import ResilienceConfig
from server.resilience.breaker import BreakerState
from server.resilience.db_errors import describe_db_error
from server.resilience.gate import ShardGate, within

log = logging.getLogger(__name__)

Prepare = Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]]

_PRIMARY_PROBE = "SELECT NULL::float8"
# Seconds the replica is behind what it could show. While it streams and has replayed all it
# received, 0. Otherwise (the stream is down, or replay is behind), the age of the last replayed
# commit: that grows while the replica is cut off, so a stale replica stops serving reads.
_REPLICA_PROBE = """
SELECT CASE
    WHEN NOT pg_is_in_recovery() THEN 0
    WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn()
         AND EXISTS (SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming') THEN 0
    ELSE COALESCE(EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()), 'Infinity')
END::float8
"""


class EndpointMonitor:
    """Probes one endpoint (a shard's primary or one of its replicas) and drives its gate's breaker."""

    def __init__(
        self,
        gate: ShardGate,
        dsn: str,
        resilience: ResilienceConfig,
        *,
        replica: bool = False,
        prepare: Prepare | None = None,
        on_available: Callable[[], None] | None = None,
        on_down: Callable[[], None] | None = None,
    ) -> None:
        self.gate = gate
        #: Replication lag in seconds from the last probe (replicas only; None when unknown).
        self.lag_seconds: float | None = None
        self._dsn = dsn
        self._resilience = resilience
        self._sql = _REPLICA_PROBE if replica else _PRIMARY_PROBE
        self._prepare = prepare
        self._on_available = on_available
        self._on_down = on_down
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._wake = asyncio.Event()
        self._unanswered = 0
        self._task: asyncio.Task[None] | None = None
        gate.on_failure(self._wake.set)

    def start(self) -> None:
        name = f"monitor {self.gate.tag} {self.gate.role}"
        self._task = asyncio.create_task(self._loop(), name=name)

    async def stop(self) -> None:
        await stop_task(self._task)
        self._task = None
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                await self._conn.close()
            self._conn = None

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._resilience.probe_interval):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.probe()
            except Exception:  # pragma: no cover - a bug here must not stop the heartbeat
                log.exception("probing %s %s failed unexpectedly", self.gate.name, self.gate.role)

    async def probe(self) -> bool:
        """Probe once now; update the breaker; True when the endpoint answered."""
        gate = self.gate
        try:
            self.lag_seconds = await within(self._resilience.probe_timeout, self._query())
            if not gate.ready:
                await within(self._resilience.statement_timeout, self._make_ready())
        except (TimeoutError, psycopg.Error, OSError) as exc:
            cause = (
                f"no answer within {self._resilience.probe_timeout:g}s"
                if isinstance(exc, TimeoutError)
                else describe_db_error(exc)
            )
            self.lag_seconds = None
            gate.last_error = cause
            if isinstance(exc, TimeoutError):
                self._unanswered += 1
                if self._unanswered < self._resilience.hung_after_probes:
                    # One slow answer (a busy machine) is not an outage: ask again at once.
                    self._wake.set()
                    return False
                cause = f"no answer to {self._unanswered} probes of {self._resilience.probe_timeout:g}s"
            if gate.healthy:
                log.warning("%s %s is unavailable (%s)", gate.name, gate.role, cause)
            gate.declare_down(cause)
            if self._on_down is not None:
                self._on_down()
            return False
        self._unanswered = 0
        if gate.breaker.state is BreakerState.CLOSED:
            gate.last_error = None
            if gate.breaker.consecutive_failures:
                gate.breaker.record_success()  # the server answers: earlier failures were not an outage
        else:
            # Connections made before the outage are broken: replace them before letting calls in.
            with contextlib.suppress(Exception):
                await within(self._resilience.probe_timeout, gate.pool.check())
            log.info("%s %s is available again", gate.name, gate.role)
            gate.last_error = None
            gate.breaker.record_success()
            if self._on_available is not None:
                self._on_available()
        return True

    async def _query(self) -> float | None:
        conn = self._conn
        try:
            if conn is None or conn.closed:
                conn = self._conn = await psycopg.AsyncConnection.connect(
                    self._dsn,
                    autocommit=True,
                    connect_timeout=max(2, math.ceil(self._resilience.probe_timeout)),
                    application_name=f"dialog-shard monitor {self.gate.tag}",
                )
            row = await (await conn.execute(self._sql)).fetchone()
        except BaseException:
            # Also on cancellation (a hung server): this runs in the background, after psycopg's
            # own cancel attempt, so the next probe starts from a fresh connection.
            if conn is not None:
                if self._conn is conn:
                    self._conn = None
                with contextlib.suppress(Exception):
                    await conn.close()
            raise
        return None if row is None or row[0] is None else float(row[0])

    async def _make_ready(self) -> None:
        if self._prepare is not None:
            async with await psycopg.AsyncConnection.connect(self._dsn, autocommit=True) as conn:
                await self._prepare(conn)
        self.gate.ready = True
