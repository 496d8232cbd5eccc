"""Benchmark of online resharding: rows/s moved, and SendMessage latency before vs during the move.

    python -m bench.reshard                      # 4 -> 8 shards, 200,000 messages (about a minute)
    python -m bench.reshard --messages 50000 --target-shards 16

Starts 4 PostgreSQL servers under /dev/shm (fsync on), shard i of the target layout on server
i % 4, a `dialog-server` process on them (first with 4 shards, so the control database records a
4-shard layout, then with all of them), seeds messages straight into the 4-shard homes, and runs a
closed-loop SendMessage load (`--concurrency` callers, one process, random pairs among the seeded
ones, each with a request_id and retried on DIALOG_MOVING after its RetryInfo). The load runs for
`--seconds` before the reshard, then during `dialogctl reshard` (its own process), and the latency
of each phase is printed: p50/p99 of acknowledged calls, including the retries a call needed.
Not a test: nothing is asserted about time; the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import psycopg

from bench.procs import ServerProcess, scratch_dir, start_postgres
from client.gen.dialog.v1 import dialog_service_pb2 as pb
from client.gen.dialog.v1 import dialog_service_pb2_grpc
from server.auth import issue_token
from server.config import AuthConfig, render_config
from server.routing import Pair, bucket_of, calculate_shard
from server.storage.ids import MessageIdGenerator, id_time


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.reshard", description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000, help="seeded messages (default 200,000)")
    parser.add_argument("--pairs", type=int, default=20_000, help="seeded pairs (default 20,000)")
    parser.add_argument(
        "--target-shards", type=int, default=8, help="reshard 4 -> this (default 8; 6 is a full reshuffle)"
    )
    parser.add_argument("--concurrency", type=int, default=16, help="SendMessage calls in flight")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the before phase")
    parser.add_argument("--buckets-per-step", type=int, default=64)
    return parser.parse_args(argv)


def _config(path: Path, dsns: list[str], secret_file: Path) -> Path:
    path.write_text(
        render_config(
            shard_dsns=dsns,
            listen="127.0.0.1:0",
            auth={"jwt_secret_file": str(secret_file)},
            settings={"shutdown_grace_seconds": 5.0},
            sections={"limits": {"send_rate_per_second": 0, "read_rate_per_second": 0}},
        )
    )
    return path


def seed_messages(dsns: list[str], pairs: list[tuple[int, int]], messages: int) -> None:
    """`messages` messages over `pairs` (round-robin), copied straight into each pair's home among
    the 4 shards `dsns[0..3]` (table `messages_<shard>`), then analyzed."""
    ids = MessageIdGenerator()
    rows: dict[int, list[tuple[Any, ...]]] = {}
    for i in range(messages):
        a, b = pairs[i % len(pairs)]
        low, high = Pair.of(a, b)
        message_id = ids.next()
        rows.setdefault(calculate_shard(a, b, 4), []).append(
            (message_id, low, high, bucket_of(a, b), a, b, f"seeded {i}", id_time(message_id))
        )
    for shard_id, shard_rows in rows.items():
        with psycopg.connect(dsns[shard_id]) as conn, conn.cursor() as cur:
            with cur.copy(
                f"COPY messages_{shard_id} (message_id, user_low, user_high, bucket, from_user_id, "
                "to_user_id, text, created_at) FROM STDIN"
            ) as copy:
                for row in shard_rows:
                    copy.write_row(row)
            conn.execute(f"ANALYZE messages_{shard_id}")


class Load:
    """Closed-loop SendMessage callers; `phase` names where each latency is recorded."""

    def __init__(
        self, address: str, auth: AuthConfig, pairs: list[tuple[int, int]], concurrency: int
    ) -> None:
        self.address = address
        self.auth = auth
        self.pairs = pairs
        self.concurrency = concurrency
        self.phase = "before"
        self.latencies: dict[str, list[float]] = {"before": [], "during": [], "after": []}
        self.moving_retries: dict[str, int] = {"before": 0, "during": 0, "after": 0}
        self.errors: list[str] = []
        self.stop = asyncio.Event()
        self._tokens: dict[int, str] = {}

    def _metadata(self, user: int) -> tuple[tuple[str, str], ...]:
        if user not in self._tokens:
            self._tokens[user] = issue_token(self.auth, user_id=user, ttl_seconds=3600)
        return (("authorization", f"Bearer {self._tokens[user]}"),)

    async def _caller(self, stub: dialog_service_pb2_grpc.DialogServiceStub, n: int) -> None:
        rng = random.Random(n)
        while not self.stop.is_set():
            a, b = rng.choice(self.pairs)
            request = pb.SendMessageRequest(
                from_user_id=a, to_user_id=b, text="load", request_id=secrets.token_hex(8)
            )
            phase, started = self.phase, time.perf_counter()
            for _ in range(200):
                try:
                    await stub.SendMessage(request, metadata=self._metadata(a), timeout=30)  # type: ignore[misc]
                    break
                except grpc.aio.AioRpcError as err:
                    if err.code() != grpc.StatusCode.UNAVAILABLE or "moving" not in (err.details() or ""):
                        self.errors.append(f"{err.code().name}: {err.details()}")
                        break
                    self.moving_retries[phase] += 1
                    await asyncio.sleep(0.2)
            else:
                self.errors.append("still moving after 200 retries")
                continue
            self.latencies[phase].append(time.perf_counter() - started)

    async def run(self) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = dialog_service_pb2_grpc.DialogServiceStub(channel)
            await asyncio.gather(*(self._caller(stub, n) for n in range(self.concurrency)))


def percentile_ms(values: list[float], q: float) -> float:
    """The `q` quantile of latencies in seconds, in milliseconds (NaN for none)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")


