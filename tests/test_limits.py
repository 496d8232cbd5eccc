"""Bounded work per call: GetDialog's byte budget, the cap on concurrent calls, server memory under
maximal reads, and the rate-limit table the workers of one host share (its logic here; across
real worker processes in test_workers.py)."""

from __future__ import annotations

import asyncio
import random
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import psycopg
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.gen.dialog.v1 import admin_service_pb2 as admin_pb
from client.gen.dialog.v1 import admin_service_pb2_grpc as admin_pb_grpc
from client.gen.dialog.v1 import dialog_service_pb2 as pb
from client.gen.dialog.v1 import dialog_service_pb2_grpc as pb_grpc
from server.config import ConfigError, ServerConfig, config_from_mapping
from server.interceptors.rate_limit import TokenBucketLimiter
from server.interceptors.shared_buckets import (
    SLOTS_PER_STRIPE,
    SharedLimitTables,
    SharedTableError,
    SharedTokenBuckets,
    create_table,
)
from server.routing import calculate_shard
from server.runtime.app import RunningServer
from tests.processes import child_env, write_server_config
from tests.support import (
    Metadata,
    dialog_pages,
    expect_error,
    make_config,
    metric_value,
    preload_pairs,
    retry_delay,
    rows_for_pair,
    scrape_metrics,
    serving,
    status_details,
    wait_until,
)

MESSAGES = 1000
ORDERS = (pb.MESSAGE_ORDER_OLDEST_FIRST, pb.MESSAGE_ORDER_NEWEST_FIRST)


def big_text(i: int) -> str:
    """Message i of the big dialog: 4,096 characters, 16,372 UTF-8 bytes (the limits are 4,096 / 16 KiB)."""
    return f"{i:04d}" + "\U0001f600" * 4092


@dataclass(frozen=True)
class BigDialog:
    user: int
    peer: int
    ids: frozenset[str]


@pytest.fixture(scope="module")
def big_dialog(server: RunningServer, cluster_config: ServerConfig) -> BigDialog:
    """1,000 maximal messages (16.4 MB of text) of one pair, written straight to its shard."""
    rng = random.Random()
    user, peer = rng.randrange(1, 2**63), rng.randrange(1, 2**63)
    ids = preload_pairs(cluster_config, [(user, peer)], MESSAGES, text=big_text)
    return BigDialog(user, peer, frozenset(ids))


async def test_a_dialog_of_1000_maximal_messages_reads_completely_with_a_default_client(
    address: str, big_dialog: BigDialog, auth_for: Callable[..., Metadata], cluster_config: ServerConfig
) -> None:
    budget = cluster_config.limits.max_response_bytes
    # A plain channel: gRPC's default 4 MB receive limit, no options.
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.DialogServiceStub(channel)
        for order in ORDERS:
            pages = await dialog_pages(
                stub, big_dialog.user, big_dialog.peer, auth_for(big_dialog.user), order=order
            )
            ids = [m.message_id for page in pages for m in page.messages]
            assert len(ids) == MESSAGES and set(ids) == big_dialog.ids, "every message exactly once"
            assert ids == sorted(ids, reverse=order == pb.MESSAGE_ORDER_NEWEST_FIRST)
            assert all(m.text == big_text(int(m.text[:4])) for page in pages for m in page.messages)
            sizes = [page.ByteSize() for page in pages]
            assert max(sizes) <= budget, sizes
            # page_size 1000 asked; each page ended at the budget instead: it is nearly full, since
            # it stopped only when the next message would not fit.
            assert len(pages) >= 16
            assert min(sizes[:-1]) > budget - 2 * len(big_text(0).encode()), sizes


async def test_admins_list_the_big_dialog_completely_in_pages_within_the_budget(
    address: str, big_dialog: BigDialog, admin_auth: Metadata, cluster_config: ServerConfig
) -> None:
    """ListMessages pages end at the same byte budget (and read the shard a chunk at a time)."""
    budget = cluster_config.limits.max_response_bytes
    listed: list[str] = []
    sizes: list[int] = []
    async with grpc.aio.insecure_channel(address) as channel:  # default receive limit
        stub = admin_pb_grpc.AdminServiceStub(channel)
        token = ""
        while True:
            page = await stub.ListMessages(
                admin_pb.ListMessagesRequest(
                    user_id_1=big_dialog.user, user_id_2=big_dialog.peer, page_size=1000, page_token=token
                ),
                metadata=admin_auth,
            )
            listed += [m.message.message_id for m in page.messages]
            sizes.append(page.ByteSize())
            token = page.next_page_token
            if not token:
                break
    assert len(listed) == MESSAGES and set(listed) == big_dialog.ids, "every message exactly once"
    assert max(sizes) <= budget and len(sizes) >= 16, sizes
    assert min(sizes[:-1]) > budget - 2 * len(big_text(0).encode()), sizes


