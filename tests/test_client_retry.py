"""The sync client's retry and error mapping, driven through grpcio-testing's in-process channel.

The test plays the server: it takes each RPC the client makes and terminates it with a chosen
status. Error trailers are built by the server's own mapper (server.errors.to_grpc_status), so
the client decodes exactly what the real server sends. Pure retry arithmetic is unit-tested below.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import grpc
import grpc_testing
import pytest

from client import AdminClient, ChannelSecurity, DialogClient, DialogShardError, FieldViolation, RetryPolicy
from client._retry import Attempts
from client.gen.dialog.v1 import admin_service_pb2 as admin_pb
from client.gen.dialog.v1 import dialog_service_pb2 as pb
from server.errors import FieldViolation as ServerViolation
from server.errors import InvalidArgument, ResourceExhausted, ShardUnavailable, to_grpc_status

DIALOG = pb.DESCRIPTOR.services_by_name["DialogService"]
ADMIN = admin_pb.DESCRIPTOR.services_by_name["AdminService"]
SEND = DIALOG.methods_by_name["SendMessage"]
GET = DIALOG.methods_by_name["GetDialog"]
DELETE_OVERRIDE = ADMIN.methods_by_name["DeleteShardOverride"]


@pytest.fixture
def channel() -> Any:
    return grpc_testing.channel([DIALOG, ADMIN], grpc_testing.strict_real_time())


@pytest.fixture
def background() -> Iterator[Callable[..., Future[Any]]]:
    """Run the client's blocking call in a thread while the test answers its RPCs."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool.submit


def _recording(client: Any) -> list[float]:
    slept: list[float] = []
    client._sleep = slept.append
    return slept


def _fail(rpc: Any, status: grpc.Status) -> None:
    rpc.terminate(None, status.trailing_metadata, status.code, status.details)


def _stored(request: pb.SendMessageRequest) -> pb.SendMessageResponse:
    return pb.SendMessageResponse(
        message=pb.Message(
            message_id="0190a0a0-0000-7000-8000-000000000001",
            from_user_id=request.from_user_id,
            to_user_id=request.to_user_id,
            text=request.text,
        )
    )


def test_unavailable_twice_then_ok_is_one_send_with_one_request_id(
    channel: Any, background: Callable[..., Future[Any]]
) -> None:
    client = DialogClient(channel, retry=RetryPolicy(initial_backoff=0.01, max_backoff=0.01))
    slept = _recording(client)
    future = background(client.send_message, 7, 8, "hello")

    seen: list[pb.SendMessageRequest] = []
    _, request, rpc = channel.take_unary_unary(SEND)
    seen.append(request)
    # A bare UNAVAILABLE (e.g. from a proxy): the client's own backoff.
    rpc.terminate(None, (), grpc.StatusCode.UNAVAILABLE, "connection reset")
    _, request, rpc = channel.take_unary_unary(SEND)
    seen.append(request)
    # The server's UNAVAILABLE says when to come back: the client waits exactly that long.
    _fail(rpc, to_grpc_status(ShardUnavailable(3, "connection refused", retry_after_seconds=0.02)))
    _, request, rpc = channel.take_unary_unary(SEND)
    seen.append(request)
    rpc.terminate(_stored(request), (), grpc.StatusCode.OK, "")

    sent = future.result(timeout=10)
    assert sent.message.text == "hello"
    assert (sent.message.from_user_id, sent.message.to_user_id) == (7, 8)
    assert len(seen) == 3
    assert {r.request_id for r in seen} == {sent.request_id}
    assert len(sent.request_id) == 32
    assert 0 <= slept[0] <= 0.01
    assert slept[1] == pytest.approx(0.02)


def test_each_logical_send_gets_its_own_request_id(
    channel: Any, background: Callable[..., Future[Any]]
) -> None:
    client = DialogClient(channel)
    ids = []
    for text in ("one", "two"):
        future = background(client.send_message, 7, 8, text)
        _, request, rpc = channel.take_unary_unary(SEND)
        rpc.terminate(_stored(request), (), grpc.StatusCode.OK, "")
        ids.append(future.result(timeout=10).request_id)
    assert ids[0] != ids[1]


