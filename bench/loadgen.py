"""Load generators in separate processes: h2load (gRPC over HTTP/2) and pgbench (SQL), and their results.

Both are C programs that need a fraction of a core, so on a 2-core machine they leave the CPU to what is
measured. Latency percentiles come from their per-request logs (h2load `--log-file`, pgbench `-l`),
throughput from their own summaries.

Concurrency mapping for h2load: `concurrency` N is the number of requests in flight. They are carried
by C = min(N, 8) HTTP/2 connections with N / C streams each (like real gRPC clients, which multiplex
over a few channels), split over P = min(4, C) h2load processes of one thread each. Each process may
use its own payload and token (the service's benchmark gives each one a pair of users on a different
shard), and all run for the same duration; their requests and logs are added up.

Every run is bounded in time and in requests. By default it runs for `duration` seconds (h2load `-D`,
pgbench `-T`), which also bounds its requests. Given `requests`, it sends exactly that many (h2load `-n`
split over its processes, pgbench `-t` per client) and `duration` becomes its time limit: a run that
has not finished by then is stopped and reported as an error, not as a figure.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import statistics
import struct
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MAX_CONNECTIONS = 8
MAX_PROCESSES = 4

_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored"
)
_FINISHED = re.compile(r"finished in ([\d.]+)(us|ms|s), ([\d.]+) req/s")
_TRAFFIC = re.compile(r"traffic: .* \((\d+)\) data")
_TPS = re.compile(r"tps = ([\d.]+) \(without initial connection time\)")
_PGB_FAILED = re.compile(r"number of failed transactions: (\d+)")


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: flag 0 (uncompressed), 4-byte big-endian length, the bytes."""
    return struct.pack(">BI", 0, len(message)) + message


@dataclass(frozen=True, slots=True)
class Layout:
    """How `concurrency` in-flight requests are spread over h2load processes and connections."""

    concurrency: int
    processes: int
    connections_per_process: int
    streams_per_connection: int

    @classmethod
    def for_concurrency(cls, concurrency: int) -> Layout:
        connections = min(concurrency, MAX_CONNECTIONS)
        processes = min(MAX_PROCESSES, connections)
        if concurrency % connections or connections % processes:
            raise ValueError(f"concurrency {concurrency} must be 1..8 or a multiple of 8")
        return cls(concurrency, processes, connections // processes, concurrency // connections)


@dataclass(frozen=True, slots=True)
class Target:
    """What one h2load process sends: the path, the framed request and the bearer token."""

    path: str
    payload: bytes
    token: str | None = None
    #: Size of the right answer's DATA (gRPC frame), when it is fixed: errors are much smaller.
    expected_response_bytes: int | None = None


@dataclass(slots=True)
class Measurement:
    """One timed run of one load generator configuration (several processes added up)."""

    rps: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    succeeded: int
    failed: int
    #: Requests started but cut off by the deadline (their effect may still be stored).
    cut_off: int = 0
    #: Response body bytes per successful request (h2load only): tells real answers from gRPC errors.
    data_bytes_per_response: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index]


def _latencies_summary(latencies_us: list[float]) -> tuple[float, float, float]:
    latencies_us.sort()
    if not latencies_us:
        return math.nan, math.nan, math.nan
    return (
        _percentile(latencies_us, 0.50) / 1000,
        _percentile(latencies_us, 0.99) / 1000,
        statistics.fmean(latencies_us) / 1000,
    )


def h2load_binary() -> str | None:
    return shutil.which("h2load")


def pgbench_binary(bin_dir: Path) -> str | None:
    """pgbench of the PostgreSQL that runs the shards (it ships beside `postgres`), else the one on PATH."""
    beside = bin_dir / "pgbench"
    return str(beside) if beside.exists() else shutil.which("pgbench")


def split_requests(requests: int, parts: int) -> list[int]:
    """`requests` over `parts` processes as evenly as whole numbers allow (the first ones take the rest)."""
    share, rest = divmod(requests, parts)
    return [share + (1 if i < rest else 0) for i in range(parts)]


