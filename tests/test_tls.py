"""TLS and mutual TLS with throwaway certificates (trustme), the client channel helpers, reflection off."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from client import (
    AsyncDialogClient,
    ChannelSecurity,
    DialogClient,
    DialogShardError,
    RetryPolicy,
    aio_channel,
    sync_channel,
)
from client.gen.dialog.v1 import dialog_service_pb2 as pb
from client.gen.dialog.v1 import dialog_service_pb2_grpc
from server.config import ConfigError, ServerConfig
from server.dev.embedded_pg import EmbeddedPostgres
from server.runtime.app import running_server
from tests.support import make_config, rows_for_pair

SERVER_CA = trustme.CA()
CLIENT_CA = trustme.CA()
ROGUE_CA = trustme.CA()
SERVER_CERT = SERVER_CA.issue_cert("127.0.0.1", "localhost")
CLIENT_CERT = CLIENT_CA.issue_cert("backend.dialog.test")
ROGUE_CERT = ROGUE_CA.issue_cert("backend.dialog.test")


def chain(cert: trustme.LeafCert) -> bytes:
    return b"".join(blob.bytes() for blob in cert.cert_chain_pems)


def client_security(cert: trustme.LeafCert | None = None) -> ChannelSecurity:
    return ChannelSecurity(
        root_certificates=SERVER_CA.cert_pem.bytes(),
        client_cert_chain=chain(cert) if cert else None,
        client_private_key=cert.private_key_pem.bytes() if cert else None,
    )


@pytest.fixture(scope="module")
def pem_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tls")
    (directory / "server.pem").write_bytes(chain(SERVER_CERT))
    SERVER_CERT.private_key_pem.write_to_path(str(directory / "server.key"))
    CLIENT_CA.cert_pem.write_to_path(str(directory / "clients-ca.pem"))
    return directory


def tls_config(
    pg_servers: list[EmbeddedPostgres], jwt_secret: str, pem_dir: Path, **tls: Any
) -> ServerConfig:
    files = {"cert_file": str(pem_dir / "server.pem"), "key_file": str(pem_dir / "server.key")}
    return make_config([s.dsn for s in pg_servers], jwt_secret, tls={**files, **tls}, reflection=False)


@pytest_asyncio.fixture(scope="module")
async def tls_address(
    pg_servers: list[EmbeddedPostgres], jwt_secret: str, pem_dir: Path
) -> AsyncIterator[str]:
    """TLS without client certificates, reflection switched off."""
    async with running_server(tls_config(pg_servers, jwt_secret, pem_dir)) as running:
        yield f"127.0.0.1:{running.port}"


@pytest_asyncio.fixture(scope="module")
async def mtls_address(
    pg_servers: list[EmbeddedPostgres], jwt_secret: str, pem_dir: Path
) -> AsyncIterator[str]:
    config = tls_config(
        pg_servers,
        jwt_secret,
        pem_dir,
        client_ca_file=str(pem_dir / "clients-ca.pem"),
        require_client_cert=True,
    )
    async with running_server(config) as running:
        yield f"127.0.0.1:{running.port}"


async def send_over(channel: grpc.aio.Channel, a: int, b: int, text: str) -> pb.SendMessageResponse:
    stub = dialog_service_pb2_grpc.DialogServiceStub(channel)
    request = pb.SendMessageRequest(from_user_id=a, to_user_id=b, text=text)
    response: pb.SendMessageResponse = await stub.SendMessage(request, timeout=10)
    return response


async def test_tls_client_sends_and_reads(
    tls_address: str,
    token_for: Callable[..., Callable[[], str]],
    new_pair: Callable[[], tuple[int, int]],
    cluster_config: ServerConfig,
) -> None:
    a, b = new_pair()
    async with aio_channel(tls_address, client_security(), token=token_for(a)) as channel:
        await send_over(channel, a, b, "over tls")
        page = await dialog_service_pb2_grpc.DialogServiceStub(channel).GetDialog(
            pb.GetDialogRequest(user_id=a, peer_user_id=b), timeout=10
        )
    assert [m.text for m in page.messages] == ["over tls"]

    def blocking_send() -> str:
        with sync_channel(tls_address, client_security(), token=token_for(b)) as channel:
            stub = dialog_service_pb2_grpc.DialogServiceStub(channel)
            reply = stub.SendMessage(
                pb.SendMessageRequest(from_user_id=b, to_user_id=a, text="sync"), timeout=10
            )
            return str(reply.message.text)

    # The server runs on this event loop, so the blocking client runs in a thread.
    assert await asyncio.to_thread(blocking_send) == "sync"
    (rows,) = rows_for_pair(cluster_config, (a, b)).values()
    assert sorted(r[3] for r in rows) == ["over tls", "sync"]


async def test_tls_port_refuses_plaintext_and_untrusted_servers(
    tls_address: str,
    token_for: Callable[..., Callable[[], str]],
    new_pair: Callable[[], tuple[int, int]],
    cluster_config: ServerConfig,
) -> None:
    a, b = new_pair()
    untrusting = ChannelSecurity(root_certificates=ROGUE_CA.cert_pem.bytes())
    for security in (ChannelSecurity(plaintext=True), untrusting):
        async with aio_channel(tls_address, security, token=token_for(a)) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await send_over(channel, a, b, "should not arrive")
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert rows_for_pair(cluster_config, (a, b)) == {}


async def test_mtls_accepts_only_client_certificates_of_the_configured_ca(
    mtls_address: str,
    token_for: Callable[..., Callable[[], str]],
    new_pair: Callable[[], tuple[int, int]],
    cluster_config: ServerConfig,
) -> None:
    a, b = new_pair()
    async with aio_channel(mtls_address, client_security(CLIENT_CERT), token=token_for(a)) as channel:
        reply = await send_over(channel, a, b, "with a client certificate")
    assert reply.message.text == "with a client certificate"
    for name, cert in (("no certificate", None), ("certificate of another CA", ROGUE_CERT)):
        async with aio_channel(mtls_address, client_security(cert), token=token_for(a)) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await send_over(channel, a, b, name)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, name
    (rows,) = rows_for_pair(cluster_config, (a, b)).values()
    assert [r[3] for r in rows] == ["with a client certificate"]


async def test_a_valid_client_certificate_does_not_replace_the_token(
    mtls_address: str, new_pair: Callable[[], tuple[int, int]]
) -> None:
    a, b = new_pair()
    async with aio_channel(mtls_address, client_security(CLIENT_CERT)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await send_over(channel, a, b, "no token")
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def list_services(channel: grpc.aio.Channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    names: list[str] = []
    async for response in call:
        names += [s.name for s in response.list_services_response.service]
    return names


async def test_reflection_switched_off_refuses_listing_while_health_works(
    tls_address: str, channel: grpc.aio.Channel
) -> None:
    # Reflection is on for the session server (the default) ...
    assert "dialog.v1.DialogService" in await list_services(channel)
    # ... and off for this one: `grpcurl list` gets UNIMPLEMENTED, probes still get an answer.
    async with aio_channel(tls_address, client_security()) as tls_channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await list_services(tls_channel)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        health = health_pb2_grpc.HealthStub(tls_channel)
        reply = await health.Check(
            health_pb2.HealthCheckRequest(service="dialog.v1.DialogService"), timeout=10
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    ("tls", "fragment"),
    [
        ({"cert_file": "server.pem"}, "both cert_file and key_file"),
        (
            {"cert_file": "server.pem", "key_file": "server.key", "require_client_cert": True},
            "client_ca_file",
        ),
        ({"cert_file": "missing.pem", "key_file": "server.key"}, "cannot read [tls] cert_file"),
        ({"cert_file": "server.pem", "key_file": "server.key", "verify": False}, "unknown keys in [tls]"),
    ],
)
def test_tls_configuration_mistakes_are_named(pem_dir: Path, tls: dict[str, Any], fragment: str) -> None:
    tls = {k: str(pem_dir / v) if isinstance(v, str) else v for k, v in tls.items()}
    with pytest.raises(ConfigError) as caught:
        make_config(["postgresql://h/db"], "k" * 32, tls=tls)
    assert fragment in str(caught.value)


def test_channel_security_refuses_contradictions() -> None:
    with pytest.raises(ValueError, match="plaintext"):
        ChannelSecurity(plaintext=True, root_certificates=b"x")
    with pytest.raises(ValueError, match="go together"):
        ChannelSecurity(client_cert_chain=b"x")


async def test_typed_clients_over_mutual_tls(
    mtls_address: str, token_for: Callable[..., Callable[[], str]], new_pair: Callable[[], tuple[int, int]]
) -> None:
    a, b = new_pair()
    security = client_security(CLIENT_CERT)
    async with AsyncDialogClient.connect(mtls_address, security, token=token_for(a)) as client:
        sent = await client.send_message(a, b, "typed over mtls")

    def blocking_read() -> list[str]:
        with DialogClient.connect(mtls_address, security, token=token_for(b)) as client:
            return [m.message_id for m in client.iter_dialog(b, a)]

    assert await asyncio.to_thread(blocking_read) == [sent.message.message_id]

    # Without a client certificate the handshake fails: UNAVAILABLE, retried until the deadline.
    async with AsyncDialogClient.connect(
        mtls_address, client_security(), token=token_for(a), retry=RetryPolicy(initial_backoff=0.01)
    ) as client:
        with pytest.raises(DialogShardError) as refused:
            await client.get_dialog(a, b, timeout=1.0)
    assert refused.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
