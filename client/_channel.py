"""Channels to dialog-shard: plaintext, TLS or mutual TLS, with a bearer token on every call.

The token comes from a provider (a callable returning the current JWT), asked
once per call, so tokens can be refreshed without rebuilding the channel. It
travels as `authorization: Bearer <token>` metadata; over a plaintext channel
(local development only) it travels in clear.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

#: Returns the bearer token (a JWT) to send with the next call.
TokenProvider = Callable[[], str]


@dataclass(frozen=True, slots=True)
class ChannelSecurity:
    """How to reach the server: plaintext, or TLS with optional client certificate (mutual TLS)."""

    #: Connect without TLS (local development); the other fields must then be unset.
    plaintext: bool = False
    #: PEM CAs that sign the server certificate; None trusts the system's roots.
    root_certificates: bytes | None = None
    #: PEM client certificate chain for mutual TLS.
    client_cert_chain: bytes | None = None
    #: PEM private key of the client certificate.
    client_private_key: bytes | None = None

    def __post_init__(self) -> None:
        tls_material = (self.root_certificates, self.client_cert_chain, self.client_private_key)
        if self.plaintext and any(m is not None for m in tls_material):
            raise ValueError("plaintext=True cannot be combined with certificates")
        if (self.client_cert_chain is None) != (self.client_private_key is None):
            raise ValueError("client_cert_chain and client_private_key go together")

    def credentials(self) -> grpc.ChannelCredentials | None:
        """The channel credentials, or None for plaintext."""
        if self.plaintext:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.client_private_key,
            certificate_chain=self.client_cert_chain,
        )


def _with_token(metadata: Any, token: TokenProvider) -> list[tuple[str, str | bytes]]:
    pairs = [(k, v) for k, v in (metadata or ()) if k != "authorization"]
    return [*pairs, ("authorization", f"Bearer {token()}")]


class _AioBearerDetails:
    """Call details with the bearer token added (grpc.aio files an interceptor under one kind of
    call only: `_AioBearer` serves unary calls, `_AioStreamBearer` server streams)."""

    def __init__(self, token: TokenProvider) -> None:
        self._token = token

    def _details(self, client_call_details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return grpc.aio.ClientCallDetails(
            method=client_call_details.method,
            timeout=client_call_details.timeout,
            metadata=grpc.aio.Metadata(*_with_token(client_call_details.metadata, self._token)),
            credentials=client_call_details.credentials,
            wait_for_ready=client_call_details.wait_for_ready,
        )


class _AioBearer(_AioBearerDetails, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request)


class _AioStreamBearer(_AioBearerDetails, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request)


@dataclass(frozen=True, slots=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Any
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class _SyncBearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds the bearer token to every unary call and every server stream (SubscribeMessages)."""

    def __init__(self, token: TokenProvider) -> None:
        self._token = token

    def _details(self, client_call_details: Any) -> _CallDetails:
        return _CallDetails(
            method=client_call_details.method,
            timeout=client_call_details.timeout,
            metadata=_with_token(client_call_details.metadata, self._token),
            credentials=client_call_details.credentials,
            wait_for_ready=client_call_details.wait_for_ready,
            compression=client_call_details.compression,
        )

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)


def aio_channel(
    address: str,
    security: ChannelSecurity,
    *,
    token: TokenProvider | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """An asyncio channel to `address` (`host:port`); use it with `async with`."""
    interceptors: list[grpc.aio.ClientInterceptor] | None = None
    if token is not None:
        interceptors = [_AioBearer(token), _AioStreamBearer(token)]
    credentials = security.credentials()
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)


def sync_channel(
    address: str,
    security: ChannelSecurity,
    *,
    token: TokenProvider | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """A blocking channel to `address` (`host:port`); use it with `with`."""
    credentials = security.credentials()
    if credentials is None:
        channel = grpc.insecure_channel(address, options=options)
    else:
        channel = grpc.secure_channel(address, credentials, options=options)
    if token is not None:
        channel = grpc.intercept_channel(channel, _SyncBearer(token))
    return channel
