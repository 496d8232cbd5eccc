"""The session's real server driven by the real grpcurl binary, plaintext, through server reflection.

grpcurl exits with 64 + the gRPC status code when a call fails (80 for UNAUTHENTICATED, 67 for
INVALID_ARGUMENT). The server runs on this process's event loop, so subprocesses are awaited.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from server.runtime.app import RunningServer
from tests.processes import Result, run_async
from tests.support import wait_until

GRPCURL = Path(sys.executable).parent / "grpcurl"
UNAUTHENTICATED_EXIT = 64 + 16
INVALID_ARGUMENT_EXIT = 64 + 3


async def grpcurl(*args: str) -> Result:
    return await run_async(GRPCURL, "-plaintext", "-max-time", "20", *args)


@pytest.fixture(scope="session")
def bearer(auth_for: Callable[..., tuple[tuple[str, str], ...]]) -> Callable[[int], str]:
    """`-H` value with a valid token for a user."""

    def make(user_id: int) -> str:
        ((key, value),) = auth_for(user_id)
        return f"{key}: {value}"

    return make


def test_grpcurl_binary_is_installed() -> None:
    assert GRPCURL.is_file()


async def test_list_shows_the_services(address: str) -> None:
    result = await grpcurl(address, "list")
    assert result.returncode == 0, result.stderr
    services = set(result.stdout.split())
    assert {"dialog.v1.DialogService", "dialog.v1.AdminService", "grpc.health.v1.Health"} <= services


async def test_describe_dialog_service_shows_both_rpcs(address: str) -> None:
    result = await grpcurl(address, "describe", "dialog.v1.DialogService")
    assert result.returncode == 0, result.stderr
    assert "dialog.v1.DialogService is a service:" in result.stdout
    assert (
        "rpc SendMessage ( .dialog.v1.SendMessageRequest ) returns ( .dialog.v1.SendMessageResponse );"
        in result.stdout
    )
    assert (
        "rpc GetDialog ( .dialog.v1.GetDialogRequest ) returns ( .dialog.v1.GetDialogResponse );"
        in result.stdout
    )

    message = await grpcurl(address, "describe", "dialog.v1.SendMessageRequest")
    assert message.returncode == 0, message.stderr
    assert "int64 from_user_id = 1;" in message.stdout
    assert "string text = 3;" in message.stdout


async def test_send_and_read_back(
    address: str, bearer: Callable[[int], str], new_pair: Callable[[], tuple[int, int]]
) -> None:
    a, b = new_pair()
    text = "hello from grpcurl ✓"
    request = {"from_user_id": str(a), "to_user_id": b, "text": text, "request_id": "grpcurl-1"}
    sent = await grpcurl(
        "-H", bearer(a), "-d", json.dumps(request), address, "dialog.v1.DialogService/SendMessage"
    )
    message = sent.json()["message"]
    assert message["text"] == text
    # proto3 JSON: int64 as strings.
    assert (message["from_user_id"], message["to_user_id"]) == (str(a), str(b))
    assert message["create_time"].endswith("Z")

    # The same request_id again is a replay of the stored message.
    again = await grpcurl(
        "-H", bearer(a), "-d", json.dumps(request), address, "dialog.v1.DialogService/SendMessage"
    )
    replay = again.json()
    assert replay["replayed"] is True
    assert replay["message"]["message_id"] == message["message_id"]

    # The peer reads it back.
    page = await grpcurl(
        "-H",
        bearer(b),
        "-d",
        json.dumps({"user_id": b, "peer_user_id": a}),
        address,
        "dialog.v1.DialogService/GetDialog",
    )
    messages = page.json()["messages"]
    assert [(m["message_id"], m["text"]) for m in messages] == [(message["message_id"], text)]


async def test_call_without_token_is_unauthenticated(
    address: str, new_pair: Callable[[], tuple[int, int]]
) -> None:
    a, b = new_pair()
    result = await grpcurl(
        "-d",
        json.dumps({"from_user_id": a, "to_user_id": b, "text": "no token"}),
        address,
        "dialog.v1.DialogService/SendMessage",
    )
    assert result.returncode == UNAUTHENTICATED_EXIT, result.stderr
    assert "Code: Unauthenticated" in result.stderr
    assert "authorization" in result.stderr  # the message says what to send
    assert result.stdout == ""


async def test_admin_call_with_user_token_is_refused(address: str, bearer: Callable[[int], str]) -> None:
    result = await grpcurl("-H", bearer(7), "-d", "{}", address, "dialog.v1.AdminService/GetShardStats")
    assert result.returncode == 64 + 7, result.stderr
    assert "Code: PermissionDenied" in result.stderr


async def test_invalid_request_is_invalid_argument(
    address: str, bearer: Callable[[int], str], new_pair: Callable[[], tuple[int, int]]
) -> None:
    a, b = new_pair()
    result = await grpcurl(
        "-H",
        bearer(a),
        "-d",
        json.dumps({"from_user_id": a, "to_user_id": b, "text": ""}),
        address,
        "dialog.v1.DialogService/SendMessage",
    )
    assert result.returncode == INVALID_ARGUMENT_EXIT, result.stderr
    assert "Code: InvalidArgument" in result.stderr
    assert "text" in result.stderr

    # Reading the dialog shows nothing was stored.
    page = await grpcurl(
        "-H", bearer(a), "-d", json.dumps({"user_id": a, "peer_user_id": b}), address,
        "dialog.v1.DialogService/GetDialog",
    )  # fmt: skip
    assert page.json().get("messages", []) == []


async def test_health_check_is_serving(address: str) -> None:
    overall = await grpcurl(address, "grpc.health.v1.Health/Check")
    assert overall.json() == {"status": "SERVING"}
    for service in ("dialog.v1.DialogService", "dialog.v1.AdminService"):
        result = await grpcurl("-d", json.dumps({"service": service}), address, "grpc.health.v1.Health/Check")
        assert result.json() == {"status": "SERVING"}
    unknown = await grpcurl("-d", '{"service": "no.such.Service"}', address, "grpc.health.v1.Health/Check")
    assert unknown.returncode == 64 + 5, unknown.stderr  # NOT_FOUND


def _json_stream(text: str) -> list[dict[str, Any]]:
    """The JSON objects grpcurl printed one after the other (one per streamed response)."""
    decoder, found, at = json.JSONDecoder(), [], 0
    while text[at:].strip():
        at += len(text[at:]) - len(text[at:].lstrip())
        value, at = decoder.raw_decode(text, at)
        found.append(value)
    return found


async def test_subscribe_and_list_dialogs_through_reflection(
    address: str,
    server: RunningServer,
    bearer: Callable[[int], str],
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    a, b = new_pair()
    assert server.delivery is not None and server.delivery.relay is not None
    delivery = server.delivery
    before = delivery.subscribers
    # The stream never ends by itself: grpcurl stops it at -max-time (DEADLINE_EXCEEDED).
    subscribing = asyncio.create_task(
        run_async(
            GRPCURL,
            "-plaintext",
            "-max-time",
            "8",
            "-H",
            bearer(b),
            "-d",
            json.dumps({"user_id": b}),
            address,
            "dialog.v1.DialogService/SubscribeMessages",
        )
    )
    await wait_until(lambda: delivery.subscribers > before, "grpcurl subscribed")
    request = {"from_user_id": a, "to_user_id": b, "text": "to a grpcurl subscriber"}
    sent = await grpcurl(
        "-H", bearer(a), "-d", json.dumps(request), address, "dialog.v1.DialogService/SendMessage"
    )
    assert sent.returncode == 0, sent.stderr
    streamed = await subscribing
    assert streamed.returncode == 64 + 4, streamed.stderr
    first, delivered = _json_stream(streamed.stdout)
    assert "message" not in first and first["resume_token"]
    assert delivered["message"] == sent.json()["message"] and delivered["resume_token"]

    await server.delivery.relay.catch_up()
    listed = await grpcurl(
        "-H", bearer(b), "-d", json.dumps({"user_id": b}), address, "dialog.v1.DialogService/ListDialogs"
    )
    [dialog] = listed.json()["dialogs"]
    assert (dialog["peer_user_id"], dialog["message_count"]) == (str(a), "1")
    assert dialog["last_message"] == sent.json()["message"]
