"""`dialogctl backup` / `dialogctl restore`: per-shard and control-table backups with pg_dump/pg_restore.

    dialogctl backup --out backups/2026-11-26           # every shard and the control tables
    dialogctl backup --shard 2 --out backups/s2         # one shard
    dialogctl restore backups/s2 --shard 2 --yes        # put shard 2's table back as it was

A backup directory holds one custom-format archive per item (`shard-N.dump`, `control.dump`) and
`manifest.json` (tables, location, exact row count, size). A shard's item is its message table and
the tables named after it (`messages_N_fences`); the control item is every other table of the
control database. Rows are counted in the very snapshot
pg_dump reads (`pg_export_snapshot` + `pg_dump --snapshot`), so a restore can verify that every
row came back. Restoring replaces the item's tables (`pg_restore --clean --if-exists`, in one
transaction): messages stored since the backup are lost, hence `--yes`. The item's migration then
runs (idempotent), recreating what archives of tables do not hold (the fence functions). After
restoring the control tables, the servers' shard-map mirrors are made to reload (their listener connections
are ended; they reconnect and load the whole table). dialogctl talks to the databases directly
here, with the DSNs of the config; exit status 1 when pg_dump or pg_restore fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from server.cli.output import format_table, print_json
from server.cli.pgtools import EXIT_TOOL_FAILED, find_tool, run_tool
from server.cli.progress import Progress
from server.cli.session import EXIT_CONFIG, CliError, Session
from server.cli.verify import reconcile_restored_routing
from server.config import describe_dsn
from server.storage.overrides import LISTENER_APPLICATION_NAME
from server.storage.schema import migrate_control, migrate_shard

MANIFEST = "manifest.json"
_FORMAT = 1
CONTROL = "control"


_TABLES = """
    SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') ORDER BY c.relname
"""


def owned_by_shard(table: str, shard_table: str) -> bool:
    """Whether `table` belongs to the shard whose message table is `shard_table` (itself or `<it>_...`)."""
    return table == shard_table or table.startswith(shard_table + "_")


@dataclass(frozen=True, slots=True)
class Item:
    """One unit of backup: a shard's tables, or the control tables."""

    name: str
    shard_id: int | None
    #: The shard's message table; None for the control item.
    table: str | None
    dsn: str
    #: Message tables of every configured shard (what the control item leaves out).
    shard_tables: tuple[str, ...]

    def owns(self, table: str) -> bool:
        if self.table is not None:
            return owned_by_shard(table, self.table)
        return not any(owned_by_shard(table, t) for t in self.shard_tables)

    @property
    def file(self) -> str:
        return f"{self.name}.dump"


def _items(session: Session, shards: Sequence[int] | None, control: bool) -> list[Item]:
    config = session.config()
    configured = {s.shard_id: s for s in config.shards}
    everything = shards is None and not control
    chosen = sorted(configured) if everything else list(shards or ())
    unknown = [s for s in chosen if s not in configured]
    if unknown:
        raise CliError(
            f"no shard {unknown[0]} in the config (shards: {', '.join(map(str, sorted(configured)))})"
        )
    shard_tables = tuple(c.table for c in config.shards)
    items = [
        Item(f"shard-{s}", s, configured[s].table, configured[s].dsn, shard_tables)
        for s in dict.fromkeys(chosen)
    ]
    if everything or control:
        items.append(Item(CONTROL, None, None, config.control_dsn, shard_tables))
    return items


def _connect(item: Item) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(item.dsn, connect_timeout=10)
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CliError(f"{item.name} ({describe_dsn(item.dsn)}): {first}", EXIT_TOOL_FAILED) from None


def _count(conn: psycopg.Connection[Any], tables: Sequence[str]) -> int:
    total = 0
    for table in tables:
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))).fetchone()
        total += int(row[0]) if row else 0
    return total


def _dump(item: Item, out: Path, pg_dump: Path) -> dict[str, Any]:
    target = out / item.file
    with _connect(item) as conn:
        # The count and the dump read one snapshot: the manifest's row count is exactly the archive's.
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        row = conn.execute("SELECT pg_export_snapshot()").fetchone()
        assert row is not None
        tables = [t for (t,) in conn.execute(_TABLES).fetchall() if item.owns(t)]
        if item.table is not None and item.table not in tables:
            raise CliError(f"{item.name}: table {item.table} does not exist; run `dialogctl migrate`")
        if not tables:
            raise CliError(f"{item.name}: no control tables found; run `dialogctl migrate`")
        rows = _count(conn, tables)
        args = [
            "--format=custom",
            "--no-owner",
            "--no-privileges",
            f"--snapshot={row[0]}",
            f"--file={target}",
        ]
        args += [f"--table={t}" for t in tables]
        run_tool(pg_dump, args, item.dsn, f"backup of {item.name}")
        conn.rollback()
    return {
        "name": item.name,
        "shard_id": item.shard_id,
        "tables": tables,
        "location": describe_dsn(item.dsn),
        "rows": rows,
        "file": item.file,
        "bytes": target.stat().st_size,
    }


def cmd_backup(session: Session) -> int:
    args = session.args
    items = _items(session, args.shard, args.control)
    pg_dump = find_tool("pg_dump", args.pg_bindir)
    out: Path = args.out
    if out.exists() and any(out.iterdir()):
        raise CliError(f"{out} is not empty: back up into a new directory")
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    with Progress("backup") as progress:
        for n, item in enumerate(items, 1):
            progress.update(f"{item.name} ({n}/{len(items)})")
            entries.append(_dump(item, out, pg_dump))
    manifest = {"format": _FORMAT, "created_at": datetime.now(UTC).isoformat(), "items": entries}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if session.json:
        print_json({"directory": str(out), **manifest})
        return 0
    _print_items(entries)
    print(f"backup of {len(entries)} item{'' if len(entries) == 1 else 's'} in {out}")
    return 0


