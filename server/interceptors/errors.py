"""The one error mapper at the edge: ServiceError -> gRPC status with rich details.

Anything else escaping a handler is a bug: it is logged with its traceback
and the caller gets INTERNAL with a generic message, never the traceback.

A request body that does not parse as the method's message (for example a
string field holding invalid UTF-8, which proto3 forbids) would make gRPC
answer INTERNAL from inside its own deserialization. The deserializer is
therefore wrapped: it hands a marker to the behavior, which raises
INVALID_ARGUMENT (reason MALFORMED_REQUEST) before any other layer runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc

from server.errors import InternalError, InvalidArgument, ServiceError, to_grpc_status
from server.interceptors._wrap import Behavior, CallInterceptor, Wrapper, rewrap

log = logging.getLogger(__name__)


class _Undecodable:
    """Stands in for a request whose bytes did not parse."""

    __slots__ = ()


_UNDECODABLE = _Undecodable()


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:
            return _UNDECODABLE

    return deserialize


class ErrorMappingInterceptor(CallInterceptor):
    """Turns exceptions raised by inner layers into statuses; outermost but for observation."""

    def wrap_handler(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        # A request that does not parse reaches the wrapper as a marker, answered INVALID_ARGUMENT.
        return rewrap(
            handler, self.wrapper(method), request_deserializer=_tolerant(handler.request_deserializer)
        )

    def wrapper(self, method: str) -> Wrapper:

        def wrap(behavior: Behavior) -> Behavior:
            async def mapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                try:
                    if request is _UNDECODABLE:
                        raise InvalidArgument(
                            [],
                            reason="MALFORMED_REQUEST",
                            message=f"the request body does not parse as the request message of {method} "
                            "(is it the right message type? string fields must be valid UTF-8)",
                        )
                    return await behavior(request, context)
                except grpc.aio.AbortError:
                    raise
                except ServiceError as exc:
                    await context.abort_with_status(to_grpc_status(exc))
                except Exception:
                    log.exception("unhandled error in %s", method)
                    await context.abort_with_status(
                        to_grpc_status(InternalError("internal error; the server log has the details"))
                    )

            return mapped

        return wrap