async def test_a_page_holds_one_message_even_when_it_alone_passes_the_budget(
    server: RunningServer,
    cluster_config: ServerConfig,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    # The smallest budget allowed: one maximal message and not two.
    limits = replace(cluster_config.limits, max_response_bytes=cluster_config.limits.max_text_bytes + 1024)
    a, b = new_pair()
    ids = preload_pairs(cluster_config, [(a, b)], 5, text=big_text)
    async with serving(replace(cluster_config, limits=limits)) as (_, channel):
        stub = pb_grpc.DialogServiceStub(channel)
        for order in ORDERS:
            pages = await dialog_pages(stub, a, b, auth_for(a), order=order)
            assert [len(page.messages) for page in pages] == [1] * 5
            assert {m.message_id for page in pages for m in page.messages} == ids


def _in_flight(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], method: str) -> float:
    started = metric_value(samples, "grpc_server_started_total", grpc_method=method)
    return started - metric_value(samples, "grpc_server_handled_total", grpc_method=method)


async def test_calls_beyond_max_concurrent_rpcs_are_resource_exhausted_and_held_ones_complete(
    cluster_config: ServerConfig,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    config = replace(cluster_config, limits=replace(cluster_config.limits, max_concurrent_rpcs=2))
    a, b = new_pair()
    shard = config.shards[calculate_shard(a, b, 4)]
    # The shard's table locked against writes: the pair's inserts wait (its reads would not).
    with psycopg.connect(shard.dsn) as blocker:
        blocker.execute(f"LOCK TABLE {shard.table} IN SHARE MODE")
        async with serving(config) as (running, channel):
            stub = pb_grpc.DialogServiceStub(channel)
            assert running.metrics_port is not None
            port = running.metrics_port
            held = [
                asyncio.ensure_future(
                    stub.SendMessage(
                        pb.SendMessageRequest(
                            from_user_id=a, to_user_id=b, text=f"held {i}", request_id=f"h{i}"
                        ),
                        metadata=auth_for(a),
                        timeout=30,
                    )
                )
                for i in range(2)
            ]

            async def two_in_flight() -> bool:
                return _in_flight((await scrape_metrics(port))[0], "SendMessage") == 2

            await wait_until(two_in_flight, "both sends are in flight")
            err = await expect_error(
                stub.GetDialog(pb.GetDialogRequest(user_id=a, peer_user_id=b), metadata=auth_for(a)),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            )
            assert "its limit of 2 calls at once" in (err.details() or "")
            info, _ = status_details(err)
            assert info is not None and info.reason == "TOO_MANY_CALLS"
            assert retry_delay(err) > 0
            # Health checks stay out of the cap: a load balancer's probe is answered meanwhile.
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            blocker.rollback()
            replies = await asyncio.gather(*held)
            assert sorted(r.message.text for r in replies) == ["held 0", "held 1"]
            page = await stub.GetDialog(pb.GetDialogRequest(user_id=a, peer_user_id=b), metadata=auth_for(a))
            assert sorted(m.text for m in page.messages) == ["held 0", "held 1"]
    (rows,) = rows_for_pair(cluster_config, (a, b)).values()
    assert sorted(r[3] for r in rows) == ["held 0", "held 1"]


# -- Server memory under maximal reads -------------------------------------------------------------

_SERVING = re.compile(r"dialog-shard serving on \S+:(\d+)")
READERS = 16
MEMORY_GROWTH_LIMIT_MIB = 150


def _status_kib(pid: int, field: str) -> int:
    """A `kB` figure of /proc/<pid>/status (VmRSS: resident now; VmHWM: the peak since the last reset)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _reset_peak(pid: int) -> None:
    """Reset VmHWM of `pid` to its current RSS (proc(5), /proc/<pid>/clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@pytest_asyncio.fixture
async def server_process(
    tmp_path: Path, server: RunningServer, cluster_config: ServerConfig, jwt_secret: str
) -> AsyncIterator[tuple[int, str]]:
    """A `dialog-server` process of its own (pid, address) on the session's shards, reads unlimited."""
    path = write_server_config(
        tmp_path / "dialog.toml",
        cluster_config,
        "127.0.0.1:0",
        jwt_secret,
        sections={"limits": {"read_rate_per_second": 0}},
    )
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "dialog-server"),
        "--config",
        str(path),
        "--log-level",
        "WARNING",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=child_env(DIALOG_LOG_RPC="0"),
    )
    try:
        assert process.stdout is not None
        port = None
        while port is None:
            line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()
            assert line, "dialog-server exited before serving"
            if match := _SERVING.search(line):
                port = match.group(1)

        async def drain() -> None:
            assert process.stdout is not None
            while await process.stdout.readline():
                pass

        drainer = asyncio.ensure_future(drain())
        yield process.pid, f"127.0.0.1:{port}"
    finally:
        process.kill()
        await process.wait()
    drainer.cancel()


