"""`dialogctl verify`: is every message stored once, on the shard routing names? (like Vitess VDiff)

    dialogctl verify              # scan every shard; exit 1 when something is off
    dialogctl verify --repair     # also move misplaced messages home and drop duplicate copies
    dialogctl verify --json       # every finding with up to 20 message ids each

It connects to the shards and the control database named in the config (no server
needed) and routes pairs as the servers do: the shard map first, else the hash.
Without --repair, pairs with an unfinished move (or in buckets a reshard is
moving) are skipped: a mover may be working on them. --repair takes the mover
lock, so no move runs meanwhile, and checks those pairs too: a crashed or failed
move's copies on its target are settled as strays, and re-running the move
copies them again.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import psycopg

from server.cli.output import format_table, print_json
from server.cli.progress import Progress
from server.cli.session import Session
from server.cli.shards import run_tool, tool_shards
from server.config import ServerConfig
from server.moves.mover import mover_lock
from server.moves.verify import Report, verify
from server.routing import Pair, ShardRouter, bucket_of
from server.storage.layout import ensure_layout, load_layout
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


async def run_verify(config: ServerConfig, *, repair: bool) -> Report:
    if not repair:
        return await _verify(config, repair=False)
    # No move runs while a repair holds the mover lock: every unit, even one whose move
    # crashed or failed, is where routing says, and the rest are strays to settle.
    async with mover_lock(config.control_dsn):
        return await _verify(config, repair=True)


async def _verify(config: ServerConfig, *, repair: bool) -> Report:
    router, moving_pairs, moving_buckets = await load_router(config)
    async with tool_shards(config) as shards:
        return await verify(
            shards,
            lambda p: router.resolve(*p).shard_id,
            moving=lambda p: not repair and (p in moving_pairs or bucket_of(*p) in moving_buckets),
            repair=repair,
        )


def cmd_verify(session: Session) -> int:
    args = session.args
    config = session.config()
    with Progress("verify") as progress:
        progress.update(f"scanning {config.num_shards} shards")
        report = run_tool(run_verify(config, repair=args.repair))
    remaining = [f for f in report.findings if not args.repair or f.kind in _UNREPAIRABLE]
    if session.json:
        print_json(
            {
                "shards_scanned": report.shards_scanned,
                "pairs": report.pairs,
                "messages": report.messages,
                "skipped_moving_pairs": report.skipped_moving_pairs,
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
                "clean": not remaining,
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
        print(
            f"scanned {report.shards_scanned} shards: {report.messages} messages of {report.pairs} pairs, "
            f"{len(report.findings)} finding(s), {report.skipped_moving_pairs} moving pair(s) skipped"
        )
        if args.repair:
            print(f"repaired: {report.copied} copied to their shard, {report.deleted} stray copies deleted")
        if remaining and args.repair:
            print(f"{len(remaining)} finding(s) need a person: conflicting copies or wrong stored buckets")
    return _EXIT_FINDINGS if remaining else 0


def register(commands: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add `verify` to dialogctl's subcommands."""
    verifying = command(
        commands, "verify", cmd_verify, "check that every message is stored once, on the shard routing names"
    )
    verifying.add_argument(
        "--repair",
        action="store_true",
        help="copy misplaced messages to their shard and delete stray copies (conflicts are only reported)",
    )


__all__ = ["cmd_verify", "load_router", "register", "run_verify"]
