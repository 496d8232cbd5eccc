"""`make bench` judges its ratios against the performance goals: pure logic, no servers."""

from __future__ import annotations

from typing import Any

from bench.goals import GOALS, judge, render

SEND_ECHO = "send_over_echo_c32"
SEND_PGBENCH = "send_c32_over_pgbench_insert_c32"
DEEP_P50 = "deep_over_first_page_p50"
DEEP_P99 = "deep_over_first_page_p99"


def _ratios(
    send_echo: float, send_pgbench: float, deep_p50: float, deep_p99: float, c: int = 32
) -> dict[str, float]:
    """One round's ratios (or their medians) as `make bench` names them, at `c` in flight."""
    return {
        f"send_over_echo_c{c}": send_echo,
        f"send_c{c}_over_pgbench_insert_c{c}": send_pgbench,
        DEEP_P50: deep_p50,
        DEEP_P99: deep_p99,
    }


def _judge(
    medians: dict[str, float], per_round: list[dict[str, float]], c: int = 32, p: int = 32
) -> dict[str, Any]:
    """The verdicts by ratio name."""
    return {v["ratio"]: v for v in judge({**medians, "per_round": per_round}, c, p)}


def test_a_goal_is_met_by_its_median_and_the_rounds_that_met_it_are_counted() -> None:
    per_round = [
        _ratios(0.631, 0.304, 1.06, 1.54),
        _ratios(0.469, 0.298, 1.10, 1.21),
        _ratios(0.461, 0.311, 0.98, 0.69),
    ]
    verdicts = _judge(_ratios(0.469, 0.304, 1.06, 1.21), per_round)

    assert verdicts[SEND_ECHO] == {
        "goal": "SendMessage / echo at 32 in flight",
        "ratio": SEND_ECHO,
        "condition": ">= 0.60",
        "median": 0.469,
        "met": False,
        "rounds_met": 1,
        "rounds": 3,
    }
    assert (verdicts[SEND_PGBENCH]["met"], verdicts[SEND_PGBENCH]["rounds_met"]) == (True, 3)
    # Latency goals are upper bounds: 1.06 is within 1.2x, 1.21 is not.
    assert (verdicts[DEEP_P50]["met"], verdicts[DEEP_P50]["rounds_met"]) == (True, 3)
    assert (verdicts[DEEP_P99]["met"], verdicts[DEEP_P99]["rounds_met"]) == (False, 1)


def test_the_bound_itself_meets_the_goal() -> None:
    at_bounds = _ratios(0.60, 0.25, 1.2, 1.2)
    assert [v["met"] for v in _judge(at_bounds, [at_bounds]).values()] == [True] * len(GOALS)


def test_throughput_goals_are_not_judged_at_another_concurrency() -> None:
    """A run at 8 in flight says nothing about the goals at 32; the page-depth goals still count."""
    at_8 = _ratios(0.9, 0.9, 1.5, 1.0, c=8)
    verdicts = _judge(at_8, [at_8], c=8, p=8)
    for key in ("send_over_echo_c8", "send_c8_over_pgbench_insert_c8"):
        assert (verdicts[key]["met"], verdicts[key]["rounds_met"], verdicts[key]["median"]) == (
            None,
            None,
            0.9,
        )
    assert verdicts[DEEP_P50]["met"] is False
    assert verdicts[DEEP_P99]["met"] is True
    # The ratio at 32 in flight against pgbench at 8 clients is not the goal either.
    mixed = {"send_over_echo_c32": 0.7, "send_c32_over_pgbench_insert_c8": 0.3}
    assert [v["met"] for v in _judge(mixed, [mixed], c=32, p=8).values()][:2] == [None, None]


def test_the_verdicts_print_as_one_line_each() -> None:
    ratios = _ratios(0.55, 0.3, 1.0, 1.0)
    lines = render(list(_judge(ratios, [ratios]).values()))
    assert len(lines) == 1 + len(GOALS)
    assert "SendMessage / echo at 32 in flight >= 0.60" in lines[1]
    assert "0.550  NOT met (0 of 1 rounds)" in lines[1]
    assert lines[2].endswith("0.300  met (1 of 1 rounds)")
    # Measured at 16 in flight: the ratio exists, but is not printed under a label saying 32.
    at_16 = _ratios(0.55, 0.3, 1.0, 1.0, c=16)
    unjudged = render(list(_judge(at_16, [at_16], c=16, p=16).values()))
    assert "not judged" in unjudged[1] and "0.550" not in unjudged[1]
