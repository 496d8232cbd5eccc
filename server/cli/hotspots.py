"""`dialogctl hotspots` and `dialogctl rebalance`: find the heavy pairs and shards, and even them out.

    dialogctl hotspots                      # heaviest shards and pairs: stored size and recent rate
    dialogctl hotspots --by rate --window 600
    dialogctl rebalance                     # proposed overrides bringing the heaviest shard near the mean
    dialogctl rebalance --apply             # apply them through SetShardOverride (which moves the data)
    dialogctl rebalance --status            # what the automatic rebalancer saw, did and skipped, and why

Nothing here scans a message table. A shard's stored messages are PostgreSQL's estimate (the
statistics of GetShardStats); its recent messages, bytes and reads, and its heaviest pairs, come
from its recent-activity table (`<table>_activity`, filled by the servers every few seconds; one
index range per shard). A listed pair's stored messages are counted along the dialog index, that
pair alone. So only pairs written or read within the window are listed: `--by messages` orders
them (and the shards) by stored messages, `--by rate` by messages written within the window.

`hotspots`, the proposal and `--status` read the databases named in the config directly (no
server needed); `--apply` calls the server's AdminService, one SetShardOverride per proposal.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from server.cli.output import format_table, print_json
from server.cli.session import CliError, Session
from server.cli.shards import run_tool, tool_shards
from server.config import ServerConfig
from server.routing import Pair, ShardRouter
from server.routing.rebalance import PairLoad, Proposal, attribute, propose
from server.storage.activity import pairs_messages, shard_activity
from server.storage.layout import load_layout
from server.storage.rebalance_log import Entry, latest_entries, leader


@dataclass(frozen=True, slots=True)
class ShardView:
    """A shard: stored messages (estimated) and what it took within the window."""

    shard_id: int
    messages: int
    recent: int
    bytes: int
    reads: int


@dataclass(frozen=True, slots=True)
class Scan:
    """What `hotspots` and `rebalance` read: the routing, the shards and the active pairs (both
    counted where the pairs live now: a pair moved within the window has activity on two shards)."""

    router: ShardRouter
    shards: list[ShardView]
    pairs: list[PairView]


@dataclass(frozen=True, slots=True)
class PairView:
    """A pair active within the window: where it lives now, its stored messages, its activity."""

    pair: Pair
    shard_id: int
    messages: int
    recent: int
    bytes: int
    reads: int


async def _routing(control_dsn: str) -> ShardRouter:
    """The servers' routing as the control database has it (layout and overrides)."""
    async with await psycopg.AsyncConnection.connect(control_dsn, connect_timeout=5) as conn:
        layout = await load_layout(conn)
        cur = await conn.execute("SELECT user1, user2, shard_id FROM shard_map")
        overrides = [(Pair(r[0], r[1]), int(r[2])) for r in await cur.fetchall()]
    router = ShardRouter(layout.num_shards)
    router.set_layout(layout)
    router.replace_all(overrides)
    return router


async def _scan(config: ServerConfig, *, window: float, top: int) -> Scan:
    router = await _routing(config.control_dsn)
    async with tool_shards(config) as shards:
        stores = [shards.store(c.shard_id) for c in config.shards]
        activity = await asyncio.gather(*(shard_activity(s, window, top=top) for s in stores))
        estimates = await asyncio.gather(*(s.estimate() for s in stores))
        # A pair moved within the window has activity on both shards: add it up, place it by routing.
        merged: dict[Pair, list[int]] = {}
        for found in activity:
            for row in found.pairs:
                sums = merged.setdefault(row.pair, [0, 0, 0])
                sums[0] += row.messages
                sums[1] += row.bytes
                sums[2] += row.reads
        where: dict[int, list[Pair]] = {}
        for pair in merged:
            shard_id = router.resolve(pair.low, pair.high).shard_id
            if shard_id < len(stores):
                where.setdefault(shard_id, []).append(pair)
        counted = await asyncio.gather(*(pairs_messages(stores[s], ps) for s, ps in where.items()))
    # A shard's recent messages as the routing places them now: those of a pair that moved away
    # within the window count on its new shard (as the rebalancer weighs them).
    recent, _ = attribute(
        {a.shard_id: float(a.messages) for a in activity},
        [PairLoad(r.pair, a.shard_id, float(r.messages)) for a in activity for r in a.pairs],
        lambda p: router.resolve(p.low, p.high).shard_id,
    )
    views = [
        ShardView(a.shard_id, n, round(recent[a.shard_id]), a.bytes, a.reads)
        for a, n in zip(activity, estimates, strict=True)
    ]
    pairs = [
        PairView(p, s, n, *merged[p])
        for s, found in zip(where, counted, strict=True)
        for p, n in found.items()
    ]
    return Scan(router, views, pairs)


