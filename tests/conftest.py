"""Shared fixtures: real PostgreSQL servers (tests.pgfixtures) and a real gRPC server on a real port.

The session runs one dialog-shard server whose four shards live on four
separate PostgreSQL servers (control tables on the first). Tests keep out of
each other's way by drawing fresh random user ids (`new_pair`).
"""

from __future__ import annotations

import functools
import random
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from client.gen.dialog.v1 import admin_service_pb2_grpc, dialog_service_pb2_grpc
from server.auth import issue_token
from server.config import ServerConfig
from server.dev.embedded_pg import EmbeddedPostgres
from server.runtime.app import RunningServer, running_server
from tests.processes import Result, write_server_config
from tests.support import S3_CREDENTIALS, S3Server, dialogctl, make_config, start_s3_server, token_provider

pytest_plugins = ["tests.pgfixtures"]

_rng = random.Random()


@pytest.fixture(scope="session")
def jwt_secret() -> str:
    return secrets.token_urlsafe(48)


@pytest.fixture(scope="session")
def cluster_config(pg_servers: list[EmbeddedPostgres], jwt_secret: str) -> ServerConfig:
    """Four shards, each on its own PostgreSQL server."""
    return make_config([s.dsn for s in pg_servers], jwt_secret)


@pytest_asyncio.fixture(scope="session")
async def server(cluster_config: ServerConfig) -> AsyncIterator[RunningServer]:
    async with running_server(cluster_config) as running:
        yield running


@pytest.fixture(scope="session")
def address(server: RunningServer) -> str:
    return f"127.0.0.1:{server.port}"


@pytest_asyncio.fixture(scope="session")
async def channel(address: str) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(address) as ch:
        yield ch


@pytest.fixture(scope="session")
def dialog_stub(channel: grpc.aio.Channel) -> dialog_service_pb2_grpc.DialogServiceAsyncStub:
    return dialog_service_pb2_grpc.DialogServiceStub(channel)


@pytest.fixture(scope="session")
def admin_stub(channel: grpc.aio.Channel) -> admin_service_pb2_grpc.AdminServiceAsyncStub:
    return admin_service_pb2_grpc.AdminServiceStub(channel)


@pytest.fixture(scope="session")
def auth_for(cluster_config: ServerConfig) -> Callable[..., tuple[tuple[str, str], ...]]:
    """Metadata with a valid token: auth_for(user_id) or auth_for(admin=True)."""

    def make(
        user_id: int | None = None, *, admin: bool = False, **kwargs: Any
    ) -> tuple[tuple[str, str], ...]:
        token = issue_token(cluster_config.auth, user_id=user_id, admin=admin, **kwargs)
        return (("authorization", f"Bearer {token}"),)

    return make


@pytest.fixture(scope="session")
def admin_auth(auth_for: Callable[..., tuple[tuple[str, str], ...]]) -> tuple[tuple[str, str], ...]:
    return auth_for(admin=True)


@pytest.fixture
def token_for(cluster_config: ServerConfig) -> Callable[..., Callable[[], str]]:
    """A token provider for a user (or the admin), as an application would pass to the client."""
    return functools.partial(token_provider, cluster_config)


@pytest.fixture
def ctl_config(tmp_path: Path, cluster_config: ServerConfig, address: str, jwt_secret: str) -> Path:
    """A config file for dialogctl naming the session's server and shards."""
    return write_server_config(tmp_path / "dialog-shard.toml", cluster_config, address, jwt_secret)


@pytest.fixture
def ctl(ctl_config: Path) -> Callable[..., Awaitable[Result]]:
    """`await ctl("stats", "--json")`: dialogctl with the session server's config."""
    return functools.partial(dialogctl, ctl_config)


@pytest.fixture
def new_pair() -> Callable[[], tuple[int, int]]:
    """Fresh random user ids (over the whole int64 range) that no other test uses."""

    def make() -> tuple[int, int]:
        a = _rng.randrange(1, 2**63)
        b = _rng.randrange(1, 2**63)
        return (a, b) if a != b else make()

    return make


@pytest.fixture(scope="session")
def single_db_config(pg_server: EmbeddedPostgres, jwt_secret: str) -> Iterator[ServerConfig]:
    """The seed's layout: messages_0..3 side by side in one database."""
    pg_server.create_database("single")
    dsn = pg_server.dsn_for("single")
    yield replace(make_config([dsn] * 4, jwt_secret))


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A local S3-compatible server (moto_server) for the archive, with its credentials in the environment."""
    proc, server = start_s3_server()
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in S3_CREDENTIALS.items():
                patch.setenv(name, value)
            yield server
    finally:
        proc.terminate()
        proc.wait(timeout=10)
