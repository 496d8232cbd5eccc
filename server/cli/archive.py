"""`dialogctl archive`: move old messages from the shards into the archive's files.

    dialogctl archive --older-than 365d --dry-run   # how many messages per shard would go
    dialogctl archive --older-than 365d             # resumable; verified before rows are deleted
    dialogctl archive --before 2026-01-01T00:00:00Z
    dialogctl archive --status                      # files, messages and bytes in the archive

It connects to the shards, the control database and the archive named in the config (no server
needed) and holds the movers' lock while it runs (server/moves/archiver.py says how each batch
is written, read back, verified and only then deleted from its shard).
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from server.archive.manifest import Manifest, read_manifest
from server.archive.store import ArchiveStore, configured_store
from server.cli.output import format_table, print_json
from server.cli.progress import Progress
from server.cli.session import CliError, Session
from server.cli.shards import run_tool, tool_shards
from server.config import ArchiveConfig, ServerConfig, parse_duration
from server.moves.archiver import Archiver, ArchiveReport

#: The youngest messages an archive run takes: an insert with a slightly older id may still commit.
MIN_AGE = timedelta(minutes=1)


def open_store(archive: ArchiveConfig) -> ArchiveStore:
    """The configured archive; a CliError naming the setting when there is none."""
    store = configured_store(archive)
    if store is None:
        raise CliError("no archive is configured: set [archive] url (a directory or s3://bucket/prefix)")
    return store


async def run_archive(
    config: ServerConfig, cutoff: datetime, *, dry_run: bool, lock_wait: float
) -> ArchiveReport:
    store = open_store(config.archive)
    async with tool_shards(config) as shards:
        stores = [shards.store(c.shard_id) for c in config.shards]
        archiver = Archiver(stores, config.control_dsn, store, config.archive)
        return await archiver.run(cutoff, dry_run=dry_run, lock_wait=lock_wait)


def _cutoff(args: argparse.Namespace) -> datetime:
    now = datetime.now(UTC)
    if args.older_than is not None:
        try:
            cutoff = now - timedelta(seconds=parse_duration(args.older_than))
        except ValueError as exc:
            raise CliError(f"--older-than: {exc}", 2) from None
    else:
        try:
            cutoff = datetime.fromisoformat(args.before)
        except ValueError:
            raise CliError(
                f"--before {args.before!r} is not an ISO 8601 time (e.g. 2026-01-01T00:00:00Z)", 2
            ) from None
        if cutoff.tzinfo is None:
            cutoff = cutoff.replace(tzinfo=UTC)
    if cutoff > now - MIN_AGE:
        raise CliError(
            f"the cutoff {cutoff.isoformat()} is less than {MIN_AGE.seconds} s ago: messages that young may "
            "still be committing; archive older ones",
            2,
        )
    return cutoff


def _status(config: ServerConfig) -> Manifest:
    store = open_store(config.archive)
    return read_manifest(store)


def cmd_archive(session: Session) -> int:
    args = session.args
    config = session.config()
    if args.status:
        manifest = run_tool(asyncio.to_thread(_status, config), reaching="the archive")
        totals = manifest.totals() | {"unfinished_batches": len(manifest.unfinished())}
        if session.json:
            print_json({"url": config.archive.url, **totals})
        else:
            print(
                f"archive {config.archive.url}: {totals['messages']} messages in {totals['files']} files, "
                f"{totals['bytes']} bytes; {totals['unfinished_batches']} batches unfinished"
            )
        return 0
    if args.older_than is None and args.before is None:
        raise CliError("say which messages: --older-than DURATION or --before TIMESTAMP (or --status)", 2)
    cutoff = _cutoff(args)
    with Progress("archive") as progress:
        progress.update(f"archiving messages older than {cutoff.isoformat()}")
        report = run_tool(
            run_archive(config, cutoff, dry_run=args.dry_run, lock_wait=args.lock_wait),
            reaching="the databases",
        )
    summary: dict[str, Any] = {
        "cutoff": cutoff.isoformat(),
        "dry_run": report.dry_run,
        "messages": report.total,
        "messages_by_shard": {str(k): v for k, v in sorted(report.messages.items())},
        "files": report.files,
        "bytes": report.bytes,
        "resumed_batches": report.resumed_batches,
        "removed_leftovers": report.removed_leftovers,
        "seconds": round(report.seconds, 3),
    }
    if session.json:
        print_json(summary)
        return 0
    rows = [[shard_id, count] for shard_id, count in sorted(report.messages.items())]
    print(format_table(("SHARD", "MESSAGES"), rows, right=(0, 1)))
    verb = "would archive" if report.dry_run else "archived"
    print(f"{verb} {report.total} messages older than {cutoff.isoformat()}", end="")
    print(
        ""
        if report.dry_run
        else f" into {report.files} files ({report.bytes} bytes) in {report.seconds:.1f} s"
    )
    return 0


def register(commands: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    archiving = command(commands, "archive", cmd_archive, "move old messages into the archive's files")
    when = archiving.add_mutually_exclusive_group()
    when.add_argument("--older-than", metavar="DURATION", help="messages older than this (90d, 12h, 30m)")
    when.add_argument("--before", metavar="TIMESTAMP", help="messages sent before this time (ISO 8601)")
    when.add_argument("--status", action="store_true", help="what the archive holds")
    archiving.add_argument(
        "--dry-run", action="store_true", help="count what would be archived, change nothing"
    )
    archiving.add_argument(
        "--lock-wait",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="wait this long for a move, reshard, repair or backup holding the movers' lock (default 60)",
    )


__all__ = ["cmd_archive", "open_store", "register", "run_archive"]
