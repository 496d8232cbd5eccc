"""Cost of a per-user rate-limit check: `python -m bench.limiter`.

Every SendMessage and GetDialog takes a token. A single-process server takes it from its own
buckets (`TokenBucketLimiter`, a dict); the workers of `dialog-server --workers N` take it from the
table they share (`SharedTokenBuckets`: a stripe lock with `fcntl.lockf`, one unpack, one pack, the
unlock). This measures both per call, for a few hot users and for many users, in one run, with a
second process taking tokens from the same table at the same time for the shared case's contention
figure, and prints the figures and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from server.interceptors.rate_limit import Limiter, TokenBucketLimiter
from server.interceptors.shared_buckets import SharedTokenBuckets, create_table

_RATE, _BURST, _CAPACITY = 1e9, 1_000_000, 100_000
#: A process taking tokens from the same table until killed (the shared case under contention).
_RIVAL = (
    "import sys, random; from pathlib import Path;"
    "from server.interceptors.shared_buckets import SharedTokenBuckets;"
    "b = SharedTokenBuckets(Path(sys.argv[1]), rate_per_second=1e9, burst=1000000);"
    "r = random.Random(1); keys = [r.randrange(1, 2**63) for _ in range(1000)];"
    "print('ready', flush=True)\n"
    "while True:\n    [b.acquire(k) for k in keys]"
)


def _per_call_us(limiter: Limiter, keys: list[int], repeats: int) -> float:
    """Median over `repeats` passes of the mean µs per acquire()."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for key in keys:
            limiter.acquire(key)
        samples.append((time.perf_counter() - start) / len(keys) * 1e6)
    return statistics.median(samples)


def measure(calls: int = 50_000, repeats: int = 5) -> dict[str, Any]:
    """µs per acquire() of the in-process and the shared limiter (alone and with a rival process)."""
    rng = random.Random(7)
    hot = [rng.randrange(1, 2**63) for _ in range(10)] * (calls // 10)
    many = [rng.randrange(1, 2**63) for _ in range(calls)]
    with tempfile.TemporaryDirectory(
        prefix="bench-limiter-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None
    ) as d:
        path = Path(d) / "send.buckets"
        create_table(path, _CAPACITY)
        local = TokenBucketLimiter(rate_per_second=_RATE, burst=_BURST, max_keys=_CAPACITY)
        shared = SharedTokenBuckets(path, rate_per_second=_RATE, burst=_BURST)
        figures = {
            "in_process_hot_us": _per_call_us(local, hot, repeats),
            "in_process_many_us": _per_call_us(local, many, repeats),
            "shared_hot_us": _per_call_us(shared, hot, repeats),
            "shared_many_us": _per_call_us(shared, many, repeats),
        }
        rival = subprocess.Popen([sys.executable, "-c", _RIVAL, str(path)], stdout=subprocess.PIPE, text=True)
        try:
            assert rival.stdout is not None and rival.stdout.readline().strip() == "ready"
            figures["shared_many_contended_us"] = _per_call_us(shared, many, repeats)
        finally:
            rival.kill()
            rival.wait()
        shared.close()
    return {"calls": calls, "repeats": repeats, "capacity": _CAPACITY, **figures}


def render(figures: dict[str, Any]) -> list[str]:
    """The figures of `measure` as lines of a table."""
    return [
        f"Rate-limit check per call ({figures['calls']:,} calls, median of {figures['repeats']} passes)",
        f"  in-process buckets, 10 users        {figures['in_process_hot_us']:.2f} µs",
        f"  in-process buckets, {figures['calls']:,} users   {figures['in_process_many_us']:.2f} µs",
        f"  shared table, 10 users              {figures['shared_hot_us']:.2f} µs",
        f"  shared table, {figures['calls']:,} users         {figures['shared_many_us']:.2f} µs",
        f"  shared, another process hammering   {figures['shared_many_contended_us']:.2f} µs",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=50_000, help="acquire() calls per pass")
    parser.add_argument("--repeats", type=int, default=5, help="passes; the median is reported")
    args = parser.parse_args(argv)
    figures = measure(args.calls, args.repeats)
    print("\n".join(render(figures)))
    print(json.dumps({"benchmark": "dialog-shard limiter", **figures}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