def test_caller_request_id_is_sent_as_given(channel: Any, background: Callable[..., Future[Any]]) -> None:
    client = DialogClient(channel)
    future = background(lambda: client.send_message(7, 8, "x", request_id="order-42"))
    _, request, rpc = channel.take_unary_unary(SEND)
    rpc.terminate(_stored(request), (), grpc.StatusCode.OK, "")
    assert request.request_id == "order-42"
    assert future.result(timeout=10).request_id == "order-42"


def test_invalid_argument_is_not_retried_and_details_are_decoded(
    channel: Any, background: Callable[..., Future[Any]]
) -> None:
    client = DialogClient(channel)
    slept = _recording(client)
    future = background(client.send_message, 7, 7, "")
    _, _, rpc = channel.take_unary_unary(SEND)
    violations = [
        ServerViolation("to_user_id", "must differ from from_user_id"),
        ServerViolation("text", "must not be blank"),
    ]
    _fail(rpc, to_grpc_status(InvalidArgument(violations)))

    with pytest.raises(DialogShardError) as raised:
        future.result(timeout=10)
    error = raised.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.message == "to_user_id: must differ from from_user_id; text: must not be blank"
    assert error.reason == "INVALID_ARGUMENT"
    assert error.domain == "dialog-shard"
    assert error.field_violations == (
        FieldViolation("to_user_id", "must differ from from_user_id"),
        FieldViolation("text", "must not be blank"),
    )
    assert error.retry_delay is None
    assert error.attempts == 1
    assert slept == []
    assert str(error).startswith("INVALID_ARGUMENT: ")


def test_error_info_metadata_and_retry_info_are_decoded(
    channel: Any, background: Callable[..., Future[Any]]
) -> None:
    client = DialogClient(channel, retry=RetryPolicy(max_attempts=1))
    future = background(client.get_dialog, 7, 8)
    _, _, rpc = channel.take_unary_unary(GET)
    _fail(rpc, to_grpc_status(ShardUnavailable(2, "connection refused", retry_after_seconds=1.5)))
    with pytest.raises(DialogShardError) as raised:
        future.result(timeout=10)
    error = raised.value
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.reason == "SHARD_UNAVAILABLE"
    assert error.metadata == {"shard_id": "2"}
    assert error.retry_delay == pytest.approx(1.5)
    assert error.attempts == 1


def test_gives_up_after_max_attempts_with_the_last_error(
    channel: Any, background: Callable[..., Future[Any]]
) -> None:
    client = DialogClient(channel, retry=RetryPolicy(max_attempts=3, initial_backoff=0, max_backoff=0))
    slept = _recording(client)
    future = background(client.get_dialog, 7, 8)
    for n in range(3):
        _, _, rpc = channel.take_unary_unary(GET)
        rpc.terminate(None, (), grpc.StatusCode.UNAVAILABLE, f"attempt {n + 1}")
    with pytest.raises(DialogShardError) as raised:
        future.result(timeout=10)
    assert raised.value.message == "attempt 3"
    assert raised.value.attempts == 3
    assert len(slept) == 2


def test_retry_info_longer_than_the_deadline_fails_at_once(
    channel: Any, background: Callable[..., Future[Any]]
) -> None:
    client = DialogClient(channel, timeout=5.0)
    slept = _recording(client)
    future = background(client.get_dialog, 7, 8)
    _, _, rpc = channel.take_unary_unary(GET)
    _fail(rpc, to_grpc_status(ShardUnavailable(1, "connection refused", retry_after_seconds=30)))
    with pytest.raises(DialogShardError) as raised:
        future.result(timeout=10)
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert raised.value.attempts == 1
    assert slept == []


