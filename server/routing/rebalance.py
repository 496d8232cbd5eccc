"""Proposing overrides that bring the heaviest shard close to the mean (pure; no I/O).

Greedy, like an operator would do it by hand: while the heaviest shard is more than
`tolerance` above the mean, move to the lightest shard the pair of the heaviest that
leaves the larger of the two lowest (ties: the pair closest to the excess). Only pairs in `candidates` (the
heaviest pairs, from `dialogctl hotspots`) are considered; each pair moves at most once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from server.routing.hash import Pair


@dataclass(frozen=True, slots=True)
class PairLoad:
    """A pair, the shard it lives on, and its weight (messages, or messages per second)."""

    pair: Pair
    shard_id: int
    load: float


@dataclass(frozen=True, slots=True)
class Proposal:
    """Pin `pair` to `target` (moving its `load` away from `source`)."""

    pair: Pair
    source: int
    target: int
    load: float


def propose(
    shard_loads: Mapping[int, float],
    candidates: Sequence[PairLoad],
    *,
    tolerance: float = 0.1,
    max_moves: int = 10,
) -> list[Proposal]:
    """Moves that bring max(shard load) within `tolerance` of the mean, heaviest shard first."""
    loads = dict(shard_loads)
    if not loads:
        return []
    mean = sum(loads.values()) / len(loads)
    remaining = {c.pair: c for c in candidates}
    proposals: list[Proposal] = []
    while len(proposals) < max_moves:
        heaviest = max(loads, key=lambda s: (loads[s], -s))
        lightest = min(loads, key=lambda s: (loads[s], s))
        excess = loads[heaviest] - mean
        gap = loads[heaviest] - loads[lightest]
        if excess <= tolerance * mean or gap <= 0:
            break
        # A move helps only if it leaves both shards below the current maximum.
        fitting = [c for c in remaining.values() if c.shard_id == heaviest and 0 < c.load < gap]
        if not fitting:
            break
        best = min(
            fitting,
            key=lambda c: (
                max(loads[heaviest] - c.load, loads[lightest] + c.load),
                abs(c.load - excess),
                c.pair,
            ),
        )
        proposals.append(Proposal(best.pair, heaviest, lightest, best.load))
        loads[heaviest] -= best.load
        loads[lightest] += best.load
        del remaining[best.pair]
    return proposals
