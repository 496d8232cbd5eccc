"""Read replicas: a real streaming replica (pg_basebackup + standby.signal) of a shard's primary.

GetDialog reads from the replica while its lag is within `replica_max_lag` (shown by pausing
its WAL replay: a message written since stays invisible), from the primary beyond that; when
the primary is down, reads keep working from the replica while writes get UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.gen.dialog.v1 import dialog_service_pb2 as pb
from client.gen.dialog.v1 import dialog_service_pb2_grpc
from server.auth import issue_token
from server.config import ServerConfig
from server.dev.embedded_pg import EmbeddedPostgres
from server.resilience import BreakerState
from server.runtime.app import DIALOG_SERVICE, RunningServer, running_server
from tests.faults import FAST_POOL, FAST_RESILIENCE, pairs_on, rng, start_postgres, start_replica
from tests.pgfixtures import reachable_temp_dir
from tests.support import fresh_database, make_config, replay, wait_until


@pytest.fixture
def primary_and_replica() -> Iterator[tuple[EmbeddedPostgres, EmbeddedPostgres]]:
    with reachable_temp_dir("dialog-shard-replica-") as base:
        primary = start_postgres(base, "primary")
        yield primary, start_replica(primary, base, "replica")


def _config(
    primary: EmbeddedPostgres, replica: EmbeddedPostgres, control: str, jwt_secret: str, max_lag: float
) -> ServerConfig:
    return make_config(
        [primary.dsn],
        jwt_secret,
        shards=[{"id": 0, "dsn": primary.dsn, "table": "messages_0", "replica_dsns": [replica.dsn]}],
        control_dsn=control,
        pool=FAST_POOL,
        resilience={**FAST_RESILIENCE, "replica_reads": True, "replica_max_lag": max_lag},
    )


@pytest.fixture
def control_dsn(pg_servers: list[EmbeddedPostgres]) -> str:
    return fresh_database(pg_servers[3], "replica_control")


class Dialog:
    """One pair's SendMessage/GetDialog calls against a running server."""

    def __init__(self, running: RunningServer, config: ServerConfig, channel: grpc.aio.Channel) -> None:
        (self.pair,) = pairs_on(0, 1, 1, rng)
        self._stub = dialog_service_pb2_grpc.DialogServiceStub(channel)
        token = issue_token(config.auth, user_id=self.pair[0])
        self._metadata = (("authorization", f"Bearer {token}"),)

    async def send(self, text: str) -> pb.SendMessageResponse:
        return await self._stub.SendMessage(
            pb.SendMessageRequest(
                from_user_id=self.pair[0], to_user_id=self.pair[1], text=text, request_id=text
            ),
            metadata=self._metadata,
            timeout=5,
        )

    async def texts(self) -> list[str]:
        page = await self._stub.GetDialog(
            pb.GetDialogRequest(user_id=self.pair[0], peer_user_id=self.pair[1], page_size=100),
            metadata=self._metadata,
            timeout=5,
        )
        return [m.text for m in page.messages]


@pytest_asyncio.fixture
async def lagging_reads(
    primary_and_replica: tuple[EmbeddedPostgres, EmbeddedPostgres], control_dsn: str, jwt_secret: str
) -> AsyncIterator[tuple[RunningServer, ServerConfig, EmbeddedPostgres, EmbeddedPostgres]]:
    primary, replica = primary_and_replica
    config = _config(primary, replica, control_dsn, jwt_secret, max_lag=60)
    async with running_server(config) as running:
        yield running, config, primary, replica


async def test_reads_use_a_fresh_enough_replica_and_survive_the_primary(
    lagging_reads: tuple[RunningServer, ServerConfig, EmbeddedPostgres, EmbeddedPostgres],
    control_dsn: str,
    jwt_secret: str,
) -> None:
    running, config, primary, replica = lagging_reads

    async def replica_up() -> bool:
        state = running.shards.state(0).replicas[0]
        return state.available and state.lag_seconds is not None

    await wait_until(replica_up, "the replica is probed", within=10, every=0.05)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        dialog = Dialog(running, config, channel)
        await dialog.send("first")

        async def sees(text: str) -> Any:
            async def check() -> bool:
                return text in await dialog.texts()

            return check

        await wait_until(await sees("first"), "the first message is readable", within=10, every=0.05)

        # Replay paused: the replica stays behind, and reads served by it do not show what follows.
        await asyncio.to_thread(replay, replica, "pause")
        await dialog.send("second")
        for _ in range(5):
            assert await dialog.texts() == ["first"], "GetDialog did not read from the replica"

        # Another server with a 0.5 s lag bound reads from the primary once the replica's lag exceeds it.
        strict = _config(primary, replica, control_dsn, jwt_secret, max_lag=0.5)
        async with running_server(strict) as strict_running:

            async def stale() -> bool:
                lag = strict_running.shards.state(0).replicas[0].lag_seconds
                return lag is not None and lag > 0.5

            await wait_until(stale, "the paused replica's lag exceeds 0.5 s", within=10, every=0.05)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{strict_running.port}") as strict_channel:
                strict_dialog = Dialog(strict_running, strict, strict_channel)
                strict_dialog.pair, strict_dialog._metadata = dialog.pair, dialog._metadata
                assert await strict_dialog.texts() == ["second", "first"]

        await asyncio.to_thread(replay, replica, "resume")
        await wait_until(await sees("second"), "the replica catches up", within=10, every=0.05)

        # The primary goes down: reads keep working from the replica, writes are refused.
        await asyncio.to_thread(primary.stop, "fast")

        async def primary_open() -> bool:
            return running.shards.state(0).primary.breaker is BreakerState.OPEN

        await wait_until(primary_open, "the primary's breaker opens", within=10, every=0.05)
        for _ in range(5):
            assert await dialog.texts() == ["second", "first"]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await dialog.send("third")
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        health = health_pb2_grpc.HealthStub(channel)

        async def status(service: str) -> int:
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            return int(reply.status)

        async def shard_not_serving() -> bool:
            return bool(await status("shard-0") == health_pb2.HealthCheckResponse.NOT_SERVING)

        await wait_until(shard_not_serving, "shard-0 health turns NOT_SERVING", within=5, every=0.05)
        assert await status(DIALOG_SERVICE) == health_pb2.HealthCheckResponse.SERVING  # read-only

        # The primary returns: writes resume by themselves.
        await asyncio.to_thread(primary.start)

        async def writable() -> bool:
            try:
                await dialog.send("third")
            except grpc.aio.AioRpcError as exc:
                assert exc.code() is grpc.StatusCode.UNAVAILABLE
                return False
            return True

        await wait_until(writable, "writes resume", within=20, every=0.05)
        await wait_until(await sees("third"), "the third message is readable", within=10, every=0.05)
