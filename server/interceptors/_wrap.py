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


#: Turns a behavior into the wrapped one.
Wrapper = Callable[[Behavior], Behavior]


class UnaryUnaryInterceptor(grpc.aio.ServerInterceptor):
    """Base of the interceptors that wrap unary-unary behaviors.

    Subclasses say in `wrapper` how to wrap one call's behavior (None leaves the handler as it
    is); other handlers (unknown methods, streams such as health Watch) pass through untouched.
    """

    async def intercept_service(
        self,
        continuation: Continuation,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        return self.wrap_handler(handler, handler_call_details)

    def wrap_handler(
        self, handler: grpc.RpcMethodHandler[Any, Any], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any]:
        wrap = self.wrapper(details)
        return handler if wrap is None else wrap_unary_unary(handler, wrap)

    def wrapper(self, details: grpc.HandlerCallDetails) -> Wrapper | None:
        raise NotImplementedError
