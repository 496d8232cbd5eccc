"""Wrapping the behavior of the service's handlers: unary-unary and server-streaming ones.

Each interceptor says once per method how it wraps that method's behavior (`wrapper`), or, for
the ones that only check or record something before the call (`CallCheck`), what it checks
(`check`). Per-call facts (metadata, deadline) are read from the call's context when it runs.
`FusedInterceptors` serves the server's interceptors as one: the first call of a method builds
its wrapped handler, with consecutive checks run in one wrapper, and later calls reuse it, so a
call pays for neither rebuilding handlers nor one coroutine per check.

A server-streaming behavior is wrapped in the same way: its async generator is first turned into a
coroutine that writes each response (`context.write`) and returns None, which grpc.aio serves as
a stream. The wrappers then see one awaitable per call whatever its kind, so a stream is
authenticated, limited, timed, logged and error-mapped by the very code that handles unary calls
(an error raised after some responses went out still ends the stream with the mapped status).
Client-streaming methods are not wrapped (the services define none; tests/test_proto_stubs.py
checks).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeAlias

import grpc

Behavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
#: Runs before the behavior; raises to refuse the call (the error mapper answers it).
Check = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], None]
#: What `intercept_service` receives to look up the next handler (a string: grpc's classes are
#: generic only in their type stubs, not at run time).
Continuation: TypeAlias = (
    "Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]]"
)
#: Turns a behavior into the wrapped one.
Wrapper = Callable[[Behavior], Behavior]


def is_wrappable(handler: grpc.RpcMethodHandler[Any, Any] | None) -> bool:
    """Whether `handler` is of a kind the interceptors wrap (unary-unary or server-streaming)."""
    return handler is not None and (handler.unary_unary is not None or handler.unary_stream is not None)


def is_stream(handler: grpc.RpcMethodHandler[Any, Any]) -> bool:
    """Whether `handler` answers with a stream of responses."""
    return handler.unary_stream is not None


def _writing(stream: Callable[..., Any]) -> Behavior:
    """A server-streaming behavior as a coroutine that writes each response itself."""
    if not inspect.isasyncgenfunction(stream):
        return stream  # already a coroutine using context.write (a wrapped behavior)

    async def write_all(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        responses: AsyncIterator[Any] = stream(request, context)
        async for response in responses:
            await context.write(response)

    return write_all


def rewrap(
    handler: grpc.RpcMethodHandler[Any, Any],
    wrap: Callable[[Behavior], Behavior],
    *,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of `handler`'s kind whose behavior is `wrap(original behavior)` (and deserializer,
    if given)."""
    deserializer = request_deserializer or handler.request_deserializer
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            wrap(_writing(handler.unary_stream)),
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )
    return grpc.unary_unary_rpc_method_handler(
        wrap(handler.unary_unary),  # type: ignore[arg-type]
        request_deserializer=deserializer,
        response_serializer=handler.response_serializer,
    )


def metadata_value(context: grpc.aio.ServicerContext[Any, Any], key: str) -> str | None:
    """The first value of invocation metadata `key` (lowercase) of the current call, or None."""
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return str(v)
    return None


class CallInterceptor(grpc.aio.ServerInterceptor):
    """Base of the interceptors that wrap unary-unary and server-streaming behaviors.

    Subclasses say in `wrapper` how to wrap a method's behavior (None leaves the handler as it
    is); other handlers (unknown methods, client streams) pass through untouched.
    """

    async def intercept_service(
        self,
        continuation: Continuation,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or not is_wrappable(handler):
            return handler
        return self.wrap_handler(handler, handler_call_details.method)

    def wrap_handler(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        wrap = self.wrapper(method)
        return handler if wrap is None else rewrap(handler, wrap)

    def wrapper(self, method: str) -> Wrapper | None:
        raise NotImplementedError


class CallCheck(CallInterceptor):
    """An interceptor that only checks or records something before the behavior runs."""

    def check(self, method: str) -> Check | None:
        """What to run before each call of `method` (None: nothing)."""
        raise NotImplementedError

    def wrapper(self, method: str) -> Wrapper | None:
        check = self.check(method)
        return None if check is None else _checked([check])


def _checked(checks: Sequence[Check]) -> Wrapper:
    """Runs `checks` in order, then the behavior: one coroutine for all of them."""
    run = tuple(checks)

    def wrap(behavior: Behavior) -> Behavior:
        async def checked(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            for check in run:
                check(request, context)
            return await behavior(request, context)

        return checked

    return wrap


class FusedInterceptors(grpc.aio.ServerInterceptor):
    """`interceptors` (outermost first) as one interceptor, with each method's handler built once.

    Equivalent to passing them to the server one by one: the same wrappers in the same order,
    consecutive `CallCheck`s run one after the other inside one wrapper. Handlers of other kinds
    than unary-unary and server-streaming, or unknown methods, go through untouched (and are not
    remembered).
    """

    def __init__(self, interceptors: Sequence[CallInterceptor]) -> None:
        self._interceptors = tuple(interceptors)
        self._handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Continuation,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is not None:
            return handler
        found = await continuation(handler_call_details)
        if found is None or not is_wrappable(found):
            return found
        # The services are registered before the server starts and never change, so a method's
        # handler is the same for every call.
        handler = self._handlers[method] = self.wrap_handler(found, method)
        return handler

    def wrap_handler(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """`handler` wrapped by every interceptor, innermost first."""
        checks: list[Check] = []
        for interceptor in reversed(self._interceptors):
            if isinstance(interceptor, CallCheck):
                check = interceptor.check(method)
                if check is not None:
                    checks.insert(0, check)
                continue
            if checks:
                handler = rewrap(handler, _checked(checks))
                checks = []
            handler = interceptor.wrap_handler(handler, method)
        if checks:
            handler = rewrap(handler, _checked(checks))
        return handler
