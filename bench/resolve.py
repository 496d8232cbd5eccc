"""Shard resolution cost with and without a large shard map: `python -m bench.resolve`.

Resolution is pure and in memory (`server.routing.ShardRouter`: a dict lookup for the override,
else the seed's hash), so its cost must not depend on how many overrides exist. This measures
`resolve()` per call with no overrides and with 100,000 of them, for pinned pairs (override hits)
and for unpinned ones (misses), in one run, and prints the figures and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any

from server.routing import Pair, ShardRouter

_MAX_ID = 2**63 - 1


def _pairs(rng: random.Random, count: int) -> list[tuple[int, int]]:
    pairs: list[tuple[int, int]] = []
    while len(pairs) < count:
        a, b = rng.randint(1, _MAX_ID), rng.randint(1, _MAX_ID)
        if a != b:
            pairs.append((a, b))
    return pairs


def _per_call_us(router: ShardRouter, pairs: list[tuple[int, int]], repeats: int) -> float:
    """Median over `repeats` passes of the mean µs per resolve() call."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for a, b in pairs:
            router.resolve(a, b)
        samples.append((time.perf_counter() - start) / len(pairs) * 1e6)
    return statistics.median(samples)


def measure(overrides: int = 100_000, calls: int = 50_000, repeats: int = 5) -> dict[str, Any]:
    """Per-call µs of resolve() with no overrides and with `overrides` of them, and the worst ratio."""
    rng = random.Random(7)
    pinned = _pairs(rng, overrides)
    shard_of = {Pair.of(a, b): rng.randrange(4) for a, b in pinned}
    empty = ShardRouter(4)
    large = ShardRouter(4, shard_of)
    hits = rng.sample(pinned, min(calls, len(pinned)))
    misses = _pairs(rng, calls)
    # Interleaved, so that the machine's other load hits every variant alike.
    figures = {
        "no_overrides_us": _per_call_us(empty, misses, repeats),
        "large_map_miss_us": _per_call_us(large, misses, repeats),
        "large_map_hit_us": _per_call_us(large, hits, repeats),
    }
    if not all(large.resolve(a, b).shard_id == shard_of[Pair.of(a, b)] for a, b in hits[:1000]):
        raise RuntimeError("a pinned pair did not resolve to its override")
    ratio = max(figures["large_map_miss_us"], figures["large_map_hit_us"]) / figures["no_overrides_us"]
    return {"overrides": overrides, "calls": calls, "repeats": repeats, **figures, "ratio": ratio}


def render(figures: dict[str, Any]) -> list[str]:
    """The figures of `measure` as lines of a table."""
    n = figures["overrides"]
    return [
        f"ShardRouter.resolve() per call ({figures['calls']:,} calls, median of {figures['repeats']} passes)",
        f"  no overrides                    {figures['no_overrides_us']:.2f} µs",
        f"  {n:,} overrides, unpinned pair {figures['large_map_miss_us']:.2f} µs",
        f"  {n:,} overrides, pinned pair   {figures['large_map_hit_us']:.2f} µs",
        f"  large map / none (worst case)   {figures['ratio']:.2f}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--overrides", type=int, default=100_000, help="size of the large shard map")
    parser.add_argument("--calls", type=int, default=50_000, help="resolve() calls per pass")
    parser.add_argument("--repeats", type=int, default=5, help="passes; the median is reported")
    args = parser.parse_args(argv)
    figures = measure(args.overrides, args.calls, args.repeats)
    print("\n".join(render(figures)))
    print(json.dumps({"benchmark": "dialog-shard resolve", **figures}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
