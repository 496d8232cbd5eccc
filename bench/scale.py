"""`make bench-scale`: SendMessage throughput as shard servers and worker processes are added.

For each number of shard servers (separate PostgreSQL servers, one shard each, fsync and
synchronous_commit on, under /dev/shm) and each `--workers` count and write-batch size, it starts
`dialog-server` and measures SendMessage with h2load, interleaved with the gRPC echo ceiling so
that each ratio comes from one round. It reports requests/s, p50/p99 latency, and the CPU that
the server processes (all workers) and PostgreSQL (all shard servers) spent per 1,000 messages:
the figures an operator sizes a deployment with. Figures are medians over rounds.

    python -m bench.scale [--shards 1 2 4] [--workers 1 2] [--batch 64] [--batch-wait 4]
                          [--event-loop auto] [--concurrency 32] [--repeats 3] [--duration 3]
                          [--server-arg=...]

Every combination of --workers, --batch, --batch-wait and --event-loop is started at once per
shard count and the rounds interleave them, so the machine's background noise hits them alike.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import secrets
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import echo_server
from bench.loadgen import Layout, Target, grpc_frame, run_h2load
from bench.procs import (
    REPO,
    ServerProcess,
    cpu_seconds,
    ensure_h2load,
    interrupt_on_sigterm,
    postmaster_pids,
    scratch_dir,
    start_postgres,
)
from bench.workload import MESSAGE_TEXT, Dialog, count_rows, dialogs_per_shard
from client.gen.dialog.v1 import dialog_service_pb2 as pb
from server.auth import issue_token
from server.config import AuthConfig, PoolConfig, render_config

SEND_PATH = "/dialog.v1.DialogService/SendMessage"
#: h2load processes each send as one user; this many users (dialogs) spread the load over shards.
USERS = 4


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4], help="shard servers")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="dialog-server --workers")
    parser.add_argument(
        "--batch", type=int, nargs="+", default=[64], help="[pool] max_write_batch (1: no batching)"
    )
    parser.add_argument(
        "--batch-wait",
        type=float,
        nargs="+",
        default=[PoolConfig().max_write_batch_wait_ms],
        help="[pool] max_write_batch_wait_ms (0: never wait for company)",
    )
    parser.add_argument(
        "--event-loop", nargs="+", default=["auto"], help="dialog-server --event-loop values to compare"
    )
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per timed run")
    parser.add_argument("--server-arg", action="append", default=[], help="extra dialog-server argument")
    parser.add_argument("--output-dir", type=Path, default=REPO / "bench-results")
    args = parser.parse_args(argv)
    Layout.for_concurrency(args.concurrency)
    return args


def _log(started: float, message: str) -> None:
    print(f"[{time.monotonic() - started:6.1f}s] {message}", file=sys.stderr, flush=True)


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


@dataclass(frozen=True)
class Variant:
    """One server configuration measured at each shard count."""

    workers: int
    batch: int
    batch_wait_ms: float
    event_loop: str

    @property
    def label(self) -> str:
        wait = f"{self.batch_wait_ms:g}ms"
        return f"workers={self.workers} batch={self.batch} wait={wait} loop={self.event_loop}"


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    ensure_h2load()
    secret = secrets.token_urlsafe(48)
    auth = AuthConfig(jwt_secret=secret.encode())
    variants = [
        Variant(w, b, wait, loop)
        for b in args.batch
        for wait in args.batch_wait
        for loop in args.event_loop
        for w in args.workers
    ]
    results: list[dict[str, Any]] = []
    with contextlib.ExitStack() as outer:
        tmp = scratch_dir("dialog-scale-", outer)
        secret_file = tmp / "jwt-secret"
        secret_file.write_text(secret)
        echo = ServerProcess(
            "echo server",
            [sys.executable, "-m", "bench.echo_server", "--listen", "127.0.0.1:0"],
            tmp / "echo.log",
            outer,
        )
        for shards in args.shards:
            with contextlib.ExitStack() as stack:
                _log(started, f"starting {shards} PostgreSQL shard server(s) and {len(variants)} server(s)")
                pg = start_postgres(
                    tmp / f"s{shards}", shards, stack, {"synchronous_commit": "on", "fsync": "on"}
                )
                # USERS senders (one h2load process each) spread round robin over the shards.
                senders = _distinct_senders(shards, USERS)
                targets = [
                    Target(
                        SEND_PATH,
                        grpc_frame(
                            pb.SendMessageRequest(
                                from_user_id=d.sender, to_user_id=d.peer, text=MESSAGE_TEXT
                            ).SerializeToString()
                        ),
                        issue_token(auth, user_id=d.sender, ttl_seconds=3600),
                    )
                    for d in senders
                ]
                echo_targets = [
                    Target(echo_server.PATH, t.payload, expected_response_bytes=len(t.payload))
                    for t in targets
                ]
                # Every variant serves at once (idle ones cost nothing) so that rounds interleave
                # them: noise from other work on the machine hits all variants alike.
                servers = {v: _start_server(args, tmp, stack, pg, secret_file, shards, v) for v in variants}
                for server in servers.values():
                    run_h2load(f"http://{server.address}", targets, args.concurrency, 1.0, tmp)  # warm-up
                rounds: dict[Variant, list[dict[str, Any]]] = {v: [] for v in variants}
                for r in range(args.repeats):
                    for v, server in servers.items():
                        _log(started, f"shards={shards} {v.label} round {r + 1}/{args.repeats}")
                        rounds[v].append(
                            _round_of(
                                args,
                                tmp,
                                echo.address,
                                echo_targets,
                                f"http://{server.address}",
                                targets,
                                server.pid,
                                pg,
                                senders,
                            )
                        )
                for v in variants:
                    results.append(_summary(shards, v, rounds[v]))
                    _log(started, f"shards={shards} {v.label}: {results[-1]['rps']:,.0f} req/s")
    return {
        "benchmark": "dialog-shard bench.scale",
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "settings": {
            "concurrency": args.concurrency,
            "repeats": args.repeats,
            "duration_s": args.duration,
            "server_args": args.server_arg,
            "fsync": "on",
            "synchronous_commit": "on",
        },
        "results": results,
        "elapsed_s": round(time.monotonic() - started, 1),
    }


def _start_server(
    args: argparse.Namespace,
    tmp: Path,
    stack: contextlib.ExitStack,
    pg: list[Any],
    secret_file: Path,
    shards: int,
    v: Variant,
) -> ServerProcess:
    name = f"{shards}-{v.workers}-{v.batch}-{v.batch_wait_ms:g}-{v.event_loop}"
    config = tmp / f"dialog-{name}.toml"
    config.write_text(
        render_config(
            shard_dsns=[s.dsn for s in pg],
            listen="127.0.0.1:0",
            auth={"jwt_secret_file": str(secret_file)},
            settings={"shutdown_grace_seconds": 5.0},
            sections={
                "limits": {"send_rate_per_second": 0, "read_rate_per_second": 0},
                "pool": {"max_write_batch": v.batch, "max_write_batch_wait_ms": v.batch_wait_ms},
                "metrics": {"listen": "127.0.0.1:0"},  # several servers at once: free ports
            },
        )
    )
    argv = [
        str(Path(sys.executable).parent / "dialog-server"),
        "--config",
        str(config),
        "--log-level",
        "WARNING",
        "--workers",
        str(v.workers),
        "--event-loop",
        v.event_loop,
        *args.server_arg,
    ]
    return ServerProcess("dialog-server", argv, tmp / f"server-{name}.log", stack)


def _summary(shards: int, v: Variant, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    keys: tuple[str, ...] = ("rps", "p50_ms", "p99_ms", "echo_rps", "send_over_echo")
    keys += ("server_cpu_ms_per_1000", "postgres_cpu_ms_per_1000")
    return {
        "shard_servers": shards,
        "workers": v.workers,
        "max_write_batch": v.batch,
        "max_write_batch_wait_ms": v.batch_wait_ms,
        "event_loop": v.event_loop,
        **{key: _median([r[key] for r in rounds]) for key in keys},
        "rows_match_every_round": all(r["rows_match"] for r in rounds),
        "failed_requests": sum(r["failed"] for r in rounds),
        "rounds": rounds,
    }


def _round_of(
    args: argparse.Namespace,
    tmp: Path,
    echo_address: str,
    echo_targets: list[Target],
    url: str,
    targets: list[Target],
    server_pid: int,
    pg: list[Any],
    senders: list[Dialog],
) -> dict[str, Any]:
    """One round: echo, then SendMessage with the server's and PostgreSQL's CPU and the stored rows."""
    pg_pids = postmaster_pids(pg)

    def rows() -> int:
        return sum(count_rows(pg[d.shard_id].dsn, f"messages_{d.shard_id}", [d]) for d in senders)

    echo_m = run_h2load(f"http://{echo_address}", echo_targets, args.concurrency, args.duration, tmp)
    before_rows = rows()
    srv0, pg0 = cpu_seconds([server_pid]), cpu_seconds(pg_pids)
    m = run_h2load(url, targets, args.concurrency, args.duration, tmp)
    srv1, pg1 = cpu_seconds([server_pid]), cpu_seconds(pg_pids)
    stored = rows() - before_rows
    calls = max(1, m.succeeded)
    return {
        "rps": m.rps,
        "p50_ms": m.p50_ms,
        "p99_ms": m.p99_ms,
        "echo_rps": echo_m.rps,
        "send_over_echo": m.rps / echo_m.rps,
        "server_cpu_ms_per_1000": (srv1 - srv0) / calls * 1e6,
        "postgres_cpu_ms_per_1000": (pg1 - pg0) / calls * 1e6,
        "rows_match": m.succeeded <= stored <= m.succeeded + m.cut_off,
        "failed": m.failed,
    }


def _distinct_senders(shards: int, count: int) -> list[Dialog]:
    """`count` dialogs of distinct users spread round robin over the shards."""
    found: list[Dialog] = []
    first = 1_000_000_000 + secrets.randbelow(10**9)
    while len(found) < count:
        found.extend(dialogs_per_shard(shards, first))
        first += 1_000_000
    return found[:count]


def render_table(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        f"SendMessage at {s['concurrency']} in flight, {s['repeats']} rounds of {s['duration_s']:g}s, "
        f"medians; {result['cpus']} CPUs shared by load generator, server and PostgreSQL",
        "",
        f"{'shard servers':>13}{'workers':>8}{'batch':>6}{'wait ms':>8}{'loop':>8}{'req/s':>9}"
        f"{'p50 ms':>8}{'p99 ms':>8}"
        f"{'echo req/s':>11}{'send/echo':>10}{'srv CPU ms/1k':>14}{'PG CPU ms/1k':>13}",
    ]
    for r in result["results"]:
        lines.append(
            f"{r['shard_servers']:>13}{r['workers']:>8}{r['max_write_batch']:>6}"
            f"{r['max_write_batch_wait_ms']:>8g}{r['event_loop']:>8}"
            f"{r['rps']:>9,.0f}"
            f"{r['p50_ms']:>8.2f}{r['p99_ms']:>8.2f}{r['echo_rps']:>11,.0f}{r['send_over_echo']:>10.3f}"
            f"{r['server_cpu_ms_per_1000']:>14.0f}{r['postgres_cpu_ms_per_1000']:>13.0f}"
        )
    checks = all(r["rows_match_every_round"] for r in result["results"])
    failed = sum(r["failed_requests"] for r in result["results"])
    lines += ["", f"checks: stored rows match successes every round: {checks}; failed requests: {failed}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    interrupt_on_sigterm()
    try:
        result = run(args)
    except KeyboardInterrupt:
        print("bench.scale: interrupted; servers stopped", file=sys.stderr)
        return 130
    args.output_dir.mkdir(parents=True, exist_ok=True)
    out = args.output_dir / f"scale-{dt.datetime.now().strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(render_table(result))
    print(f"results written to {out}")
    print(json.dumps(result, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