def _scan_or_fail(session: Session) -> Scan:
    args = session.args
    return run_tool(_scan(session.config(), window=args.window, top=args.top), reaching="the databases")


def _pair_order(by: str) -> Callable[[PairView], tuple[int, int, Pair]]:
    if by == "rate":
        return lambda p: (-p.recent, -p.messages, p.pair)
    return lambda p: (-p.messages, -p.recent, p.pair)


def cmd_hotspots(session: Session) -> int:
    args = session.args
    scan = _scan_or_fail(session)
    shards = scan.shards
    pairs = sorted(scan.pairs, key=_pair_order(args.by))[: args.top]
    shards.sort(key=(lambda s: -s.recent) if args.by == "rate" else (lambda s: -s.messages))
    window = args.window
    if session.json:
        print_json(
            {
                "window_seconds": window,
                "by": args.by,
                "shards": [
                    {
                        "shard_id": s.shard_id,
                        "messages": s.messages,
                        "messages_estimated": True,
                        "recent": s.recent,
                        "rate": s.recent / window,
                        "recent_bytes": s.bytes,
                        "reads": s.reads,
                    }
                    for s in sorted(shards, key=lambda s: s.shard_id)
                ],
                "pairs": [
                    {
                        "pair": [p.pair.low, p.pair.high],
                        "shard_id": p.shard_id,
                        "messages": p.messages,
                        "recent": p.recent,
                        "rate": p.recent / window,
                        "recent_bytes": p.bytes,
                        "reads": p.reads,
                    }
                    for p in pairs
                ],
            }
        )
        return 0
    total = sum(s.messages for s in shards) or 1
    shard_rows = [
        [s.shard_id, s.messages, f"{s.messages / total:.1%}", s.recent, f"{s.recent / window:.2f}", s.reads]
        for s in shards
    ]
    headers = ("SHARD", "MESSAGES~", "SHARE", "RECENT", "PER_SECOND", "READS")
    print(format_table(headers, shard_rows, right=(0, 1, 2, 3, 4, 5)))
    print()
    pair_rows = [
        [f"{p.pair.low} {p.pair.high}", p.shard_id, p.messages, p.recent, f"{p.recent / window:.2f}", p.reads]
        for p in pairs
    ]
    headers = ("PAIR", "SHARD", "MESSAGES", "RECENT", "PER_SECOND", "READS")
    print(format_table(headers, pair_rows, right=(1, 2, 3, 4, 5)))
    print(
        f"MESSAGES~ = PostgreSQL's estimate; RECENT = written within the last {window:g} s (recent-activity "
        "tables), on the shard the pair lives on now; pairs: those active within the window"
    )
    return 0


