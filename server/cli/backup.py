"""`dialogctl backup` / `dialogctl restore`: per-shard and control-table backups with pg_dump/pg_restore.

    dialogctl backup --out backups/2026-11-26           # every shard and the control tables
    dialogctl backup --shard 2 --out backups/s2         # one shard
    dialogctl restore backups/s2 --shard 2 --yes        # put shard 2's table back as it was

A backup directory (mode 0700) holds one custom-format archive per item (`shard-N.dump`,
`control.dump`) and `manifest.json` (tables, location, exact row count, size, sha256), all 0600.
A shard's item is its message table and the tables named after it (`messages_N_fences`); the
control item is every other table of the control database. Rows are counted in the very snapshot
pg_dump reads (`pg_export_snapshot` + `pg_dump --snapshot`), so a restore can verify that every
row came back. A backup of more than one item holds the movers' lock (server.moves.mover.mover_lock)
from before its first dump to after its last, waiting up to --lock-wait seconds for a running move:
no move runs between two dumps, so every message is in the set exactly once, on the shard the
set's routing names. The manifest says so (`movers_lock`) and lists the moves unfinished then
(crashed ones, which the servers' resumer completes after a restore). Before anything is changed,
restore checks every chosen item: its file is named by a path inside the backup directory (no
absolute path, no `..`, no symlink out of it), its sha256 is the manifest's, its tables are the
item's, and the archive holds each of them. Restoring replaces
the item's tables (`pg_restore --clean --if-exists`, in one transaction) and only those: pg_restore
gets a list (`-L`) of the manifest's tables and what depends on them alone (their data,
constraints, indexes, sequences, defaults), so anything else an archive holds is left out.
Messages stored since the backup are lost, hence `--yes`. The item's migration then runs
(idempotent), recreating what archives of tables do not hold (the fence functions). After restoring
the control tables, the servers' shard-map mirrors are made to reload (their listener connections
are ended; they reconnect and load the whole table). dialogctl talks to the databases directly
here, with the DSNs of the config; exit status 1 when pg_dump or pg_restore fails or a backup is
refused.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import psycopg
from psycopg import sql

from server.archive.manifest import read_manifest
from server.cli.archive import open_store
from server.cli.output import format_table, print_json
from server.cli.pgtools import EXIT_TOOL_FAILED, find_tool, list_archive, run_tool
from server.cli.progress import Progress
from server.cli.session import EXIT_CONFIG, CliError, Session
from server.cli.verify import reconcile_restored_routing
from server.config import describe_dsn
from server.errors import ControlUnavailable
from server.moves.mover import MoverBusy, MoverLockLost, mover_lock
from server.storage.overrides import reload_mirrors_in
from server.storage.schema import migrate_control, migrate_shard

MANIFEST = "manifest.json"
#: 2: files are 0600 in a 0700 directory and every item records its file's sha256.
_FORMAT = 2
_T = TypeVar("_T")
CONTROL = "control"
_FILE_MODE = 0o600
_DIR_MODE = 0o700


_TABLES = """
    SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') ORDER BY c.relname
"""


#: Tables that running servers keep writing on their own (recent-activity counts, the message log's
#: pruning, the inbox and its relay cursors, server heartbeats, the rebalancer's decisions): they
#: are backed up and restored, but their row counts are not checked, since a server may change
#: them between a restore and its count.
_SERVER_MAINTAINED_SUFFIXES = ("_activity", "_events", "_pruned", "_inbox", "_relayed")
_SERVER_MAINTAINED_CONTROL = frozenset({"server_presence", "rebalance_decisions"})


def counted_tables(tables: Sequence[str]) -> list[str]:
    """The tables whose exact row count a backup records and a restore checks."""
    return [
        t
        for t in tables
        if t not in _SERVER_MAINTAINED_CONTROL and not t.endswith(_SERVER_MAINTAINED_SUFFIXES)
    ]


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _create_private(path: Path, text: str = "") -> None:
    """A new file, mode 0600 from the start (whatever the umask); fails if `path` exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, _FILE_MODE)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def _dump(item: Item, out: Path, pg_dump: Path) -> dict[str, Any]:
    target = out / item.file
    _create_private(target)  # pg_dump truncates it and keeps its mode
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
        counted = counted_tables(tables)
        rows = _count(conn, counted)
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
        "counted_tables": counted,
        "file": item.file,
        "bytes": target.stat().st_size,
        "sha256": _sha256(target),
    }


