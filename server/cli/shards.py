"""The shard pools of dialogctl's long operations (verify, reshard, hotspots, moves), and how they run.

They scan whole shards or move many rows, so their statements get an hour instead of the
server's per-statement ceiling; every shard must be reachable, as for any tool.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import psycopg

from server.cli.session import CliError
from server.config import PoolConfig, ResilienceConfig, ServerConfig
from server.errors import ServiceError
from server.storage.pools import DatabaseStartupError, ShardSet

T = TypeVar("T")

#: Seconds one statement of a tool may run (a whole-shard scan of a large shard).
TOOL_STATEMENT_TIMEOUT = 3600.0


def tool_shards(config: ServerConfig, *, max_size: int = 4) -> ShardSet:
    """An unopened ShardSet over every configured shard (use `async with`)."""
    return ShardSet(
        config.shards,
        PoolConfig(min_size=1, max_size=max_size),
        ResilienceConfig(require_all_shards=True, statement_timeout=TOOL_STATEMENT_TIMEOUT),
    )


def run_tool(work: Coroutine[Any, Any, T], *, reaching: str = "the databases") -> T:
    """Run a long operation's work to its end; unreachable databases and refusals exit 1 with the reason."""
    try:
        return asyncio.run(work)
    except (DatabaseStartupError, psycopg.Error) as exc:
        raise CliError(f"cannot reach {reaching}: {exc}", 1) from None
    except ServiceError as exc:
        raise CliError(exc.message, 1) from None
