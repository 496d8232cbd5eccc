"""`dialogctl verify`: is every message stored once, on the shard routing names? (like Vitess VDiff)

    dialogctl verify              # scan every shard; exit 1 when something is off
    dialogctl verify --repair     # also move misplaced messages home, drop duplicate copies, fix fences
    dialogctl verify --json       # every finding with up to 20 message ids each
    dialogctl verify --max-rows-per-second 0    # as fast as the shards go (default: 50,000 rows/s each)

It connects to the shards and the control database named in the config (no server
needed) and routes pairs as the servers do: the shard map first, else the hash.
It also reads every shard's fence rows: a `stale_fence` refuses (DIALOG_MOVING)
pairs that routing sends to that very shard, which no move will ever lift (left
by a finished move before a control restore or a hand edit of shard_map).
Without --repair, pairs with an unfinished move (or in buckets a reshard is
moving) are skipped: a mover may be working on them. --repair takes the mover
lock, so no move runs meanwhile, and checks those pairs too: a crashed or failed
move's copies on its target are settled as strays, and re-running the move
copies them again. It first makes the servers reload their shard-map mirrors
(routing as stored is what it repairs to), then rewrites stale fences (never
those of a bucket with an unfinished move), then repairs the messages.
`dialogctl restore --control` runs the same repair after restoring.
With an archive configured, it also reads every archive file and compares it with the manifest
(count and checksum), and lists files the manifest does not name.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from typing import Any

import psycopg

from server.archive.verify import ArchiveCheck, check_archive
from server.cli.archive import open_store
from server.cli.output import format_table, print_json
from server.cli.progress import Progress
from server.cli.session import Session
from server.cli.shards import run_tool, tool_shards
from server.config import ServerConfig
from server.moves.mover import mover_lock
from server.moves.verify import Report, check_fences, verify
from server.routing import Pair, ShardRouter, bucket_of
from server.storage.layout import ensure_layout, load_layout
from server.storage.overrides import reload_mirrors_in
from server.storage.schema import migrate_control

_EXIT_FINDINGS = 1
_UNREPAIRABLE = frozenset({"conflict", "bad_bucket"})


async def load_router(config: ServerConfig) -> tuple[ShardRouter, frozenset[Pair], frozenset[int]]:
    """The routing the servers use (layout, shard map, hash), and the pairs and buckets being moved."""
    async with await psycopg.AsyncConnection.connect(config.control_dsn, connect_timeout=10) as conn:
        await migrate_control(conn)  # a fresh control database has no tables yet
        await ensure_layout(conn, config.num_shards)
        async with conn.transaction():
            overrides = await (await conn.execute("SELECT user1, user2, shard_id FROM shard_map")).fetchall()
            layout = await load_layout(conn)
            moving = await (
                await conn.execute(
                    "SELECT user_low, user_high, coalesce(buckets, ARRAY[bucket]) FROM shard_moves "
                    "WHERE state <> 'done'"
                )
            ).fetchall()
    router = ShardRouter(layout.num_shards, {Pair(r[0], r[1]): r[2] for r in overrides})
    router.set_layout(layout)
    pairs = frozenset(Pair(r[0], r[1]) for r in moving if r[0] != 0)
    buckets = frozenset(b for r in moving if r[0] == 0 for b in r[2])
    return router, pairs, buckets


async def run_verify(config: ServerConfig, *, repair: bool, rows_per_second: float = 0.0) -> Report:
    """Verify (and with `repair`, fix) every shard, each scanned at most `rows_per_second` (0: unbounded)."""
    if not repair:
        return await _verify(config, repair=False, rows_per_second=rows_per_second)
    # No move runs while a repair holds the mover lock: every unit, even one whose move
    # crashed or failed, is where routing says, and the rest are strays to settle.
    async with mover_lock(config.control_dsn):
        return await _verify(config, repair=True, rows_per_second=rows_per_second)


async def _verify(config: ServerConfig, *, repair: bool, rows_per_second: float) -> Report:
    report = Report()
    if repair:
        # The servers route as stored from now on (a stale one is turned away by the fences below).
        async with await psycopg.AsyncConnection.connect(
            config.control_dsn, autocommit=True, connect_timeout=10
        ) as conn:
            report.mirrors_reloaded = await reload_mirrors_in(conn)
    router, moving_pairs, moving_buckets = await load_router(config)
    async with tool_shards(config) as shards:
        # Fences first: the message repair copies to shards whose fences must already be right.
        await check_fences(
            shards, router, report, moving_pairs=moving_pairs, moving_buckets=moving_buckets, repair=repair
        )
        return await verify(
            shards,
            lambda p: router.resolve(*p).shard_id,
            moving=lambda p: not repair and (p in moving_pairs or bucket_of(*p) in moving_buckets),
            repair=repair,
            report=report,
            rows_per_second=rows_per_second,
        )


def _stale_fences(report: Report) -> list[dict[str, Any]]:
    return [
        {
            "kind": "stale_fence",
            "shard_id": f.shard_id,
            "bucket": f.row.bucket,
            "user_low": f.row.low,
            "user_high": f.row.high,
            "unit": f.row.unit,
            "state": f.row.state,
        }
        for f in report.stale_fences
    ]


def reconcile_restored_routing(session: Session) -> dict[str, Any]:
    """After `restore --control`: make fences and messages agree with the restored routing.

    Runs `verify --repair` (mover lock, mirrors reloaded, stale fences rewritten, misplaced
    messages moved home); prints a line unless --json, and returns what it did.
    """
    with Progress("restore") as progress:
        progress.update("reconciling fences and messages with the restored routing")
        report = run_tool(run_verify(session.config(), repair=True))
    remaining = [f for f in report.findings if f.kind in _UNREPAIRABLE]
    summary = {
        "stale_fences": _stale_fences(report),
        "fences_repaired": report.fences_repaired,
        "copied": report.copied,
        "deleted": report.deleted,
        "unrepaired_findings": len(remaining),
    }
    if not session.json:
        print(
            f"reconciled with the restored routing: {len(report.stale_fences)} stale fence row(s) fixed in "
            f"{report.fences_repaired} bucket(s), {report.copied} message(s) copied to their shard, "
            f"{report.deleted} stray copies deleted"
        )
        if remaining:
            print(f"{len(remaining)} finding(s) need a person: run `dialogctl verify` to list them")
    return summary


def cmd_verify(session: Session) -> int:
    args = session.args
    config = session.config()
    with Progress("verify") as progress:
        progress.update(f"scanning {config.num_shards} shards")
        report = run_tool(run_verify(config, repair=args.repair, rows_per_second=args.max_rows_per_second))
    remaining: list[object] = [f for f in report.findings if not args.repair or f.kind in _UNREPAIRABLE]
    if not args.repair:
        remaining += report.stale_fences
    archive = None
    if config.archive.url is not None:
        archive = run_tool(
            asyncio.to_thread(check_archive, open_store(config.archive)), reaching="the archive"
        )
        remaining += archive.findings
    if session.json:
        print_json(
            {
                "shards_scanned": report.shards_scanned,
                "pairs": report.pairs,
                "messages": report.messages,
                "skipped_moving_pairs": report.skipped_moving_pairs,
                "fence_rows": report.fence_rows,
                "skipped_moving_buckets": report.skipped_moving_buckets,
                "stale_fences": _stale_fences(report),
                "findings": [
                    {
                        "kind": f.kind,
                        "pair": [f.pair.low, f.pair.high],
                        "shard_id": f.shard_id,
                        "expected_shard_id": f.expected_shard_id,
                        "count": f.count,
                        "message_ids": [str(i) for i in f.message_ids],
                    }
                    for f in report.findings
                ],
                "repaired": args.repair,
                "copied": report.copied,
                "deleted": report.deleted,
                "fences_repaired": report.fences_repaired,
                "mirrors_reloaded": report.mirrors_reloaded,
                "clean": not remaining,
                **({} if archive is None else {"archive": _archive_summary(archive)}),
            }
        )
    else:
        if report.findings:
            rows = [
                [
                    f.kind,
                    f"{f.pair.low} {f.pair.high}",
                    f.shard_id,
                    f.expected_shard_id,
                    f.count,
                    " ".join(str(i) for i in f.message_ids[:3]) + (" ..." if f.count > 3 else ""),
                ]
                for f in report.findings
            ]
            print(
                format_table(
                    ("KIND", "PAIR", "SHARD", "EXPECTED", "COUNT", "MESSAGE_IDS"), rows, right=(2, 3, 4)
                )
            )
        if report.stale_fences:
            fences = [
                ["stale_fence", f.shard_id, f.row.bucket, f.row.unit, f.row.state]
                for f in report.stale_fences
            ]
            print(format_table(("KIND", "SHARD", "BUCKET", "UNIT", "STATE"), fences, right=(1, 2)))
        print(
            f"scanned {report.shards_scanned} shards: {report.messages} messages of {report.pairs} pairs, "
            f"{len(report.findings)} finding(s), {report.skipped_moving_pairs} moving pair(s) skipped; "
            f"{report.fence_rows} fence rows, {len(report.stale_fences)} stale, "
            f"{report.skipped_moving_buckets} bucket(s) of unfinished moves skipped"
        )
        if args.repair:
            print(
                f"repaired: {report.copied} copied to their shard, {report.deleted} stray copies deleted, "
                f"fences of {report.fences_repaired} bucket(s) rewritten"
            )
        if archive is not None:
            for finding in archive.findings:
                print(f"archive {finding.kind}: {finding.file}: {finding.detail}")
            print(
                f"archive: {archive.files} files, {archive.messages} messages checked against the manifest, "
                f"{len(archive.findings)} finding(s), {archive.unfinished_batches} batch(es) unfinished"
            )
        if remaining and args.repair:
            print(f"{len(remaining)} finding(s) need a person: conflicting copies or wrong stored buckets")
    return _EXIT_FINDINGS if remaining else 0


def _archive_summary(check: ArchiveCheck) -> dict[str, Any]:
    return {
        "files": check.files,
        "messages": check.messages,
        "unfinished_batches": check.unfinished_batches,
        "findings": [{"kind": f.kind, "file": f.file, "detail": f.detail} for f in check.findings],
    }


#: Rows per second `dialogctl verify` reads from each shard by default: a scan that leaves a busy
#: shard most of its capacity (docs/operations.md, Operator reads, has the costs).
DEFAULT_ROWS_PER_SECOND = 50_000


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of rows per second, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 (no limit) or more, got {text!r}")
    return value


def register(commands: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add `verify` to dialogctl's subcommands."""
    verifying = command(
        commands, "verify", cmd_verify, "check that every message is stored once, on the shard routing names"
    )
    verifying.add_argument(
        "--max-rows-per-second",
        type=_rate,
        default=DEFAULT_ROWS_PER_SECOND,
        metavar="N",
        help=f"rows read per second per shard at most (default {DEFAULT_ROWS_PER_SECOND:,}; 0: no limit)",
    )
    verifying.add_argument(
        "--repair",
        action="store_true",
        help="copy misplaced messages to their shard, delete stray copies and fix stale fences "
        "(conflicts are only reported)",
    )


__all__ = ["cmd_verify", "load_router", "reconcile_restored_routing", "register", "run_verify"]