def _dump_all(items: Sequence[Item], out: Path, pg_dump: Path) -> list[dict[str, Any]]:
    out.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    out.chmod(_DIR_MODE)  # an existing empty directory too: the archives hold every message
    entries = []
    with Progress("backup") as progress:
        for n, item in enumerate(items, 1):
            progress.update(f"{item.name} ({n}/{len(items)})")
            entries.append(_dump(item, out, pg_dump))
    return entries


_UNFINISHED = """
    SELECT move_id, state, source_shard, target_shard, flip, user_low, user_high,
           coalesce(buckets, ARRAY[bucket]) FROM shard_moves WHERE state <> 'done' ORDER BY move_id
"""


async def _unfinished_moves(control_dsn: str) -> list[dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(
        control_dsn, autocommit=True, connect_timeout=10
    ) as conn:
        rows = await (await conn.execute(_UNFINISHED)).fetchall()
    return [
        {
            "move_id": r[0],
            "state": r[1],
            "source_shard": r[2],
            "target_shard": r[3],
            "flip": r[4],
            **({"user_low": r[5], "user_high": r[6]} if r[5] or r[6] else {"buckets": list(r[7])}),
        }
        for r in rows
    ]


_LOCK_NAME = "dialogctl backup"


async def _under_movers_lock(
    control_dsn: str, wait: float, work: Callable[[], _T], *, doing: str, undone: str
) -> tuple[_T, list[dict[str, Any]]]:
    """Run `work` holding the movers' lock: no move, reshard, repair or resumed move changes
    routing, fences or a unit's messages meanwhile. Returns (its result, the moves unfinished
    while the lock was held: crashed ones, which the servers' resumer completes). `doing` names
    the work in messages ("backup"), `undone` what a refusal means ("nothing was backed up")."""
    busy = (
        "the movers' lock is held (a move, reshard, repair, backup or restore is running) and was not "
        f"released within {wait:g} s; a {doing} waits for it, so that no move runs meanwhile: retry "
        f"later or pass a longer --lock-wait; {undone}"
    )
    try:
        async with contextlib.AsyncExitStack() as stack:
            try:
                lease = await stack.enter_async_context(
                    mover_lock(control_dsn, 0, application_name=f"dialogctl {doing}")
                )
            except MoverBusy:
                if wait <= 0:
                    raise
                print(
                    "dialogctl: a move, reshard, repair, backup or restore holds the movers' lock; the "
                    f"{doing} waits up to {wait:g} s (--lock-wait) for it to finish, so that no move "
                    "runs meanwhile",
                    file=sys.stderr,
                    flush=True,
                )
                lease = await stack.enter_async_context(
                    mover_lock(control_dsn, wait, application_name=f"dialogctl {doing}")
                )
            unfinished = await _unfinished_moves(control_dsn)
            result = await asyncio.to_thread(work)
            # Still ours at the end: had the lock gone with its session, a move could have run meanwhile.
            await lease.confirm()
            return result, unfinished
    except MoverBusy:
        raise CliError(busy, EXIT_TOOL_FAILED) from None
    except MoverLockLost as exc:
        raise CliError(
            f"the movers' lock was lost during the {doing}, so a move may have run meanwhile: "
            f"{exc.message}; run it again",
            EXIT_TOOL_FAILED,
        ) from None
    except ControlUnavailable as exc:
        raise CliError(
            f"cannot take the movers' lock on the control database: {exc.message}", EXIT_TOOL_FAILED
        ) from None


def cmd_backup(session: Session) -> int:
    args = session.args
    items = _items(session, args.shard, args.control)
    pg_dump = find_tool("pg_dump", args.pg_bindir)
    out: Path = args.out
    if out.exists() and any(out.iterdir()):
        raise CliError(f"{out} is not empty: back up into a new directory")
    manifest: dict[str, Any] = {"format": _FORMAT, "created_at": datetime.now(UTC).isoformat()}
    if len(items) > 1:
        # Shards are dumped one after another: only with no move in between does every message
        # appear exactly once in the set, on the shard the set's routing names.
        work = functools.partial(_dump_all, items, out, pg_dump)
        entries, unfinished = asyncio.run(
            _under_movers_lock(
                session.config().control_dsn,
                args.lock_wait,
                work,
                doing="backup",
                undone="nothing was backed up",
            )
        )
        manifest |= {"movers_lock": True, "unfinished_moves": unfinished}
    else:
        # One item is one snapshot of one database: consistent by itself, no need to stop moves.
        entries = _dump_all(items, out, pg_dump)
        manifest |= {"movers_lock": False}
    manifest["items"] = entries
    if session.config().archive.url is not None:
        manifest["archive"] = _archive_reference(session)
    _create_private(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    if session.json:
        print_json({"directory": str(out), **manifest})
        return 0
    _print_items(entries)
    print(f"backup of {len(entries)} item{'' if len(entries) == 1 else 's'} in {out}")
    if manifest["movers_lock"]:
        print(
            f"taken under the movers' lock (no move ran meanwhile); {len(manifest['unfinished_moves'])} "
            "unfinished move(s) in the set, which the servers' move resumer completes after a restore"
        )
    return 0


def _missing_archive_files(session: Session, directory: Path) -> list[str]:
    """The archive files the backup's manifest names that the configured archive no longer holds."""
    if session.config().archive.url is None:
        return []
    try:
        listed = json.loads((directory / MANIFEST).read_text()).get("archive") or {}
    except (OSError, ValueError, AttributeError):
        return []
    names = [f.get("file") for f in listed.get("files", []) if isinstance(f, dict)]
    present = set(open_store(session.config().archive).list("parts"))
    return [n for n in names if isinstance(n, str) and n not in present]


def _archive_reference(session: Session) -> dict[str, Any]:
    """The archive files the backed-up shards rely on: messages archived before the backup are in
    them, not in the dumps. Archive files are never changed, so naming them is enough; keep them
    (a rewrite by compaction or an erasure makes new files and removes the old ones)."""
    store = open_store(session.config().archive)
    listed = read_manifest(store)
    return {
        "url": store.url,
        "manifest_version": listed.version,
        "files": [
            {"file": b.file, "rows": b.rows, "checksum": str(b.checksum), "state": str(b.state)}
            for b in listed.batches
        ],
    }


def _print_items(entries: Sequence[dict[str, Any]]) -> None:
    rows = [
        [e["name"], ",".join(e["tables"]), e["location"], e["rows"], e["file"], e.get("bytes", "")]
        for e in entries
    ]
    print(format_table(("ITEM", "TABLES", "LOCATION", "ROWS", "FILE", "BYTES"), rows, right=(3, 5)))


def _refuse(directory: Path, reason: str) -> CliError:
    return CliError(f"refusing to restore from {directory}: {reason}; nothing was changed", EXIT_TOOL_FAILED)


def _inside(directory: Path, name: object, what: str) -> Path:
    """The real path of `name`, a path relative to the backup directory that stays inside it."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise _refuse(directory, f"the manifest names {what} {name!r}, which is not a file name")
    relative = PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise _refuse(directory, f"the manifest names {what} {name!r} outside the backup directory")
    root = directory.resolve()
    real = (root / relative).resolve()
    if not real.is_relative_to(root) or real == root:
        raise _refuse(directory, f"{what} {name!r} leads out of the backup directory (to {real})")
    if not real.is_file():
        raise _refuse(directory, f"{what} {name!r} is missing from the backup")
    return real


def _names_some_of(value: object, tables: list[str]) -> bool:
    return isinstance(value, list) and all(isinstance(t, str) and t in tables for t in value)


def _read_manifest(directory: Path) -> dict[str, dict[str, Any]]:
    if not (directory / MANIFEST).exists():
        raise CliError(f"{directory / MANIFEST} not found: not a dialogctl backup directory")
    path = _inside(directory, MANIFEST, "the manifest")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read {path}: {exc}") from None
    if isinstance(manifest, dict) and manifest.get("format") == 1:
        raise _refuse(
            directory,
            "the backup was written by an older dialogctl whose manifest has no checksums, so its "
            "files cannot be verified; restore it with that dialogctl, or take a new backup",
        )
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
        raise CliError(f"{path} is not a backup manifest this dialogctl understands")
    items = manifest.get("items")
    if not isinstance(items, list) or not all(isinstance(e, dict) for e in items):
        raise _refuse(directory, "the manifest's items are not a list of objects")
    entries: dict[str, dict[str, Any]] = {}
    for entry in items:
        name = entry.get("name")
        tables = entry.get("tables")
        if (
            not isinstance(name, str)
            or name in entries
            or not isinstance(tables, list)
            or not tables
            or not all(isinstance(t, str) and t for t in tables)
            or len(set(tables)) != len(tables)
            or not isinstance(entry.get("rows"), int)
            or not isinstance(entry.get("sha256"), str)
            or not _names_some_of(entry.get("counted_tables", tables), tables)
        ):
            raise _refuse(directory, f"the manifest's item {name!r} is malformed or repeated")
        entries[name] = entry
    return entries


@dataclass(slots=True)
class TocEntry:
    """One line of `pg_restore --list --verbose`: an object of the archive and what it depends on."""

    dump_id: int
    kind: str
    tag: str
    line: str
    depends: tuple[int, ...] = field(default_factory=tuple)


_TOC_LINE = re.compile(r"^(\d+); \d+ \d+ (.*)$")
#: Entries that set up the restoring session (encoding, standard strings, an empty search_path).
_SESSION = frozenset({"ENCODING", "STDSTRINGS", "SEARCHPATH"})
#: Kinds restored when every object they depend on is restored (a table's parts, never a table).
_DEPENDENT = frozenset(
    {
        "TABLE DATA",
        "CONSTRAINT",
        "FK CONSTRAINT",
        "CHECK CONSTRAINT",
        "INDEX",
        "DEFAULT",
        "SEQUENCE",
        "SEQUENCE OWNED BY",
        "SEQUENCE SET",
        "TRIGGER",
        "COMMENT",
        "STATISTICS",
    }
)
#: Every kind pg_dump writes that has a space in it, longest first, then any one-word kind.
_MULTIWORD = sorted(
    [*(k for k in _DEPENDENT if " " in k), "TABLE ATTACH", "INDEX ATTACH", "ROW SECURITY", "DEFAULT ACL"],
    key=len,
    reverse=True,
)


def parse_toc(text: str) -> list[TocEntry]:
    """The entries of a `pg_restore --list --verbose` listing, in the archive's order."""
    entries: list[TocEntry] = []
    for line in text.splitlines():
        if line.startswith(";\tdepends on:") and entries:
            entries[-1].depends = tuple(int(d) for d in line.split(":", 1)[1].split())
            continue
        match = _TOC_LINE.match(line)
        if match is None:
            continue
        rest = match.group(2)
        kind = next((k for k in _MULTIWORD if rest.startswith(k + " ")), rest.split(" ", 1)[0])
        # KIND NAMESPACE TAG OWNER; the owner is one word (or empty), the tag may hold spaces.
        tag = rest[len(kind) + 1 :].partition(" ")[2].rsplit(" ", 1)[0]
        entries.append(TocEntry(int(match.group(1)), kind, tag, line))
    return entries


def restore_list(entries: Sequence[TocEntry], tables: Sequence[str]) -> tuple[list[TocEntry], list[TocEntry]]:
    """(entries to restore, entries left out): the tables, and what depends on nothing else.

    Raises ValueError naming a table the archive does not hold (or holds twice, or without data).
    """
    for table in tables:
        kinds = [e.kind for e in entries if e.tag == table and e.kind in ("TABLE", "TABLE DATA")]
        if sorted(kinds) != ["TABLE", "TABLE DATA"]:
            problem = "does not hold" if "TABLE" not in kinds else "holds more than one copy, or no data, of"
            raise ValueError(f"the archive {problem} table {table}, which the manifest lists")
    wanted = set(tables)
    chosen = {e.dump_id for e in entries if e.kind == "TABLE" and e.tag in wanted}
    grew = True
    while grew:
        grew = False
        for e in entries:
            if e.dump_id in chosen or e.kind not in _DEPENDENT or not e.depends:
                continue
            if e.kind == "TABLE DATA" and e.tag not in wanted:
                continue
            if all(d in chosen for d in e.depends):
                chosen.add(e.dump_id)
                grew = True
    kept = [e for e in entries if e.dump_id in chosen or e.kind in _SESSION]
    left_out = [
        e for e in entries if e.dump_id not in chosen and e.kind not in _SESSION and e.kind != "DATABASE"
    ]
    return kept, left_out


@dataclass(frozen=True, slots=True)
class _Checked:
    """An item whose archive was verified: what to restore from it, and what it leaves out."""

    item: Item
    entry: dict[str, Any]
    archive: Path
    kept: list[TocEntry]
    left_out: list[TocEntry]


def _check(item: Item, entry: dict[str, Any], directory: Path, pg_restore: Path) -> _Checked:
    """Everything restore verifies of an item before it changes anything (see the module docstring)."""
    tables: list[str] = entry["tables"]
    if item.table is not None and item.table not in tables:
        raise CliError(
            f"{item.name}: the backup holds tables {', '.join(tables)} but the config names the shard's "
            f"table {item.table}; restore with a config that matches the backup"
        )
    foreign = [t for t in tables if not item.owns(t)]
    if foreign:
        raise _refuse(
            directory, f"the manifest's {item.name} lists {', '.join(foreign)}, not tables of {item.name}"
        )
    archive = _inside(directory, entry.get("file"), f"{item.name}'s file")
    actual = _sha256(archive)
    if actual != entry["sha256"]:
        raise _refuse(
            directory,
            f"{archive.name} does not match its checksum (sha256 {actual}, the manifest says "
            f"{entry['sha256']}): the file was changed or damaged since the backup",
        )
    try:
        kept, left_out = restore_list(parse_toc(list_archive(pg_restore, archive)), tables)
    except ValueError as exc:
        raise _refuse(directory, f"{item.name}: {exc}") from None
    return _Checked(item, entry, archive, kept, left_out)


async def _migrate(item: Item) -> int | None:
    """Bring the restored tables to this version's schema; after the control tables, make the
    servers reload their shard-map mirrors (returns how many did)."""
    async with await psycopg.AsyncConnection.connect(item.dsn, autocommit=True, connect_timeout=10) as conn:
        if item.table is not None:
            await migrate_shard(conn, item.table)
            return None
        await migrate_control(conn)
        return await reload_mirrors_in(conn)


def _restore(checked: _Checked, pg_restore: Path) -> dict[str, Any]:
    item, entry = checked.item, checked.entry
    tables: list[str] = entry["tables"]
    if checked.left_out:
        names = ", ".join(f"{e.kind} {e.tag}" for e in checked.left_out)
        print(
            f"dialogctl: {item.name}: not restoring what the manifest does not list: {names}", file=sys.stderr
        )
    with tempfile.TemporaryDirectory(prefix="dialogctl-restore-") as private:
        listing = Path(private) / "restore.list"
        listing.write_text("".join(e.line + "\n" for e in checked.kept))
        args = [
            "--clean",
            "--if-exists",
            "--no-owner",
            "--no-privileges",
            "--single-transaction",
            f"--use-list={listing}",
            str(checked.archive),
        ]
        run_tool(pg_restore, args, item.dsn, f"restore of {item.name}")
    mirrors_reloaded = asyncio.run(_migrate(item))
    # Sets written before `counted_tables` existed counted every table.
    counted: list[str] = entry.get("counted_tables", tables)
    with _connect(item) as conn:
        rows = _count(conn, counted)
    if rows != entry["rows"]:
        raise CliError(
            f"{item.name}: restored {rows} rows but the backup recorded {entry['rows']}", EXIT_TOOL_FAILED
        )
    result = {**entry, "location": describe_dsn(item.dsn), "rows": rows}
    if checked.left_out:
        result["left_out"] = [f"{e.kind} {e.tag}" for e in checked.left_out]
    if mirrors_reloaded is not None:
        result["mirrors_reloaded"] = mirrors_reloaded
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
    # Every item is verified before the first one is restored: a bad backup changes nothing.
    checked = [_check(item, entries[item.name], directory, pg_restore) for item in items]

    def restore_all() -> list[dict[str, Any]]:
        restored = []
        with Progress("restore") as progress:
            for n, one in enumerate(checked, 1):
                progress.update(f"{one.item.name} ({n}/{len(items)})")
                restored.append(_restore(one, pg_restore))
        return restored

    # Under the movers' lock: a move (or the servers' resumer completing a restored unfinished
    # one) cannot change routing or a unit's rows between an item's restore and its row count.
    restored, _ = asyncio.run(
        _under_movers_lock(
            session.config().control_dsn,
            args.lock_wait,
            restore_all,
            doing="restore",
            undone="nothing was restored",
        )
    )
    if restored[-1]["shard_id"] is None:  # the control item comes last: fences and messages follow routing
        restored[-1]["reconciled"] = reconcile_restored_routing(session)
    missing_files = _missing_archive_files(session, directory)
    if missing_files:
        print(
            f"dialogctl: {len(missing_files)} archive file(s) the backup relies on are gone (e.g. "
            f"{missing_files[0]}): their messages were rewritten or erased since; GetDialog shows the "
            "archive as it is now",
            file=sys.stderr,
        )
    if session.json:
        print_json({"directory": str(directory), "items": restored, "archive_files_missing": missing_files})
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
    backup.add_argument(
        "--lock-wait",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long a backup of more than one item waits for a running move, reshard or repair "
        "(the movers' lock) before giving up (default: 60)",
    )
    _selection(backup, "back up")
    restore = command(commands, "restore", cmd_restore, "restore shards and control tables from a backup")
    restore.add_argument("directory", type=Path, metavar="DIR", help="a directory written by backup")
    _selection(restore, "restore")
    restore.add_argument("--yes", action="store_true", help="confirm replacing the current tables")
    restore.add_argument(
        "--lock-wait",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long the restore waits for a running move, reshard or repair (the movers' lock) "
        "before giving up (default: 60)",
    )


__all__ = [
    "Item",
    "TocEntry",
    "cmd_backup",
    "cmd_restore",
    "owned_by_shard",
    "parse_toc",
    "register",
    "restore_list",
]
