"""Facts about the current RPC that the edges report: which shard it resolved to.

The servicer's shard resolution sets `current_shard`; the observing interceptor
reads it after the call to label the latency histogram and the RPC log line.
Each RPC runs in its own task, so the value never leaks between calls.
"""

from __future__ import annotations

from contextvars import ContextVar

#: The shard the current RPC's pair resolved to; None until (or unless) it resolves one.
current_shard: ContextVar[int | None] = ContextVar("current_shard", default=None)
