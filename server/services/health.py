"""The gRPC health service, kept in step with the shards' real state.

Service names and when they are SERVING:

- `shard-<id>`: the shard's primary takes calls (its breaker is not open).
- `dialog.v1.DialogService` and `""` (the whole server): at least one shard can serve reads,
  so the instance is useful; a shard being down affects every instance alike, so it is no
  reason for a load balancer to drop this one. Per-shard names tell the degraded state.
- `dialog.v1.AdminService`: SERVING while the server runs (it reports shard state itself).

On shutdown everything turns NOT_SERVING before the server drains (see server.runtime.app).
"""

from __future__ import annotations

import asyncio

from grpc_health.v1 import health, health_pb2

from server.background import repeat_every, stop_task
from server.storage.pools import ShardSet

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def shard_service_name(shard_id: int) -> str:
    """The health service name of one shard."""
    return f"shard-{shard_id}"


def health_statuses(shards: ShardSet, services: tuple[str, ...], admin_service: str) -> dict[str, int]:
    """What each health service name should report now."""
    states = shards.states()
    statuses = {shard_service_name(s.shard_id): SERVING if s.writable else NOT_SERVING for s in states}
    useful = SERVING if any(s.readable for s in states) else NOT_SERVING
    statuses.update({name: useful for name in services})
    statuses[admin_service] = SERVING
    return statuses


class ShardHealthReporter:
    """Updates the health servicer from shard state every `interval` seconds, in the background."""

    def __init__(
        self,
        shards: ShardSet,
        servicer: health.aio.HealthServicer,
        *,
        services: tuple[str, ...],
        admin_service: str,
        interval: float,
    ) -> None:
        self._shards = shards
        self._servicer = servicer
        self._services = services
        self._admin_service = admin_service
        self._interval = interval
        self._current: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    async def update(self) -> None:
        """Publish the statuses that changed since the last update."""
        for name, status in health_statuses(self._shards, self._services, self._admin_service).items():
            if self._current.get(name) != status:
                await self._servicer.set(name, status)
                self._current[name] = status

    async def start(self) -> None:
        await self.update()
        self._task = repeat_every(self._interval, self.update, name="shard-health")

    async def stop(self) -> None:
        await stop_task(self._task)
        self._task = None
