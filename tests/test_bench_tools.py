"""The benchmark's own measuring tools: what `make bench` divides by must count what it claims.

CPU per call is only honest if a process's CPU includes the children it already reaped (pgbench's
PostgreSQL backends exit before the second reading), and the batching figure sums every worker's
metrics endpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from typing import Any

import psycopg
from prometheus_client import CollectorRegistry, Counter, start_http_server

from bench.procs import counter_totals, cpu_seconds, idle_share, machine_cpu_ticks, worker_cpu_seconds
from bench.workload import settle_after_load
from server.embedded_pg import EmbeddedPostgres
from tests.pgfixtures import free_port

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
        deadline = time.monotonic() + 20
        while True:
            figures = worker_cpu_seconds(parent.pid)
            if len(figures) == 2 and all(f >= 0.25 for f in figures):
                break
            assert parent.poll() is None and time.monotonic() < deadline, figures
            time.sleep(0.05)
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
    database = f"settle_{uuid.uuid4().hex[:12]}"
    pg_server.create_database(database)
    dsn = pg_server.dsn_for(database)
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


def test_machine_idle_share_counts_idle_and_iowait_against_all_cpu_time():
    before = machine_cpu_ticks("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3\n")
    after = machine_cpu_ticks("cpu  160 0 70 830 60 5 5 0 9 9\n")
    assert before == (850, 1000) and after == (890, 1130)
    # 40 idle ticks (30 idle, 10 iowait) of 130; guest time is already in user time.
    assert idle_share(before, after) == 40 / 130
    real_before = machine_cpu_ticks()
    real_after = machine_cpu_ticks()
    assert real_after[1] >= real_before[1] and 0.0 <= idle_share(real_before, real_after) <= 1.0
