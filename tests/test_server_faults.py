"""The server process itself: SIGTERM drains in-flight calls; kill -9 and a restart lose nothing.

The server runs as a real `dialog-server` child process on the session's four PostgreSQL servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections import Counter
from collections.abc import Awaitable
from pathlib import Path

import grpc
import pytest

from client.gen.dialog.v1 import dialog_service_pb2 as pb
from client.gen.dialog.v1 import dialog_service_pb2_grpc
from server.auth import issue_token
from server.config import ServerConfig
from server.routing import calculate_shard
from tests.faults import (
    Load,
    assert_exactly_once,
    fault_server_config,
    pairs_on,
    resend_unacked,
    rng,
    start_server_process,
    table_locked,
    waiting_statements,
)
from tests.pgfixtures import free_port
from tests.support import wait_until


def _send(
    stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    config: ServerConfig,
    pair: tuple[int, int],
    text: str,
    timeout: float,
) -> Awaitable[pb.SendMessageResponse]:
    token = issue_token(config.auth, user_id=pair[0])
    return stub.SendMessage(
        pb.SendMessageRequest(from_user_id=pair[0], to_user_id=pair[1], text=text, request_id=text),
        metadata=(("authorization", f"Bearer {token}"),),
        timeout=timeout,
    )


async def test_sigterm_refuses_new_calls_and_drains_in_flight_ones(
    tmp_path: Path, cluster_config: ServerConfig, jwt_secret: str
) -> None:
    port = free_port()
    proc = await start_server_process(
        fault_server_config(tmp_path / "drain.toml", cluster_config, port, jwt_secret, 10)
    )
    address = f"127.0.0.1:{port}"
    # One pair on each of three shards: each insert is then its shard's only statement (inserts of one
    # shard that queue behind a running one would wait in the server's write batcher instead).
    shard_ids = (0, 1, 2)
    pairs = [pairs_on(s, cluster_config.num_shards, 1, rng)[0] for s in shard_ids]
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = dialog_service_pb2_grpc.DialogServiceStub(channel)
            with contextlib.ExitStack() as locks:
                for s in shard_ids:
                    locks.enter_context(table_locked(cluster_config, s))
                in_flight = [
                    asyncio.ensure_future(
                        _send(stub, cluster_config, pair, f"drain-{i}-{time.time_ns()}", 30)
                    )
                    for i, pair in enumerate(pairs)
                ]

                def all_waiting() -> bool:
                    return all(waiting_statements(cluster_config, s) for s in shard_ids)

                ends = time.monotonic() + 10
                while not await asyncio.to_thread(all_waiting):
                    assert time.monotonic() < ends, "the in-flight calls never reached the shards"
                    await asyncio.sleep(0.02)
                proc.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                # New calls are refused while the in-flight ones are still waiting for the lock.

                async def a_new_call_is_refused() -> bool:
                    async with grpc.aio.insecure_channel(address) as fresh:
                        try:
                            await _send(
                                dialog_service_pb2_grpc.DialogServiceStub(fresh),
                                cluster_config,
                                pairs[0],
                                f"late-{time.time_ns()}",
                                1,
                            )
                        except grpc.aio.AioRpcError as exc:
                            return exc.code() is grpc.StatusCode.UNAVAILABLE
                    return False

                refused = await wait_until(
                    a_new_call_is_refused, "new calls are refused after SIGTERM", within=10, every=0.05
                )
                assert not any(call.done() for call in in_flight)
            released = time.monotonic()
            responses = await asyncio.gather(*in_flight)
            finished = time.monotonic()
        assert [r.message.text for r in responses] == [f.result().message.text for f in in_flight]
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        print(
            f"SIGTERM: new calls refused after {refused - signalled:.3f}s; in-flight calls answered "
            f"{finished - released:.3f}s after the shard was released; exit {proc.returncode}"
        )
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_kill_9_of_the_server_mid_load_loses_no_acknowledged_message(
    tmp_path: Path, cluster_config: ServerConfig, jwt_secret: str
) -> None:
    port = free_port()
    config_path = fault_server_config(tmp_path / "crash.toml", cluster_config, port, jwt_secret, 2)
    address = f"127.0.0.1:{port}"
    shards = range(cluster_config.num_shards)
    pairs = {s: pairs_on(s, cluster_config.num_shards, 2, rng) for s in shards}
    proc = await start_server_process(config_path)
    try:
        async with Load(address, cluster_config.auth, pairs, deadline=1.0) as load:
            await load.wait_for(
                lambda: len(load.report.acked()) >= 100, 20, "100 calls are acknowledged before the crash"
            )
            proc.kill()  # SIGKILL: no drain, no cleanup
            killed = time.monotonic()
            await proc.wait()
            await load.wait_for(
                lambda: any(
                    o.started > killed and o.code is grpc.StatusCode.UNAVAILABLE for o in load.report.outcomes
                ),
                10,
                "calls fail while the server is down",
            )
            proc = await start_server_process(config_path)
            restarted = time.monotonic()
            await load.wait_for(
                lambda: len([o for o in load.report.acked() if o.started > restarted]) >= 100,
                20,
                "acks after",
            )
        report = load.report
        in_doubt = [o for o in report.outcomes if o.code is not grpc.StatusCode.OK]
        print(
            f"server kill -9: {len(report.acked())} acked, {len(in_doubt)} not acked "
            f"({dict(Counter(o.code.name for o in in_doubt))}); "
            f"restart took {restarted - killed:.2f}s"
        )
        resent = await resend_unacked(address, cluster_config, report)
        checked = assert_exactly_once(report, cluster_config, list(shards))
        print(f"re-sent {resent} unacknowledged; {checked} messages stored exactly once")
        assert all(calculate_shard(*o.pair, cluster_config.num_shards) == o.shard_id for o in report.outcomes)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                pytest.fail("dialog-server did not stop on SIGTERM")
