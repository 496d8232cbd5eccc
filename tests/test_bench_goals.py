"""`make bench` judges its ratios against the performance goals: pure logic, no servers."""

from __future__ import annotations

from bench.goals import GOALS, judge, render

SEND_ECHO = "send_over_echo_c32"
SEND_PGBENCH = "send_c32_over_pgbench_insert_c32"


def _ratios(per_round: list[dict[str, float]], medians: dict[str, float]) -> dict[str, object]:
    return {**medians, "per_round": per_round}


def _by_goal(verdicts: list[dict[str, object]]) -> dict[str, dict[str, object]]:
    return {str(v["ratio"]): v for v in verdicts}


def test_a_goal_is_met_by_its_median_and_the_rounds_that_met_it_are_counted() -> None:
    per_round = [
        {
            SEND_ECHO: 0.631,
            SEND_PGBENCH: 0.304,
            "deep_over_first_page_p50": 1.06,
            "deep_over_first_page_p99": 1.54,
        },
        {
            SEND_ECHO: 0.469,
            SEND_PGBENCH: 0.298,
            "deep_over_first_page_p50": 1.10,
            "deep_over_first_page_p99": 1.21,
        },
        {
            SEND_ECHO: 0.461,
            SEND_PGBENCH: 0.311,
            "deep_over_first_page_p50": 0.98,
            "deep_over_first_page_p99": 0.69,
        },
    ]
    medians = {
        SEND_ECHO: 0.469,
        SEND_PGBENCH: 0.304,
        "deep_over_first_page_p50": 1.06,
        "deep_over_first_page_p99": 1.21,
    }
    verdicts = _by_goal(judge(_ratios(per_round, medians), per_round, 32, 32))

    assert verdicts[SEND_ECHO] | {} == {
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
    assert (
        verdicts["deep_over_first_page_p50"]["met"],
        verdicts["deep_over_first_page_p50"]["rounds_met"],
    ) == (True, 3)
    assert (
        verdicts["deep_over_first_page_p99"]["met"],
        verdicts["deep_over_first_page_p99"]["rounds_met"],
    ) == (False, 1)


def test_the_bound_itself_meets_the_goal() -> None:
    per_round = [
        {
            SEND_ECHO: 0.60,
            SEND_PGBENCH: 0.25,
            "deep_over_first_page_p50": 1.2,
            "deep_over_first_page_p99": 1.2,
        }
    ]
    verdicts = judge(_ratios(per_round, per_round[0]), per_round, 32, 32)
    assert [v["met"] for v in verdicts] == [True] * len(GOALS)


def test_throughput_goals_are_not_judged_at_another_concurrency() -> None:
    """A run at 8 in flight says nothing about the goals at 32; the page-depth goals still count."""
    per_round = [
        {
            "send_over_echo_c8": 0.9,
            "send_c8_over_pgbench_insert_c8": 0.9,
            "deep_over_first_page_p50": 1.5,
            "deep_over_first_page_p99": 1.0,
        }
    ]
    verdicts = _by_goal(judge(_ratios(per_round, per_round[0]), per_round, 8, 8))
    for key in ("send_over_echo_c8", "send_c8_over_pgbench_insert_c8"):
        assert (verdicts[key]["met"], verdicts[key]["rounds_met"], verdicts[key]["median"]) == (
            None,
            None,
            0.9,
        )
    assert verdicts["deep_over_first_page_p50"]["met"] is False
    assert verdicts["deep_over_first_page_p99"]["met"] is True
    # The ratio at 32 with pgbench at 8 clients is not the goal either.
    mixed = [{"send_over_echo_c32": 0.7, "send_c32_over_pgbench_insert_c8": 0.3}]
    assert all(v["met"] is None for v in judge(_ratios(mixed, mixed[0]), mixed, 32, 8)[:2])


def test_the_verdicts_print_as_one_line_each() -> None:
    per_round = [
        {SEND_ECHO: 0.55, SEND_PGBENCH: 0.3, "deep_over_first_page_p50": 1.0, "deep_over_first_page_p99": 1.0}
    ]
    lines = render(judge(_ratios(per_round, per_round[0]), per_round, 32, 32))
    assert len(lines) == 1 + len(GOALS)
    assert (
        "SendMessage / echo at 32 in flight >= 0.60" in lines[1]
        and "0.550  NOT met (0 of 1 rounds)" in lines[1]
    )
    assert lines[2].endswith("0.300  met (1 of 1 rounds)")
    unjudged = render(judge(_ratios(per_round, per_round[0]), per_round, 16, 32))
    assert "not judged" in unjudged[1] and "0.550" not in unjudged[1]
