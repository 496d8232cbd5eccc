"""One logical call = attempts with backoff under one deadline; sync and asyncio flavours.

Both flavours share the decisions (`client._retry.Attempts`) and the error mapping
(`client._errors.error_from_rpc`); they differ only in how they call and how they sleep.
"""

from __future__ import annotations

import asyncio
import random
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import grpc

from client._channel import ChannelSecurity, TokenProvider, aio_channel, sync_channel
from client._errors import DialogShardError, error_from_rpc
from client._retry import Attempts, RetryPolicy

_Response = TypeVar("_Response")
#: The generated stub class a client calls through (e.g. DialogServiceStub).
_Stub = TypeVar("_Stub")
_Item = TypeVar("_Item")

#: Metadata pairs added to one call, e.g. `[("x-trace-id", "abc")]`.
Metadata = Sequence[tuple[str, str]]

DEFAULT_TIMEOUT = 10.0


class _Base:
    def __init__(self, *, timeout: float | None, retry: RetryPolicy, owns_channel: bool) -> None:
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive seconds or None, got {timeout}")
        self._timeout = timeout
        self._retry = retry
        self._owns_channel = owns_channel
        self._rng = random.Random()
        self._closed = False

    def _attempts(self, timeout: float | None, safe_to_repeat: bool) -> Attempts:
        if self._closed:
            raise RuntimeError(f"the {type(self).__name__} is closed")
        return Attempts(
            self._retry,
            self._timeout if timeout is None else timeout,
            safe_to_repeat=safe_to_repeat,
            rng=self._rng,
        )

    def __del__(self) -> None:
        # getattr: __init__ may have raised before setting them.
        if getattr(self, "_owns_channel", False) and not getattr(self, "_closed", True):
            warnings.warn(
                f"unclosed {type(self).__name__}: use it with `with` or call close()",
                ResourceWarning,
                stacklevel=1,
            )


class SyncCaller(_Base, Generic[_Stub]):
    """Blocking calls over a `grpc.Channel`; a context manager that closes the channel it owns.

    Subclasses name their generated stub class in `stub_class`.
    """

    stub_class: Callable[[grpc.Channel], _Stub]

    def __init__(
        self,
        channel: grpc.Channel,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        owns_channel: bool = False,
    ) -> None:
        super().__init__(timeout=timeout, retry=retry or RetryPolicy(), owns_channel=owns_channel)
        self._channel = channel
        self._stub: _Stub = type(self).stub_class(channel)
        #: How the client waits between attempts (replaceable in tests).
        self._sleep: Callable[[float], None] = time.sleep

    @classmethod
    def connect(
        cls,
        address: str,
        security: ChannelSecurity,
        *,
        token: TokenProvider | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> Self:
        """A client on its own channel to `address` (`host:port`), closed with the client."""
        channel = sync_channel(address, security, token=token, options=options)
        return cls(channel, timeout=timeout, retry=retry, owns_channel=True)

    def _call(
        self,
        method: Callable[..., _Response],
        request: Any,
        *,
        timeout: float | None,
        metadata: Metadata,
        safe_to_repeat: bool,
    ) -> _Response:
        attempts = self._attempts(timeout, safe_to_repeat)
        while True:
            try:
                return method(request, timeout=attempts.next_timeout(), metadata=tuple(metadata))
            except grpc.RpcError as exc:
                error = error_from_rpc(exc, attempts=attempts.count)
            delay = attempts.delay_before_retry(error)
            if delay is None:
                raise error
            self._sleep(delay)

    def close(self) -> None:
        """Close the channel if this client opened it; idempotent."""
        if not self._closed and self._owns_channel:
            self._channel.close()
        self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncCaller(_Base, Generic[_Stub]):
    """Awaitable calls over a `grpc.aio.Channel`; an async context manager closing the channel it owns.

    Subclasses name their generated stub class in `stub_class`.
    """

    stub_class: Callable[[grpc.aio.Channel], _Stub]

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        owns_channel: bool = False,
    ) -> None:
        super().__init__(timeout=timeout, retry=retry or RetryPolicy(), owns_channel=owns_channel)
        self._channel = channel
        self._stub: _Stub = type(self).stub_class(channel)
        self._sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    @classmethod
    def connect(
        cls,
        address: str,
        security: ChannelSecurity,
        *,
        token: TokenProvider | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> Self:
        """A client on its own channel to `address` (`host:port`), closed with the client."""
        channel = aio_channel(address, security, token=token, options=options)
        return cls(channel, timeout=timeout, retry=retry, owns_channel=True)

    async def _call(
        self,
        method: Callable[..., Awaitable[_Response]],
        request: Any,
        *,
        timeout: float | None,
        metadata: Metadata,
        safe_to_repeat: bool,
    ) -> _Response:
        attempts = self._attempts(timeout, safe_to_repeat)
        while True:
            try:
                return await method(request, timeout=attempts.next_timeout(), metadata=tuple(metadata))
            except grpc.RpcError as exc:
                error = error_from_rpc(exc, attempts=attempts.count)
            delay = attempts.delay_before_retry(error)
            if delay is None:
                raise error
            await self._sleep(delay)

    async def close(self) -> None:
        """Close the channel if this client opened it; idempotent."""
        if not self._closed and self._owns_channel:
            await self._channel.close()
        self._closed = True

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


def follow_pages(
    fetch: Callable[[str], tuple[Sequence[_Item], str]], page_token: str = ""
) -> Iterator[_Item]:
    """The items of every page from `page_token` on: `fetch(token)` returns a page's items and next token."""
    token = page_token
    while True:
        items, token = fetch(token)
        yield from items
        if not token:
            return


async def follow_pages_async(
    fetch: Callable[[str], Awaitable[tuple[Sequence[_Item], str]]], page_token: str = ""
) -> AsyncIterator[_Item]:
    """The asyncio twin of `follow_pages`."""
    token = page_token
    while True:
        items, token = await fetch(token)
        for item in items:
            yield item
        if not token:
            return


__all__ = [
    "DEFAULT_TIMEOUT",
    "AsyncCaller",
    "DialogShardError",
    "Metadata",
    "SyncCaller",
    "follow_pages",
    "follow_pages_async",
]
