"""Carries each call's deadline (`context.time_remaining()`) to the shard gates.

The value lives in `server.resilience.rpc_deadline`, a contextvar: every RPC runs
in its own task, so the handler and everything it awaits see their own call's deadline.
"""

from __future__ import annotations

import time
from typing import Any

import grpc

from server.interceptors._wrap import CallCheck, Check
from server.resilience.deadline import rpc_deadline


class DeadlineInterceptor(CallCheck):
    """Publishes the call's absolute deadline (time.monotonic() based) for the storage layer."""

    def check(self, method: str) -> Check:
        return _publish_deadline


def _publish_deadline(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    left = context.time_remaining()
    # grpc reports "no deadline" as None (or a huge number from some stacks).
    if left is not None and left < 1e9:
        rpc_deadline.set(time.monotonic() + left)