def cmd_rebalance(session: Session) -> int:
    args = session.args
    if args.status:
        return _status(session)
    scan = _scan_or_fail(session)
    router, shards, pairs = scan.router, scan.shards, scan.pairs
    by_rate = args.by == "rate"
    # Only the shards the hash routes over share the load: the config also lists shards a
    # reshard has not reached yet (or has left), and those must not look like the lightest.
    routed = set(range(router.num_shards))
    if by_rate:
        # `_scan` counted shards' and pairs' recent messages where the pairs live now.
        loads = {s.shard_id: s.recent / args.window for s in shards if s.shard_id in routed}
        candidates = [
            PairLoad(p.pair, p.shard_id, p.recent / args.window) for p in pairs if p.shard_id in routed
        ]
    else:
        loads = {s.shard_id: float(s.messages) for s in shards if s.shard_id in routed}
        candidates = [PairLoad(p.pair, p.shard_id, float(p.messages)) for p in pairs if p.shard_id in routed]
    proposals = propose(loads, candidates, tolerance=args.tolerance, max_moves=args.max_moves)
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


def _entry_json(entry: Entry) -> dict[str, Any]:
    return {
        "at": entry.decided_at.isoformat(),
        "server": entry.instance,
        "kind": entry.kind,
        "outcome": entry.outcome,
        "pair": [entry.pair.low, entry.pair.high] if entry.pair else None,
        "source": entry.source_shard,
        "target": entry.target_shard,
        "load": entry.load,
        "rows_moved": entry.rows_moved,
        "reason": entry.reason,
    }


def _status(session: Session) -> int:
    dsn = session.config().control_dsn

    async def read() -> tuple[str | None, Entry | None, list[Entry], list[Entry]]:
        async with await psycopg.AsyncConnection.connect(dsn, connect_timeout=5) as conn:
            acting = await leader(conn)
            last, skipped, moves = await latest_entries(conn)
        return acting, last, skipped, moves

    try:
        acting, last, skipped, moves = asyncio.run(read())
    except psycopg.Error as exc:
        raise CliError(f"cannot read the control database: {exc}", 1) from None
    if session.json:
        print_json(
            {
                "leader": acting,
                "last_round": None
                if last is None
                else {**_entry_json(last), "loads": last.loads, "skipped": [_entry_json(e) for e in skipped]},
                "moves_last_hour": [_entry_json(e) for e in moves],
            }
        )
        return 0
    print(f"acting server: {acting or 'none (no server runs the rebalancer: [rebalance] auto is off)'}")
    if last is None:
        print("no round recorded yet")
        return 0
    print(f"last round: {last.decided_at:%Y-%m-%d %H:%M:%S %Z} on {last.instance}: {last.outcome}")
    print(f"  {last.reason}")
    if last.loads:
        loads = [[shard, f"{load:.4g}"] for shard, load in last.loads.items()]
        print(format_table(("SHARD", "LOAD"), loads, right=(0, 1)))
    for entry in skipped:
        pair = f"({entry.pair.low}, {entry.pair.high})" if entry.pair else "-"
        print(f"  {entry.kind} {pair}: {entry.reason}")
    print(f"moves within the last hour: {sum(1 for m in moves if m.kind == 'move')}")
    rows: list[list[object]] = [
        [
            f"{m.decided_at:%H:%M:%S}",
            f"{m.pair.low} {m.pair.high}" if m.pair else "-",
            m.source_shard if m.source_shard is not None else "-",
            m.target_shard if m.target_shard is not None else "-",
            m.rows_moved if m.rows_moved is not None else "-",
            m.kind if m.kind != "move" else "moved",
        ]
        for m in moves
    ]
    if rows:
        print(format_table(("AT", "PAIR", "FROM", "TO", "ROWS", "RESULT"), rows, right=(2, 3, 4)))
    return 0


def _options(parser: argparse.ArgumentParser, top_default: int) -> None:
    parser.add_argument(
        "--by",
        choices=("messages", "rate"),
        default="messages",
        help="weigh by stored messages or by messages written within the window (default: messages)",
    )
    parser.add_argument(
        "--window",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="what counts as recent (default: 3600, the activity tables' default retention)",
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
    rebalance.add_argument(
        "--status",
        action="store_true",
        help="what the automatic rebalancer saw, did and skipped, and why (from the control database)",
    )


__all__ = ["cmd_hotspots", "cmd_rebalance", "register"]
