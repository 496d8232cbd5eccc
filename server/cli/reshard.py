"""`dialogctl reshard`: move the cluster from N to N' shards online (server.moves.reshard).

    dialogctl reshard --shards 8 --dry-run    # what would move: buckets, messages and pairs per route
    dialogctl reshard --shards 8              # move them; Ctrl-C or a crash: run it again to continue
    dialogctl reshard --shards 6 --full-reshuffle   # a count that is not a multiple (or a smaller one)
    dialogctl reshard --status                # layout, units moved so far, unfinished moves, servers

Before running it, list the new shards in every server's config ([[shards]] with
their DSNs) and restart the servers, so every server can reach every shard; the
control database says how many of them the hash uses. The command connects to
the databases named in the config itself (no server needed), creates the new
shards' tables, and moves units (a hash bucket's pairs going from one shard to
another) in groups while the servers keep serving;
writes to a group's pairs pause only for its final catch-up (retryable
UNAVAILABLE, reason DIALOG_MOVING). Each group is verified (counts and checksums)
before its routing flips and its old rows are deleted.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import psycopg

from server.cli.output import format_table, print_json
from server.cli.progress import Progress as ProgressLine
from server.cli.session import CliError, Session
from server.cli.shards import run_tool, tool_shards
from server.config import PoolConfig, ServerConfig
from server.moves.mover import Mover
from server.moves.reshard import Progress, Resharder, check_servers, check_target, estimate, plan_steps
from server.routing import ShardRouter
from server.routing.layout import moving_units
from server.storage.layout import Layout, load_layout
from server.storage.moves import MoveLog
from server.storage.overrides import OverrideStore
from server.storage.pools import open_pool
from server.storage.presence import live_servers
from server.storage.schema import migrate_control

_POOL = PoolConfig(min_size=1, max_size=4)


async def _stored_layout(conn: psycopg.AsyncConnection[Any]) -> Layout:
    """The control database's layout (its tables created first if it is new)."""
    await migrate_control(conn)
    try:
        return await load_layout(conn)
    except LookupError:
        raise CliError(
            "no server has started on this control database yet, so it has no shard layout; "
            "start the servers first"
        ) from None


async def _run(config: ServerConfig, args: argparse.Namespace, line: ProgressLine) -> dict[str, Any]:
    control = await open_pool("control", config.control_dsn, _POOL, min_size=1, max_size=4)
    try:
        async with control.connection() as conn:
            layout = await _stored_layout(conn)
        async with tool_shards(config) as shards:
            router = ShardRouter(layout.num_shards)
            router.set_layout(layout)
            mover = Mover(config.control_dsn, control, shards, router)
            if args.dry_run:
                if layout.target_shards is None:
                    check_target(
                        layout.num_shards, args.shards, config.num_shards, full_reshuffle=args.full_reshuffle
                    )
                async with control.connection() as conn:
                    check_servers(await live_servers(conn), args.shards)
                pinned = await OverrideStore(control).all()
                estimates = await estimate(shards, layout, args.shards, pinned)
                return {
                    "dry_run": True,
                    "num_shards": layout.num_shards,
                    "target_shards": args.shards,
                    "steps": len(plan_steps(layout, args.shards, args.buckets_per_step)),
                    "routes": [
                        {
                            "source": e.source,
                            "target": e.target,
                            "buckets": e.buckets,
                            "messages": e.messages,
                            "pairs": e.pairs,
                        }
                        for e in estimates
                    ],
                    "messages": sum(e.messages for e in estimates),
                    "pairs": sum(e.pairs for e in estimates),
                }

            def report(p: Progress) -> None:
                line.update(
                    f"step {p.steps_done}/{p.steps_total}, {p.rows_copied} rows copied "
                    f"({p.rows_per_second:.0f} rows/s)"
                )

            started = time.monotonic()
            progress = await Resharder(mover, config.num_shards).run(
                args.shards,
                buckets_per_step=args.buckets_per_step,
                full_reshuffle=args.full_reshuffle,
                on_progress=report,
            )
            elapsed = time.monotonic() - started
            pinned_per_shard = Counter((await OverrideStore(control).all()).values())
            return {
                "dry_run": False,
                "num_shards": args.shards,
                # Shards the hash no longer uses after shrinking, with the pairs overrides still keep there.
                "unused_shards": [
                    {"shard_id": c.shard_id, "pinned_pairs": pinned_per_shard[c.shard_id]}
                    for c in config.shards
                    if c.shard_id >= args.shards
                ],
                "steps": progress.steps_done,
                "rows_copied": progress.rows_copied,
                "rows_deleted": progress.rows_deleted,
                "seconds": round(elapsed, 3),
                "rows_per_second": round(progress.rows_copied / elapsed, 1) if elapsed > 0 else 0.0,
            }
    finally:
        await control.close()