async def test_server_memory_grows_less_than_150_mib_under_16_concurrent_maximal_reads(
    server_process: tuple[int, str], big_dialog: BigDialog, auth_for: Callable[..., Metadata]
) -> None:
    pid, address = server_process
    auth = auth_for(big_dialog.user)
    channels = [grpc.aio.insecure_channel(address) for _ in range(4)]
    try:
        stubs = [pb_grpc.DialogServiceStub(c) for c in channels]
        # Warm-up: every channel reads the whole dialog once, in both orders.
        for stub in stubs:
            for order in ORDERS:
                await dialog_pages(stub, big_dialog.user, big_dialog.peer, auth, order=order)
        baseline = _status_kib(pid, "VmRSS")
        _reset_peak(pid)
        assert _status_kib(pid, "VmHWM") <= baseline + 1024

        # 16 readers at once, each walking all 1,000 messages at page_size 1000, over 4 connections.
        readers = [
            dialog_pages(stubs[i % 4], big_dialog.user, big_dialog.peer, auth, order=ORDERS[i % 2])
            for i in range(READERS)
        ]
        results = await asyncio.gather(*readers)
        peak = _status_kib(pid, "VmHWM")
    finally:
        for channel in channels:
            await channel.close()
    for pages in results:
        assert {m.message_id for page in pages for m in page.messages} == big_dialog.ids
    growth_mib = (peak - baseline) / 1024
    print(
        f"\n[memory] baseline RSS {baseline / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB, "
        f"growth {growth_mib:.1f} MiB"
    )
    assert growth_mib < MEMORY_GROWTH_LIMIT_MIB


# -- The shared rate-limit table (pure logic) ------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _table(tmp_path: Path, capacity: int) -> Path:
    path = tmp_path / "send.buckets"
    create_table(path, capacity)
    return path


def test_shared_buckets_answer_like_the_in_process_limiter(tmp_path: Path) -> None:
    clock = FakeClock()
    shared = SharedTokenBuckets(_table(tmp_path, 4096), rate_per_second=5.0, burst=4, clock=clock)
    local = TokenBucketLimiter(rate_per_second=5.0, burst=4, clock=clock)
    rng = random.Random(3)
    refused = 0
    for _ in range(3000):
        clock.now += rng.choice([0.0, 0.0, 0.0, 0.01, 0.05, 0.3])
        user = rng.randrange(1, 6)
        wait = shared.acquire(user)
        assert wait == pytest.approx(local.acquire(user))
        refused += wait > 0
    assert 100 < refused < 2900, "both outcomes exercised"
    assert shared.evictions == 0
    shared.close()


def test_handles_on_one_table_share_each_users_bucket(tmp_path: Path) -> None:
    clock = FakeClock()
    path = _table(tmp_path, 100)
    first, second = (SharedTokenBuckets(path, rate_per_second=1.0, burst=3, clock=clock) for _ in range(2))
    assert [first.acquire(7), second.acquire(7), first.acquire(7)] == [0.0, 0.0, 0.0]
    assert second.acquire(7) == pytest.approx(1.0)
    assert first.acquire(8) == 0.0  # another user
    clock.now += 1.0
    assert second.acquire(7) == 0.0
    assert first.acquire(7) == pytest.approx(1.0)


