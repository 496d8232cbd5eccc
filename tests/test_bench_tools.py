"""The benchmark's own measuring tools: what `make bench` divides by must count what it claims.

CPU per call is only honest if a process's CPU includes the children it already reaped (pgbench's
PostgreSQL backends exit before the second reading), and the batching figure sums every worker's
metrics endpoint. Counted runs (`--requests`) send exactly what was asked, with the real h2load and
pgbench, and stop at their time limit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client import CollectorRegistry, Counter, start_http_server

from bench import echo_server
from bench.loadgen import Target, grpc_frame, pgbench_binary, run_h2load, run_pgbench, split_requests
from bench.procs import (
    counter_totals,
    cpu_seconds,
    ensure_debian_binary,
    idle_share,
    machine_cpu_ticks,
    worker_cpu_seconds,
)
from bench.workload import settle_after_load
from server.dev.embedded_pg import EmbeddedPostgres
from tests.pgfixtures import free_port
from tests.support import fresh_database, wait_until_blocking

BURN = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"


def test_cpu_seconds_counts_children_that_already_exited() -> None:
    before = cpu_seconds([os.getpid()])
    subprocess.run([sys.executable, "-c", BURN], check=True)  # exits and is reaped before the reading
    assert cpu_seconds([os.getpid()]) - before >= 0.25


def test_worker_cpu_seconds_is_one_figure_per_child() -> None:
    """A supervisor with two busy workers: one figure each, each with its own CPU."""
    worker = BURN + "time.sleep(60)\n"
    supervisor = (
        "import subprocess, sys, time\n"
        f"workers = [subprocess.Popen([sys.executable, '-c', {worker!r}]) for _ in range(2)]\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", supervisor], start_new_session=True)
    try:

        def both_burnt_a_quarter_second() -> bool:
            assert parent.poll() is None, "the supervisor exited"
            figures = worker_cpu_seconds(parent.pid)
            return len(figures) == 2 and all(f >= 0.25 for f in figures)

        wait_until_blocking(
            both_burnt_a_quarter_second,
            "both workers used 0.25 s of CPU",
            within=20,
            every=0.05,
            explain=lambda: worker_cpu_seconds(parent.pid),
        )
        # Read again after the check: the parent's total must cover what the workers had used by then.
        figures = worker_cpu_seconds(parent.pid)
        assert cpu_seconds([parent.pid]) >= sum(figures)
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()


def test_counter_totals_sum_every_endpoint_and_label() -> None:
    urls, servers = [], []
    for increments in ((3, 4), (5, 0)):
        registry = CollectorRegistry()
        statements = Counter("dialog_shard_insert_statements", "", ["shard", "kind"], registry=registry)
        statements.labels("0", "single").inc(increments[0])
        statements.labels("1", "batch").inc(increments[1])
        Counter("unrelated", "", registry=registry).inc(100)
        port = free_port()
        server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
        servers.append((server, thread))
        urls.append(f"http://127.0.0.1:{port}/metrics")
    try:
        totals = counter_totals(urls, {"dialog_shard_insert_statements_total", "missing_total"})
    finally:
        for server, thread in servers:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
    assert totals == {"dialog_shard_insert_statements_total": 12.0, "missing_total": 0.0}


def test_settling_after_the_load_vacuums_analyzes_and_checkpoints(pg_server: EmbeddedPostgres) -> None:
    """What `make bench` does after seeding, so autovacuum's first pass does not land in a round."""
    dsn = fresh_database(pg_server, "settle")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE seeded (id int PRIMARY KEY)")
        conn.execute("INSERT INTO seeded SELECT generate_series(1, 10000)")
        checkpoints_before = _checkpoints(conn)

    settle_after_load(dsn, "seeded")

    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT last_vacuum IS NOT NULL, last_analyze IS NOT NULL FROM pg_stat_user_tables"
            " WHERE relname = 'seeded'"
        ).fetchone()
        assert row == (True, True)
        assert _checkpoints(conn) > checkpoints_before