async def _status(config: ServerConfig) -> dict[str, Any]:
    """Where the cluster stands: layout, units moved so far, the move in flight, the live servers."""
    control = await open_pool("control", config.control_dsn, _POOL, min_size=1, max_size=1)
    try:
        async with control.connection() as conn:
            layout = await _stored_layout(conn)
            servers = await live_servers(conn)
        moves = await MoveLog(control).all_unfinished()
    finally:
        await control.close()
    total = len(moving_units(layout.num_shards, layout.target_shards)) if layout.target_shards else 0
    return {
        "num_shards": layout.num_shards,
        "target_shards": layout.target_shards,
        "units_moved": len(layout.flipped),
        "units_total": total,
        "unfinished_moves": [
            {
                "move_id": m.move_id,
                "state": str(m.state),
                "source_shard": m.source_shard,
                "target_shard": m.target_shard,
                "unit": m.unit,
                "idle_seconds": round(m.idle_seconds, 1),
            }
            for m in moves
        ],
        "live_servers": [
            {"host": s.host, "pid": s.pid, "configured_shards": s.configured_shards} for s in servers
        ],
    }


def _print_status(status: dict[str, Any]) -> None:
    target = status["target_shards"]
    if target is None:
        print(f"layout: {status['num_shards']} shards; no reshard running")
    else:
        done, total = status["units_moved"], status["units_total"]
        print(
            f"layout: {status['num_shards']} shards, resharding to {target}: {done} of {total} units moved "
            f"({done / max(total, 1):.0%}); run `dialogctl reshard --shards {target}` to continue"
        )
    for m in status["unfinished_moves"]:
        print(
            f"unfinished move {m['move_id']}: shard {m['source_shard']} -> {m['target_shard']}, {m['unit']}, "
            f"{m['state']}, idle {m['idle_seconds']:.0f} s"
        )
    servers = status["live_servers"]
    print(
        f"live servers: {len(servers)}"
        + "".join(
            f"\n  {s['host']} pid {s['pid']}: {s['configured_shards']} shards configured" for s in servers
        )
    )


def cmd_reshard(session: Session) -> int:
    args = session.args
    config = session.config()
    if args.status:
        status = run_tool(_status(config), reaching="the control database")
        if session.json:
            print_json(status)
        else:
            _print_status(status)
        return 0
    if args.shards is None:
        args.subparser.error("--shards N is required (or --status)")
    with ProgressLine("reshard") as line:
        result = run_tool(_run(config, args, line))
    if session.json:
        print_json(result)
    elif result["dry_run"]:
        rows = [[r["source"], r["target"], r["buckets"], r["messages"], r["pairs"]] for r in result["routes"]]
        print(format_table(("SOURCE", "TARGET", "BUCKETS", "MESSAGES", "PAIRS"), rows, right=(0, 1, 2, 3, 4)))
        print(
            f"dry run: {result['num_shards']} -> {result['target_shards']} shards would move "
            f"{result['messages']} messages of {result['pairs']} pairs in {result['steps']} steps; "
            "nothing changed"
        )
    else:
        print(
            f"resharded to {result['num_shards']} shards: {result['steps']} steps, "
            f"{result['rows_copied']} rows copied ({result['rows_per_second']:.0f} rows/s), "
            f"{result['rows_deleted']} old rows deleted"
        )
        for unused in result["unused_shards"]:
            kept = unused["pinned_pairs"]
            print(
                f"shard {unused['shard_id']}: the hash no longer uses it; "
                + (
                    f"overrides still pin {kept} pair(s) there"
                    if kept
                    else "nothing is pinned there: it can leave the config"
                )
            )
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def register(commands: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add `reshard` to dialogctl's subcommands."""
    reshard = command(commands, "reshard", cmd_reshard, "change the shard count while serving")
    reshard.add_argument("--shards", type=_positive, metavar="N", help="the new number of shards")
    reshard.add_argument(
        "--status",
        action="store_true",
        help="show the layout, how far a running reshard is, unfinished moves and the live servers",
    )
    reshard.add_argument("--dry-run", action="store_true", help="print what would move; change nothing")
    reshard.add_argument(
        "--buckets-per-step",
        type=_positive,
        default=64,
        metavar="K",
        help="hash buckets moved (and fenced for their catch-up) together (default: 64 of 4096)",
    )
    reshard.add_argument(
        "--full-reshuffle",
        action="store_true",
        help="accept a count that is not a multiple of the current one (most pairs move), or a smaller one",
    )


__all__ = ["cmd_reshard", "register"]
