"""A cap on the service's calls in flight in this process, answered like any other limit.

gRPC's own `maximum_concurrent_rpcs` refuses with a bare "Concurrent RPC limit exceeded!"; this
cap answers RESOURCE_EXHAUSTED with reason TOO_MANY_CALLS and a RetryInfo, like the rate limits,
and leaves health checks out of it, so a load balancer's probes still get their answer while the
server is busiest. gRPC's cap stays above it as the backstop for everything else.

Streams (SubscribeMessages) are counted apart, against `stream_limit` (reason TOO_MANY_STREAMS):
a subscription lasts as long as its client stays connected, and idle subscribers counted with
the unary calls would leave none of those to the users sending and reading.
"""

from __future__ import annotations

from typing import Any

import grpc

from server.errors import ResourceExhausted
from server.interceptors._wrap import Behavior, CallInterceptor, Wrapper, is_stream, rewrap

#: RetryInfo of a refused call: calls in flight finish within milliseconds to seconds.
RETRY_AFTER_SECONDS = 0.1
#: RetryInfo of a refused stream: streams end when their clients leave, seconds to hours later.
STREAM_RETRY_AFTER_SECONDS = 5.0


class _Cap:
    """A count of calls in flight and its limit (one event loop: no lock needed)."""

    __slots__ = ("in_flight", "limit", "reason", "retry_after", "what")

    def __init__(self, limit: int, *, what: str, reason: str, retry_after: float) -> None:
        self.limit = limit
        self.what = what
        self.reason = reason
        self.retry_after = retry_after
        self.in_flight = 0

    def wrapper(self) -> Wrapper:
        def wrap(behavior: Behavior) -> Behavior:
            async def capped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                if self.in_flight >= self.limit:
                    raise ResourceExhausted(
                        f"the server is handling its limit of {self.limit} {self.what} at once; "
                        f"retry in {self.retry_after:g} s",
                        retry_after_seconds=self.retry_after,
                        reason=self.reason,
                    )
                self.in_flight += 1
                try:
                    return await behavior(request, context)
                finally:
                    self.in_flight -= 1

            return capped

        return wrap


class ConcurrencyLimitInterceptor(CallInterceptor):
    """At most `limit` unary calls and `stream_limit` streams of the services named by `prefixes`
    at once in this process."""

    def __init__(self, limit: int, prefixes: tuple[str, ...], *, stream_limit: int = 0) -> None:
        self._prefixes = prefixes
        self._calls = _Cap(limit, what="calls", reason="TOO_MANY_CALLS", retry_after=RETRY_AFTER_SECONDS)
        self._streams = _Cap(
            stream_limit, what="streams", reason="TOO_MANY_STREAMS", retry_after=STREAM_RETRY_AFTER_SECONDS
        )

    @property
    def streams_in_flight(self) -> int:
        """Streams of the capped services open now."""
        return self._streams.in_flight

    def wrap_handler(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        if not method.startswith(self._prefixes):
            return handler
        cap = self._streams if is_stream(handler) else self._calls
        return rewrap(handler, cap.wrapper())

    def wrapper(self, method: str) -> Wrapper | None:
        # Which cap applies depends on the handler's kind: wrap_handler decides.
        raise NotImplementedError