def _checkpoints(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter").fetchone()
    assert row is not None
    return int(row[0])


def test_the_resolution_benchmark_runs_alone() -> None:
    """`python -m bench.resolve`, which the README offers beside `make bench`."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.resolve", "--overrides", "1000", "--calls", "1000", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    figures = json.loads(done.stdout.splitlines()[-1])
    assert figures["benchmark"] == "dialog-shard resolve" and figures["overrides"] == 1000
    assert figures["no_overrides_us"] > 0 and figures["large_map_hit_us"] > 0
    assert "overrides, pinned pair" in done.stdout


def test_the_limiter_benchmark_runs_alone() -> None:
    """`python -m bench.limiter`: a rate-limit check in-process and shared (`make bench` runs it too)."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.limiter", "--calls", "1000", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    figures = json.loads(done.stdout.splitlines()[-1])
    assert figures["benchmark"] == "dialog-shard limiter" and figures["calls"] == 1000
    for name in ("in_process_hot_us", "shared_hot_us", "shared_many_contended_us"):
        assert 0 < figures[name] < 10_000, figures
    assert "shared table, 10 users" in done.stdout


def test_machine_idle_share_counts_idle_and_iowait_against_all_cpu_time() -> None:
    before = machine_cpu_ticks("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3\n")
    after = machine_cpu_ticks("cpu  160 0 70 830 60 5 5 0 9 9\n")
    assert before == (850, 1000) and after == (890, 1130)
    # 40 idle ticks (30 idle, 10 iowait) of 130; guest time is already in user time.
    assert idle_share(before, after) == 40 / 130
    real_before = machine_cpu_ticks()
    real_after = machine_cpu_ticks()
    assert real_after[1] >= real_before[1] and 0.0 <= idle_share(real_before, real_after) <= 1.0


# -- counted runs ------------------------------------------------------------------------------------


def test_requests_split_over_processes_add_up_to_what_was_asked() -> None:
    assert split_requests(1001, 4) == [251, 250, 250, 250]
    assert split_requests(8, 8) == [1] * 8
    assert sum(split_requests(99_999, 3)) == 99_999


@pytest.fixture(scope="module")
def echo_address() -> Iterator[str]:
    """The benchmark's own echo server, on a free port, for h2load to drive."""
    address = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.echo_server", "--listen", address],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert "echo serving on" in proc.stdout.readline()
        yield address
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_counted_h2load_run_sends_exactly_the_requests_asked_for(echo_address: str, tmp_path: Path) -> None:
    _need_h2load()
    body = b"counted"
    target = Target(echo_server.PATH, grpc_frame(body), expected_response_bytes=len(grpc_frame(body)))
    # 1,001 over 4 processes does not divide evenly: the shares must still add up.
    m = run_h2load(f"http://{echo_address}", [target], 8, 60.0, tmp_path, requests=1001)
    assert (m.succeeded, m.failed, m.cut_off) == (1001, 0, 0)
    assert m.extra["response_bytes_ok"] is True


def test_a_counted_h2load_run_that_overruns_its_time_limit_is_an_error(
    echo_address: str, tmp_path: Path
) -> None:
    _need_h2load()
    target = Target(echo_server.PATH, grpc_frame(b"x"))
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="did not finish 100000000 requests within the 1 s limit"):
        run_h2load(f"http://{echo_address}", [target], 8, 1.0, tmp_path, requests=100_000_000)
    assert time.monotonic() - started < 30
    # The stopped h2load processes were reaped, not left running against the server.
    assert not _processes_named("h2load")


def _need_h2load() -> None:
    if ensure_debian_binary("h2load", "nghttp2-client") is None:
        pytest.skip("h2load not installed (Debian: apt-get install nghttp2-client)")


def _processes_named(name: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == name:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def test_a_counted_pgbench_run_runs_exactly_the_transactions_asked_for(
    pg_server: EmbeddedPostgres, tmp_path: Path
) -> None:
    database = f"counted_{uuid.uuid4().hex[:12]}"
    pg_server.create_database(database)
    with psycopg.connect(pg_server.dsn_for(database), autocommit=True) as conn:
        conn.execute("CREATE TABLE hits (id bigserial PRIMARY KEY, who int NOT NULL)")
    binary = pgbench_binary(pg_server.bin_dir)
    assert binary is not None, "pgbench ships with the PostgreSQL server binaries"
    parts = {
        "host": pg_server.host,
        "port": str(pg_server.port),
        "user": "postgres",
        "dbname": database,
        "passfile": str(pg_server.password_file),
    }
    script = "INSERT INTO hits (who) VALUES (:who);\n"

    m = run_pgbench(binary, parts, script, {"who": "7"}, 8, 60.0, tmp_path, requests=200)

    assert (m.succeeded, m.failed) == (200, 0)
    with psycopg.connect(pg_server.dsn_for(database)) as conn:
        assert conn.execute("SELECT count(*) FROM hits WHERE who = 7").fetchone() == (200,)
    with pytest.raises(ValueError, match="do not split evenly over 8 pgbench clients"):
        run_pgbench(binary, parts, script, {"who": "7"}, 8, 60.0, tmp_path, requests=201)


def test_counted_runs_that_cannot_be_counted_exactly_are_refused_before_any_setup() -> None:
    for args, message in (
        (["--requests", "4", "--concurrency", "1", "8"], "cannot keep 8 requests in flight"),
        (
            ["--requests", "100", "--pgbench-clients", "8", "32"],
            "does not split evenly over pgbench clients [8, 32]",
        ),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "bench.run", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 2, done.stderr
        assert message in done.stderr
