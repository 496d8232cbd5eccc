"""What operator reads cost on a large shard: `python -m bench.operator_reads [--rows 10000000]`.

One durable PostgreSQL server holds one shard table seeded with `--rows` messages over `--pairs`
dialogs (spread over the last hour), vacuumed and analyzed as after a bulk load. Then each read
an operator runs is timed through the service's own code, `--repeats` times (median reported):

- `stats estimate`: GetShardStats' default count (PostgreSQL's statistics, no scan);
- `stats exact`: `GetShardStats(exact=True)` / `dialogctl stats --exact` (a scan);
- `hotspots activity` and `hotspots pair counts`: what `dialogctl hotspots` (and a rebalancer
  round) runs per shard: the recent-activity table over an hour (seeded as a full hour of windows:
  every bucket's total and 512 pairs per minute, what one busy server process flushes) and an index
  count of each of the 20 heaviest pairs;
- `verify`: `dialogctl verify`'s pass over the shard (every pair's count and checksum).

Figures depend on the machine and on what else runs: quote them with both.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg

from bench.procs import scratch_dir, start_postgres
from bench.workload import MESSAGE_TEXT, settle_after_load
from server.cli.shards import tool_shards
from server.config import config_from_mapping
from server.moves.verify import verify
from server.routing import ShardRouter
from server.storage.activity import pairs_messages, shard_activity
from server.storage.schema import migrate_shard

_TABLE = "messages_0"
#: The window `dialogctl hotspots` uses by default, in seconds.
_WINDOW = 3600.0


def _seed(dsn: str, rows: int, pairs: int) -> None:
    """`rows` messages over `pairs` dialogs spread over the last hour, each in its pair's real bucket
    (so that verify finds a clean shard), then vacuumed and analyzed as after a bulk load."""
    now_ms = int(time.time() * 1000)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f"""
            WITH pair AS (
                SELECT k, 1000 + 2 * k AS lo, 1001 + 2 * k AS hi,
                       mod(dialog_pair_hash(1000 + 2 * k, 1001 + 2 * k), 4096)::smallint AS bucket
                FROM generate_series(0::bigint, %(pairs)s - 1) AS k
            )
            INSERT INTO {_TABLE} (message_id, user_low, user_high, bucket, from_user_id, to_user_id,
                                  text, created_at, request_id)
            SELECT (lpad(to_hex(t), 12, '0') || '70009' || lpad(to_hex(i), 15, '0'))::uuid,
                   p.lo, p.hi, p.bucket, p.lo, p.hi, %(text)s || i, to_timestamp(t / 1000.0), NULL
            FROM generate_series(1::bigint, %(n)s) AS i
            CROSS JOIN LATERAL (SELECT %(start)s + i * 3600000 / %(n)s AS t) AS x
            JOIN pair p ON p.k = mod(i * 7919, %(pairs)s)
            """,
            {"n": rows, "pairs": pairs, "start": now_ms - 3_600_000, "text": MESSAGE_TEXT},
        )
    _seed_activity(dsn, pairs)
    settle_after_load(dsn, _TABLE)


def _seed_activity(dsn: str, pairs: int) -> None:
    """A full hour of activity windows, as busy servers' flushes leave it: each minute every
    bucket's total and 512 pairs' counts (the seeded pairs, a different slice each minute)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f"""
            INSERT INTO {_TABLE}_activity (window_start, bucket, user_low, user_high, messages, bytes, reads)
            SELECT date_trunc('minute', now()) - make_interval(mins => w), b, 0, 0, 40, 4000, 10
            FROM generate_series(0, 59) AS w, generate_series(0, 4095) AS b
            """
        )
        conn.execute(
            f"""
            INSERT INTO {_TABLE}_activity (window_start, bucket, user_low, user_high, messages, bytes, reads)
            SELECT date_trunc('minute', now()) - make_interval(mins => w),
                   mod(dialog_pair_hash(1000 + 2 * k, 1001 + 2 * k), 4096)::smallint,
                   1000 + 2 * k, 1001 + 2 * k, 1 + mod(k, 97), 100, 1
            FROM generate_series(0, 59) AS w,
                 LATERAL (SELECT mod(w * 512 + j, %(pairs)s) AS k FROM generate_series(0, 511) AS j) AS p
            ON CONFLICT DO NOTHING
            """,
            {"pairs": pairs},
        )
        conn.execute(f"VACUUM ANALYZE {_TABLE}_activity")


async def _timed(work: Callable[[], Awaitable[Any]], repeats: int) -> tuple[float, Any]:
    """Median seconds of `repeats` runs of `work`, and the last result."""
    samples, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = await work()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples), result


async def _measure(dsn: str, rows: int, repeats: int) -> dict[str, Any]:
    config = config_from_mapping(
        {"shards": [{"id": 0, "dsn": dsn, "table": _TABLE}], "auth": {"jwt_secret": "x" * 48}},
        {},
        base_dir=Path.cwd(),
    )
    router = ShardRouter(1)
    figures: dict[str, Any] = {"rows": rows}
    async with tool_shards(config) as shards:
        store = shards.store(0)
        seconds, estimate = await _timed(store.estimate, repeats)
        figures["stats_estimate"] = {"seconds": seconds, "count": estimate}
        seconds, exact = await _timed(store.count, repeats)
        figures["stats_exact"] = {"seconds": seconds, "count": exact}
        seconds, activity = await _timed(lambda: shard_activity(store, _WINDOW, top=20), repeats)
        figures["hotspots_activity"] = {"seconds": seconds, "pairs": len(activity.pairs)}
        top = [row.pair for row in activity.pairs]
        seconds, counts = await _timed(lambda: pairs_messages(store, top), repeats)
        figures["hotspots_pair_counts"] = {"seconds": seconds, "messages": sum(counts.values())}
        seconds, report = await _timed(
            lambda: verify(shards, lambda pair: router.resolve(pair.low, pair.high).shard_id), repeats
        )
        figures["verify"] = {"seconds": seconds, "pairs": report.pairs}
    if exact != rows or not report.clean:
        raise RuntimeError(
            f"seeded {rows} rows; the exact count found {exact}, verify: {report.findings[:3]}"
        )
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=10_000_000, help="messages on the shard")
    parser.add_argument("--pairs", type=int, default=100_000, help="dialogs they belong to")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each read (median reported)")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        (server,) = start_postgres(scratch_dir("dialog-reads-", stack), 1, stack, {"max_wal_size": "4GB"})
        server.create_database("operator_reads")
        dsn = server.dsn_for("operator_reads")
        asyncio.run(_migrate(dsn))
        started = time.perf_counter()
        _seed(dsn, args.rows, args.pairs)
        print(f"seeded {args.rows:,} rows over {args.pairs:,} pairs in {time.perf_counter() - started:.0f} s")
        figures = asyncio.run(_measure(dsn, args.rows, args.repeats))
    for name, value in figures.items():
        if isinstance(value, dict):
            print(f"{name:26} {value['seconds'] * 1000:10.1f} ms")
    print(json.dumps(figures))
    return 0


async def _migrate(dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await migrate_shard(conn, _TABLE)


if __name__ == "__main__":
    sys.exit(main())
