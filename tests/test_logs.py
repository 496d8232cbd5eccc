"""Logs: a `dialog-server` process writes one JSON line per RPC to stderr, and never a secret.

The server runs as its own process on the session's PostgreSQL servers; its stderr (a pipe, so
JSON by default) is parsed line by line after it stops. The formatters are also checked on
their own, including the choice of text for a terminal (a real pseudo-terminal).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import signal
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import grpc
import pytest

from client.gen.dialog.v1 import admin_service_pb2 as apb
from client.gen.dialog.v1 import admin_service_pb2_grpc, dialog_service_pb2_grpc
from client.gen.dialog.v1 import dialog_service_pb2 as pb
from server.auth import issue_token
from server.config import LogConfig, ServerConfig
from server.observability.logs import RPC_LOGGER, JsonFormatter, TextFormatter, configure_logging
from server.routing import calculate_shard
from tests.processes import CHILD_TIMEOUT_SECONDS, child_env, write_server_config

DIALOG_SERVER = Path(sys.executable).parent / "dialog-server"


async def test_one_json_line_per_rpc_without_text_or_tokens(
    tmp_path: Path, cluster_config: ServerConfig, jwt_secret: str, new_pair: Callable[[], tuple[int, int]]
) -> None:
    config = write_server_config(tmp_path / "server.toml", cluster_config, "127.0.0.1:0", jwt_secret)
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            str(DIALOG_SERVER),
            "--config",
            str(config),
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            env=child_env(),
        )
    try:
        assert proc.stdout is not None
        address = None
        while address is None:
            line = (await asyncio.wait_for(proc.stdout.readline(), CHILD_TIMEOUT_SECONDS)).decode()
            assert line, f"dialog-server exited early:\n{stderr_path.read_text()}"
            if match := re.search(r"serving on (\S+:\d+)", line):
                address = match.group(1)

        a, b = new_pair()
        shard = calculate_shard(a, b, cluster_config.num_shards)
        token = issue_token(cluster_config.auth, user_id=a)
        admin_token = issue_token(cluster_config.auth, admin=True)
        admin_auth = (("authorization", f"Bearer {admin_token}"),)
        auth = (("authorization", f"Bearer {token}"), ("x-request-id", "trace-42"))
        secret_text = f"do-not-log-{uuid.uuid4()}"
        bogus_token = f"bogus-{uuid.uuid4()}"
        async with grpc.aio.insecure_channel(address) as channel:
            stub = dialog_service_pb2_grpc.DialogServiceStub(channel)
            for i in range(2):
                request = pb.SendMessageRequest(
                    from_user_id=a, to_user_id=b, text=secret_text, request_id=f"send-{i}"
                )
                await stub.SendMessage(request, metadata=auth)
            first = await stub.GetDialog(
                pb.GetDialogRequest(user_id=a, peer_user_id=b, page_size=1), metadata=auth
            )
            page_token = first.next_page_token
            assert page_token
            await stub.GetDialog(
                pb.GetDialogRequest(user_id=a, peer_user_id=b, page_size=1, page_token=page_token),
                metadata=auth,
            )
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await stub.SendMessage(
                    pb.SendMessageRequest(from_user_id=b, to_user_id=a, text=secret_text), metadata=auth
                )
            assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.aio.AioRpcError) as unauthenticated:
                await stub.GetDialog(
                    pb.GetDialogRequest(user_id=a, peer_user_id=b),
                    metadata=(("authorization", f"Bearer {bogus_token}"),),
                )
            assert unauthenticated.value.code() is grpc.StatusCode.UNAUTHENTICATED
            # An admin reading the pair's messages is traced as the admin.
            admin = admin_service_pb2_grpc.AdminServiceStub(channel)
            listed = await admin.ListMessages(
                apb.ListMessagesRequest(user_id_1=a, user_id_2=b), metadata=admin_auth
            )
            assert len(listed.messages) == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), CHILD_TIMEOUT_SECONDS) == 0

    text = stderr_path.read_text()
    for secret in (secret_text, token, admin_token, bogus_token, page_token):
        assert secret not in text
        assert secret.split(".")[-1] not in text  # not even a token's signature
    entries = [json.loads(line) for line in text.splitlines()]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= e.keys() for e in entries)
    rpcs = [e for e in entries if e["logger"] == "server.rpc"]
    outcomes = [(e["grpc_method"], e["grpc_code"], e["shard"]) for e in rpcs]
    assert outcomes == [
        ("SendMessage", "OK", shard),
        ("SendMessage", "OK", shard),
        ("GetDialog", "OK", shard),
        ("GetDialog", "OK", shard),
        ("SendMessage", "PermissionDenied", None),
        ("GetDialog", "Unauthenticated", None),
        ("ListMessages", "OK", shard),
    ]
    # Every line names the caller: the user, the admin, or nobody when the token did not verify.
    assert [e["principal"] for e in rpcs] == [f"user:{a}"] * 5 + ["anonymous", "admin"]
    assert [e["grpc_service"] for e in rpcs] == ["dialog.v1.DialogService"] * 6 + ["dialog.v1.AdminService"]
    for entry in rpcs:
        assert entry["level"] == "INFO"
        assert isinstance(entry["duration_ms"], float) and entry["duration_ms"] >= 0
        assert entry["peer"].startswith("ipv4:127.0.0.1:")
    assert [e.get("x_request_id") for e in rpcs] == ["trace-42"] * 5 + [None, None]
    assert [e.get("request_id") for e in rpcs[:2]] == ["send-0", "send-1"]
    # Only the fields the RPC log is allowed to write.
    allowed = {"time", "level", "logger", "message", "grpc_service", "grpc_method", "grpc_code"}
    allowed |= {"duration_ms", "shard", "principal", "peer", "x_request_id", "request_id"}
    assert all(e.keys() <= allowed for e in rpcs)


def _record(**fields: Any) -> logging.LogRecord:
    record = logging.LogRecord("server.rpc", logging.INFO, __file__, 1, "%s done", ("Call",), None)
    record.__dict__.update(fields)
    return record


def test_formatters() -> None:
    entry = json.loads(JsonFormatter().format(_record(grpc_code="OK", shard=2)))
    assert entry["message"] == "Call done" and entry["grpc_code"] == "OK" and entry["shard"] == 2
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])
    line = TextFormatter().format(_record(grpc_code="OK", shard=2, peer=None))
    assert line.endswith("INFO server.rpc: Call done shard=2")


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, its handlers and level restored afterwards (pytest's capture lives there)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger(RPC_LOGGER).disabled = False


@pytest.mark.parametrize(
    ("fmt", "terminal", "expect_json"),
    [("auto", False, True), ("auto", True, False), ("json", True, True), ("text", False, False)],
)
def test_format_follows_config_and_terminal(
    root_logger: logging.Logger, fmt: str, terminal: bool, expect_json: bool
) -> None:
    primary, secondary = os.openpty()
    os.close(secondary)
    stream: TextIO = os.fdopen(primary, "w") if terminal else io.StringIO()
    if not terminal:
        os.close(primary)
    with stream:
        configure_logging(LogConfig(format=fmt, level="INFO"), stream)
        (handler,) = root_logger.handlers
        assert isinstance(handler.formatter, JsonFormatter if expect_json else TextFormatter)


def test_rpc_lines_can_be_switched_off(root_logger: logging.Logger) -> None:
    stream = io.StringIO()
    configure_logging(LogConfig(format="json", rpc=False), stream)
    logging.getLogger(RPC_LOGGER).info("call")
    logging.getLogger("server.runtime.app").info("other")
    assert [json.loads(line)["logger"] for line in stream.getvalue().splitlines()] == ["server.runtime.app"]
