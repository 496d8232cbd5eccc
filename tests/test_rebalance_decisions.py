"""The rebalancer's decisions (server.routing.rebalance.decide): pure, so every rule is tested here
directly: the threshold and its hysteresis, budgets, frozen pairs, a pair above the fair share."""

from __future__ import annotations

from server.routing import Pair
from server.routing.rebalance import (
    Decision,
    Outcome,
    PairLoad,
    Policy,
    attribute,
    decide,
    moves_allowed,
    pause_after,
)


def _apply(loads: dict[int, float], pairs: list[PairLoad], decision: Decision) -> list[PairLoad]:
    """The loads and pairs after the decision's moves, as the next round sees them."""
    moved = {m.pair: m for m in decision.moves}
    for move in decision.moves:
        loads[move.source] -= move.load
        loads[move.target] += move.load
    return [PairLoad(p.pair, moved[p.pair].target, p.load) if p.pair in moved else p for p in pairs]


def _hot_shard() -> tuple[dict[int, float], list[PairLoad]]:
    """Issue 24's test: 14 pairs of 90 on shard 0, 20 pairs of 5 spread over the others."""
    pairs = [PairLoad(Pair(i, i + 1000), 0, 90.0) for i in range(14)]
    pairs += [PairLoad(Pair(100 + i, 2000 + i), 1 + i % 3, 5.0) for i in range(20)]
    loads = {s: sum(p.load for p in pairs if p.shard_id == s) for s in range(4)}
    return loads, pairs


def test_a_shard_within_the_threshold_is_left_alone() -> None:
    loads = {0: 125.0, 1: 100.0, 2: 90.0, 3: 85.0}  # 1.25x the mean, threshold 1.3
    decision = decide(loads, [PairLoad(Pair(1, 2), 0, 40.0)], Policy())
    assert decision.outcome is Outcome.BALANCED and not decision.moves
    assert "within the threshold" in decision.reason


def test_no_load_is_idle() -> None:
    assert decide({0: 0.0, 1: 0.0}, [], Policy()).outcome is Outcome.IDLE


def test_a_hot_shard_gets_within_settle_of_the_mean_by_moving_its_pairs_to_the_light_ones() -> None:
    loads, pairs = _hot_shard()
    decision = decide(loads, pairs, Policy(max_moves=20))
    assert decision.outcome is Outcome.MOVES
    assert all(m.target != 0 for m in decision.moves), "nothing goes onto the hot shard"
    assert sum(1 for m in decision.moves if m.source == 0) >= 9
    _apply(loads, pairs, decision)
    mean = sum(loads.values()) / 4
    assert max(loads.values()) <= 1.1 * mean + 90, "within settle, give or take one pair"
    assert max(loads.values()) <= 1.5 * mean


def test_rounds_converge_and_never_oscillate() -> None:
    loads, pairs = _hot_shard()
    moved_at: dict[Pair, list[int]] = {}
    frozen: dict[Pair, str] = {}
    for round_number in range(12):
        decision = decide(loads, pairs, Policy(max_moves=3), frozen=frozen)
        for move in decision.moves:
            moved_at.setdefault(move.pair, []).append(round_number)
            frozen[move.pair] = "cooling down"
        pairs = _apply(loads, pairs, decision)
    assert all(len(rounds) == 1 for rounds in moved_at.values()), moved_at
    last = max(r for rounds in moved_at.values() for r in rounds)
    assert last < 6, "it settles within a few rounds and then stays put"
    # Without the cool-down too: the loads a round leaves never start another move.
    assert decide(loads, pairs, Policy(max_moves=3)).moves == ()


def test_the_hysteresis_band_starts_nothing() -> None:
    """Above settle but below the threshold: a round that did not start moving does not begin."""
    loads = {0: 128.0, 1: 100.0, 2: 86.0, 3: 86.0}
    assert decide(loads, [PairLoad(Pair(1, 2), 0, 20.0)], Policy()).moves == ()


