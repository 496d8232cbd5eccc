"""`dialogctl rebuild-inbox`: rebuild the inbox (ListDialogs) from the message tables.

    dialogctl rebuild-inbox           # every user's dialogs, counts and last messages, recounted

For an inbox that missed events (the relay fell behind the logs' retention, see the server log),
after a restore, or after deleting messages by hand. Servers may keep running: the rebuild holds
the movers' lock (no move changes where messages are meanwhile) and makes the inbox shards'
relays wait while it writes; each source shard is read in one snapshot, and the relays then
resume from that snapshot, skipping the messages it already counted.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import psycopg

from server.cli.output import print_json
from server.cli.progress import Progress
from server.cli.session import CliError, Session
from server.cli.shards import run_tool
from server.cli.verify import load_router
from server.config import ServerConfig
from server.moves.mover import mover_lock
from server.routing import ShardRouter
from server.routing.inbox import inbox_shard
from server.storage.events import EventCursor
from server.storage.inbox import InboxRow, inbox_layout, read_dialog_totals, relay_lock, replace_inbox


async def rebuild_inbox(config: ServerConfig) -> dict[str, Any]:
    """Recount every inbox shard from every message table; what was written."""
    started = time.monotonic()
    async with mover_lock(config.control_dsn):
        router, _, _ = await load_router(config)
        async with await psycopg.AsyncConnection.connect(config.control_dsn, autocommit=True) as conn:
            count = await inbox_layout(conn, config.num_shards)
        if count > config.num_shards:
            raise CliError(
                f"the inbox lives on {count} shards, but only {config.num_shards} are configured", 1
            )
        async with AsyncExitStack() as stack:
            inboxes: list[tuple[str, psycopg.AsyncConnection[Any]]] = []
            for shard in config.shards[:count]:
                conn = await stack.enter_async_context(await psycopg.AsyncConnection.connect(shard.dsn))
                for source in config.shards:  # every relay into this inbox shard waits
                    await relay_lock(conn, shard.table, source.shard_id, wait=True)
                inboxes.append((shard.table, conn))
            per_inbox: list[list[tuple[tuple[int, int], InboxRow]]] = [[] for _ in range(count)]
            cursors: dict[int, tuple[EventCursor, str]] = {}
            for shard in config.shards:
                routed_here = functools.partial(_routed_to, router, shard.shard_id)
                async with await psycopg.AsyncConnection.connect(shard.dsn) as conn:
                    start, snapshot, rows = await read_dialog_totals(conn, shard.table, routed_here)
                cursors[shard.shard_id] = (start, snapshot)
                for key, row in rows:
                    per_inbox[inbox_shard(key[0], count)].append((key, row))
            for (table, conn), rows in zip(inboxes, per_inbox, strict=True):
                await replace_inbox(conn, table, rows, cursors)
                await conn.commit()
    return {
        "inbox_shards": count,
        "rows": sum(len(rows) for rows in per_inbox),
        "seconds": round(time.monotonic() - started, 3),
    }


def _routed_to(router: ShardRouter, shard_id: int, low: int, high: int) -> bool:
    return router.resolve(low, high).shard_id == shard_id


def cmd_inbox_rebuild(session: Session) -> int:
    config = session.config()
    with Progress("rebuild-inbox") as progress:
        progress.update(f"recounting the dialogs of {config.num_shards} shards")
        report = run_tool(rebuild_inbox(config))
    if session.json:
        print_json(report)
    else:
        print(
            f"rebuilt the inbox on {report['inbox_shards']} shard(s): {report['rows']} dialog row(s) "
            f"in {report['seconds']} s"
        )
    return 0


def register(commands: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add `rebuild-inbox` to dialogctl's subcommands."""
    command(
        commands,
        "rebuild-inbox",
        cmd_inbox_rebuild,
        "recount the inbox (ListDialogs) from the message tables",
    )


__all__ = ["cmd_inbox_rebuild", "rebuild_inbox", "register"]
