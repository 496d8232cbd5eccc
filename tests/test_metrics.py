"""The Prometheus endpoint of a running server: per-shard counts after known traffic, label sets.

The session server is shared, so every count is asserted as the difference between a scrape
before and a scrape after this test's own traffic (tests run one at a time).
"""

from __future__ import annotations

import asyncio
import random
import re
import signal
import socket
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from client.gen.dialog.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    dialog_service_pb2,
    dialog_service_pb2_grpc,
)
from server.config import (
    DEFAULT_METRICS_LISTEN,
    ConfigError,
    MetricsConfig,
    ServerConfig,
    config_from_mapping,
)
from server.observability.metrics import MetricsEndpoint, ServerMetrics, go_code_name
from server.routing import calculate_shard
from server.runtime.app import RunningServer, running_server
from tests.processes import CHILD_TIMEOUT_SECONDS, child_env, write_server_config
from tests.support import Metadata, metric_value, pair_on_shard, scrape_metrics

RPC_LABELS = {"grpc_type", "grpc_service", "grpc_method"}


def send(a: int, b: int, text: str, request_id: str = "") -> dialog_service_pb2.SendMessageRequest:
    return dialog_service_pb2.SendMessageRequest(
        from_user_id=a, to_user_id=b, text=text, request_id=request_id
    )