def test_budgets_limit_the_moves() -> None:
    loads, pairs = _hot_shard()
    assert len(decide(loads, pairs, Policy(max_moves=2)).moves) == 2
    spent = decide(loads, pairs, Policy(max_moves=0))
    assert spent.outcome is Outcome.BUDGET and not spent.moves and "budget" in spent.reason
    assert moves_allowed(28, per_hour=30, per_round=5) == 2
    assert moves_allowed(31, per_hour=30, per_round=5) == 0
    assert moves_allowed(0, per_hour=30, per_round=5) == 5
    assert pause_after(5000, 2500.0) == 2.0


def test_frozen_pairs_stay_and_say_why() -> None:
    loads, pairs = _hot_shard()
    frozen = {pairs[0].pair: "pinned to shard 0 by an operator"}
    decision = decide(loads, pairs, Policy(max_moves=20), frozen=frozen)
    assert pairs[0].pair not in {m.pair for m in decision.moves}
    assert any(s.pair == pairs[0].pair and "operator" in s.reason for s in decision.skipped)


def test_one_pair_above_the_fair_share_is_not_shuffled_around() -> None:
    giant = PairLoad(Pair(1, 2), 0, 1000.0)
    small = [PairLoad(Pair(10 + i, 20 + i), s, 10.0) for s in range(4) for i in range(5 * s, 5 * s + 5)]
    loads = {s: sum(p.load for p in [giant, *small] if p.shard_id == s) for s in range(4)}
    decision = decide(loads, [giant, *small], Policy(max_moves=20))
    assert decision.outcome is Outcome.UNHELPABLE and decision.moves == (), decision
    assert any(s.pair == giant.pair and "fair share" in s.reason for s in decision.skipped)


def test_a_giant_that_only_swaps_places_with_an_empty_shard_is_left_and_named() -> None:
    """The greedy plan may pick the giant for an empty shard; lowering the maximum by 8 of 158
    does not pay, and the reason names the giant, not a lack of candidates."""
    giant = PairLoad(Pair(1, 2), 0, 150.0)
    small = [PairLoad(Pair(10, 11), 0, 4.0), PairLoad(Pair(12, 13), 0, 4.0)]
    small += [PairLoad(Pair(20 + i, 30 + i), 2 + i % 2, 4.0) for i in range(4)]
    loads = {0: 158.0, 1: 0.0, 2: 8.0, 3: 8.0}
    decision = decide(loads, [giant, *small], Policy(max_moves=20))
    assert decision.outcome is Outcome.UNHELPABLE and decision.moves == ()
    assert "(1, 2) alone carries 150" in decision.reason
    assert [s.pair for s in decision.skipped] == [giant.pair]


def test_a_pair_above_the_fair_share_gets_the_least_loaded_shard_when_that_helps() -> None:
    giant = PairLoad(Pair(1, 2), 0, 1000.0)
    others = [PairLoad(Pair(10 + i, 20 + i), 0, 100.0) for i in range(5)]
    others += [PairLoad(Pair(30 + i, 40 + i), 2 + i % 2, 100.0) for i in range(10)]
    loads = {0: 1500.0, 1: 0.0, 2: 500.0, 3: 500.0}
    decision = decide(loads, [giant, *others], Policy(max_moves=20))
    assert decision.moves[0].pair == giant.pair and decision.moves[0].target == 1
    assert decision.outcome is Outcome.MOVES


def test_activity_recorded_before_a_move_counts_where_the_pair_lives_now() -> None:
    moved = Pair(1, 2)
    recorded = {0: 100.0, 1: 10.0}
    pairs = [PairLoad(moved, 0, 60.0), PairLoad(moved, 1, 5.0), PairLoad(Pair(3, 4), 0, 40.0)]
    loads, placed = attribute(recorded, pairs, lambda p: 1 if p == moved else 0)
    assert loads == {0: 40.0, 1: 70.0}
    assert placed == [PairLoad(moved, 1, 65.0), PairLoad(Pair(3, 4), 0, 40.0)]
