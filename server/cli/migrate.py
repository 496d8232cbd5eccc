"""`dialogctl migrate`: apply the schema to every shard and the control database, and say what changed.

The migrations (server/storage/schema.py) are idempotent and serialized by an advisory lock, so
running this against a live cluster, twice, or beside a starting server is safe. The report lists
the tables, indexes, sequences and functions each database gained ("up to date" when none). Every
target is tried even when one fails; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from server.cli.output import fail, format_table, print_json
from server.cli.progress import Progress
from server.cli.session import Session
from server.config import describe_dsn
from server.storage.pools import connect_failure_reason
from server.storage.schema import migrate_control, migrate_shard

EXIT_FAILED = 1

_RELATIONS = """
    SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p', 'i', 'I', 'S', 'v', 'm')
    UNION ALL
    SELECT p.proname || '()' FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE n.nspname = current_schema()
"""


@dataclass
class Target:
    """One migration: a shard's table or the control tables, in one database."""

    name: str
    shard_id: int | None
    dsn: str
    apply: Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]]
    created: list[str] = field(default_factory=list)
    error: str | None = None

    def report(self) -> dict[str, Any]:
        status = "failed" if self.error else ("migrated" if self.created else "up to date")
        return {
            "name": self.name,
            "shard_id": self.shard_id,
            "location": describe_dsn(self.dsn),
            "status": status,
            "created": self.created,
            "error": self.error,
        }


async def _relations(conn: psycopg.AsyncConnection[Any]) -> set[str]:
    cur = await conn.execute(_RELATIONS)
    return {row[0] for row in await cur.fetchall()}


async def _migrate(target: Target) -> None:
    try:
        async with await psycopg.AsyncConnection.connect(
            target.dsn, autocommit=True, connect_timeout=10
        ) as conn:
            before = await _relations(conn)
            await target.apply(conn)
            target.created = sorted((await _relations(conn)) - before)
    except psycopg.Error as exc:
        target.error = connect_failure_reason(exc)


def _shard_migration(table: str) -> Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]]:
    async def apply(conn: psycopg.AsyncConnection[Any]) -> None:
        await migrate_shard(conn, table)

    return apply


def _targets(session: Session) -> list[Target]:
    config = session.config()
    targets = [
        Target(f"shard-{s.shard_id}", s.shard_id, s.dsn, _shard_migration(s.table)) for s in config.shards
    ]
    targets.append(Target("control", None, config.control_dsn, migrate_control))
    return targets


def cmd_migrate(session: Session) -> int:
    targets = _targets(session)
    with Progress("migrate") as progress:
        for n, target in enumerate(targets, 1):
            progress.update(f"{target.name} ({n}/{len(targets)})")
            # One at a time: targets often share a database, and the advisory lock serializes them anyway.
            asyncio.run(_migrate(target))
    reports = [t.report() for t in targets]
    failed = [r for r in reports if r["status"] == "failed"]
    if session.json:
        print_json({"targets": reports})
    else:
        rows = [
            [
                r["name"],
                r["location"],
                r["status"],
                r["error"] if r["error"] else (", ".join(r["created"]) or "-"),
            ]
            for r in reports
        ]
        print(format_table(("TARGET", "LOCATION", "STATUS", "CREATED"), rows))
    if failed:
        what = "; ".join(f"{r['name']} ({r['location']}): {r['error']}" for r in failed)
        return fail(f"migration failed for {what}", EXIT_FAILED)
    return 0


def register(commands: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add `migrate` to dialogctl's subcommands."""
    command(
        commands,
        "migrate",
        cmd_migrate,
        "apply the schema to every shard and the control database (idempotent)",
    )
