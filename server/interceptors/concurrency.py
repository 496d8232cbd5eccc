"""A cap on the service's calls in flight in this process, answered like any other limit.

gRPC's own `maximum_concurrent_rpcs` refuses with a bare "Concurrent RPC limit exceeded!"; this
cap answers RESOURCE_EXHAUSTED with reason TOO_MANY_CALLS and a RetryInfo, like the rate limits,
and leaves health checks out of it, so a load balancer's probes still get their answer while the
server is busiest. gRPC's cap stays above it as the backstop for everything else.
"""

from __future__ import annotations

from typing import Any

import grpc

from server.errors import ResourceExhausted
from server.interceptors._wrap import Behavior, UnaryUnaryInterceptor, Wrapper

#: RetryInfo of a refused call: calls in flight finish within milliseconds to seconds.
RETRY_AFTER_SECONDS = 0.1


class ConcurrencyLimitInterceptor(UnaryUnaryInterceptor):
    """At most `limit` calls of the services named by `prefixes` at once in this process."""

    def __init__(self, limit: int, prefixes: tuple[str, ...]) -> None:
        self.limit = limit
        self._prefixes = prefixes
        #: Calls of the capped services running now (one event loop: no lock needed).
        self.in_flight = 0

    def wrapper(self, method: str) -> Wrapper | None:
        if not method.startswith(self._prefixes):
            return None

        def wrap(behavior: Behavior) -> Behavior:
            async def capped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                if self.in_flight >= self.limit:
                    raise ResourceExhausted(
                        f"the server is handling its limit of {self.limit} calls at once; "
                        f"retry in {RETRY_AFTER_SECONDS:g} s",
                        retry_after_seconds=RETRY_AFTER_SECONDS,
                        reason="TOO_MANY_CALLS",
                    )
                self.in_flight += 1
                try:
                    return await behavior(request, context)
                finally:
                    self.in_flight -= 1

            return capped

        return wrap
