"""Deciding which pairs to move so the heaviest shard comes near the mean (pure; no I/O).

`propose` is the greedy core, as an operator would do it by hand: while the heaviest shard is more
than `tolerance` above the mean, move to the lightest shard the pair of the heaviest that leaves
the larger of the two lowest (ties: the pair closest to the excess). A move is made only if both
shards end below the current maximum, so a pair that alone carries more than the gap between the
heaviest and the lightest shard never moves: it would only make another shard the hotspot. Each
pair moves at most once per proposal.

`decide` wraps it with what an automatic rebalancer needs to never do harm:

- a threshold and a hysteresis band: act only when the heaviest shard is above `threshold` x the
  mean, and then move only until it is within `settle` x the mean (settle < threshold), so the
  loads a round leaves are far from those that start the next one;
- frozen pairs (pinned by an operator, or moved recently: a cool-down) are never proposed;
- moves must pay: if all of them together lower the heaviest shard's load by less than
  `min_improvement` of it, none is made (a shard hot because of one pair that is above the fair
  share cannot be helped by shuffling: that pair gets the least-loaded shard only when this brings
  the maximum down by that much);
- at most `max_moves` (what the budgets leave).

`attribute` puts recorded activity on the shards the current routing names, so pairs moved since
their activity was recorded count where they are now.
"""

from __future__ import annotations

import enum
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


@dataclass(frozen=True, slots=True)
class Policy:
    """When the rebalancer acts and how far it goes (server.config.RebalanceConfig)."""

    threshold: float = 1.3
    settle: float = 1.1
    min_improvement: float = 0.1
    max_moves: int = 5


class Outcome(enum.StrEnum):
    """What a round decided; every value is also a metric label."""

    #: Nothing was written in the window.
    IDLE = "idle"
    #: The heaviest shard is within the threshold.
    BALANCED = "balanced"
    #: Moves were chosen.
    MOVES = "moves"
    #: No set of moves lowers the heaviest shard enough (e.g. one pair above the fair share).
    UNHELPABLE = "unhelpable"
    #: The budgets leave no move now.
    BUDGET = "budget"
    #: Not decided: a shard is unhealthy, a reshard or another move runs, the control database is down.
    PAUSED = "paused"


@dataclass(frozen=True, slots=True)
class Skip:
    """A candidate pair left where it is, and why."""

    pair: Pair
    shard_id: int
    load: float
    reason: str


@dataclass(frozen=True, slots=True)
class Decision:
    """A round's view (loads by shard, their mean) and what it decided, with the reason."""

    outcome: Outcome
    reason: str
    loads: Mapping[int, float]
    moves: tuple[Proposal, ...] = ()
    skipped: tuple[Skip, ...] = ()

    @property
    def mean(self) -> float:
        return sum(self.loads.values()) / len(self.loads) if self.loads else 0.0

    @property
    def heaviest(self) -> int | None:
        return max(self.loads, key=lambda s: (self.loads[s], -s)) if self.loads else None

    @property
    def ratio(self) -> float:
        """The heaviest shard's load over the mean (0 with no load)."""
        mean = self.mean
        return max(self.loads.values()) / mean if mean > 0 else 0.0


def decide(
    loads: Mapping[int, float],
    candidates: Sequence[PairLoad],
    policy: Policy,
    *,
    frozen: Mapping[Pair, str] | None = None,
) -> Decision:
    """The moves (if any) this round should make; see the module docstring for the rules."""
    frozen = frozen or {}
    if not loads or sum(loads.values()) <= 0:
        return Decision(Outcome.IDLE, "no load recorded on the routed shards", loads)
    decision = Decision(Outcome.BALANCED, "", loads)
    mean, heaviest, ratio = decision.mean, decision.heaviest, decision.ratio
    assert heaviest is not None
    top = loads[heaviest]
    if ratio <= policy.threshold:
        reason = f"shard {heaviest} is at {ratio:.2f}x the mean, within the threshold {policy.threshold:g}x"
        return Decision(Outcome.BALANCED, reason, loads)
    skipped = [
        Skip(c.pair, c.shard_id, c.load, frozen[c.pair])
        for c in candidates
        if c.pair in frozen and c.shard_id == heaviest
    ]
    if policy.max_moves <= 0:
        reason = f"shard {heaviest} is at {ratio:.2f}x the mean, but the move budget is spent"
        return Decision(Outcome.BUDGET, reason, loads, skipped=tuple(skipped))
    movable = [c for c in candidates if c.pair not in frozen]
    plan = propose(loads, movable, tolerance=policy.settle - 1.0, max_moves=policy.max_moves)
    after = dict(loads)
    for move in plan:
        after[move.source] -= move.load
        after[move.target] += move.load
    lowered = top - max(after.values())
    # Pairs above the fair share on the hot shard: when the plan does not pay they are why (the
    # plan may have chosen one of them), and when it does, those it leaves are worth saying.
    giants = [c for c in movable if c.shard_id == heaviest and c.load > mean]

    def alone(c: PairLoad) -> Skip:
        why = (
            f"carries {c.load:.3g} alone, above the fair share {mean:.3g}: no shard would end "
            "lighter than its own with it"
        )
        return Skip(c.pair, c.shard_id, c.load, why)

    if not plan or lowered < policy.min_improvement * top:
        skipped += [alone(c) for c in giants]
        why = (
            f"pair ({giants[0].pair.low}, {giants[0].pair.high}) alone carries {giants[0].load:.3g} of its "
            f"{top:.3g}"
            if giants
            else "no candidate pair fits"
        )
        reason = (
            f"shard {heaviest} is at {ratio:.2f}x the mean, but no moves lower it by "
            f"{policy.min_improvement:.0%} ({why})"
        )
        return Decision(Outcome.UNHELPABLE, reason, loads, skipped=tuple(skipped))
    moved = {m.pair for m in plan}
    skipped += [alone(c) for c in giants if c.pair not in moved]
    reason = (
        f"shard {heaviest} is at {ratio:.2f}x the mean (threshold {policy.threshold:g}x); "
        f"{len(plan)} move(s) bring the heaviest shard to {max(after.values()) / mean:.2f}x"
    )
    return Decision(Outcome.MOVES, reason, loads, tuple(plan), tuple(skipped))


def moves_allowed(moves_last_hour: int, *, per_hour: int, per_round: int) -> int:
    """How many moves a round may make under both budgets."""
    return max(0, min(per_round, per_hour - moves_last_hour))


def pause_after(rows: int, rows_per_second: float) -> float:
    """Seconds to wait after moving `rows` so that moves average at most `rows_per_second`."""
    return rows / rows_per_second if rows_per_second > 0 else 0.0