def test_deadline_exceeded_is_retried_only_when_safe(
    channel: Any, background: Callable[..., Future[Any]]
) -> None:
    client = AdminClient(channel, retry=RetryPolicy(initial_backoff=0, max_backoff=0))
    _recording(client)
    # Deleting an override twice is not the same as once: a timed-out delete is not repeated.
    future = background(client.delete_override, 7, 8)
    _, _, rpc = channel.take_unary_unary(DELETE_OVERRIDE)
    rpc.terminate(None, (), grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
    with pytest.raises(DialogShardError) as raised:
        future.result(timeout=10)
    assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert raised.value.attempts == 1

    # A read is safe to repeat.
    dialog = DialogClient(channel, retry=RetryPolicy(initial_backoff=0, max_backoff=0))
    _recording(dialog)
    future = background(dialog.get_dialog, 7, 8)
    _, _, rpc = channel.take_unary_unary(GET)
    rpc.terminate(None, (), grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
    _, _, rpc = channel.take_unary_unary(GET)
    rpc.terminate(pb.GetDialogResponse(), (), grpc.StatusCode.OK, "")
    assert future.result(timeout=10).messages == ()


def test_rate_limit_with_retry_info_is_retried_after_the_delay(
    channel: Any, background: Callable[..., Future[Any]]
) -> None:
    client = DialogClient(channel)
    slept = _recording(client)
    future = background(client.send_message, 7, 8, "hi")
    _, first, rpc = channel.take_unary_unary(SEND)
    _fail(rpc, to_grpc_status(ResourceExhausted("slow down", retry_after_seconds=0.2, reason="RATE_LIMITED")))
    _, second, rpc = channel.take_unary_unary(SEND)
    rpc.terminate(_stored(second), (), grpc.StatusCode.OK, "")
    assert future.result(timeout=10).request_id == first.request_id == second.request_id
    assert slept == [pytest.approx(0.2)]


def test_iter_dialog_follows_page_tokens(channel: Any, background: Callable[..., Future[Any]]) -> None:
    client = DialogClient(channel)
    future = background(lambda: [m.message_id for m in client.iter_dialog(7, 8, page_size=2)])
    tokens = []
    for page, next_token in ((["a", "b"], "t1"), (["c"], "")):
        _, request, rpc = channel.take_unary_unary(GET)
        tokens.append(request.page_token)
        assert request.page_size == 2
        response = pb.GetDialogResponse(
            messages=[pb.Message(message_id=i) for i in page], next_page_token=next_token
        )
        rpc.terminate(response, (), grpc.StatusCode.OK, "")
    assert future.result(timeout=10) == ["a", "b", "c"]
    assert tokens == ["", "t1"]


# -- pure retry arithmetic ---------------------------------------------------------------------------


def test_backoff_is_full_jitter_under_a_growing_capped_bound() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=0.5, multiplier=2)
    rng = random.Random(1)
    for retry, bound in ((1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (9, 0.5)):
        delays = [policy.backoff(retry, rng) for _ in range(200)]
        assert all(0 <= d <= bound for d in delays)
        assert max(delays) > bound * 0.8  # jitter spreads over the whole range


def test_attempt_timeouts_shrink_with_the_deadline() -> None:
    now = [100.0]
    attempts = Attempts(
        RetryPolicy(attempt_timeout=3.0), 5.0, safe_to_repeat=True, rng=random.Random(), clock=lambda: now[0]
    )
    assert attempts.next_timeout() == 3.0
    now[0] += 3.5
    assert attempts.next_timeout() == pytest.approx(1.5)
    assert attempts.count == 2


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"initial_backoff": 3, "max_backoff": 1},
        {"multiplier": 0.5},
        {"attempt_timeout": 0},
    ],
)
def test_nonsense_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_values_that_cannot_be_encoded_fail_before_sending(channel: Any) -> None:
    client = DialogClient(channel)
    with pytest.raises(DialogShardError) as raised:
        client.send_message(2**63, 1, "x")  # beyond int64
    error = raised.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "CLIENT_INVALID_ARGUMENT"
    assert [v.field for v in error.field_violations] == ["from_user_id"]
    assert error.attempts == 0

    admin = AdminClient(channel)
    with pytest.raises(DialogShardError) as raised:
        admin.list_messages(pair=(1, "2"), shard_id=2**31)  # type: ignore[arg-type]
    assert [v.field for v in raised.value.field_violations] == ["user_id_2", "shard_id"]


def test_an_unclosed_client_that_owns_its_channel_warns() -> None:
    with pytest.warns(ResourceWarning, match="unclosed DialogClient"):
        client = DialogClient.connect("127.0.0.1:1", ChannelSecurity(plaintext=True))
        del client
    with DialogClient.connect("127.0.0.1:1", ChannelSecurity(plaintext=True)) as closed:
        pass
    with pytest.raises(RuntimeError, match="closed"):
        closed.get_dialog(1, 2)
