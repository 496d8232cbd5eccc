"""Observation of every call: status code, duration and shard, reported to metrics and the RPC log.

The outermost interceptor, so it sees the status the caller gets (after error mapping) and
times everything the server does for the call. The shard is what the servicer resolved
(`server.observability.call_context.current_shard`); calls that resolve none report no shard.
The principal is what the auth interceptor (inside this one, in the same task) verified
(`server.auth.current_principal`, reset here per call); a call without one logs `anonymous`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc

from server.auth import current_principal
from server.interceptors._wrap import Behavior, CallInterceptor, Wrapper, is_stream, metadata_value, rewrap
from server.observability.call_context import current_shard
from server.observability.logs import ANONYMOUS, RpcLog
from server.observability.metrics import ServerMetrics, go_code_name


class ObserveInterceptor(CallInterceptor):
    """Counts and times calls of registered methods; must be the outermost interceptor.

    A stream is one call: counted when it starts, timed and logged once when it ends.
    """

    def __init__(self, metrics: ServerMetrics | None, rpc_log: RpcLog | None) -> None:
        self._metrics = metrics
        self._log = rpc_log

    def wrap_handler(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        return rewrap(handler, self._observing(method, stream=is_stream(handler)))

    def wrapper(self, full_method: str) -> Wrapper:
        return self._observing(full_method, stream=False)

    def _observing(self, full_method: str, *, stream: bool) -> Wrapper:
        # Only registered methods get here (an unknown one is answered UNIMPLEMENTED by gRPC and
        # passed through by the base class), so method names are a bounded label set.
        method_metrics = (
            self._metrics.method(full_method, stream=stream) if self._metrics is not None else None
        )
        rpc_log = self._log
        service, _, name = full_method.lstrip("/").rpartition("/")

        def wrap(behavior: Behavior) -> Behavior:
            async def observed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                current_shard.set(None)
                current_principal.set(None)
                if method_metrics is not None:
                    method_metrics.started()
                start = time.perf_counter()
                code = grpc.StatusCode.OK
                response = None
                try:
                    response = await behavior(request, context)
                    return response
                except grpc.aio.AbortError:
                    code = context.code() or grpc.StatusCode.UNKNOWN
                    raise
                except asyncio.CancelledError:
                    code = grpc.StatusCode.CANCELLED
                    raise
                except BaseException:
                    code = grpc.StatusCode.UNKNOWN
                    raise
                finally:
                    seconds = time.perf_counter() - start
                    shard = current_shard.get()
                    if method_metrics is not None:
                        method_metrics.handled(code, seconds, shard, response)
                    if rpc_log is not None and rpc_log.enabled():
                        principal = current_principal.get()
                        rpc_log.record(
                            principal=principal.log_label() if principal is not None else ANONYMOUS,
                            service=service,
                            method=name,
                            code=go_code_name(code),
                            seconds=seconds,
                            shard=shard,
                            peer=context.peer(),
                            x_request_id=metadata_value(context, "x-request-id"),
                            request_id=getattr(request, "request_id", None),
                        )

            return observed

        return wrap