def _print_items(entries: Sequence[dict[str, Any]]) -> None:
    rows = [
        [e["name"], ",".join(e["tables"]), e["location"], e["rows"], e["file"], e.get("bytes", "")]
        for e in entries
    ]
    print(format_table(("ITEM", "TABLES", "LOCATION", "ROWS", "FILE", "BYTES"), rows, right=(3, 5)))


def _read_manifest(directory: Path) -> dict[str, dict[str, Any]]:
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CliError(f"{path} not found: not a dialogctl backup directory") from None
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read {path}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
        raise CliError(f"{path} is not a backup manifest this dialogctl understands")
    return {e["name"]: e for e in manifest["items"]}


async def _migrate(item: Item) -> None:
    async with await psycopg.AsyncConnection.connect(item.dsn, autocommit=True, connect_timeout=10) as conn:
        if item.table is None:
            await migrate_control(conn)
        else:
            await migrate_shard(conn, item.table)


def _reload_mirrors(item: Item) -> int:
    """End the servers' shard-map listener connections: each reconnects and reloads the whole table."""
    with _connect(item) as conn:
        row = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = %s AND datname = current_database()",
            (LISTENER_APPLICATION_NAME,),
        ).fetchone()
    return int(row[0]) if row else 0


def _restore(item: Item, entry: dict[str, Any], directory: Path, pg_restore: Path) -> dict[str, Any]:
    tables: list[str] = entry["tables"]
    if item.table is not None and item.table not in tables:
        raise CliError(
            f"{item.name}: the backup holds tables {', '.join(tables)} but the config names the shard's "
            f"table {item.table}; restore with a config that matches the backup"
        )
    archive = directory / entry["file"]
    if not archive.is_file():
        raise CliError(f"{archive} is missing from the backup")
    args = ["--clean", "--if-exists", "--no-owner", "--no-privileges", "--single-transaction", str(archive)]
    run_tool(pg_restore, args, item.dsn, f"restore of {item.name}")
    asyncio.run(_migrate(item))
    with _connect(item) as conn:
        rows = _count(conn, tables)
    if rows != entry["rows"]:
        raise CliError(
            f"{item.name}: restored {rows} rows but the backup recorded {entry['rows']}", EXIT_TOOL_FAILED
        )
    result = {**entry, "location": describe_dsn(item.dsn), "rows": rows}
    if item.shard_id is None:
        result["mirrors_reloaded"] = _reload_mirrors(item)
    return result


def cmd_restore(session: Session) -> int:
    args = session.args
    directory: Path = args.directory
    entries = _read_manifest(directory)
    if args.shard is None and not args.control:
        names = set(entries)
        shards = sorted(e["shard_id"] for e in entries.values() if e["shard_id"] is not None)
        items = _items(session, shards, CONTROL in names)
    else:
        items = _items(session, args.shard, args.control)
    missing = [i.name for i in items if i.name not in entries]
    if missing:
        raise CliError(
            f"the backup in {directory} has no {missing[0]} (it has: {', '.join(sorted(entries))})"
        )
    if not args.yes:
        raise CliError(
            f"restore replaces the tables of {', '.join(i.name for i in items)} with the backup's "
            "(messages stored since the backup are lost); pass --yes to proceed",
            EXIT_CONFIG,
        )
    pg_restore = find_tool("pg_restore", args.pg_bindir)
    restored = []
    with Progress("restore") as progress:
        for n, item in enumerate(items, 1):
            progress.update(f"{item.name} ({n}/{len(items)})")
            restored.append(_restore(item, entries[item.name], directory, pg_restore))
    if restored[-1]["shard_id"] is None:  # the control item comes last: fences and messages follow routing
        restored[-1]["reconciled"] = reconcile_restored_routing(session)
    if session.json:
        print_json({"directory": str(directory), "items": restored})
        return 0
    _print_items(restored)
    print(f"restored {len(restored)} item{'' if len(restored) == 1 else 's'} from {directory}")
    return 0


def _selection(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument(
        "--shard",
        type=int,
        action="append",
        metavar="SHARD",
        help=f"{verb} this shard's table (repeatable; default: every shard and the control tables)",
    )
    parser.add_argument("--control", action="store_true", help=f"{verb} the control tables (shard_map)")
    parser.add_argument(
        "--pg-bindir", type=Path, metavar="DIR", help="where pg_dump/pg_restore are (default: searched)"
    )


def register(commands: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add `backup` and `restore` to dialogctl's subcommands."""
    backup = command(commands, "backup", cmd_backup, "back up shards and control tables with pg_dump")
    backup.add_argument("--out", type=Path, required=True, metavar="DIR", help="new or empty directory")
    _selection(backup, "back up")
    restore = command(commands, "restore", cmd_restore, "restore shards and control tables from a backup")
    restore.add_argument("directory", type=Path, metavar="DIR", help="a directory written by backup")
    _selection(restore, "restore")
    restore.add_argument("--yes", action="store_true", help="confirm replacing the current tables")


__all__ = ["Item", "cmd_backup", "cmd_restore", "owned_by_shard", "register"]
