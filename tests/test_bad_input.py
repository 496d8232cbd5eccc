"""Bad input and bad credentials: the right status, an actionable message, and nothing written."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import jwt
import pytest

from client.gen.dialog.v1 import admin_service_pb2 as admin_pb
from client.gen.dialog.v1 import admin_service_pb2_grpc, dialog_service_pb2_grpc
from client.gen.dialog.v1 import dialog_service_pb2 as pb
from server.config import LimitsConfig, ServerConfig
from server.services.validation import Violations, check_text
from tests.support import Metadata, expect_error, rows_for_pair, status_details


@pytest.mark.parametrize(
    ("from_delta", "to_id", "text", "field", "fragment"),
    [
        (0, 0, "hi", "to_user_id", "1..9223372036854775807"),
        (0, -5, "hi", "to_user_id", "got -5"),
        (0, None, "", "text", "non-whitespace"),
        (0, None, "   \n", "text", "non-whitespace"),
        (0, None, "a\x00b", "text", "NUL"),
        (0, None, "x" * 4097, "text", "4096"),
        (0, "self", "hi", "to_user_id", "differ"),
    ],
)
async def test_invalid_send_is_invalid_argument_with_field_violation(
    dialog_stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
    cluster_config: ServerConfig,
    from_delta: int,
    to_id: int | str | None,
    text: str,
    field: str,
    fragment: str,
) -> None:
    a, b = new_pair()
    to = b if to_id is None else (a if to_id == "self" else int(to_id))
    request = pb.SendMessageRequest(from_user_id=a, to_user_id=to, text=text)
    err = await expect_error(
        dialog_stub.SendMessage(request, metadata=auth_for(a)), grpc.StatusCode.INVALID_ARGUMENT
    )
    info, violations = status_details(err)
    assert info is not None and info.reason == "INVALID_ARGUMENT" and info.domain == "dialog-shard"
    assert any(f == field and fragment in d for f, d in violations), violations
    assert rows_for_pair(cluster_config, (a, max(to, 1))) == {}


async def test_longest_accepted_text_is_stored(
    dialog_stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
    cluster_config: ServerConfig,
) -> None:
    a, b = new_pair()
    text = "𝄞" * 4096  # 4096 characters and 16384 UTF-8 bytes: exactly both default limits
    await dialog_stub.SendMessage(
        pb.SendMessageRequest(from_user_id=a, to_user_id=b, text=text), metadata=auth_for(a)
    )
    (rows,) = rows_for_pair(cluster_config, (a, b)).values()
    assert [r[3] for r in rows] == [text]


def test_byte_limit_applies_separately_from_the_character_limit() -> None:
    limits = LimitsConfig(max_text_chars=100, max_text_bytes=20)
    violations = Violations()
    check_text(violations, "text", "é" * 11, limits)  # 11 characters, 22 bytes
    assert [(v.field, v.description) for v in violations] == [
        ("text", "is 22 bytes in UTF-8; the limit is 20")
    ]
    ok = Violations()
    check_text(ok, "text", "é" * 10, limits)
    assert not ok


async def test_all_violations_are_reported_at_once(
    dialog_stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    a, _ = new_pair()
    err = await expect_error(
        dialog_stub.SendMessage(
            pb.SendMessageRequest(from_user_id=a, to_user_id=-1, text="", request_id="has space"),
            metadata=auth_for(a),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    _, violations = status_details(err)
    assert {f for f, _ in violations} == {"to_user_id", "text", "request_id"}


async def test_negative_page_size_and_bad_tokens(
    dialog_stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    a, b = new_pair()
    for _ in range(3):
        await dialog_stub.SendMessage(
            pb.SendMessageRequest(from_user_id=a, to_user_id=b, text="m"), metadata=auth_for(a)
        )
    err = await expect_error(
        dialog_stub.GetDialog(
            pb.GetDialogRequest(user_id=a, peer_user_id=b, page_size=-1), metadata=auth_for(a)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert status_details(err)[1][0][0] == "page_size"
    page = await dialog_stub.GetDialog(
        pb.GetDialogRequest(user_id=a, peer_user_id=b, page_size=1), metadata=auth_for(a)
    )
    token = page.next_page_token
    assert token
    c, d = new_pair()
    bad_tokens = {
        "garbage": "not a token!",
        "tampered": token[:-2] + ("AA" if token[-2:] != "AA" else "BB"),
        "truncated": token[:8],
    }
    for name, bad in bad_tokens.items():
        err = await expect_error(
            dialog_stub.GetDialog(
                pb.GetDialogRequest(user_id=a, peer_user_id=b, page_size=1, page_token=bad),
                metadata=auth_for(a),
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert status_details(err)[1][0][0] == "page_token", name
    # A genuine token of one dialog cannot page another dialog, nor the same dialog in the other order.
    for request in (
        pb.GetDialogRequest(user_id=c, peer_user_id=d, page_size=1, page_token=token),
        pb.GetDialogRequest(
            user_id=a, peer_user_id=b, page_size=1, page_token=token, order=pb.MESSAGE_ORDER_OLDEST_FIRST
        ),
    ):
        err = await expect_error(
            dialog_stub.GetDialog(request, metadata=auth_for(request.user_id)),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert "another dialog or order" in (err.details() or "")
    # The other participant may continue the same dialog with it.
    following = await dialog_stub.GetDialog(
        pb.GetDialogRequest(user_id=b, peer_user_id=a, page_size=1, page_token=token), metadata=auth_for(b)
    )
    assert following.messages[0].message_id < page.messages[0].message_id


async def test_missing_and_invalid_tokens_are_unauthenticated(
    dialog_stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
    cluster_config: ServerConfig,
    jwt_secret: str,
) -> None:
    a, b = new_pair()
    request = pb.SendMessageRequest(from_user_id=a, to_user_id=b, text="hi")
    now = int(time.time())
    cases: dict[str, tuple[tuple[tuple[str, str], ...], str]] = {
        "missing": ((), "missing credentials"),
        "not bearer": ((("authorization", "Basic abc"),), "Bearer"),
        "malformed": ((("authorization", "Bearer abc.def"),), "malformed"),
        "wrong key": (
            (("authorization", "Bearer " + jwt.encode({"sub": str(a), "exp": now + 60}, "x" * 40, "HS256")),),
            "signature",
        ),
        "expired": (auth_for(a, ttl_seconds=-3600), "expired"),
        "future nbf": (auth_for(a, extra_claims={"nbf": now + 3600}), "not valid yet"),
        "alg none": (
            (("authorization", "Bearer " + jwt.encode({"sub": str(a), "exp": now + 60}, "", "none")),),
            "algorithm",
        ),
        "no exp": (
            (("authorization", "Bearer " + jwt.encode({"sub": str(a)}, jwt_secret, "HS256")),),
            "exp",
        ),
        "no sub": (
            (("authorization", "Bearer " + jwt.encode({"iat": now, "exp": now + 60}, jwt_secret, "HS256")),),
            "sub",
        ),
    }
    for name, (metadata, fragment) in cases.items():
        err = await expect_error(
            dialog_stub.SendMessage(request, metadata=metadata), grpc.StatusCode.UNAUTHENTICATED
        )
        assert fragment in (err.details() or ""), (name, err.details())
        assert jwt_secret not in (err.details() or "")
    assert rows_for_pair(cluster_config, (a, b)) == {}


async def test_users_act_only_as_themselves(
    dialog_stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    admin_stub: admin_service_pb2_grpc.AdminServiceAsyncStub,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
    cluster_config: ServerConfig,
) -> None:
    a, b = new_pair()
    mallory, _ = new_pair()
    await dialog_stub.SendMessage(
        pb.SendMessageRequest(from_user_id=a, to_user_id=b, text="secret"), metadata=auth_for(a)
    )
    err = await expect_error(
        dialog_stub.SendMessage(
            pb.SendMessageRequest(from_user_id=a, to_user_id=b, text="forged"), metadata=auth_for(mallory)
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert "itself" in (err.details() or "")
    # Reading someone else's dialog is refused the same way whether it exists or not.
    c, d = new_pair()
    details = set()
    for user, peer in ((a, b), (c, d)):
        err = await expect_error(
            dialog_stub.GetDialog(
                pb.GetDialogRequest(user_id=user, peer_user_id=peer), metadata=auth_for(mallory)
            ),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        details.add(err.details())
    assert len(details) == 1
    # AdminService needs the admin claim; a user token is not enough.
    err = await expect_error(
        admin_stub.GetShardStats(admin_pb.GetShardStatsRequest(), metadata=auth_for(a)),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert "admin" in (err.details() or "")
    (rows,) = rows_for_pair(cluster_config, (a, b)).values()
    assert [r[3] for r in rows] == ["secret"]


async def test_health_and_reflection_need_no_token(channel: grpc.aio.Channel) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "dialog.v1.DialogService", "dialog.v1.AdminService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
