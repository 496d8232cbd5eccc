"""Starting with a shard down, health from real shard state, and the shard joining when it comes up."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.gen.dialog.v1 import admin_service_pb2 as admin_pb
from client.gen.dialog.v1 import admin_service_pb2_grpc, dialog_service_pb2_grpc
from client.gen.dialog.v1 import dialog_service_pb2 as pb
from server.auth import issue_token
from server.dev.embedded_pg import EmbeddedPostgres
from server.runtime.app import DIALOG_SERVICE, running_server
from server.storage.pools import DatabaseStartupError
from tests.faults import CRASH_SAFE_SETTINGS, FAST_POOL, FAST_RESILIENCE, pairs_on, rng
from tests.pgfixtures import free_port, reachable_temp_dir
from tests.support import (
    fresh_database,
    make_config,
    metric_value,
    retry_delay_of,
    scrape_metrics,
    wait_until,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _status(channel: grpc.aio.Channel, service: str) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
    return int(reply.status)


@pytest.fixture
def late_base() -> Iterator[Path]:
    with reachable_temp_dir("dialog-shard-late-") as base:
        yield base


async def test_starts_without_a_down_shard_which_joins_when_its_server_starts(
    pg_servers: list[EmbeddedPostgres], jwt_secret: str, late_base: Path
) -> None:
    database = fresh_database(pg_servers[2], "degraded")
    # Its DSN (naming its password file) is known before the server exists.
    late = EmbeddedPostgres(late_base / "late", port=free_port(), fsync=False, settings=CRASH_SAFE_SETTINGS)
    config = make_config(
        [database, late.dsn],
        jwt_secret,
        pool=FAST_POOL,
        resilience=FAST_RESILIENCE,
    )
    (up_pair,) = pairs_on(0, 2, 1, rng)
    (down_pair,) = pairs_on(1, 2, 1, rng)

    async def send(pair: tuple[int, int], text: str) -> pb.SendMessageResponse:
        token = issue_token(config.auth, user_id=pair[0])
        return await stub.SendMessage(
            pb.SendMessageRequest(
                from_user_id=pair[0], to_user_id=pair[1], text=text, request_id=text.replace(" ", "-")
            ),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=5,
        )

    async with (
        running_server(config) as running,
        grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        stub = dialog_service_pb2_grpc.DialogServiceStub(channel)
        assert await _status(channel, "shard-0") == SERVING
        assert await _status(channel, "shard-1") == NOT_SERVING
        assert await _status(channel, DIALOG_SERVICE) == SERVING  # degraded, still useful
        assert await _status(channel, "") == SERVING
        assert not running.shards.state(1).writable

        await send(up_pair, "to the live shard")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await send(down_pair, "to the missing shard")
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "shard 1 is unavailable" in (refused.value.details() or "")
        assert (retry_delay_of(refused.value) or 0) > 0
        # The operator's listing of that shard is refused the same way, by the same gate.
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        admin_token = issue_token(config.auth, admin=True)
        with pytest.raises(grpc.aio.AioRpcError) as listing:
            await admin.ListMessages(
                admin_pb.ListMessagesRequest(shard_id=1),
                metadata=(("authorization", f"Bearer {admin_token}"),),
                timeout=5,
            )
        assert listing.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "shard 1 is unavailable" in (listing.value.details() or "")
        assert (retry_delay_of(listing.value) or 0) > 0
        # The metrics tell the same: shard 1's breaker is open, the refused call is counted on it.
        assert running.metrics_port is not None
        samples, _ = await scrape_metrics(running.metrics_port)
        assert metric_value(samples, "dialog_shard_breaker_state", shard="0") == 0
        assert metric_value(samples, "dialog_shard_breaker_state", shard="1") == 2
        assert (
            metric_value(
                samples, "grpc_server_handled_total", grpc_method="SendMessage", grpc_code="Unavailable"
            )
            == 1
        )
        assert (
            metric_value(samples, "grpc_server_handling_seconds_count", grpc_method="SendMessage", shard="1")
            == 1
        )
        assert metric_value(samples, "dialog_shard_messages_written_total", shard="0") == 1

        started = time.monotonic()
        await asyncio.to_thread(late.start)

        async def shard_serving() -> bool:
            return bool(await _status(channel, "shard-1") == SERVING)

        joined = await wait_until(shard_serving, "shard 1 joins", within=20, every=0.05)
        print(f"shard 1 joined {joined - started:.2f}s after its server was started")
        # Its schema was applied when it joined: the message is stored.
        sent = await send(down_pair, "to the missing shard")
        assert sent.message.text == "to the missing shard"
        assert running.shards.state(1).writable
        samples, _ = await scrape_metrics(running.metrics_port)
        assert metric_value(samples, "dialog_shard_breaker_state", shard="1") == 0
        assert metric_value(samples, "dialog_shard_messages_written_total", shard="1") == 1


async def test_no_reachable_shard_at_all_fails_startup(jwt_secret: str) -> None:
    dead = [f"postgresql://postgres@127.0.0.1:{free_port()}/dialog" for _ in range(2)]
    with pytest.raises(DatabaseStartupError, match=r"shard-0 .*; shard-1 "):
        async with running_server(make_config(dead, jwt_secret)):
            pytest.fail("server must not start")