def test_another_process_takes_from_the_same_buckets(tmp_path: Path) -> None:
    path = _table(tmp_path, 100)
    script = (
        "import sys; from pathlib import Path;"
        "from server.interceptors.shared_buckets import SharedTokenBuckets;"
        "b = SharedTokenBuckets(Path(sys.argv[1]), rate_per_second=0.001, burst=5);"
        "print([b.acquire(42) for _ in range(3)])"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[0.0, 0.0, 0.0]"
    here = SharedTokenBuckets(path, rate_per_second=0.001, burst=5)
    assert [here.acquire(42) == 0.0 for _ in range(3)] == [True, True, False]


def test_a_full_stripe_gives_the_least_recently_updated_slot_and_counts_early_evictions(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    path = _table(tmp_path, SLOTS_PER_STRIPE)  # one stripe: every user lands in it
    size = path.stat().st_size
    buckets = SharedTokenBuckets(path, rate_per_second=1.0, burst=1, clock=clock)
    assert buckets.capacity == SLOTS_PER_STRIPE
    for user in range(1, SLOTS_PER_STRIPE + 1):
        assert buckets.acquire(user) == 0.0
        clock.now += 0.01
    assert buckets.acquire(1) > 0  # still tracked, still limited
    # A newcomer takes user 2's slot (the least recently updated) before it refilled: user 2
    # is forgotten and gets a fresh burst early; counted.
    assert buckets.acquire(100) == 0.0
    assert buckets.evictions == 1
    assert buckets.acquire(2) == 0.0
    assert buckets.evictions == 2
    # Once buckets are full again, taking their slots forgets nothing that matters: not counted.
    clock.now += 5
    for user in range(200, 200 + SLOTS_PER_STRIPE):
        assert buckets.acquire(user) == 0.0
    assert buckets.evictions == 2
    assert path.stat().st_size == size


def test_a_file_that_is_not_a_table_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.buckets"
    junk.write_bytes(b"x" * 1000)
    with pytest.raises(SharedTableError, match="not a rate-limit table"):
        SharedTokenBuckets(junk, rate_per_second=1.0, burst=1)
    with pytest.raises(SharedTableError, match="cannot open"):
        SharedTokenBuckets(tmp_path / "missing", rate_per_second=1.0, burst=1)


def test_the_parent_creates_the_tables_and_removes_them(tmp_path: Path) -> None:
    with SharedLimitTables.created(("send", "read"), 1000) as tables:
        assert sorted(p.name for p in tables.directory.iterdir()) == ["read.buckets", "send.buckets"]
        assert SharedTokenBuckets(tables.path("read"), rate_per_second=1.0, burst=1).capacity >= 1000
    assert not tables.directory.exists()


# -- Configuration ---------------------------------------------------------------------------------


def test_limits_come_from_the_file_and_the_environment_and_mistakes_are_named() -> None:
    config = make_config(["postgresql://h/db"], "k" * 32)
    assert config.limits.max_response_bytes == 1024 * 1024
    assert (config.limits.read_rate_per_second, config.limits.read_burst) == (50.0, 200)
    assert config.limits.max_concurrent_rpcs == 256
    env = {
        "DIALOG_MAX_RESPONSE_BYTES": "65536",
        "DIALOG_READ_RATE_PER_SECOND": "2.5",
        "DIALOG_READ_BURST": "7",
    }
    data = {"shards": [{"id": 0, "dsn": "postgresql://h/db"}], "auth": {"jwt_secret": "k" * 32}}
    limits = config_from_mapping(
        {**data, "limits": {"max_response_bytes": 100_000}}, env, base_dir=Path.cwd()
    ).limits
    assert (limits.max_response_bytes, limits.read_rate_per_second, limits.read_burst) == (65536, 2.5, 7)
    with pytest.raises(ConfigError, match="max_response_bytes"):
        make_config(["postgresql://h/db"], "k" * 32, limits={"max_response_bytes": 16 * 1024})
    with pytest.raises(ConfigError, match="max_response_bytes"):
        make_config(["postgresql://h/db"], "k" * 32, limits={"max_response_bytes": 8 * 1024 * 1024})
    with pytest.raises(ConfigError, match="read_rate_per_second"):
        make_config(["postgresql://h/db"], "k" * 32, limits={"read_rate_per_second": -1})
    with pytest.raises(ConfigError, match="max_concurrent_rpcs"):
        make_config(["postgresql://h/db"], "k" * 32, limits={"max_concurrent_rpcs": 0})
