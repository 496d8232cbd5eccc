"""`dialog-server --workers N`: real worker processes sharing one port, supervised by their parent.

Which worker answered a call is read from the kernel, not from the server: after each call on a
fresh connection, the new established socket on the server port is found in /proc/net/tcp{,6}
and its inode among one worker's open files.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.gen.dialog.v1 import dialog_service_pb2 as pb
from client.gen.dialog.v1 import dialog_service_pb2_grpc as pb_grpc
from server.config import ServerConfig
from server.runtime.affinity import cpu_for_worker
from server.runtime.app import RunningServer, running_server
from server.runtime.supervisor import SHARED_LIMITS_FLAG, ListenError, reserve_port, split_listen
from tests.processes import (
    MAX_CONNECTIONS,
    channel_per_worker,
    server_connections,
    socket_inodes,
    supervised,
    write_server_config,
)
from tests.support import Metadata, rows_for_pair, wait_until


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


async def _wait_gone(pids: list[int], within: float = 30) -> None:
    await wait_until(
        lambda: not any(_alive(p) for p in pids),
        "the processes exit",
        within=within,
        every=0.05,
        explain=lambda: f"still running: {[p for p in pids if _alive(p)]}",
    )


async def test_workers_share_the_port_serve_each_others_data_and_drain_on_sigterm(
    tmp_path: Path,
    server: RunningServer,
    cluster_config: ServerConfig,
    jwt_secret: str,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    config_path = write_server_config(tmp_path / "dialog.toml", cluster_config, "127.0.0.1:0", jwt_secret)
    sender, peer = new_pair()
    metadata = auth_for(sender)
    async with supervised(config_path, workers=2) as running:
        assert len(running.worker_pids) == 2
        # The reserved port refuses any other server: plain binds and other supervisors alike.
        with pytest.raises(OSError) as caught, socket.socket() as intruder:
            intruder.bind(("127.0.0.1", running.port))
        assert caught.value.errno == errno.EADDRINUSE
        with pytest.raises(ListenError, match="Address already in use"):
            reserve_port(running.address)

        channels: dict[int, grpc.aio.Channel] = {}  # worker pid -> a connection to it
        sent: list[str] = []
        for attempt in range(MAX_CONNECTIONS):
            if len(channels) == 2:
                break
            before = set(server_connections(running.port))
            # A local subchannel pool: each channel opens its own connection.
            channel = grpc.aio.insecure_channel(
                running.address, options=[("grpc.use_local_subchannel_pool", 1)]
            )
            text = f"via connection {attempt}"
            await pb_grpc.DialogServiceStub(channel).SendMessage(
                pb.SendMessageRequest(from_user_id=sender, to_user_id=peer, text=text),
                metadata=metadata,
                timeout=10,
            )
            sent.append(text)
            new = set(server_connections(running.port)) - before
            assert len(new) == 1, f"expected one new connection, found {len(new)}"
            owner = [pid for pid in running.worker_pids if new & socket_inodes(pid)]
            assert len(owner) == 1
            if owner[0] in channels:
                await channel.close()
            else:
                channels[owner[0]] = channel
        assert set(channels) == set(running.worker_pids), "every worker answers calls"

        # What one worker stored, the other one reads.
        first, second = (channels[pid] for pid in running.worker_pids)
        for writer, reader in ((first, second), (second, first)):
            text = f"written by one worker, read by the other {len(sent)}"
            await pb_grpc.DialogServiceStub(writer).SendMessage(
                pb.SendMessageRequest(from_user_id=sender, to_user_id=peer, text=text),
                metadata=metadata,
                timeout=10,
            )
            sent.append(text)
            page = await pb_grpc.DialogServiceStub(reader).GetDialog(
                pb.GetDialogRequest(user_id=sender, peer_user_id=peer, page_size=100),
                metadata=metadata,
                timeout=10,
            )
            assert sorted(m.text for m in page.messages) == sorted(sent)

        # SIGTERM with calls in flight on both workers: every acknowledged message is stored,
        # the parent exits 0 once both workers drained, and the port is free again.
        calls = [
            asyncio.ensure_future(
                pb_grpc.DialogServiceStub(channel).SendMessage(
                    pb.SendMessageRequest(from_user_id=sender, to_user_id=peer, text=f"at shutdown {i}"),
                    metadata=metadata,
                    timeout=10,
                )
            )
            for i in range(20)
            for channel in (channels[running.worker_pids[i % 2]],)
        ]
        await asyncio.sleep(0)
        running.process.send_signal(signal.SIGTERM)
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert await asyncio.wait_for(running.process.wait(), timeout=30) == 0
        for channel in channels.values():
            await channel.close()
    await _wait_gone(running.worker_pids)
    acknowledged = {r.message.text for r in results if isinstance(r, pb.SendMessageResponse)}
    refused = [r for r in results if not isinstance(r, pb.SendMessageResponse)]
    assert all(isinstance(r, grpc.aio.AioRpcError) for r in refused), refused
    stored = [row[3] for rows in rows_for_pair(cluster_config, (sender, peer)).values() for row in rows]
    assert acknowledged <= set(stored)
    assert sorted(t for t in stored if not t.startswith("at shutdown")) == sorted(sent)
    assert any("draining in-flight calls in 2 workers" in line for line in running.output)
    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", running.port))


async def test_a_crashed_worker_stops_the_server_with_an_error(
    tmp_path: Path, server: RunningServer, cluster_config: ServerConfig, jwt_secret: str
) -> None:
    config_path = write_server_config(tmp_path / "dialog.toml", cluster_config, "127.0.0.1:0", jwt_secret)
    async with supervised(config_path, workers=2) as running:
        crashed, other = running.worker_pids
        os.kill(crashed, signal.SIGKILL)
        assert await asyncio.wait_for(running.process.wait(), timeout=30) == 1
        await _wait_gone([other])
    assert any(
        f"worker 0 (pid {crashed}) exited with signal SIGKILL; stopped the other workers" in line
        for line in running.output
    ), running.output


def _thread_cpus(pid: int) -> dict[int, set[int]]:
    """Thread id -> the CPUs it may run on, for every thread of `pid`."""
    return {int(t.name): os.sched_getaffinity(int(t.name)) for t in Path(f"/proc/{pid}/task").iterdir()}


async def test_pinned_workers_run_every_thread_on_their_own_cpu_and_serve(
    tmp_path: Path, server: RunningServer, cluster_config: ServerConfig, jwt_secret: str
) -> None:
    config_path = write_server_config(tmp_path / "dialog.toml", cluster_config, "127.0.0.1:0", jwt_secret)
    allowed = os.sched_getaffinity(0)
    async with supervised(config_path, 2, "--pin-workers") as running:
        async with grpc.aio.insecure_channel(running.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        for index, pid in enumerate(running.worker_pids):
            threads = _thread_cpus(pid)
            # gRPC's threads (started after the pinning) included: they inherit the worker's CPU.
            assert len(threads) > 1
            assert set(map(frozenset, threads.values())) == {frozenset({cpu_for_worker(index, allowed)})}
        # The parent, which only supervises, is not pinned.
        assert os.sched_getaffinity(running.process.pid) == allowed


async def test_workers_are_not_pinned_by_default(
    tmp_path: Path, server: RunningServer, cluster_config: ServerConfig, jwt_secret: str
) -> None:
    config_path = write_server_config(tmp_path / "dialog.toml", cluster_config, "127.0.0.1:0", jwt_secret)
    allowed = os.sched_getaffinity(0)
    async with supervised(config_path, 2) as running:
        for pid in running.worker_pids:
            assert all(cpus == allowed for cpus in _thread_cpus(pid).values())


def test_workers_take_the_allowed_cpus_in_order_and_wrap_around() -> None:
    assert [cpu_for_worker(i, {3, 1, 7}) for i in range(5)] == [1, 3, 7, 1, 3]
    with pytest.raises(ValueError):
        cpu_for_worker(0, set())


def test_listen_addresses_split_into_host_and_port() -> None:
    assert split_listen("127.0.0.1:50051") == ("127.0.0.1", 50051)
    assert split_listen("[::1]:0") == ("::1", 0)
    with pytest.raises(ListenError, match="expected host:port"):
        split_listen("localhost")


async def test_connections_older_than_max_connection_age_are_replaced_and_no_call_fails(
    cluster_config: ServerConfig,
) -> None:
    # How connections get spread over the workers anew: the server ends each connection after its
    # age (GOAWAY), the client opens a new one, which the kernel hashes to a worker again.
    config = replace(cluster_config, max_connection_age_seconds=1.0, shutdown_grace_seconds=1.0)
    request = health_pb2.HealthCheckRequest(service="")
    async with (
        running_server(config) as running,
        grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        assert (await health.Check(request)).status == health_pb2.HealthCheckResponse.SERVING
        assert channel.get_state() is grpc.ChannelConnectivity.READY
        replaced = asyncio.ensure_future(
            asyncio.wait_for(channel.wait_for_state_change(grpc.ChannelConnectivity.READY), 15)
        )
        answered = 0
        while not replaced.done():
            reply = await health.Check(request, timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            answered += 1
            await asyncio.sleep(0.05)
        await replaced  # the server ended the connection (TimeoutError here if it never does)
        assert answered > 5
        assert (await health.Check(request, timeout=5)).status == health_pb2.HealthCheckResponse.SERVING


def _shared_limits_of(worker_pid: int) -> tuple[str, bool]:
    """The name of the rate-limit tables' directory a worker was handed, and whether it still exists."""
    argv = Path(f"/proc/{worker_pid}/cmdline").read_bytes().split(b"\0")
    handed = Path(argv[argv.index(SHARED_LIMITS_FLAG.encode()) + 1].decode())
    return handed.name, handed.exists()


