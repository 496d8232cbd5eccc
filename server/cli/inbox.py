"""`dialogctl rebuild-inbox`: rebuild the inbox (ListDialogs) from the message tables.

    dialogctl rebuild-inbox           # every user's dialogs, counts and last messages, recounted

For an inbox that missed events (the relay fell behind the logs' retention, see the server log),
after a restore, or after deleting messages by hand. Servers may keep running: the rebuild holds
the movers' lock (no move changes where messages are meanwhile) and makes the inbox shards'
relays wait while it writes; each source shard is read in one snapshot, and the relays then
resume from that snapshot, skipping the messages it already counted.

With an archive configured, the archived messages count too (archiving changes no dialog): every
file of the manifest is read once, one at a time, leaving out the messages deleted by their senders
(tombstones, read after the snapshots; the relays then skip those messages' deletion events) and
the rows of a `verified` batch still on a shard (counted there).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import time
import uuid
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import psycopg

from server.archive.files import decode
from server.archive.manifest import BatchState, read_manifest
from server.archive.store import ArchiveStore, configured_store
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
from server.storage.tombstones import all_tombstones

#: An inbox row by (owner, peer).
Rows = dict[tuple[int, int], InboxRow]


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
            per_inbox: list[Rows] = [{} for _ in range(count)]
            cursors: dict[int, tuple[EventCursor, str]] = {}
            for shard in config.shards:
                routed_here = functools.partial(_routed_to, router, shard.shard_id)
                async with await psycopg.AsyncConnection.connect(shard.dsn) as conn:
                    start, snapshot, totals = await read_dialog_totals(conn, shard.table, routed_here)
                cursors[shard.shard_id] = (start, snapshot)
                for key, row in totals:
                    _add(per_inbox[inbox_shard(key[0], count)], key, row)
            # After the snapshots: a deletion logged since is either skipped by the relays (its
            # tombstone read here) or counted by them (its message counted here).
            async with await psycopg.AsyncConnection.connect(config.control_dsn, autocommit=True) as conn:
                tombstoned = await all_tombstones(conn)
            hidden = {message_id for message_id, _ in tombstoned}
            archived = 0
            store = configured_store(config.archive)
            if store is not None:
                archived = await _add_archived(config, store, hidden, per_inbox)
            for inbox_id, ((table, conn), rows) in enumerate(zip(inboxes, per_inbox, strict=True)):
                taken_off = [
                    (owner, peer, message_id)
                    for message_id, (low, high) in tombstoned
                    for owner, peer in ((low, high), (high, low))
                    if inbox_shard(owner, count) == inbox_id
                ]
                await replace_inbox(conn, table, sorted(rows.items()), cursors, taken_off)
                await conn.commit()
    return {
        "inbox_shards": count,
        "rows": sum(len(rows) for rows in per_inbox),
        "archived_messages": archived,
        "seconds": round(time.monotonic() - started, 3),
    }


def _add(rows: Rows, key: tuple[int, int], row: InboxRow) -> None:
    earlier = rows.get(key)
    rows[key] = row if earlier is None else earlier.merged(row)


async def _add_archived(
    config: ServerConfig, store: ArchiveStore, hidden: set[uuid.UUID], per_inbox: list[Rows]
) -> int:
    """Add the archived messages to the rows, file by file (none is deleted or still on a shard);
    how many were counted."""
    manifest = await asyncio.to_thread(read_manifest, store)
    counted = 0
    for batch in manifest.batches:
        content = await asyncio.to_thread(store.read, batch.file)
        if content is None:
            raise CliError(f"the archive file {batch.file} listed in the manifest is missing", 1)
        rows = [r for r in await asyncio.to_thread(decode, content) if r[0] not in hidden]
        if batch.state is BatchState.VERIFIED:
            still_hot = await _hot_among(config, [r[0] for r in rows])
            rows = [r for r in rows if r[0] not in still_hot]
        for message_id, low, high, _, sender, _, text, created_at, _ in rows:
            for owner, peer in ((low, high), (high, low)):
                row = InboxRow(peer, message_id, sender, text, created_at, 1)
                _add(per_inbox[inbox_shard(owner, len(per_inbox))], (owner, peer), row)
        counted += len(rows)
    return counted


async def _hot_among(config: ServerConfig, ids: list[uuid.UUID]) -> set[uuid.UUID]:
    """Which of these messages a shard holds (a `verified` batch's rows may be in both places)."""
    found: set[uuid.UUID] = set()
    for shard in config.shards:
        async with await psycopg.AsyncConnection.connect(shard.dsn, autocommit=True) as conn:
            cur = await conn.execute(
                f"SELECT message_id FROM {shard.table} WHERE message_id = ANY(%s::uuid[])", (ids,)
            )
            found.update(r[0] for r in await cur.fetchall())
    return found


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
