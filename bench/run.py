"""`make bench`: the service against its own ceilings, measured in one run on this machine.

Starts 4 PostgreSQL shard servers (temporary, under /dev/shm, fsync and synchronous_commit on), the
dialog server (`dialog-server --config`, its own process) and a bare grpc.aio echo server, then measures
with h2load and pgbench (C load generators in their own processes):

- SendMessage, GetDialog and echo throughput and p50/p99 latency at several concurrencies;
- pgbench running the service's INSERT and latest-page SELECT on one shard server (the DB ceiling),
  and a plain INSERT of the same row (what the service's statement, its move fence included, adds);
- GetDialog of a 100,000-message dialog: the first page vs a page ~1,000 pages deep;
- server RSS before and after the load, server and PostgreSQL CPU per call;
- ratios SendMessage/echo, SendMessage/pgbench INSERT, pgbench INSERT/plain INSERT and deep/first
  page, each within one round,
  and each judged against its goal (bench.goals);
- after the servers stop, shard resolution per call with no overrides and with 100,000 (bench.resolve),
  and a rate-limit check per call, in-process vs the table shared by workers (bench.limiter).

Each round runs every measurement once; figures are medians over rounds, ratios are computed within
a round (then the median of those is shown). SendMessage successes are checked against the rows that
actually appeared in the database, GetDialog and echo successes against the response size (gRPC
answers errors with HTTP 200 too). The last line printed is one JSON object with every figure, also
written to bench-results/<timestamp>.json.

    python -m bench.run [--quick] [--repeats N] [--duration S] [--workers N] [--server-arg=...]

The service runs as deployed on this machine: one worker process per CPU (`--workers 1` measures one
process); the echo server is one process, the per-process gRPC ceiling.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import fields
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import psycopg

from bench import echo_server, goals, limiter, resolve
from bench.loadgen import Layout, Measurement, Target, grpc_frame, pgbench_binary, run_h2load, run_pgbench
from bench.procs import (
    REPO,
    ServerProcess,
    counter_totals,
    cpu_seconds,
    ensure_h2load,
    idle_share,
    interrupt_on_sigterm,
    machine_cpu_ticks,
    pgbench_login,
    postmaster_pids,
    rss_kib,
    scratch_dir,
    start_postgres,
    worker_cpu_seconds,
)
from bench.workload import (
    MESSAGE_TEXT,
    Dialog,
    count_rows,
    dialogs_per_shard,
    pgbench_scripts,
    pgbench_variables,
    plain_insert_script,
    seed_dialog,
    seed_other_dialogs,
    settle_after_load,
)
from client.gen.dialog.v1 import dialog_service_pb2 as pb
from client.gen.dialog.v1 import dialog_service_pb2_grpc as pb_grpc
from server.auth import issue_token
from server.config import AuthConfig, LimitsConfig, render_config
from server.dev.embedded_pg import EmbeddedPostgres
from server.runtime import eventloop

NUM_SHARDS = 4
PAGE_SIZE = 50
SEND_PATH = "/dialog.v1.DialogService/SendMessage"
GET_PATH = "/dialog.v1.DialogService/GetDialog"
#: Config [limits] set for the benchmark when the server knows them (0 disables a per-user rate limit).
BENCH_LIMITS = {"send_rate_per_second": 0, "read_rate_per_second": 0}
#: The server's write batching counters (summed over shards, kinds and workers).
_STATEMENTS = "dialog_shard_insert_statements_total"
_STATEMENT_MESSAGES = "dialog_shard_insert_statement_messages_total"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench", description="Benchmark dialog-shard on this machine.")
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s runs (under a minute)")
    parser.add_argument("--repeats", type=int, help="rounds; figures are medians (default 3, quick 1)")
    parser.add_argument(
        "--duration",
        type=float,
        help="seconds per timed run (default 4, quick 2); with --requests, each run's limit (default 120)",
    )
    parser.add_argument(
        "--requests",
        type=int,
        help="counted runs: each sends exactly this many requests (h2load -n, pgbench -t), "
        "a multiple of every --pgbench-clients count, and fails if it exceeds --duration",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=[1, 16, 32, 64],
        help="in-flight gRPC requests (1..8 or multiples of 8; default 1 16 32 64)",
    )
    parser.add_argument("--pgbench-clients", type=int, nargs="+", default=[8, 32])
    parser.add_argument(
        "--ratio-concurrency", type=int, default=32, help="concurrency (nearest measured) of the ratios"
    )
    parser.add_argument("--deep-messages", type=int, default=100_000, help="size of the deep dialog")
    parser.add_argument(
        "--shard-rows",
        type=int,
        help="messages of 20,000 other dialogs on the deep dialog's shard (default 2,000,000, quick 200,000)",
    )
    parser.add_argument("--read-messages", type=int, default=2_000, help="size of each GetDialog dialog")
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="dialog-server --workers: server processes (default: one per CPU, as deployed)",
    )
    parser.add_argument(
        "--event-loop",
        choices=eventloop.CHOICES,
        default="auto",
        help="event loop of dialog-server and of the echo server alike (default auto: uvloop if installed)",
    )
    parser.add_argument(
        "--server-arg", action="append", default=[], help="extra dialog-server argument (repeatable)"
    )
    parser.add_argument(
        "--pool",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        type=_pool_setting,
        help="a [pool] setting of the server's config (repeatable), e.g. max_write_batch_wait_ms=0",
    )
    parser.add_argument(
        "--resolve-overrides",
        type=int,
        default=100_000,
        help="shard-map size of the resolution micro-benchmark (bench.resolve), run after the servers stop",
    )
    parser.add_argument("--output-dir", type=Path, default=REPO / "bench-results")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.duration = args.duration or (120.0 if args.requests else 2.0 if args.quick else 4.0)
    if args.shard_rows is None:
        args.shard_rows = 200_000 if args.quick else 2_000_000
    for c in args.concurrency:
        Layout.for_concurrency(c)  # fail early on a concurrency h2load cannot be mapped to
    if args.requests is not None:
        # Fail before minutes of seeding, not at the first run that cannot be counted exactly.
        if args.requests < max(args.concurrency):
            parser.error(f"--requests {args.requests} cannot keep {max(args.concurrency)} requests in flight")
        uneven = [n for n in args.pgbench_clients if args.requests % n]
        if uneven:
            parser.error(f"--requests {args.requests} does not split evenly over pgbench clients {uneven}")
    return args


def _pool_setting(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` of `--pool`, the value read as TOML (a number, a quoted string, ...)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: the value is not TOML ({exc})") from exc


def _median(values: list[float]) -> float | None:
    clean = [v for v in values if v is not None and v == v]
    return statistics.median(clean) if clean else None


def _summary(runs: list[Measurement]) -> dict[str, Any]:
    def med(key: str) -> float | None:
        value = _median([getattr(r, key) for r in runs])
        return None if value is None else round(value, 3)

    extra_keys = sorted({k for r in runs for k, v in r.extra.items() if isinstance(v, int | float)})
    return {
        "rps": med("rps"),
        "p50_ms": med("p50_ms"),
        "p99_ms": med("p99_ms"),
        **{
            k: _round(_median([r.extra[k] for r in runs if k in r.extra]))
            for k in extra_keys
            if not isinstance(runs[0].extra.get(k), bool)
        },
        "runs": [r.as_dict() for r in runs],
    }


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


class Bench:
    def __init__(self, args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
        self.args = args
        self.stack = stack
        self.started = time.monotonic()
        self.h2load = ensure_h2load()
        self.tmp = scratch_dir("dialog-bench-", stack)
        self.results: dict[str, Any] = {}

    def log(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {message}", file=sys.stderr, flush=True)

    # -- setup -------------------------------------------------------------------------------------

    def setup(self) -> None:
        self.log(f"starting {NUM_SHARDS} PostgreSQL servers in {self.tmp} (fsync on)")
        self.pg: list[EmbeddedPostgres] = start_postgres(
            self.tmp, NUM_SHARDS, self.stack, {"synchronous_commit": "on", "fsync": "on"}
        )
        self.pgbench = pgbench_binary(self.pg[0].bin_dir)
        secret = secrets.token_urlsafe(48)
        secret_file = self.tmp / "jwt-secret"
        secret_file.write_text(secret)
        secret_file.chmod(0o600)
        self.auth = AuthConfig(jwt_secret=secret.encode())
        config = self.tmp / "dialog.toml"
        # A per-user rate limit (if this version has one) would measure the limiter, not the service:
        # the load comes from 4 users. The limiter's code still runs; only its budget is lifted.
        self.limits_overrides = {
            name: value
            for name, value in BENCH_LIMITS.items()
            if name in {f.name for f in fields(LimitsConfig)}
        }
        config.write_text(
            render_config(
                shard_dsns=[server.dsn for server in self.pg],
                listen="127.0.0.1:0",
                auth={"jwt_secret_file": str(secret_file)},
                settings={"shutdown_grace_seconds": 5.0},
                sections={
                    # Metrics stay on (their per-call cost is part of the service) on a free port.
                    "metrics": {"listen": "127.0.0.1:0"},
                    **({"limits": self.limits_overrides} if self.limits_overrides else {}),
                    **({"pool": dict(self.args.pool)} if self.args.pool else {}),
                },
            )
        )
        server_bin = Path(sys.executable).parent / "dialog-server"
        argv = [str(server_bin), "--config", str(config), "--log-level", "WARNING"]
        argv += ["--workers", str(self.args.workers), "--event-loop", self.args.event_loop]
        argv += self.args.server_arg
        self.log(f"starting {' '.join(argv[:1] + argv[3:])} --config ...")
        self.server = ServerProcess("dialog-server", argv, self.tmp / "dialog-server.log", self.stack)
        self.echo = ServerProcess(
            "echo server",
            [
                sys.executable,
                "-m",
                "bench.echo_server",
                "--listen",
                "127.0.0.1:0",
                "--event-loop",
                self.args.event_loop,
            ],
            self.tmp / "echo-server.log",
            self.stack,
        )
        self.base_url = f"http://{self.server.address}"
        self.metrics_urls = self.server.metrics_urls(self.args.workers)
        self.echo_url = f"http://{self.echo.address}"

        first_user = 1_000_000_000 + secrets.randbelow(10**9)
        self.send_dialogs = dialogs_per_shard(NUM_SHARDS, first_user)
        self.read_dialogs = dialogs_per_shard(NUM_SHARDS, first_user + 1_000_000)
        self.deep_dialog = dialogs_per_shard(NUM_SHARDS, first_user + 2_000_000)[0]
        deep = self.deep_dialog
        self.log(f"seeding {self.args.shard_rows:,} messages of other dialogs on shard {deep.shard_id}")
        seed_other_dialogs(self.dsn(deep), self.table(deep), self.args.shard_rows, 20_000, 10**15)
        self.log(
            f"seeding {NUM_SHARDS} dialogs of {self.args.read_messages} messages and one of "
            f"{self.args.deep_messages} (shard {self.deep_dialog.shard_id})"
        )
        for d in self.read_dialogs:
            seed_dialog(self.dsn(d), self.table(d), d, self.args.read_messages)
        seed_dialog(
            self.dsn(self.deep_dialog),
            self.table(self.deep_dialog),
            self.deep_dialog,
            self.args.deep_messages,
        )
        self.log("VACUUM (ANALYZE) and CHECKPOINT on every shard server")
        for d in self.read_dialogs:  # one per shard
            settle_after_load(self.dsn(d), self.table(d))

        self.tokens = {
            d.sender: issue_token(self.auth, user_id=d.sender, ttl_seconds=3600)
            for d in (*self.send_dialogs, *self.read_dialogs, self.deep_dialog)
        }
        self.send_targets = [
            Target(SEND_PATH, grpc_frame(self._send_request(d).SerializeToString()), self.tokens[d.sender])
            for d in self.send_dialogs
        ]
        self.echo_targets = [
            Target(echo_server.PATH, t.payload, expected_response_bytes=len(t.payload))
            for t in self.send_targets
        ]
        self._check_with_python_client()

    def background_work(self) -> dict[str, int]:
        """PostgreSQL's own work so far, summed over the shard servers: autovacuum and autoanalyze
        passes over the messages tables, and checkpoints. Such work during the rounds takes CPU
        from whatever is measured at the time (`make bench` reports how much happened)."""
        totals = dict.fromkeys(("autovacuum", "autoanalyze", "checkpoints"), 0)
        for d in self.read_dialogs:  # one per shard
            with psycopg.connect(self.dsn(d), autocommit=True) as conn:
                row = conn.execute(
                    "SELECT s.autovacuum_count, s.autoanalyze_count,"
                    " b.checkpoints_timed + b.checkpoints_req"
                    " FROM pg_stat_user_tables s, pg_stat_bgwriter b WHERE s.relname = %s",
                    (self.table(d),),
                ).fetchone()
            assert row is not None, f"no statistics for {self.table(d)}"
            for key, value in zip(totals, row, strict=True):
                totals[key] += int(value)
        return totals

    def dsn(self, d: Dialog) -> str:
        return self.pg[d.shard_id].dsn

    @staticmethod
    def table(d: Dialog) -> str:
        return f"messages_{d.shard_id}"

    @staticmethod
    def _send_request(d: Dialog) -> pb.SendMessageRequest:
        # No request_id: with one, every call after the first would be a deduplicated replay.
        return pb.SendMessageRequest(from_user_id=d.sender, to_user_id=d.peer, text=MESSAGE_TEXT)

    @staticmethod
    def _get_request(d: Dialog, token: str = "") -> pb.GetDialogRequest:
        return pb.GetDialogRequest(
            user_id=d.sender, peer_user_id=d.peer, page_size=PAGE_SIZE, page_token=token
        )

    def _check_with_python_client(self) -> None:
        """Each payload h2load will send succeeds once through a real gRPC client; note response sizes."""
        with grpc.insecure_channel(self.server.address) as channel:
            stub = pb_grpc.DialogServiceStub(channel)
            for d in self.send_dialogs:
                before = count_rows(self.dsn(d), self.table(d), [d])
                stub.SendMessage(self._send_request(d), metadata=self._auth(d), timeout=10)
                if count_rows(self.dsn(d), self.table(d), [d]) != before + 1:
                    raise RuntimeError(f"SendMessage for shard {d.shard_id} did not store exactly one row")
            self.get_targets = []
            for d in self.read_dialogs:
                page = stub.GetDialog(self._get_request(d), metadata=self._auth(d), timeout=10)
                if len(page.messages) != PAGE_SIZE:
                    raise RuntimeError(f"GetDialog for shard {d.shard_id} returned a short page")
                self.get_targets.append(self._get_target(d, "", len(page.SerializeToString())))
            deep = self.deep_dialog
            first = stub.GetDialog(self._get_request(deep), metadata=self._auth(deep), timeout=10)
            if len(first.messages) != PAGE_SIZE:
                raise RuntimeError("GetDialog of the deep dialog returned a short first page")
            self.first_page_target = self._get_target(deep, "", len(first.SerializeToString()))
            # Page tokens are HMAC-signed: walk the dialog through the API to get a deep one.
            pages = min(1000, self.args.deep_messages // 100) - 1
            self.log(f"paging {pages} pages of 100 through the API for a deep page token")
            token = ""
            for _ in range(pages):
                request = pb.GetDialogRequest(
                    user_id=deep.sender, peer_user_id=deep.peer, page_size=100, page_token=token
                )
                token = stub.GetDialog(request, metadata=self._auth(deep), timeout=30).next_page_token
            self.deep_depth = pages * 100
            deep_page = stub.GetDialog(self._get_request(deep, token), metadata=self._auth(deep), timeout=10)
            if len(deep_page.messages) != PAGE_SIZE:
                raise RuntimeError("the deep page is not a full page")
            self.deep_page_target = self._get_target(deep, token, len(deep_page.SerializeToString()))
        with grpc.insecure_channel(self.echo.address) as channel:
            echo: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(echo_server.PATH)
            if echo(self.echo_targets[0].payload[5:], timeout=10) != self.echo_targets[0].payload[5:]:
                raise RuntimeError("the echo server did not echo")

    def _get_target(self, d: Dialog, page_token: str, response_size: int) -> Target:
        return Target(
            GET_PATH,
            grpc_frame(self._get_request(d, page_token).SerializeToString()),
            self.tokens[d.sender],
            expected_response_bytes=response_size + 5,
        )

    def _auth(self, d: Dialog) -> tuple[tuple[str, str]]:
        return (("authorization", f"Bearer {self.tokens[d.sender]}"),)

    # -- measurements ------------------------------------------------------------------------------

    def _h2load(self, url: str, targets: list[Target], concurrency: int, server_pid: int) -> Measurement:
        pg_pids = postmaster_pids(self.pg)
        cpu_before, pg_before = cpu_seconds([server_pid]), cpu_seconds(pg_pids)
        workers_before = worker_cpu_seconds(server_pid)
        machine_before = machine_cpu_ticks()
        m = run_h2load(url, targets, concurrency, self.args.duration, self.tmp, requests=self.args.requests)
        # Idle CPU while every party (service, PostgreSQL, h2load) shares the cores: how far the
        # run was from CPU-bound.
        m.extra["machine_idle_share"] = idle_share(machine_before, machine_cpu_ticks())
        calls = max(1, m.succeeded)
        m.extra["server_cpu_us_per_call"] = (cpu_seconds([server_pid]) - cpu_before) / calls * 1e6
        m.extra["postgres_cpu_us_per_call"] = (cpu_seconds(pg_pids) - pg_before) / calls * 1e6
        workers = [a - b for a, b in zip(worker_cpu_seconds(server_pid), workers_before, strict=False)]
        if len(workers) > 1 and sum(workers) > 0:
            # The kernel spreads connections over the workers by a hash; with few connections
            # one worker can get most of them (and a full core) while the other idles.
            m.extra["busiest_worker_cpu_share"] = max(workers) / sum(workers)
        return m

    def measure_send(self, concurrency: int) -> Measurement:
        before, batching_before = self._send_rows(), self._insert_statements()
        m = self._h2load(self.base_url, self.send_targets, concurrency, self.server.pid)
        stored = self._send_rows() - before
        batching = {k: v - batching_before[k] for k, v in self._insert_statements().items()}
        if batching[_STATEMENTS]:
            m.extra["messages_per_insert_statement"] = batching[_STATEMENT_MESSAGES] / batching[_STATEMENTS]
        m.extra["rows_stored"] = stored
        # h2load counts HTTP 200 as success; gRPC errors are HTTP 200 too, so the rows are the truth.
        # Requests cut off at the deadline may have been stored without h2load counting them.
        m.extra["rows_match"] = m.succeeded <= stored <= m.succeeded + m.cut_off
        return m

    def _insert_statements(self) -> dict[str, float]:
        """The server's INSERT statements and the messages they carried, over all its workers."""
        return counter_totals(self.metrics_urls, {_STATEMENTS, _STATEMENT_MESSAGES})

    def _send_rows(self) -> int:
        return sum(count_rows(self.dsn(d), self.table(d), [d]) for d in self.send_dialogs)

    def measure_get(self, concurrency: int) -> Measurement:
        return self._h2load(self.base_url, self.get_targets, concurrency, self.server.pid)

    def measure_echo(self, concurrency: int) -> Measurement:
        return self._h2load(self.echo_url, self.echo_targets, concurrency, self.echo.pid)

    def measure_page(self, which: str) -> Measurement:
        target = self.first_page_target if which == "first_page" else self.deep_page_target
        return self._h2load(self.base_url, [target], 1, self.server.pid)

    def measure_pgbench(self, kind: str, clients: int, *, prepared: bool = True) -> Measurement:
        if self.pgbench is None:
            raise RuntimeError("pgbench not found next to the PostgreSQL binaries or on PATH")
        deep = self.deep_dialog
        # INSERTs go to another shard server: 100,000s of fresh rows next to the deep dialog would
        # change what the SELECT (here and in GetDialog) measures.
        insert = next(d for d in self.send_dialogs if d.shard_id != deep.shard_id)
        d = deep if kind == "select" else insert
        insert_sql, select_sql, self.sql_source = pgbench_scripts(self.table(d))
        insert_vars, select_vars = pgbench_variables(d, PAGE_SIZE)
        server = self.pg[d.shard_id]
        parts = pgbench_login(server)
        script, variables = {
            "insert": (insert_sql, insert_vars),
            "plain_insert": (plain_insert_script(self.table(d)), insert_vars),
            "select": (select_sql, select_vars),
        }[kind]
        pg_pids = postmaster_pids(self.pg)
        pg_before = cpu_seconds(pg_pids)
        m = run_pgbench(
            self.pgbench,
            parts,
            script,
            variables,
            clients,
            self.args.duration,
            self.tmp,
            prepared=prepared,
            requests=self.args.requests,
        )
        # PostgreSQL's own CPU per statement when a C client keeps it busy: what the service's
        # per-message figure compares with (pgbench's own CPU is not counted, like h2load's).
        m.extra["postgres_cpu_us_per_call"] = (cpu_seconds(pg_pids) - pg_before) / max(1, m.succeeded) * 1e6
        return m

    def run(self) -> dict[str, Any]:
        args = self.args
        self.log("warming up (not measured)")
        for url, targets in (
            (self.base_url, self.send_targets),
            (self.base_url, self.get_targets),
            (self.echo_url, self.echo_targets),
        ):
            run_h2load(url, targets, 16, 1.0, self.tmp)
        rss_before = rss_kib(self.server.pid)
        background_before = self.background_work()

        plan: list[tuple[str, str, Callable[[], Measurement]]] = []
        for c in args.concurrency:
            plan.append(("echo", str(c), partial(self.measure_echo, c)))
            plan.append(("send_message", str(c), partial(self.measure_send, c)))
            plan.append(("get_dialog", str(c), partial(self.measure_get, c)))
        for n in args.pgbench_clients:
            plan.append(("pgbench_insert", str(n), partial(self.measure_pgbench, "insert", n)))
            # The same row by a plain INSERT, right after: what the service's statement adds to it.
            plan.append(("pgbench_plain_insert", str(n), partial(self.measure_pgbench, "plain_insert", n)))
            # Unnamed statements: a custom plan per execution, the query's best case.
            plan.append(
                ("pgbench_select", str(n), partial(self.measure_pgbench, "select", n, prepared=False))
            )
        # The service prepares its statements; a prepared keyset query can fall onto a generic plan.
        n = min(args.pgbench_clients)
        plan.append(("pgbench_select_prepared", str(n), partial(self.measure_pgbench, "select", n)))
        plan.append(("get_dialog_page", "first", partial(self.measure_page, "first_page")))
        plan.append(("get_dialog_page", "deep", partial(self.measure_page, "deep_page")))

        runs: dict[str, dict[str, list[Measurement]]] = {}
        rounds: list[dict[str, dict[str, Measurement]]] = []
        for r in range(args.repeats):
            this_round: dict[str, dict[str, Measurement]] = {}
            for name, key, measure in plan:
                self.log(f"round {r + 1}/{args.repeats}: {name} {key}")
                m = measure()
                runs.setdefault(name, {}).setdefault(key, []).append(m)
                this_round.setdefault(name, {})[key] = m
            rounds.append(this_round)
        rss_after = rss_kib(self.server.pid)
        background_after = self.background_work()
        background = {key: background_after[key] - background_before[key] for key in background_after}

        rc = min(args.concurrency, key=lambda c: (abs(c - args.ratio_concurrency), -c))
        pc = min(args.pgbench_clients, key=lambda c: (abs(c - args.ratio_concurrency), -c))
        per_round = [
            {
                f"send_over_echo_c{rc}": rnd["send_message"][str(rc)].rps / rnd["echo"][str(rc)].rps,
                f"send_c{rc}_over_pgbench_insert_c{pc}": rnd["send_message"][str(rc)].rps
                / rnd["pgbench_insert"][str(pc)].rps,
                f"pgbench_insert_over_plain_c{pc}": rnd["pgbench_insert"][str(pc)].rps
                / rnd["pgbench_plain_insert"][str(pc)].rps,
                "deep_over_first_page_p50": rnd["get_dialog_page"]["deep"].p50_ms
                / rnd["get_dialog_page"]["first"].p50_ms,
                "deep_over_first_page_p99": rnd["get_dialog_page"]["deep"].p99_ms
                / rnd["get_dialog_page"]["first"].p99_ms,
            }
            for rnd in rounds
        ]
        ratios: dict[str, Any] = {key: _round(_median([p[key] for p in per_round])) for key in per_round[0]}
        ratios["per_round"] = [{k: round(v, 3) for k, v in p.items()} for p in per_round]
        verdicts = goals.judge(ratios, rc, pc)

        send_runs = [m for ms in runs["send_message"].values() for m in ms]
        checks = {
            "send_h2load_succeeded": sum(m.succeeded for m in send_runs),
            "send_rows_stored": sum(int(m.extra["rows_stored"]) for m in send_runs),
            "send_cut_off_at_deadline": sum(m.cut_off for m in send_runs),
            "send_rows_match_every_run": all(m.extra["rows_match"] for m in send_runs),
            "responses_full_size_every_run": all(
                m.extra.get("response_bytes_ok", True)
                for name in ("get_dialog", "echo", "get_dialog_page")
                for ms in runs[name].values()
                for m in ms
            ),
            "failed_requests": sum(m.failed for ms in runs.values() for mm in ms.values() for m in mm),
            # Every run's requests, answered or failed: exactly --requests each when runs are counted.
            "requests_per_run": sorted(
                {m.succeeded + m.failed for ms in runs.values() for mm in ms.values() for m in mm}
            ),
        }
        return {
            "benchmark": "dialog-shard make bench",
            "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "grpcio": grpc.__version__,
                "psycopg": psycopg.__version__,
                "postgres_bin": str(self.pg[0].bin_dir),
                "h2load": subprocess.run(
                    [self.h2load, "--version"], capture_output=True, text=True, check=False
                ).stdout.strip(),
            },
            "settings": {
                "quick": args.quick,
                "repeats": args.repeats,
                "duration_s": args.duration,
                # Counted runs: the requests of each run (then duration_s is its time limit).
                "requests_per_run": args.requests,
                "concurrency": args.concurrency,
                "h2load_layout": {
                    str(c): {
                        "processes": (lay := Layout.for_concurrency(c)).processes,
                        "connections_per_process": lay.connections_per_process,
                        "streams_per_connection": lay.streams_per_connection,
                    }
                    for c in args.concurrency
                },
                "pgbench_clients": args.pgbench_clients,
                # The measured concurrency nearest --ratio-concurrency: the one the ratios use.
                "ratio_concurrency": rc,
                "pgbench_sql_source": getattr(self, "sql_source", None),
                "shards": NUM_SHARDS,
                "page_size": PAGE_SIZE,
                "deep_dialog_messages": args.deep_messages,
                "deep_page_offset_messages": self.deep_depth,
                "server_workers": args.workers,
                # The same loop for the service and the echo server: the ratio compares like with like.
                "event_loop": "uvloop" if eventloop.loop_factory(args.event_loop) else "asyncio",
                "server_args": args.server_arg,
                "config_pool": dict(args.pool),
                "config_limits": self.limits_overrides,
                "fsync": "on",
                "synchronous_commit": "on",
            },
            **{name: {key: _summary(ms) for key, ms in by_key.items()} for name, by_key in runs.items()},
            "server_rss_kib": {"before": rss_before, "after": rss_after},
            "postgres_background_during_rounds": background,
            "ratios": ratios,
            "goals": verdicts,
            "checks": checks,
            "elapsed_s": round(time.monotonic() - self.started, 1),
        }