async def test_rpc_and_message_counts_per_shard(
    server: RunningServer,
    dialog_stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    assert server.metrics_port is not None
    num_shards = len(server.shards)
    before, _ = await scrape_metrics(server.metrics_port)

    pairs = [pair_on_shard(shard, num_shards, new_pair) for shard in range(num_shards)]
    users = {str(u) for pair in pairs for u in pair}
    for shard, (a, b) in enumerate(pairs):
        for i in range(shard + 1):  # shard s gets s + 1 messages
            await dialog_stub.SendMessage(send(a, b, f"m{i}", f"req-{i}"), metadata=auth_for(a))
    # A retry of an acknowledged request writes nothing new.
    a0, b0 = pairs[0]
    replay = await dialog_stub.SendMessage(send(a0, b0, "m0", "req-0"), metadata=auth_for(a0))
    assert replay.replayed
    # Pages of 2: shard s's dialog (s + 1 messages) reads min(s + 1, 2) messages.
    for a, b in pairs:
        request = dialog_service_pb2.GetDialogRequest(user_id=a, peer_user_id=b, page_size=2)
        await dialog_stub.GetDialog(request, metadata=auth_for(a))
    # Refused before any shard is resolved: a message to oneself, and sending as someone else.
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await dialog_stub.SendMessage(send(a0, a0, "x"), metadata=auth_for(a0))
    assert invalid.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await dialog_stub.SendMessage(send(b0, a0, "x"), metadata=auth_for(a0))
    assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED

    after, label_names = await scrape_metrics(server.metrics_port)

    def delta(name: str, **labels: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    sends = sum(range(1, num_shards + 1)) + 1
    rpc = {"grpc_service": "dialog.v1.DialogService", "grpc_type": "unary"}
    assert delta("grpc_server_started_total", grpc_method="SendMessage", **rpc) == sends + 2
    assert delta("grpc_server_handled_total", grpc_method="SendMessage", grpc_code="OK", **rpc) == sends
    assert delta("grpc_server_handled_total", grpc_method="SendMessage", grpc_code="InvalidArgument") == 1
    assert delta("grpc_server_handled_total", grpc_method="SendMessage", grpc_code="PermissionDenied") == 1
    assert delta("grpc_server_handled_total", grpc_method="GetDialog", grpc_code="OK") == num_shards
    for shard in range(num_shards):
        label = str(shard)
        sends_here = shard + 1 + (1 if shard == 0 else 0)
        assert (
            delta("grpc_server_handling_seconds_count", grpc_method="SendMessage", shard=label) == sends_here
        )
        assert delta("grpc_server_handling_seconds_count", grpc_method="GetDialog", shard=label) == 1
        assert delta("dialog_shard_messages_written_total", shard=label) == shard + 1
        assert delta("dialog_shard_messages_read_total", shard=label) == min(shard + 1, 2)
    assert delta("grpc_server_handling_seconds_count", grpc_method="SendMessage", shard="none") == 2
    assert delta("grpc_server_handling_seconds_sum", grpc_method="SendMessage") > 0
    # Histogram buckets are cumulative: the +Inf bucket holds every call.
    inf = delta("grpc_server_handling_seconds_bucket", grpc_method="SendMessage", le="+Inf")
    assert inf == sends + 2

    # Label sets are fixed; label values are bounded (methods, shards, codes), never a user id.
    assert label_names["grpc_server_started_total"] == RPC_LABELS
    assert label_names["grpc_server_handled_total"] == RPC_LABELS | {"grpc_code"}
    assert label_names["grpc_server_handling_seconds_bucket"] == RPC_LABELS | {"shard", "le"}
    assert label_names["dialog_shard_messages_written_total"] == {"shard"}
    shard_values = {v for (_, ls), _ in after.items() for k, v in ls if k == "shard"}
    assert shard_values <= {str(s) for s in range(num_shards)} | {"none", "unconfigured"}
    methods = {v for (_, ls), _ in after.items() for k, v in ls if k == "grpc_method"}
    assert {"SendMessage", "GetDialog"} <= methods
    assert methods <= {
        *dialog_service_pb2.DESCRIPTOR.services_by_name["DialogService"].methods_by_name,
        *admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"].methods_by_name,
        "Check",
    }
    all_values = {v for (_, ls), _ in after.items() for _, v in ls}
    assert not all_values & users


async def test_pool_and_shard_map_state(
    server: RunningServer,
    admin_stub: admin_service_pb2_grpc.AdminServiceAsyncStub,
    admin_auth: Metadata,
    new_pair: Callable[[], tuple[int, int]],
    cluster_config: ServerConfig,
) -> None:
    assert server.metrics_port is not None
    before, _ = await scrape_metrics(server.metrics_port)
    a, b = new_pair()
    target = (calculate_shard(a, b, len(server.shards)) + 1) % len(server.shards)
    await admin_stub.SetShardOverride(
        admin_service_pb2.SetShardOverrideRequest(user_id_1=a, user_id_2=b, shard_id=target),
        metadata=admin_auth,
    )
    try:
        after, label_names = await scrape_metrics(server.metrics_port)
    finally:
        await admin_stub.DeleteShardOverride(
            admin_service_pb2.DeleteShardOverrideRequest(user_id_1=a, user_id_2=b), metadata=admin_auth
        )
    for shard in range(len(server.shards)):
        label = str(shard)
        expected = metric_value(before, "dialog_shard_overrides", shard=label) + (1 if shard == target else 0)
        assert metric_value(after, "dialog_shard_overrides", shard=label) == expected
        size = metric_value(after, "dialog_shard_pool_size", shard=label)
        assert cluster_config.pool.min_size <= size <= cluster_config.pool.max_size
        assert metric_value(after, "dialog_shard_pool_max_size", shard=label) == cluster_config.pool.max_size
        assert 0 <= metric_value(after, "dialog_shard_pool_available", shard=label) <= size
        assert metric_value(after, "dialog_shard_pool_waiting", shard=label) >= 0
        assert ("dialog_shard_pool_request_errors_total", (("shard", label),)) in after
    assert metric_value(after, "dialog_shard_override_reloads_total") == server.placement.reloads >= 1
    for name in ("dialog_shard_pool_size", "dialog_shard_pool_available", "dialog_shard_overrides"):
        assert label_names[name] == {"shard"}


async def test_write_batching_counts_messages_per_statement(
    server: RunningServer,
    dialog_stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    """Concurrent sends to one shard: every message is in exactly one counted statement, and
    the ones that overlapped shared batch statements (fewer statements than messages)."""
    assert server.metrics_port is not None
    label = "1"
    a, b = pair_on_shard(int(label), len(server.shards), new_pair)
    before, _ = await scrape_metrics(server.metrics_port)
    sends = 40
    await asyncio.gather(
        *(dialog_stub.SendMessage(send(a, b, f"m{i}"), metadata=auth_for(a)) for i in range(sends))
    )
    after, label_names = await scrape_metrics(server.metrics_port)

    def delta(name: str, **labels: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    carried = {
        kind: delta("dialog_shard_insert_statement_messages_total", shard=label, kind=kind)
        for kind in ("single", "batch")
    }
    statements = {
        kind: delta("dialog_shard_insert_statements_total", shard=label, kind=kind)
        for kind in ("single", "batch")
    }
    assert carried["single"] + carried["batch"] == sends
    assert statements["single"] == carried["single"]
    # A batch carries at least 2 messages; with 40 sends in flight some of them overlapped.
    assert statements["batch"] >= 1
    assert 2 * statements["batch"] <= carried["batch"]
    assert delta("dialog_shard_insert_batch_splits_total", shard=label) == 0
    assert label_names["dialog_shard_insert_statements_total"] == {"shard", "kind"}
    assert label_names["dialog_shard_insert_batch_splits_total"] == {"shard"}


async def test_metrics_port_in_use_fails_startup_with_a_clear_error(cluster_config: ServerConfig) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = replace(cluster_config, metrics=MetricsConfig(f"127.0.0.1:{port}"))
        with pytest.raises(OSError, match=re.escape(f"cannot serve metrics on 127.0.0.1:{port}")):
            async with running_server(config):
                pytest.fail("server must not start")


async def test_metrics_can_be_disabled(cluster_config: ServerConfig) -> None:
    async with running_server(replace(cluster_config, metrics=MetricsConfig(None))) as running:
        assert running.metrics_port is None


def _load(metrics: object = None, **env: str) -> MetricsConfig:
    data: dict[str, object] = {
        "auth": {"jwt_secret": "k" * 32},
        "shards": [{"id": 0, "dsn": "postgresql://h/db"}],
    }
    if metrics is not None:
        data["metrics"] = metrics
    return config_from_mapping(data, env, base_dir=Path.cwd()).metrics


def test_metrics_config() -> None:
    assert _load().listen == "127.0.0.1:9464"
    assert _load({"listen": "0.0.0.0:9100"}).listen == "0.0.0.0:9100"
    assert _load({"enabled": False}).listen is None
    assert _load({"listen": "0.0.0.0:9100"}, DIALOG_METRICS_LISTEN="off").listen is None
    assert _load(DIALOG_METRICS_LISTEN="[::1]:0").listen == "[::1]:0"
    for bad in ({"listen": "9464"}, {"listen": "h:99999"}, {"port": 1}):
        with pytest.raises(ConfigError, match=r"\[metrics\]|HOST:PORT"):
            _load(bad)
    assert MetricsConfig("0.0.0.0:9464").for_worker(2).listen == "0.0.0.0:9466"
    assert MetricsConfig("127.0.0.1:0").for_worker(3).listen == "127.0.0.1:0"
    assert MetricsConfig(None).for_worker(1).listen is None


def _non_loopback_address() -> str | None:
    """An address of this machine other than loopback (no packet is sent), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 9))
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if address.startswith("127.") or address == "0.0.0.0" else address


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "[::1]:0"])
async def test_metrics_can_listen_on_loopback_only(listen: str) -> None:
    """The default (127.0.0.1:9464) and any loopback address bind that address and nothing else."""
    assert DEFAULT_METRICS_LISTEN.startswith("127.0.0.1:")
    endpoint = MetricsEndpoint(CollectorRegistry(), listen)
    try:
        assert endpoint._server.server_address[0] == listen.rpartition(":")[0].strip("[]")

        def fetch() -> int:
            with urllib.request.urlopen(endpoint.url, timeout=5) as reply:
                return int(reply.status)

        assert await asyncio.to_thread(fetch) == 200
        other = _non_loopback_address()
        if other is not None and listen.startswith("127."):
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((other, endpoint.port), timeout=5).close()
    finally:
        endpoint.close()


def test_code_names_follow_go() -> None:
    assert go_code_name(grpc.StatusCode.OK) == "OK"
    assert go_code_name(grpc.StatusCode.CANCELLED) == "Canceled"
    assert go_code_name(grpc.StatusCode.INVALID_ARGUMENT) == "InvalidArgument"
    assert go_code_name(grpc.StatusCode.DEADLINE_EXCEEDED) == "DeadlineExceeded"


def test_shard_labels_stay_bounded() -> None:
    metrics = ServerMetrics([0, 1])
    labels = [metrics.shard_label(s) for s in (0, 1, None, 9, -1)]
    assert labels == ["0", "1", "none", "unconfigured", "unconfigured"]


def _free_port_pair() -> int:
    """A port P such that P and P + 1 on 127.0.0.1 were both free a moment ago.

    Drawn below the ephemeral range (32768 and up on Linux), where outgoing connections, such as
    the workers' own connections to PostgreSQL, take their local ports.
    """
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(20000, 32000)
        with socket.socket() as first, socket.socket() as second:
            try:
                first.bind(("127.0.0.1", port))
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise AssertionError("no two adjacent free ports")


async def test_each_worker_serves_its_own_endpoint(
    tmp_path: Path,
    cluster_config: ServerConfig,
    jwt_secret: str,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    """`--workers 2`: worker i on the configured port + i; their counts add up to the calls made."""
    base = _free_port_pair()
    config = write_server_config(tmp_path / "workers.toml", cluster_config, "127.0.0.1:0", jwt_secret)
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "dialog-server"),
        "--config",
        str(config),
        "--workers",
        "2",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=child_env(DIALOG_METRICS_LISTEN=f"127.0.0.1:{base}", DIALOG_LOG_RPC="0"),
    )
    try:
        assert proc.stdout is not None
        address, output = None, []
        while address is None:
            output.append((await asyncio.wait_for(proc.stdout.readline(), CHILD_TIMEOUT_SECONDS)).decode())
            assert output[-1], "dialog-server exited before serving:\n" + "".join(output)
            if match := re.search(r"serving on (\S+:\d+) with 2 worker", output[-1]):
                address = match.group(1)
        # Each worker announced its endpoint before it served (how to find them with port 0).
        announced = re.findall(
            r"^worker (\d) \(pid \d+\) metrics on http://127\.0\.0\.1:(\d+)/metrics$",
            "".join(output),
            re.MULTILINE,
        )
        assert sorted(announced) == [("0", str(base)), ("1", str(base + 1))]
        a, b = new_pair()
        calls = 8
        for i in range(calls):  # a fresh connection per call: the kernel spreads them over the workers
            async with grpc.aio.insecure_channel(address) as channel:
                stub = dialog_service_pb2_grpc.DialogServiceStub(channel)
                await stub.SendMessage(send(a, b, f"m{i}"), metadata=auth_for(a))
        scrapes = [(await scrape_metrics(port))[0] for port in (base, base + 1)]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), CHILD_TIMEOUT_SECONDS) == 0
    shard = str(calculate_shard(a, b, cluster_config.num_shards))
    written = [metric_value(s, "dialog_shard_messages_written_total", shard=shard) for s in scrapes]
    assert sum(written) == calls
    handled = [
        metric_value(s, "grpc_server_handled_total", grpc_method="SendMessage", grpc_code="OK")
        for s in scrapes
    ]
    assert sum(handled) == calls