async def test_rate_limits_hold_for_the_host_not_per_worker(
    tmp_path: Path,
    server: RunningServer,
    cluster_config: ServerConfig,
    jwt_secret: str,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    send_burst, read_rate, read_burst = 4, 10.0, 5
    limits = {
        # Sends: a burst and then no refill within the test.
        "send_rate_per_second": 0.01,
        "send_burst": send_burst,
        # Reads: a sustained rate the test runs into.
        "read_rate_per_second": read_rate,
        "read_burst": read_burst,
    }
    config_path = write_server_config(
        tmp_path / "dialog.toml", cluster_config, "127.0.0.1:0", jwt_secret, sections={"limits": limits}
    )
    sender, peer = new_pair()
    metadata = auth_for(sender)
    async with supervised(config_path, workers=2) as running:
        # The workers were handed the tables' directory, which is gone once they all serve: a
        # SIGKILL of the parent leaves nothing behind in /dev/shm, and the tables work on.
        handed, still_there = _shared_limits_of(running.worker_pids[0])
        assert handed.startswith("dialog-shard-limits-") and not still_there
        channels = await channel_per_worker(running)
        try:
            stubs = [pb_grpc.DialogServiceStub(channels[pid]) for pid in running.worker_pids]
            # Twice the burst, alternating over the two workers: the burst in total, not per worker.
            accepted: list[str] = []
            limited = 0
            for i in range(2 * send_burst):
                try:
                    reply = await stubs[i % 2].SendMessage(
                        pb.SendMessageRequest(from_user_id=sender, to_user_id=peer, text=f"m{i}"),
                        metadata=metadata,
                        timeout=10,
                    )
                    accepted.append(reply.message.text)
                except grpc.aio.AioRpcError as err:
                    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
                    limited += 1
            assert (len(accepted), limited) == (send_burst, send_burst)

            # Reads as fast as they come for ~1.5 s over both workers: at most the burst plus the
            # rate over the time taken, in total (two per-worker limits would allow twice that).
            request = pb.GetDialogRequest(user_id=sender, peer_user_id=peer)
            reads = refused = 0
            started = loop_time = asyncio.get_running_loop().time()
            while loop_time - started < 1.5:
                try:
                    page = await stubs[(reads + refused) % 2].GetDialog(
                        request, metadata=metadata, timeout=10
                    )
                    assert len(page.messages) == send_burst
                    reads += 1
                except grpc.aio.AioRpcError as err:
                    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
                    refused += 1
                loop_time = asyncio.get_running_loop().time()
            allowed = read_burst + read_rate * (loop_time - started)
            assert refused > 0
            assert read_burst <= reads <= allowed + 1, (reads, allowed)
        finally:
            for channel in channels.values():
                await channel.close()
    stored = [row[3] for rows in rows_for_pair(cluster_config, (sender, peer)).values() for row in rows]
    assert sorted(stored) == sorted(accepted)