def _fmt(value: Any, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def _run_bound(settings: dict[str, Any]) -> str:
    if settings.get("requests_per_run"):
        return f"{settings['requests_per_run']:,}-request runs (limit {settings['duration_s']:g}s)"
    return f"{settings['duration_s']:g}s runs"


def render_table(result: dict[str, Any]) -> str:
    lines = [
        f"dialog-shard benchmark: {result['machine']['cpus']} CPUs, {result['settings']['repeats']} round(s) "
        f"of {_run_bound(result['settings'])}, medians; fsync and synchronous_commit on",
        f"dialog-server with {result['settings'].get('server_workers', 1)} worker process(es); "
        "echo server: one process",
        "",
        f"{'measurement':<34}{'conc':>6}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'srv CPU µs':>12}{'PG CPU µs':>11}",
    ]
    labels = {
        "send_message": "SendMessage",
        "get_dialog": f"GetDialog (page of {PAGE_SIZE})",
        "echo": "echo (gRPC ceiling)",
        "pgbench_insert": "pgbench INSERT (DB ceiling)",
        "pgbench_plain_insert": "  plain INSERT of the same row",
        "pgbench_select": f"pgbench SELECT latest {PAGE_SIZE}",
        "pgbench_select_prepared": "  same, prepared (as the service)",
    }
    for name, label in labels.items():
        for key, s in result.get(name, {}).items():
            lines.append(
                f"{label:<34}{key:>6}{_fmt(s['rps']):>10}{_fmt(s['p50_ms'], '.2f'):>9}"
                f"{_fmt(s['p99_ms'], '.2f'):>9}{_fmt(s.get('server_cpu_us_per_call')):>12}"
                f"{_fmt(s.get('postgres_cpu_us_per_call')):>11}"
            )
        lines.append("")
    for key, s in result.get("send_message", {}).items():
        per_statement, share = s.get("messages_per_insert_statement"), s.get("busiest_worker_cpu_share")
        lines.append(
            f"SendMessage at {key}: {_fmt(per_statement, '.2f')} messages per INSERT statement; "
            f"busiest worker used {_fmt(None if share is None else 100 * share, '.0f')}% of the workers' CPU"
        )
    lines.append("")
    depth = result["settings"]["deep_page_offset_messages"]
    for key, label in (("first", "GetDialog first page"), ("deep", f"GetDialog {depth:,} msgs deep")):
        s = result["get_dialog_page"][key]
        lines.append(
            f"{label:<34}{1:>6}{_fmt(s['rps']):>10}{_fmt(s['p50_ms'], '.2f'):>9}"
            f"{_fmt(s['p99_ms'], '.2f'):>9}{_fmt(s.get('server_cpu_us_per_call')):>12}"
            f"{_fmt(s.get('postgres_cpu_us_per_call')):>11}"
        )
    rss = result["server_rss_kib"]
    lines += [
        "",
        f"server RSS: {rss['before'] / 1024:.1f} MiB before load, {rss['after'] / 1024:.1f} MiB after",
    ]
    background = result.get("postgres_background_during_rounds")
    if background:
        lines.append(
            f"PostgreSQL background work during the rounds (all shard servers): {background['autovacuum']} "
            f"autovacuum and {background['autoanalyze']} autoanalyze passes, {background['checkpoints']} "
            "checkpoints"
        )
    lines.append("ratios (each from one round; median over rounds):")
    for key, value in result["ratios"].items():
        if key != "per_round":
            lines.append(f"  {key:<40}{_fmt(value, '.3f')}")
    lines += _round_lines(result)
    lines += goals.render(result["goals"])
    c = result["checks"]
    lines.append(
        f"checks: SendMessage h2load successes {c['send_h2load_succeeded']:,}, rows stored "
        f"{c['send_rows_stored']:,} (cut off at deadlines: {c['send_cut_off_at_deadline']}), "
        f"match every run: {c['send_rows_match_every_run']}; full-size responses every run: "
        f"{c['responses_full_size_every_run']}; failed requests: {c['failed_requests']}"
    )
    if "resolve" in result:
        lines += ["", *resolve.render(result["resolve"])]
    if "limiter" in result:
        lines += ["", *limiter.render(result["limiter"])]
    lines.append(f"elapsed {result['elapsed_s']:.0f}s")
    return "\n".join(lines)


def _round_lines(result: dict[str, Any]) -> list[str]:
    """Each round's send/echo beside what moved it most here: how the kernel spread h2load's
    connections over the workers (each run opens new ones), and so the batches' size."""
    concurrency = result["settings"]["ratio_concurrency"]
    ratio_key = f"send_over_echo_c{concurrency}"
    send_runs = result["send_message"][str(concurrency)]["runs"]
    lines = [f"per round at {concurrency} in flight:"]
    for index, (ratios, run) in enumerate(zip(result["ratios"]["per_round"], send_runs, strict=False)):
        share = run["extra"].get("busiest_worker_cpu_share")
        idle = run["extra"].get("machine_idle_share")
        lines.append(
            f"  round {index + 1}: send/echo {_fmt(ratios[ratio_key], '.3f')}, "
            f"{_fmt(run['extra'].get('messages_per_insert_statement'), '.2f')} messages per statement, "
            f"busiest worker {_fmt(None if share is None else 100 * share, '.0f')}% of the workers' CPU, "
            f"machine idle {_fmt(None if idle is None else 100 * idle, '.0f')}%"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    interrupt_on_sigterm()
    try:
        with contextlib.ExitStack() as stack:
            bench = Bench(args, stack)
            bench.setup()
            result = bench.run()
            bench.log("stopping servers")
    except KeyboardInterrupt:
        print("bench: interrupted; servers stopped and temporary data removed", file=sys.stderr)
        return 130
    # Pure CPU in this process: measured once the servers have stopped, so nothing else competes.
    result["resolve"] = resolve.measure(args.resolve_overrides)
    result["limiter"] = limiter.measure()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%dT%H%M%S")
    out = args.output_dir / f"{stamp}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(render_table(result))
    print(f"results written to {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    print(json.dumps(result, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
