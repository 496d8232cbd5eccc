"""Per-user SendMessage rate limit (pure token buckets + the real server) and request size limits."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
import pytest_asyncio
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from client.gen.dialog.v1 import dialog_service_pb2 as pb
from client.gen.dialog.v1 import dialog_service_pb2_grpc
from server.config import ConfigError, ServerConfig
from server.dev.embedded_pg import EmbeddedPostgres
from server.interceptors.rate_limit import TokenBucketLimiter
from server.runtime.app import running_server
from tests.support import Metadata, expect_error, make_config, retry_delay_of, rows_for_pair, status_details


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_the_sustained_rate() -> None:
    clock = FakeClock()
    limiter = TokenBucketLimiter(rate_per_second=2.0, burst=3, clock=clock)
    assert [limiter.acquire("u") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("u") == pytest.approx(0.5)
    assert limiter.acquire("u") == pytest.approx(0.5)  # a refused call takes nothing
    clock.now += 0.25
    assert limiter.acquire("u") == pytest.approx(0.25)
    clock.now += 0.25
    assert limiter.acquire("u") == 0.0
    assert limiter.acquire("u") == pytest.approx(0.5)
    # Refill stops at the burst size however long the user was idle.
    clock.now += 3600
    assert [limiter.acquire("u") for _ in range(4)][-2:] == [0.0, pytest.approx(0.5)]


def test_users_have_separate_buckets() -> None:
    clock = FakeClock()
    limiter = TokenBucketLimiter(rate_per_second=1.0, burst=1, clock=clock)
    assert limiter.acquire(1) == 0.0
    assert limiter.acquire(1) > 0
    assert limiter.acquire(2) == 0.0


def test_memory_is_bounded_and_idle_users_are_forgotten() -> None:
    clock = FakeClock()
    limiter = TokenBucketLimiter(rate_per_second=10.0, burst=5, max_keys=100, clock=clock)
    for user in range(1000):
        limiter.acquire(user)
        assert len(limiter) <= 100
    # After burst/rate = 0.5 s every bucket is full again, so all can be dropped.
    clock.now += 0.5
    limiter.acquire("late")
    assert len(limiter) == 1
    # A user not yet refilled is kept (and still limited).
    for _ in range(5):
        limiter.acquire("busy")
    clock.now += 0.1
    limiter.acquire("other")
    assert len(limiter) == 3
    assert limiter.acquire("busy") == 0.0  # 0.1 s at 10/s refilled exactly one token
    assert limiter.acquire("busy") == pytest.approx(0.1)


def test_limits_configuration_mistakes_are_named() -> None:
    with pytest.raises(ConfigError, match="send_rate_per_second"):
        make_config(["postgresql://h/db"], "k" * 32, limits={"send_rate_per_second": -1})
    with pytest.raises(ConfigError, match="max_request_bytes"):
        make_config(["postgresql://h/db"], "k" * 32, limits={"max_request_bytes": 1000})
    disabled = make_config(["postgresql://h/db"], "k" * 32, limits={"send_rate_per_second": 0})
    assert disabled.limits.send_rate_per_second == 0


@pytest_asyncio.fixture(scope="module")
async def limited_stub(
    pg_servers: list[EmbeddedPostgres], jwt_secret: str
) -> AsyncIterator[dialog_service_pb2_grpc.DialogServiceAsyncStub]:
    """Bursts of 3 sends and 4 reads, then one per 100 s: no token refills during the test."""
    config = make_config(
        [s.dsn for s in pg_servers],
        jwt_secret,
        limits={"send_rate_per_second": 0.01, "send_burst": 3, "read_rate_per_second": 0.01, "read_burst": 4},
    )
    async with (
        running_server(config) as running,
        grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        yield dialog_service_pb2_grpc.DialogServiceStub(channel)


async def test_send_over_the_rate_is_resource_exhausted_with_retry_info(
    limited_stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
    cluster_config: ServerConfig,
) -> None:
    a, b = new_pair()
    c, _ = new_pair()

    def send(user: int, peer: int, text: str) -> Awaitable[pb.SendMessageResponse]:
        request = pb.SendMessageRequest(from_user_id=user, to_user_id=peer, text=text)
        return limited_stub.SendMessage(request, metadata=auth_for(user))

    for i in range(3):
        await send(a, b, f"m{i}")
    err = await expect_error(send(a, b, "one too many"), grpc.StatusCode.RESOURCE_EXHAUSTED)
    info, _ = status_details(err)
    assert info is not None and info.reason == "RATE_LIMITED" and info.metadata["method"] == "SendMessage"
    assert "per second per user" in (err.details() or "")
    status = rpc_status.from_call(err)
    (retry,) = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    retry_info = error_details_pb2.RetryInfo()
    retry.Unpack(retry_info)
    assert 90 < retry_info.retry_delay.ToNanoseconds() / 1e9 <= 100
    # Other users are not affected, and reading is not limited.
    await send(c, a, "someone else")
    page = await limited_stub.GetDialog(pb.GetDialogRequest(user_id=a, peer_user_id=b), metadata=auth_for(a))
    assert sorted(m.text for m in page.messages) == ["m0", "m1", "m2"]
    (rows,) = rows_for_pair(cluster_config, (a, b)).values()
    assert sorted(r[3] for r in rows) == ["m0", "m1", "m2"]


async def test_reads_over_the_rate_are_resource_exhausted_with_retry_info(
    limited_stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    a, b = new_pair()
    await limited_stub.SendMessage(
        pb.SendMessageRequest(from_user_id=a, to_user_id=b, text="hi"), metadata=auth_for(a)
    )
    request = pb.GetDialogRequest(user_id=a, peer_user_id=b)
    for _ in range(4):
        page = await limited_stub.GetDialog(request, metadata=auth_for(a))
        assert [m.text for m in page.messages] == ["hi"]
    err = await expect_error(
        limited_stub.GetDialog(request, metadata=auth_for(a)), grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    info, _ = status_details(err)
    assert info is not None and info.reason == "RATE_LIMITED" and info.metadata["method"] == "GetDialog"
    assert "too many GetDialog calls" in (err.details() or "")
    delay = retry_delay_of(err)
    assert delay is not None and 90 < delay <= 100
    # The peer reads the same dialog with a bucket of its own, and the reader may still send.
    peer_page = await limited_stub.GetDialog(
        pb.GetDialogRequest(user_id=b, peer_user_id=a), metadata=auth_for(b)
    )
    assert [m.text for m in peer_page.messages] == ["hi"]
    await limited_stub.SendMessage(
        pb.SendMessageRequest(from_user_id=a, to_user_id=b, text="again"), metadata=auth_for(a)
    )


async def test_oversize_request_is_refused_by_grpc_and_nothing_is_stored(
    dialog_stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
    cluster_config: ServerConfig,
) -> None:
    a, b = new_pair()
    limit = cluster_config.limits.max_request_bytes
    request = pb.SendMessageRequest(from_user_id=a, to_user_id=b, text="x" * (limit + 1))
    err = await expect_error(
        dialog_stub.SendMessage(request, metadata=auth_for(a)), grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert "larger than max" in (err.details() or "")
    assert rows_for_pair(cluster_config, (a, b)) == {}


async def test_oversize_metadata_is_refused_and_nothing_is_stored(
    dialog_stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
    cluster_config: ServerConfig,
) -> None:
    a, b = new_pair()
    padding = (("x-padding", "p" * cluster_config.limits.max_metadata_bytes),)
    request = pb.SendMessageRequest(from_user_id=a, to_user_id=b, text="hi")
    err = await expect_error(
        dialog_stub.SendMessage(request, metadata=auth_for(a) + padding), grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert "metadata" in (err.details() or "").lower()
    assert rows_for_pair(cluster_config, (a, b)) == {}
    # The same call with ordinary metadata goes through.
    reply = await dialog_stub.SendMessage(request, metadata=auth_for(a))
    assert reply.message.text == "hi"
