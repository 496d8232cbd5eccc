"""`dialogctl moves`: the moves recorded in shard_moves, and completing the unfinished ones.

    dialogctl moves                 # unfinished moves (a crashed SetShardOverride or reshard step)
    dialogctl moves --all           # the latest moves, finished or not
    dialogctl moves --resume        # complete every unfinished move, from the step it reached

A move that crashed while its unit was fenced keeps that unit's writes answered with
the retryable DIALOG_MOVING until it is completed; `--resume` does that without
knowing which request started it. It connects to the databases named in the config
(no server needed); the servers learn the routing change by NOTIFY as usual.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import psycopg

from server.cli.output import format_table, print_json
from server.cli.session import Session
from server.cli.shards import run_tool, tool_shards
from server.config import PoolConfig, ServerConfig
from server.moves.mover import Mover
from server.routing import ShardRouter
from server.storage.layout import load_layout
from server.storage.pools import open_pool
from server.storage.schema import migrate_control

_POOL = PoolConfig(min_size=1, max_size=4)
_HEADERS = ("MOVE", "UNIT", "FROM", "TO", "FLIP", "STATE", "COPIED", "DELETED", "UPDATED")


async def _list(conn: psycopg.AsyncConnection[Any], *, everything: bool, limit: int) -> list[dict[str, Any]]:
    cur = await conn.execute(
        """
        SELECT move_id, user_low, user_high, coalesce(buckets, ARRAY[bucket]), source_shard, target_shard,
               flip, state, copied_rows, deleted_rows, updated_at
        FROM shard_moves WHERE %s OR state <> 'done' ORDER BY move_id DESC LIMIT %s
        """,
        (everything, limit),
    )
    return [
        {
            "move_id": r[0],
            "pair": [r[1], r[2]] if r[1] else None,
            "buckets": list(r[3]),
            "source_shard": r[4],
            "target_shard": r[5],
            "flip": r[6],
            "state": r[7],
            "copied_rows": r[8],
            "deleted_rows": r[9],
            "updated_at": r[10].isoformat(),
        }
        for r in await cur.fetchall()
    ]


async def _run(config: ServerConfig, args: argparse.Namespace) -> dict[str, Any]:
    control = await open_pool("control", config.control_dsn, _POOL, min_size=1, max_size=4)
    try:
        async with control.connection() as conn:
            await migrate_control(conn)
            moves = await _list(conn, everything=args.all, limit=args.limit)
        resumed: list[int] = []
        if args.resume:
            async with control.connection() as conn:
                try:
                    layout = await load_layout(conn)
                except LookupError:
                    return {"moves": moves, "resumed": resumed}
            async with tool_shards(config) as shards:
                router = ShardRouter(layout.num_shards)
                router.set_layout(layout)
                mover = Mover(config.control_dsn, control, shards, router)
                async with mover.exclusive():
                    for move in await mover.log.all_unfinished():
                        await mover.run(move)
                        resumed.append(move.move_id)
                async with control.connection() as conn:
                    moves = await _list(conn, everything=args.all, limit=args.limit)
        return {"moves": moves, "resumed": resumed}
    finally:
        await control.close()


def cmd_moves(session: Session) -> int:
    args = session.args
    result = run_tool(_run(session.config(), args))
    if session.json:
        print_json(result)
        return 0
    rows = [
        [
            m["move_id"],
            f"pair {m['pair'][0]} {m['pair'][1]}" if m["pair"] else f"{len(m['buckets'])} bucket(s)",
            m["source_shard"],
            m["target_shard"],
            m["flip"],
            m["state"],
            m["copied_rows"],
            m["deleted_rows"],
            m["updated_at"],
        ]
        for m in result["moves"]
    ]
    if rows:
        print(format_table(_HEADERS, rows, right=(0, 2, 3, 6, 7)))
    if args.resume:
        print(f"completed {len(result['resumed'])} unfinished move(s)")
        if any(m["flip"] == "bucket" and m["move_id"] in result["resumed"] for m in result["moves"]):
            print("a reshard was interrupted: run the same `dialogctl reshard --shards N` again to finish it")
    elif not rows:
        print("no unfinished moves" if not args.all else "no moves recorded")
    return 0


def register(commands: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add `moves` to dialogctl's subcommands."""
    moves = command(commands, "moves", cmd_moves, "list data moves between shards; complete unfinished ones")
    moves.add_argument("--all", action="store_true", help="finished moves too (latest first)")
    moves.add_argument("--limit", type=int, default=50, metavar="N", help="at most N moves (default 50)")
    moves.add_argument("--resume", action="store_true", help="complete every unfinished move")


__all__ = ["cmd_moves", "register"]
