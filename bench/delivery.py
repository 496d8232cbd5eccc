"""Benchmark of live delivery and the inbox: latency, idle subscribers, ListDialogs, the log's cost.

    python -m bench.delivery                     # about a minute
    python -m bench.delivery --rate 200 --idle 5000

Starts 2 PostgreSQL servers under /dev/shm (fsync on) holding 4 shards and a `dialog-server`
process (one worker: its memory is one process's), then measures, one after the other:

- delivery latency: `--senders` users send to one subscriber at `--rate` messages/s in all (open
  loop, paced), each send timed from SendMessage's OK at the sender to the message's arrival on
  the subscriber's stream (negative: it arrived before the sender had its answer);
- memory per idle subscriber: the server's RSS before and after `--idle` subscriptions of distinct
  users that receive nothing, divided by their number;
- ListDialogs against GetDialog: closed-loop calls/s at `--concurrency` for `--seconds` each, of a
  user with 50 dialogs (a page of 50) and of a dialog of 50 messages (a page of 50);
- the message log's cost on the insert: the service's insert statement with and without its
  `logged` CTE, single-row, 8 connections, `--seconds` each, straight to one shard.

Not a test: nothing is asserted about time; the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import psycopg

from bench.procs import ServerProcess, rss_kib, scratch_dir, start_postgres
from client.gen.dialog.v1 import dialog_service_pb2 as pb
from client.gen.dialog.v1 import dialog_service_pb2_grpc
from server.auth import issue_token
from server.config import AuthConfig, render_config
from server.routing import Pair, bucket_of
from server.storage.events import log_inserted
from server.storage.ids import MessageIdGenerator, id_time
from server.storage.messages import MessageStore

Metadata = tuple[tuple[str, str], ...]


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.delivery", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rate", type=float, default=100.0, help="messages/s to the subscriber (default 100)"
    )
    parser.add_argument("--senders", type=int, default=8, help="users sending to the subscriber")
    parser.add_argument("--latency-seconds", type=float, default=10.0, help="length of the latency run")
    parser.add_argument("--idle", type=int, default=2000, help="idle subscriptions (default 2,000)")
    parser.add_argument("--concurrency", type=int, default=16, help="calls in flight for throughput")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each throughput run")
    return parser.parse_args(argv)


class Tokens:
    def __init__(self, auth: AuthConfig) -> None:
        self._auth = auth
        self._tokens: dict[int, str] = {}

    def __call__(self, user: int) -> Metadata:
        if user not in self._tokens:
            self._tokens[user] = issue_token(self._auth, user_id=user, ttl_seconds=3600)
        return (("authorization", f"Bearer {self._tokens[user]}"),)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _subscribe(stub: Any, user: int, auth: Tokens) -> Any:
    call = stub.SubscribeMessages(pb.SubscribeMessagesRequest(user_id=user), metadata=auth(user))
    first = await call.read()
    assert isinstance(first, pb.SubscribeMessagesResponse), first
    return call


async def delivery_latency(address: str, auth: Tokens, args: argparse.Namespace) -> dict[str, Any]:
    subscriber = 10**15
    senders = [subscriber + 1 + i for i in range(args.senders)]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = dialog_service_pb2_grpc.DialogServiceStub(channel)
        call = await _subscribe(stub, subscriber, auth)
        acknowledged: dict[str, float] = {}
        arrived: dict[str, float] = {}
        expected: list[int] = []  # set once every send has its answer
        everything = asyncio.Event()

        async def receive() -> None:
            while isinstance(response := await call.read(), pb.SubscribeMessagesResponse):
                arrived[response.message.message_id] = time.perf_counter()
                if expected and len(arrived) >= expected[0]:
                    everything.set()

        receiver = asyncio.create_task(receive())
        interval = 1 / args.rate
        start = time.perf_counter()
        sends: list[asyncio.Task[None]] = []

        async def send(n: int) -> None:
            sender = senders[n % len(senders)]
            reply = await stub.SendMessage(
                pb.SendMessageRequest(from_user_id=sender, to_user_id=subscriber, text=f"latency {n}"),
                metadata=auth(sender),
            )
            acknowledged[reply.message.message_id] = time.perf_counter()

        n = 0
        while time.perf_counter() - start < args.latency_seconds:
            sends.append(asyncio.create_task(send(n)))
            n += 1
            await asyncio.sleep(max(0.0, start + n * interval - time.perf_counter()))
        await asyncio.gather(*sends)
        expected.append(len(acknowledged))
        if len(arrived) >= len(acknowledged):
            everything.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(everything.wait(), 10)
        call.cancel()
        receiver.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.RpcError):
            await receiver
    latencies = [(arrived[i] - t) * 1000 for i, t in acknowledged.items() if i in arrived]
    return {
        "rate_per_second": args.rate,
        "sent": len(acknowledged),
        "delivered": len(latencies),
        "p50_ms": round(_percentile(latencies, 0.5), 2),
        "p99_ms": round(_percentile(latencies, 0.99), 2),
        "max_ms": round(max(latencies), 2),
    }


async def idle_memory(address: str, server_pid: int, auth: Tokens, count: int) -> dict[str, Any]:
    channels = [
        grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(8)
    ]
    try:
        # Warm up the server's paths first, so the difference is the subscriptions' own.
        warm = [
            await _subscribe(dialog_service_pb2_grpc.DialogServiceStub(channels[0]), 10**16 + i, auth)
            for i in range(20)
        ]
        for call in warm:
            call.cancel()
        await asyncio.sleep(1)
        before = rss_kib(server_pid)
        calls = []
        for i in range(count):
            stub = dialog_service_pb2_grpc.DialogServiceStub(channels[i % len(channels)])
            calls.append(await _subscribe(stub, 2 * 10**16 + i, auth))
        await asyncio.sleep(1)
        after = rss_kib(server_pid)
        for call in calls:
            call.cancel()
    finally:
        for channel in channels:
            await channel.close()
    return {
        "subscribers": count,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "bytes_per_subscriber": round((after - before) * 1024 / count),
    }


async def read_throughput(address: str, auth: Tokens, args: argparse.Namespace) -> dict[str, Any]:
    owner = 3 * 10**16
    async with grpc.aio.insecure_channel(address) as channel:
        stub = dialog_service_pb2_grpc.DialogServiceStub(channel)
        for peer in range(owner + 1, owner + 51):
            await stub.SendMessage(
                pb.SendMessageRequest(from_user_id=peer, to_user_id=owner, text="hello"), metadata=auth(peer)
            )
        for i in range(49):
            await stub.SendMessage(
                pb.SendMessageRequest(from_user_id=owner, to_user_id=owner + 1, text=f"more {i}"),
                metadata=auth(owner),
            )
        # Until the relay has applied them all (it runs in the server's background).
        deadline = time.perf_counter() + 10
        while time.perf_counter() < deadline:
            reply = await stub.ListDialogs(
                pb.ListDialogsRequest(user_id=owner, page_size=50), metadata=auth(owner)
            )
            if len(reply.dialogs) == 50 and reply.dialogs[0].message_count == 50:
                break
            await asyncio.sleep(0.05)

        async def rate(make_call: Any) -> float:
            done = 0
            stop = time.perf_counter() + args.seconds

            async def caller() -> None:
                nonlocal done
                while time.perf_counter() < stop:
                    await make_call()
                    done += 1

            started = time.perf_counter()
            await asyncio.gather(*(caller() for _ in range(args.concurrency)))
            return done / (time.perf_counter() - started)

        metadata = auth(owner)
        list_rate = await rate(
            lambda: stub.ListDialogs(pb.ListDialogsRequest(user_id=owner, page_size=50), metadata=metadata)
        )
        get_rate = await rate(
            lambda: stub.GetDialog(
                pb.GetDialogRequest(user_id=owner, peer_user_id=owner + 1, page_size=50), metadata=metadata
            )
        )
    return {
        "concurrency": args.concurrency,
        "list_dialogs_per_second": round(list_rate),
        "get_dialog_per_second": round(get_rate),
        "ratio": round(list_rate / get_rate, 2),
    }


async def log_cost(dsn: str, table: str, seconds: float) -> dict[str, Any]:
    store = MessageStore(0, table, None)  # type: ignore[arg-type]  # only its statement is used
    logged = store.insert_sql
    cte = f"),\n            logged AS ({log_inserted(table, 'inserted')})\n"
    assert cte in logged, "the insert statement changed shape: update this benchmark"
    plain = logged.replace(cte, ")\n")
    ids = MessageIdGenerator()

    async def run(sql: str) -> float:
        done = 0
        stop = time.perf_counter() + seconds

        async def worker(n: int) -> None:
            nonlocal done
            async with await psycopg.AsyncConnection.connect(
                dsn, autocommit=True, prepare_threshold=0
            ) as conn:
                a, b = 4 * 10**16 + n, 5 * 10**16 + n
                low, high = Pair.of(a, b)
                while time.perf_counter() < stop:
                    message_id = ids.next()
                    params = {
                        "id": message_id,
                        "low": low,
                        "high": high,
                        "bucket": bucket_of(a, b),
                        "from": a,
                        "to": b,
                        "text": "cost of the log",
                        "created": id_time(message_id),
                        "request_id": None,
                    }
                    await conn.execute(sql, params)
                    done += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker(n) for n in range(8)))
        return done / (time.perf_counter() - started)

    # Alternated, twice each, so that neither gets the warmer minute.
    rates: dict[str, list[float]] = {"with_log": [], "without_log": []}
    for _ in range(2):
        rates["without_log"].append(await run(plain))
        rates["with_log"].append(await run(logged))
    with_log, without = statistics.mean(rates["with_log"]), statistics.mean(rates["without_log"])
    return {
        "inserts_per_second_with_log": round(with_log),
        "inserts_per_second_without_log": round(without),
        "cost_percent": round(100 * (1 - with_log / without), 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    with contextlib.ExitStack() as stack:
        tmp = scratch_dir("dialog-delivery-bench-", stack)
        print(f"starting 2 PostgreSQL servers in {tmp}", file=sys.stderr)
        pg = start_postgres(tmp, 2, stack, {"synchronous_commit": "on", "fsync": "on"})
        dsns = [pg[i % 2].dsn for i in range(4)]
        secret = secrets.token_urlsafe(48)
        secret_file = tmp / "jwt-secret"
        secret_file.write_text(secret)
        secret_file.chmod(0o600)
        config = tmp / "dialog.toml"
        config.write_text(
            render_config(
                shard_dsns=dsns,
                listen="127.0.0.1:0",
                auth={"jwt_secret_file": str(secret_file)},
                settings={"shutdown_grace_seconds": 5.0},
                sections={
                    "limits": {"send_rate_per_second": 0, "read_rate_per_second": 0},
                    "delivery": {"max_streams": args.idle + 100},
                },
            )
        )
        server_bin = str(Path(sys.executable).parent / "dialog-server")
        server = ServerProcess(
            "dialog-server",
            [server_bin, "--config", str(config), "--log-level", "WARNING"],
            tmp / "s.log",
            stack,
        )
        auth = Tokens(AuthConfig(jwt_secret=secret.encode()))
        results: dict[str, Any] = {"machine_cpus": len(os.sched_getaffinity(0))}
        print("delivery latency", file=sys.stderr)
        results["latency"] = asyncio.run(delivery_latency(server.address, auth, args))
        print("idle subscribers", file=sys.stderr)
        results["idle"] = asyncio.run(idle_memory(server.address, server.pid, auth, args.idle))
        print("ListDialogs vs GetDialog", file=sys.stderr)
        results["reads"] = asyncio.run(read_throughput(server.address, auth, args))
        print("the log's cost on the insert", file=sys.stderr)
        results["insert"] = asyncio.run(log_cost(dsns[0], "messages_0", args.seconds))
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
