"""Deadlines end to end: the RPC deadline bounds the statement, and a cancelled call cancels it.

A shard is made slow for real by locking its table from another connection; pg_stat_activity
then shows whether the service's statement still runs on the server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import grpc
import psycopg
import pytest

from client.gen.dialog.v1 import dialog_service_pb2 as pb
from client.gen.dialog.v1 import dialog_service_pb2_grpc
from server.config import ServerConfig
from server.routing import calculate_shard
from server.runtime.app import RunningServer
from tests.faults import table_locked, waiting_statements
from tests.support import Metadata, wait_until


async def test_deadline_bounds_the_statement_and_cancels_it_on_the_server(
    dialog_stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
    cluster_config: ServerConfig,
) -> None:
    a, b = new_pair()
    shard_id = calculate_shard(a, b, cluster_config.num_shards)
    request = pb.SendMessageRequest(from_user_id=a, to_user_id=b, text="slow", request_id="slow-1")
    with table_locked(cluster_config, shard_id):
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await dialog_stub.SendMessage(request, metadata=auth_for(a), timeout=0.5)
        assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        elapsed = time.monotonic() - started
        # The lock is still held: only a server-side cancel ends the waiting INSERT.
        ended = await wait_until(
            lambda: asyncio.to_thread(lambda: not waiting_statements(cluster_config, shard_id)),
            "the INSERT is cancelled",
            within=10,
        )
        print(
            f"deadline 0.5s: answered after {elapsed:.3f}s, statement gone {ended - started:.3f}s after start"
        )
    # Nothing was stored by the cancelled call; a retry with the same request_id stores it once.
    retried = await dialog_stub.SendMessage(request, metadata=auth_for(a), timeout=5)
    assert not retried.replayed


async def test_cancelled_call_cancels_its_statement(
    dialog_stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
    cluster_config: ServerConfig,
) -> None:
    a, b = new_pair()
    shard_id = calculate_shard(a, b, cluster_config.num_shards)
    with table_locked(cluster_config, shard_id):
        call = dialog_stub.GetDialog(pb.GetDialogRequest(user_id=a, peer_user_id=b), metadata=auth_for(a))
        await wait_until(
            lambda: asyncio.to_thread(lambda: bool(waiting_statements(cluster_config, shard_id))),
            "the SELECT waits for the lock",
            within=10,
        )
        cancelled = time.monotonic()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        ended = await wait_until(
            lambda: asyncio.to_thread(lambda: not waiting_statements(cluster_config, shard_id)),
            "the SELECT is cancelled",
            within=10,
        )
        print(f"statement gone {ended - cancelled:.3f}s after the client cancelled")


async def test_pool_connections_carry_the_statement_ceiling(
    server: RunningServer, cluster_config: ServerConfig
) -> None:
    async def show(conn: psycopg.AsyncConnection[Any]) -> str:
        row = await (await conn.execute("SHOW statement_timeout")).fetchone()
        assert row is not None
        return str(row[0])

    ceiling = cluster_config.resilience.statement_timeout
    assert await server.shards.store(0).shard.read(show, stale_ok=False) == f"{round(ceiling)}s"
