"""`make bench` itself, end to end at toy size: the benchmark must not rot between the runs we quote.

The same Makefile target a user runs (h2load, pgbench, 4 PostgreSQL servers, the service and the echo
server, then the resolution micro-benchmark), with a second's worth of load: what is checked is that
every part ran and was counted, not how fast (figures from a run this short mean nothing).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent

#: Small enough for the default suite (~20 s), yet every measurement of a full run is taken.
TOY_BENCH = (
    "--quick --duration 1 --concurrency 1 8 --pgbench-clients 8 --ratio-concurrency 8 "
    "--deep-messages 1000 --shard-rows 2000 --read-messages 200 --resolve-overrides 2000"
)


def _make_bench(bench_args: str, output_dir: Path) -> tuple[dict[str, Any], str]:
    """`make bench` with these arguments: its final JSON line and everything it printed."""
    done = subprocess.run(
        ["make", "--no-print-directory", "bench", f"BENCH_ARGS={bench_args} --output-dir {output_dir}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1]), done.stdout  # the final line holds every figure


@pytest.mark.timeout(300)
def test_make_bench_measures_every_part_and_writes_its_results(tmp_path: Path) -> None:
    bench, stdout = _make_bench(TOY_BENCH, tmp_path)

    assert bench["benchmark"] == "dialog-shard make bench"
    checks = bench["checks"]
    assert checks["failed_requests"] == 0
    assert checks["send_rows_match_every_run"] is True
    assert checks["responses_full_size_every_run"] is True
    assert checks["send_h2load_succeeded"] > 0
    # Every measurement a full run takes, at every concurrency asked for.
    for name in ("send_message", "get_dialog", "echo"):
        assert set(bench[name]) == {"1", "8"}, name
        assert all(figures["rps"] > 0 for figures in bench[name].values()), name
    assert set(bench["pgbench_insert"]) == {"8"} and bench["pgbench_insert"]["8"]["rps"] > 0
    assert set(bench["pgbench_plain_insert"]) == {"8"} and bench["pgbench_plain_insert"]["8"]["rps"] > 0
    assert set(bench["get_dialog_page"]) == {"first", "deep"}
    assert bench["settings"]["deep_page_offset_messages"] == 900
    ratios = bench["ratios"]
    for key in (
        "send_over_echo_c8",
        "send_c8_over_pgbench_insert_c8",
        "pgbench_insert_over_plain_c8",
        "deep_over_first_page_p50",
    ):
        assert ratios[key] > 0, key
    # Every goal is judged on its ratio; the throughput goals are stated at 32 in flight,
    # which this run did not measure, so only the page-depth goals get a verdict.
    goals = {goal["ratio"]: goal for goal in bench["goals"]}
    assert set(goals) == {
        "send_over_echo_c8",
        "send_c8_over_pgbench_insert_c8",
        "deep_over_first_page_p50",
        "deep_over_first_page_p99",
    }
    assert (
        goals["send_over_echo_c8"]["met"] is None
        and goals["send_over_echo_c8"]["median"] == ratios["send_over_echo_c8"]
    )
    for key in ("deep_over_first_page_p50", "deep_over_first_page_p99"):
        assert goals[key]["met"] is (ratios[key] <= 1.2), key
        assert goals[key]["rounds"] == 1
    assert "goals (median over rounds" in stdout and "not judged" in stdout
    assert bench["server_rss_kib"]["after"] > 0
    # The rate-limit check's cost: in-process buckets against the table the workers share.
    limiter = bench["limiter"]
    for key in ("in_process_hot_us", "in_process_many_us", "shared_hot_us", "shared_many_us"):
        assert limiter[key] > 0, key
    assert limiter["shared_many_contended_us"] > 0 and "Rate-limit check per call" in stdout
    assert set(bench["postgres_background_during_rounds"]) == {"autovacuum", "autoanalyze", "checkpoints"}
    assert all(count >= 0 for count in bench["postgres_background_during_rounds"].values())
    assert "PostgreSQL background work during the rounds" in stdout
    for name in ("send_message", "get_dialog", "echo"):
        for run in (run for figures in bench[name].values() for run in figures["runs"]):
            assert 0.0 <= run["extra"]["machine_idle_share"] <= 1.0, name
    assert "machine idle" in stdout
    # The table is printed, and the file holds the same result as the final line.
    assert "send/echo" in stdout
    (written,) = tmp_path.glob("*.json")
    assert json.loads(written.read_text()) == bench

    resolve = bench["resolve"]
    assert resolve["overrides"] == 2000
    assert resolve["no_overrides_us"] > 0 and resolve["large_map_hit_us"] > 0 and resolve["ratio"] > 0
    assert "overrides, pinned pair" in stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_make_bench_with_counted_runs_sends_exactly_the_requests_asked_for(tmp_path: Path) -> None:
    """`--requests N`: every run of every load generator is N requests, none more, none cut off."""
    # No --duration: counted runs get the default time limit, far from what 400 requests take.
    counted = TOY_BENCH.replace("--duration 1 ", "").replace("--concurrency 1 8", "--concurrency 8")
    counted += " --requests 400"
    bench, stdout = _make_bench(counted, tmp_path)

    assert bench["settings"]["requests_per_run"] == 400
    checks = bench["checks"]
    assert checks["requests_per_run"] == [400]  # h2load and pgbench runs alike
    assert checks["failed_requests"] == 0
    # One SendMessage run at one concurrency: 400 answered, 400 rows, nothing in flight at a deadline.
    assert (checks["send_h2load_succeeded"], checks["send_rows_stored"]) == (400, 400)
    assert checks["send_cut_off_at_deadline"] == 0
    assert "1 round(s) of 400-request runs (limit 120s)" in stdout


def test_operator_reads_benchmark_runs_every_read_at_toy_size() -> None:
    """`python -m bench.operator_reads`, which docs/operations.md quotes for a 10M-row shard."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.operator_reads", "--rows", "3000", "--pairs", "40", "--repeats", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(done.stdout.splitlines()[-1])
    # The script itself fails unless the exact count is the seeded one and verify finds nothing.
    assert figures["stats_exact"]["count"] == 3000 and figures["verify"]["pairs"] == 40
    assert 0 <= figures["stats_estimate"]["count"] <= 3000 * 2
    reads = ("stats_estimate", "stats_exact", "hotspots_activity", "hotspots_pair_counts", "verify")
    assert all(figures[name]["seconds"] > 0 for name in reads)
    assert figures["hotspots_activity"]["pairs"] == 20, "the seeded hour of activity names its heavy pairs"


@pytest.mark.timeout(300)
def test_rebalance_benchmark_runs_without_and_with_the_rebalancer_at_toy_size(tmp_path: Path) -> None:
    """`python -m bench.rebalance` (`make bench-rebalance`), which docs/performance.md quotes."""
    done = subprocess.run(
        [
            *(sys.executable, "-m", "bench.rebalance", "--seconds", "3", "--hot-pairs", "6"),
            *(
                "--messages-per-pair",
                "20",
                "--concurrency",
                "4",
                "--rounds",
                "1",
                "--output-dir",
                str(tmp_path),
            ),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (written,) = tmp_path.glob("rebalance-*.json")
    without, with_rebalancer = json.loads(written.read_text())["runs"]
    assert (without["rebalancer"], with_rebalancer["rebalancer"]) == (False, True)
    assert without["moves"] == 0 and without["sends"] > 0 and with_rebalancer["sends"] > 0
    seeded = 6 * 20 + 3 * 2 * 20
    assert sum(without["messages_per_shard"]) == seeded + without["sends"], "every acknowledged send stored"
    assert sum(with_rebalancer["messages_per_shard"]) == seeded + with_rebalancer["sends"]