async def _measure(args: argparse.Namespace, load: Load, ctl: list[str]) -> dict[str, Any]:
    runner = asyncio.create_task(load.run())
    await asyncio.sleep(args.seconds)
    load.phase = "during"
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *ctl, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    reshard_seconds = time.monotonic() - started
    load.phase = "after"
    await asyncio.sleep(min(args.seconds, 2.0))
    load.stop.set()
    await runner
    if proc.returncode != 0:
        raise RuntimeError(f"dialogctl reshard failed ({proc.returncode}): {err.decode()}")
    result: dict[str, Any] = json.loads(out)
    result["wall_seconds"] = round(reshard_seconds, 2)
    return result


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    with contextlib.ExitStack() as stack:
        tmp = scratch_dir("dialog-reshard-bench-", stack)
        print(f"starting 4 PostgreSQL servers in {tmp}", file=sys.stderr)
        pg = start_postgres(tmp, 4, stack, {"synchronous_commit": "on", "fsync": "on"})
        dsns = [pg[i % 4].dsn for i in range(args.target_shards)]
        secret = secrets.token_urlsafe(48)
        secret_file = tmp / "jwt-secret"
        secret_file.write_text(secret)
        secret_file.chmod(0o600)
        auth = AuthConfig(jwt_secret=secret.encode())
        server_bin = str(Path(sys.executable).parent / "dialog-server")
        four = _config(tmp / "four.toml", dsns[:4], secret_file)
        first = ServerProcess(
            "dialog-server (4 shards)", [server_bin, "--config", str(four)], tmp / "s4.log", stack
        )
        first.stop()  # the control database now records 4 shards, and the schema exists
        rng = random.Random(7)
        pairs = [(rng.randrange(1, 2**62), rng.randrange(2**62, 2**63)) for _ in range(args.pairs)]
        print(f"seeding {args.messages:,} messages of {len(pairs):,} pairs", file=sys.stderr)
        seed_messages(dsns, pairs, args.messages)
        everything = _config(tmp / "all.toml", dsns, secret_file)
        server = ServerProcess(
            "dialog-server",
            [server_bin, "--config", str(everything), "--log-level", "WARNING"],
            tmp / "s.log",
            stack,
        )
        load = Load(server.address, auth, pairs[:1000], args.concurrency)
        ctl = [
            str(Path(sys.executable).parent / "dialogctl"),
            "--config",
            str(everything),
            "reshard",
            "--shards",
            str(args.target_shards),
            "--buckets-per-step",
            str(args.buckets_per_step),
            "--json",
            # Not a multiple of 4 (4 -> 6): the operator's explicit consent to a full reshuffle.
            *(["--full-reshuffle"] if args.target_shards % 4 else []),
        ]
        print(f"SendMessage load for {args.seconds:g} s, then during the reshard", file=sys.stderr)
        result = asyncio.run(_measure(args, load, ctl))
    report = {
        "reshard": f"4 -> {args.target_shards}",
        "rows_copied": result["rows_copied"],
        "reshard_seconds": result["wall_seconds"],
        "rows_per_second": round(result["rows_copied"] / result["wall_seconds"], 1),
        "send_p50_ms": {p: round(percentile_ms(v, 0.50), 2) for p, v in load.latencies.items()},
        "send_p99_ms": {p: round(percentile_ms(v, 0.99), 2) for p, v in load.latencies.items()},
        "sends": {p: len(v) for p, v in load.latencies.items()},
        "moving_retries": load.moving_retries,
        "errors": load.errors[:5],
    }
    print(
        f"reshard 4 -> {args.target_shards}: {report['rows_copied']:,} rows in {report['reshard_seconds']} s "
        f"= {report['rows_per_second']:,.0f} rows/s"
    )
    for phase in ("before", "during", "after"):
        print(
            f"SendMessage {phase:>6}: {report['sends'][phase]:>6} calls, "
            f"p50 {report['send_p50_ms'][phase]:7.2f} ms, "
            f"p99 {report['send_p99_ms'][phase]:7.2f} ms, "
            f"DIALOG_MOVING retries {load.moving_retries[phase]}"
        )
    print(json.dumps(report))
    return 1 if load.errors else 0


if __name__ == "__main__":
    sys.exit(main())
