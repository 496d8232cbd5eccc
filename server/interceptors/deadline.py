"""Carries each call's deadline (`context.time_remaining()`) to the shard gates.

The value lives in `server.resilience.rpc_deadline`, a contextvar: every RPC runs
in its own task, so the handler and everything it awaits see their own call's deadline.
"""

from __future__ import annotations

import time
from typing import Any

import grpc

from server.interceptors._wrap import Behavior, UnaryUnaryInterceptor, Wrapper
from server.resilience.deadline import rpc_deadline


class DeadlineInterceptor(UnaryUnaryInterceptor):
    """Publishes the call's absolute deadline (time.monotonic() based) for the storage layer."""

    def wrapper(self, details: grpc.HandlerCallDetails) -> Wrapper:
        def wrap(behavior: Behavior) -> Behavior:
            async def bounded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                left = context.time_remaining()
                # grpc reports "no deadline" as None (or a huge number from some stacks).
                if left is not None and left < 1e9:
                    rpc_deadline.set(time.monotonic() + left)
                return await behavior(request, context)

            return bounded

        return wrap
