"""`dialogctl hotspots` and `dialogctl rebalance`: find the heavy pairs and shards, and even them out.

    dialogctl hotspots                      # heaviest shards and pairs, by messages and recent rate
    dialogctl hotspots --by rate --window 600
    dialogctl rebalance                     # proposed overrides bringing the heaviest shard near the mean
    dialogctl rebalance --apply             # apply them through SetShardOverride (which moves the data)

`hotspots` and the proposal read the shards named in the config directly (no server
needed); `--apply` calls the server's AdminService, one SetShardOverride per proposal.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from typing import Any

from server.cli.output import format_table, print_json
from server.cli.session import Session, stored_layout
from server.cli.shards import run_tool, tool_shards
from server.config import ServerConfig
from server.routing import Pair
from server.routing.rebalance import PairLoad, Proposal, propose
from server.storage.hotspots import Load, heaviest_pairs, shard_load


async def _scan(
    config: ServerConfig, *, window: float, top: int, by_recent: bool
) -> tuple[dict[int, Load], list[tuple[int, Pair, Load]]]:
    async with tool_shards(config) as shards:
        stores = [shards.store(c.shard_id) for c in config.shards]
        loads = await asyncio.gather(*(shard_load(s, window) for s in stores))
        tops = await asyncio.gather(
            *(heaviest_pairs(s, window, top=top, by_recent=by_recent) for s in stores)
        )
    pairs = [(s.shard_id, p, load) for s, found in zip(stores, tops, strict=True) for p, load in found]

    def heaviest_first(entry: tuple[int, Pair, Load]) -> tuple[int, Pair]:
        load = entry[2]
        return (-(load.recent if by_recent else load.messages), entry[1])

    pairs.sort(key=heaviest_first)
    return {s.shard_id: load for s, load in zip(stores, loads, strict=True)}, pairs


def _scan_or_fail(session: Session) -> tuple[dict[int, Load], list[tuple[int, Pair, Load]]]:
    args = session.args
    return run_tool(
        _scan(session.config(), window=args.window, top=args.top, by_recent=args.by == "rate"),
        reaching="the shards",
    )


def cmd_hotspots(session: Session) -> int:
    args = session.args
    shards, pairs = _scan_or_fail(session)
    pairs = pairs[: args.top]
    total = sum(load.messages for load in shards.values()) or 1
    if session.json:
        print_json(
            {
                "window_seconds": args.window,
                "shards": [
                    {
                        "shard_id": s,
                        "messages": load.messages,
                        "recent": load.recent,
                        "rate": load.recent / args.window,
                    }
                    for s, load in sorted(shards.items())
                ],
                "pairs": [
                    {
                        "pair": [p.low, p.high],
                        "shard_id": s,
                        "messages": load.messages,
                        "recent": load.recent,
                        "rate": load.recent / args.window,
                    }
                    for s, p, load in pairs
                ],
            }
        )
        return 0
    shard_rows = [
        [s, load.messages, f"{load.messages / total:.1%}", load.recent, f"{load.recent / args.window:.2f}"]
        for s, load in sorted(shards.items(), key=lambda e: -e[1].messages)
    ]
    print(
        format_table(
            ("SHARD", "MESSAGES", "SHARE", "RECENT", "PER_SECOND"), shard_rows, right=(0, 1, 2, 3, 4)
        )
    )
    print()
    pair_rows = [
        [f"{p.low} {p.high}", s, load.messages, load.recent, f"{load.recent / args.window:.2f}"]
        for s, p, load in pairs
    ]
    print(format_table(("PAIR", "SHARD", "MESSAGES", "RECENT", "PER_SECOND"), pair_rows, right=(1, 2, 3, 4)))
    print(f"recent = created within the last {args.window:g} s")
    return 0


def cmd_rebalance(session: Session) -> int:
    args = session.args
    shards, pairs = _scan_or_fail(session)
    by_rate = args.by == "rate"

    def weight(load: Load) -> float:
        return load.recent / args.window if by_rate else float(load.messages)

    # Only the shards the hash routes over share the load: the config also lists shards a
    # reshard has not reached yet (or has left), and those must not look like the lightest.
    routed = set(range(stored_layout(session).active_shards))
    proposals = propose(
        {s: weight(load) for s, load in shards.items() if s in routed},
        [PairLoad(p, s, weight(load)) for s, p, load in pairs if s in routed],
        tolerance=args.tolerance,
        max_moves=args.max_moves,
    )
    applied: list[Proposal] = []
    if args.apply:
        admin = session.admin()
        for proposal in proposals:
            admin.set_override(proposal.pair.low, proposal.pair.high, proposal.target)
            applied.append(proposal)
    if session.json:
        print_json(
            {
                "by": args.by,
                "proposals": [
                    {
                        "pair": [p.pair.low, p.pair.high],
                        "source": p.source,
                        "target": p.target,
                        "load": p.load,
                    }
                    for p in proposals
                ],
                "applied": len(applied),
            }
        )
        return 0
    if not proposals:
        print("balanced enough: no override would bring the heaviest shard closer to the mean")
        return 0
    rows = [[f"{p.pair.low} {p.pair.high}", p.source, p.target, f"{p.load:g}"] for p in proposals]
    print(format_table(("PAIR", "FROM", "TO", "LOAD"), rows, right=(1, 2, 3)))
    if args.apply:
        print(f"applied {len(applied)} override(s); their messages moved")
    else:
        print("dry run: pass --apply to pin these pairs (SetShardOverride moves their messages)")
    return 0


def _options(parser: argparse.ArgumentParser, top_default: int) -> None:
    parser.add_argument(
        "--by", choices=("messages", "rate"), default="messages", help="weigh by (default: messages)"
    )
    parser.add_argument(
        "--window",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="what counts as recent (default: 3600)",
    )
    parser.add_argument(
        "--top", type=int, default=top_default, metavar="N", help=f"pairs per shard (default: {top_default})"
    )


def register(commands: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add `hotspots` and `rebalance` to dialogctl's subcommands."""
    hotspots = command(commands, "hotspots", cmd_hotspots, "the heaviest shards and pairs")
    _options(hotspots, 10)
    rebalance = command(
        commands, "rebalance", cmd_rebalance, "propose (and --apply) overrides that even out the shards"
    )
    _options(rebalance, 20)
    rebalance.add_argument(
        "--tolerance", type=float, default=0.1, help="stop when the heaviest shard is within this of the mean"
    )
    rebalance.add_argument(
        "--max-moves", type=int, default=10, metavar="N", help="at most this many overrides"
    )
    rebalance.add_argument("--apply", action="store_true", help="apply the proposals through the server")


__all__ = ["cmd_hotspots", "cmd_rebalance", "register"]
