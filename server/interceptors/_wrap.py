"""Wrapping the behavior of unary-unary handlers, the only RPC kind this service defines."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import grpc

Behavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
#: What `intercept_service` receives to look up the next handler (a string: grpc's classes are
#: generic only in their type stubs, not at run time).
Continuation: TypeAlias = (
    "Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]]"
)


def wrap_unary_unary(
    handler: grpc.RpcMethodHandler[Any, Any],
    wrap: Callable[[Behavior], Behavior],
    *,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler like `handler` whose behavior is `wrap(original behavior)` (and deserializer, if given)."""
    return grpc.unary_unary_rpc_method_handler(
        wrap(handler.unary_unary),  # type: ignore[arg-type]
        request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
