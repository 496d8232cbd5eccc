"""The shard pools of dialogctl's long operations (verify, reshard, hotspots, moves).

They scan whole shards or move many rows, so their statements get an hour instead of the
server's per-statement ceiling; every shard must be reachable, as for any tool.
"""

from __future__ import annotations

from server.config import PoolConfig, ResilienceConfig, ServerConfig
from server.storage.pools import ShardSet

#: Seconds one statement of a tool may run (a whole-shard scan of a large shard).
TOOL_STATEMENT_TIMEOUT = 3600.0


def tool_shards(config: ServerConfig, *, max_size: int = 4) -> ShardSet:
    """An unopened ShardSet over every configured shard (use `async with`)."""
    return ShardSet(
        config.shards,
        PoolConfig(min_size=1, max_size=max_size),
        ResilienceConfig(require_all_shards=True, statement_timeout=TOOL_STATEMENT_TIMEOUT),
    )