def run_h2load(
    base_url: str,
    targets: list[Target],
    concurrency: int,
    duration: float,
    workdir: Path,
    *,
    requests: int | None = None,
) -> Measurement:
    """Run h2load processes in parallel; targets[i % len] feeds process i.

    For `duration` seconds, or, given `requests`, for exactly that many requests within `duration`.
    """
    binary = h2load_binary()
    if binary is None:
        raise RuntimeError("h2load is not installed")
    layout = Layout.for_concurrency(concurrency)
    if requests is not None and requests < concurrency:
        raise ValueError(f"{requests} requests cannot keep {concurrency} in flight")
    shares = split_requests(requests, layout.processes) if requests is not None else None
    procs: list[tuple[subprocess.Popen[str], Path, Target]] = []
    with contextlib.ExitStack() as stack:
        for i in range(layout.processes):
            target = targets[i % len(targets)]
            run_dir = Path(tempfile.mkdtemp(prefix="h2load-", dir=workdir))
            payload = run_dir / "payload.bin"
            payload.write_bytes(target.payload)
            log = run_dir / "requests.tsv"
            argv = [
                binary,
                *(
                    # h2load takes whole numbers with a unit: milliseconds carry fractions of a second.
                    ["-D", f"{round(duration * 1000)}ms"] if shares is None else ["-n", str(shares[i])]
                ),
                "-c",
                str(layout.connections_per_process),
                "-m",
                str(layout.streams_per_connection),
                "-t",
                "1",
                "-H",
                "content-type: application/grpc",
                "-H",
                "te: trailers",
                "-d",
                str(payload),
                f"--log-file={log}",
            ]
            if target.token:
                argv += ["-H", f"authorization: Bearer {target.token}"]
            argv.append(base_url + target.path)
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            stack.callback(_reap, proc)
            procs.append((proc, log, target))
        deadline = time.monotonic() + _time_limit(duration, requests)
        try:
            outputs = [
                (
                    proc.communicate(timeout=max(0.0, deadline - time.monotonic()))[0],
                    proc.returncode,
                    log,
                    target,
                )
                for proc, log, target in procs
            ]
        except subprocess.TimeoutExpired:
            raise RuntimeError(_over_time_limit("h2load", requests, duration)) from None

    rps = 0.0
    succeeded = failed = cut_off = data_bytes = 0
    latencies: list[float] = []
    sizes_ok: bool | None = None
    for output, returncode, log, target in outputs:
        counts = _REQUESTS.search(output)
        finished = _FINISHED.search(output)
        traffic = _TRAFFIC.search(output)
        if returncode != 0 or not counts or not finished or not traffic:
            raise RuntimeError(f"h2load failed (exit {returncode}):\n{output[-2000:]}")
        _total, started, done, ok, bad, errored = (int(g) for g in counts.groups())
        rps += float(finished.group(3))
        succeeded += ok
        failed += bad + errored
        cut_off += started - done
        data_bytes += int(traffic.group(1))
        if target.expected_response_bytes is not None and ok:
            per_response = int(traffic.group(1)) / ok
            sizes_ok = (sizes_ok is not False) and abs(per_response - target.expected_response_bytes) < 0.5
        for line in log.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) == 3 and parts[1] == "200":
                latencies.append(float(parts[2]))
    p50, p99, mean = _latencies_summary(latencies)
    return Measurement(
        rps=rps,
        p50_ms=p50,
        p99_ms=p99,
        mean_ms=mean,
        succeeded=succeeded,
        failed=failed,
        cut_off=cut_off,
        data_bytes_per_response=data_bytes / succeeded if succeeded else None,
        extra={} if sizes_ok is None else {"response_bytes_ok": sizes_ok},
    )


def _reap(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _time_limit(duration: float, requests: int | None) -> float:
    """Seconds a run may take: a timed run ends on its own, and the margin only catches a hung
    load generator; a counted run must finish within `duration`."""
    return duration + 60 if requests is None else duration


def _over_time_limit(tool: str, requests: int | None, duration: float) -> str:
    if requests is None:
        return f"{tool} did not end {_time_limit(duration, requests):g} s into a {duration:g} s run"
    return (
        f"{tool} did not finish {requests} requests within the {duration:g} s limit: "
        "ask for fewer requests or a longer --duration"
    )


def run_pgbench(
    pgbench: str,
    dsn_parts: dict[str, str],
    script: str,
    variables: dict[str, str],
    clients: int,
    duration: float,
    workdir: Path,
    *,
    prepared: bool = True,
    requests: int | None = None,
) -> Measurement:
    """pgbench with a custom script; `prepared` like the service's pool (else a custom plan per call).

    `dsn_parts`: host, port, user, dbname, and optionally passfile (libpq's password file).

    For `duration` seconds, or, given `requests` (a multiple of `clients`), for exactly that many
    transactions within `duration`.
    """
    if requests is not None and (requests < clients or requests % clients):
        raise ValueError(f"{requests} transactions do not split evenly over {clients} pgbench clients")
    run_dir = Path(tempfile.mkdtemp(prefix="pgbench-", dir=workdir))
    script_file = run_dir / "script.sql"
    script_file.write_text(script)
    argv = [
        pgbench,
        "-n",  # no vacuum of pgbench's own tables: there are none
        "-M",
        "prepared" if prepared else "extended",
        "-c",
        str(clients),
        "-j",
        str(min(clients, 2)),
        *(["-T", str(max(1, round(duration)))] if requests is None else ["-t", str(requests // clients)]),
        "-f",
        str(script_file),
        "-l",
        f"--log-prefix={run_dir / 'tx'}",
        "-h",
        dsn_parts["host"],
        "-p",
        dsn_parts["port"],
        "-U",
        dsn_parts["user"],
    ]
    for name, value in variables.items():
        argv += ["-D", f"{name}={value}"]
    argv.append(dsn_parts["dbname"])
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=_time_limit(duration, requests),
            check=False,
            cwd=run_dir,
            # The password comes from libpq's password file, as in the service's DSNs.
            env={**os.environ, "PGPASSFILE": dsn_parts["passfile"]} if "passfile" in dsn_parts else None,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(_over_time_limit("pgbench", requests, duration)) from None
    output = proc.stdout + proc.stderr
    tps = _TPS.search(output)
    if proc.returncode != 0 or not tps:
        raise RuntimeError(f"pgbench failed (exit {proc.returncode}):\n{output[-2000:]}")
    latencies: list[float] = []
    for log in run_dir.glob("tx.*"):
        for line in log.read_text().splitlines():
            parts = line.split()
            # client_id transaction_no latency_us script_no epoch_s epoch_us
            if len(parts) >= 3 and parts[2].isdigit():
                latencies.append(float(parts[2]))
    p50, p99, mean = _latencies_summary(latencies)
    failed_match = _PGB_FAILED.search(output)
    return Measurement(
        rps=float(tps.group(1)),
        p50_ms=p50,
        p99_ms=p99,
        mean_ms=mean,
        succeeded=len(latencies),
        failed=int(failed_match.group(1)) if failed_match else 0,
    )
