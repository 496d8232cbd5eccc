"""The one error mapper at the edge: ServiceError -> gRPC status with rich details.

Anything else escaping a handler is a bug: it is logged with its traceback
and the caller gets INTERNAL with a generic message, never the traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from server.errors import InternalError, ServiceError, to_grpc_status
from server.interceptors._wrap import Behavior, wrap_unary_unary

log = logging.getLogger(__name__)


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Turns exceptions raised by inner layers into statuses; must be the outermost interceptor."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method

        def wrap(behavior: Behavior) -> Behavior:
            async def mapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                try:
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

        return wrap_unary_unary(handler, wrap)
