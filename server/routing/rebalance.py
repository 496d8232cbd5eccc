"""Proposing moves of pairs that bring the heaviest shard near the mean (pure; no I/O).

`propose` is the greedy core, as an operator would do it by hand: while the heaviest shard is more
than `tolerance` above the mean, move to the lightest shard the pair of the heaviest that leaves
the larger of the two lowest (ties: the pair closest to the excess). A move is made only if both
shards end below the current maximum, so a pair that alone carries more than the gap between the
heaviest and the lightest shard never moves: it would only make another shard the hotspot. Each
pair moves at most once per proposal.

`attribute` puts recorded activity on the shards the current routing names, so pairs moved since
their activity was recorded count where they are now.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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


def attribute(
    recorded: Mapping[int, float], pairs: Sequence[PairLoad], route: Callable[[Pair], int]
) -> tuple[dict[int, float], list[PairLoad]]:
    """Shard loads and pair loads as the current routing places them.

    `recorded`: each shard's total as recorded there (the shards that count: others are left out);
    `pairs`: pair loads as recorded on a shard (a pair moved within the window is listed on both).
    A pair's load recorded on a shard it has left is moved to the shard `route` names now.
    """
    loads = dict(recorded)
    merged: dict[Pair, float] = {}
    for entry in pairs:
        now = route(entry.pair)
        if now != entry.shard_id and entry.shard_id in loads:
            loads[entry.shard_id] = max(0.0, loads[entry.shard_id] - entry.load)
            if now in loads:
                loads[now] += entry.load
        merged[entry.pair] = merged.get(entry.pair, 0.0) + entry.load
    placed = [PairLoad(p, route(p), load) for p, load in merged.items()]
    return loads, sorted((p for p in placed if p.shard_id in loads), key=lambda p: (-p.load, p.pair))
