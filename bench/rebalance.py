"""Benchmark of the automatic rebalancer: SendMessage throughput and p99 while it moves data, against
the same run without it.

    python -m bench.rebalance                     # two runs of 30 s each (make bench-rebalance)
    python -m bench.rebalance --seconds 60 --hot-pairs 60

Starts 4 PostgreSQL servers under /dev/shm (fsync on), one shard on each. Each run gets fresh
databases: a first `dialog-server` creates the schema, then `--hot-pairs` pairs whose hash shard is
0 get `--messages-per-pair` messages each, written straight into shard 0, and as many cold pairs
the same on the other shards. A `dialog-server` (rate limits off; activity flushed every second;
with `--rebalance`: `[rebalance] auto`, a round every 2 s) then takes a closed-loop SendMessage
load for `--seconds` (`--concurrency` callers, one process, the hot pairs three times as often as
the cold ones, so shard 0 is the hot one; DIALOG_MOVING is retried after its RetryInfo). Runs
without and with the rebalancer alternate, `--rounds` of each. Prints and writes to
bench-results/rebalance-<time>.json: calls per second, p50/p99 of acknowledged calls (including
their retries), the rebalancer's moves and rows moved, the messages per shard at the end, and the
medians of each way. Not a test: nothing is asserted about time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

from bench.procs import REPO, ServerProcess, scratch_dir, start_postgres
from bench.reshard import Load, percentile_ms, seed_messages
from server.config import AuthConfig, render_config
from server.dev.embedded_pg import EmbeddedPostgres
from server.routing import calculate_shard


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.rebalance", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="load per run (default 30)")
    parser.add_argument("--concurrency", type=int, default=16, help="SendMessage calls in flight")
    parser.add_argument("--hot-pairs", type=int, default=40, help="pairs on shard 0 (default 40)")
    parser.add_argument("--messages-per-pair", type=int, default=2000, help="seeded per pair (default 2,000)")
    parser.add_argument(
        "--rounds", type=int, default=2, help="runs without and with it, interleaved (default 2 each)"
    )
    parser.add_argument("--output-dir", type=Path, default=REPO / "bench-results")
    return parser.parse_args(argv)


def _pairs(shard: int, count: int, rng: random.Random) -> list[tuple[int, int]]:
    found: list[tuple[int, int]] = []
    while len(found) < count:
        pair = (rng.randrange(1, 2**62), rng.randrange(2**62, 2**63))
        if calculate_shard(*pair, 4) == shard:
            found.append(pair)
    return found


def _config(path: Path, dsns: list[str], secret_file: Path, rebalance: bool) -> Path:
    path.write_text(
        render_config(
            shard_dsns=dsns,
            listen="127.0.0.1:0",
            auth={"jwt_secret_file": str(secret_file)},
            settings={"shutdown_grace_seconds": 5.0},
            sections={
                "limits": {"send_rate_per_second": 0, "read_rate_per_second": 0},
                "activity": {"flush_seconds": 1.0},
                "rebalance": {"auto": rebalance, "interval": 2.0, "max_moves_per_hour": 200},
                "metrics": {"listen": "127.0.0.1:0"},
            },
        )
    )
    return path


def _run(
    name: str,
    rebalance: bool,
    args: argparse.Namespace,
    pg: list[EmbeddedPostgres],
    tmp: Path,
    stack: contextlib.ExitStack,
) -> dict[str, Any]:
    suffix = secrets.token_hex(3)
    dsns = []
    for postgres in pg:
        postgres.create_database(f"rebalance_{name}_{suffix}")
        dsns.append(postgres.dsn_for(f"rebalance_{name}_{suffix}"))
    secret = secrets.token_urlsafe(48)
    secret_file = tmp / f"jwt-{name}"
    secret_file.write_text(secret)
    secret_file.chmod(0o600)
    config = _config(tmp / f"{name}.toml", dsns, secret_file, rebalance)
    server_bin = str(Path(sys.executable).parent / "dialog-server")
    ServerProcess(
        f"dialog-server ({name}, schema)", [server_bin, "--config", str(config)], tmp / "s0.log", stack
    ).stop()
    rng = random.Random(11)
    hot = _pairs(0, args.hot_pairs, rng)
    cold = [p for s in (1, 2, 3) for p in _pairs(s, max(1, args.hot_pairs // 3), rng)]
    print(f"{name}: seeding {len(hot + cold) * args.messages_per_pair:,} messages", file=sys.stderr)
    seed_messages(dsns, hot + cold, args.messages_per_pair * len(hot + cold))
    server = ServerProcess(
        f"dialog-server ({name})",
        [server_bin, "--config", str(config), "--log-level", "WARNING"],
        tmp / f"{name}.log",
        stack,
    )
    load = Load(server.address, AuthConfig(jwt_secret=secret.encode()), hot * 3 + cold, args.concurrency)
    load.phase = "during"

    async def measure() -> float:
        runner = asyncio.create_task(load.run())
        started = time.monotonic()
        await asyncio.sleep(args.seconds)
        load.stop.set()
        await runner
        return time.monotonic() - started

    print(f"{name}: SendMessage load for {args.seconds:g} s", file=sys.stderr)
    elapsed = asyncio.run(measure())
    server.stop()
    with psycopg.connect(dsns[0]) as conn:
        moves = conn.execute(
            "SELECT count(*), coalesce(sum(rows_moved), 0) FROM rebalance_decisions WHERE kind = 'move'"
        ).fetchone()
    per_shard = []
    for shard_id, dsn in enumerate(dsns):
        with psycopg.connect(dsn) as conn:
            row = conn.execute(f"SELECT count(*) FROM messages_{shard_id}").fetchone()
            per_shard.append(int(row[0]) if row else 0)
    latencies = load.latencies["during"]
    return {
        "rebalancer": rebalance,
        "seconds": round(elapsed, 2),
        "sends": len(latencies),
        "sends_per_second": round(len(latencies) / elapsed, 1),
        "send_p50_ms": round(percentile_ms(latencies, 0.50), 2),
        "send_p99_ms": round(percentile_ms(latencies, 0.99), 2),
        "moving_retries": load.moving_retries["during"],
        "moves": int(moves[0]) if moves else 0,
        "rows_moved": int(moves[1]) if moves else 0,
        "messages_per_shard": per_shard,
        "errors": load.errors[:5],
    }


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    with contextlib.ExitStack() as stack:
        tmp = scratch_dir("dialog-rebalance-bench-", stack)
        print(f"starting 4 PostgreSQL servers in {tmp}", file=sys.stderr)
        pg = start_postgres(tmp, 4, stack, {"synchronous_commit": "on", "fsync": "on"})
        # Interleaved, so a machine that gets busier or quieter meanwhile weighs on both alike.
        runs = [
            _run(f"{name}{i}", rebalance, args, pg, tmp, stack)
            for i in range(args.rounds)
            for name, rebalance in (("without", False), ("with", True))
        ]
    medians = {
        way: {
            key: round(statistics.median(r[key] for r in runs if r["rebalancer"] is on), 2)
            for key in ("sends_per_second", "send_p50_ms", "send_p99_ms", "moves", "rows_moved")
        }
        for way, on in (("without", False), ("with", True))
    }
    report = {
        "benchmark": "rebalance",
        "settings": {
            "seconds": args.seconds,
            "concurrency": args.concurrency,
            "hot_pairs": args.hot_pairs,
            "messages_per_pair": args.messages_per_pair,
            "cpus": os.cpu_count(),
        },
        "runs": runs,
        "median": medians,
    }
    for run in runs:
        print(
            f"rebalancer {'on ' if run['rebalancer'] else 'off'}: {run['sends_per_second']:8.1f} sends/s, "
            f"p50 {run['send_p50_ms']:6.2f} ms, p99 {run['send_p99_ms']:7.2f} ms, "
            f"{run['moves']} moves ({run['rows_moved']:,} rows), "
            f"DIALOG_MOVING retries {run['moving_retries']}, messages per shard {run['messages_per_shard']}"
        )
    for way, figures in medians.items():
        print(f"median {way:>7}: {figures}")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / f"rebalance-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return 1 if any(run["errors"] for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
