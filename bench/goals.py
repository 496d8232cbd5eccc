"""The performance goals `make bench` is held to, judged on each run's own ratios.

The goals (SendMessage at 32 in flight at least 60% of the echo ceiling and 25% of pgbench's
INSERT rate at 32 clients; a page 99,900 messages deep within 1.2x the first page's latency) are
ratios, so a run on a slow or busy machine can still judge them. A verdict gives the median over
rounds against the threshold *and* how many single rounds met it: on a shared 2-core machine the
rounds of one run spread wider than a median's distance to its threshold (docs/performance-history.md,
"The goals, run by run"), and a reader should see that spread instead of a bare yes or no.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: In-flight requests (and pgbench clients) the throughput goals are stated at.
GOAL_CONCURRENCY = 32


@dataclass(frozen=True)
class Goal:
    """A ratio of `make bench` and the bound it must keep."""

    label: str
    #: Key in the result's `ratios` (`{c}`: the ratio concurrency, `{p}`: the pgbench client count).
    ratio_key: str
    bound: float
    #: True: the ratio must be at least `bound`; False: at most.
    at_least: bool
    #: Whether the ratio only means the goal when measured at GOAL_CONCURRENCY.
    needs_goal_concurrency: bool = True

    def key(self, concurrency: int, pgbench_clients: int) -> str:
        return self.ratio_key.format(c=concurrency, p=pgbench_clients)

    def meets(self, value: float) -> bool:
        return value >= self.bound if self.at_least else value <= self.bound

    @property
    def condition(self) -> str:
        return f"{'>=' if self.at_least else '<='} {self.bound:.2f}"


GOALS = (
    Goal("SendMessage / echo at 32 in flight", "send_over_echo_c{c}", 0.60, at_least=True),
    Goal("SendMessage / pgbench INSERT at 32", "send_c{c}_over_pgbench_insert_c{p}", 0.25, at_least=True),
    Goal(
        "deep page / first page, p50 latency",
        "deep_over_first_page_p50",
        1.2,
        at_least=False,
        needs_goal_concurrency=False,
    ),
    Goal(
        "deep page / first page, p99 latency",
        "deep_over_first_page_p99",
        1.2,
        at_least=False,
        needs_goal_concurrency=False,
    ),
)


def judge(
    ratios: Mapping[str, Any],
    concurrency: int,
    pgbench_clients: int,
    goals: Sequence[Goal] = GOALS,
) -> list[dict[str, Any]]:
    """A verdict per goal from a run's `ratios` (medians, and each round's under `per_round`).

    `met` is None when this run did not measure what the goal names.
    """
    per_round: Sequence[Mapping[str, float]] = ratios.get("per_round", ())
    verdicts = []
    for goal in goals:
        key = goal.key(concurrency, pgbench_clients)
        median = ratios.get(key)
        measured = median is not None and (
            not goal.needs_goal_concurrency or concurrency == pgbench_clients == GOAL_CONCURRENCY
        )
        rounds = [r[key] for r in per_round if r.get(key) is not None]
        verdicts.append(
            {
                "goal": goal.label,
                "ratio": key,
                "condition": goal.condition,
                "median": median,
                "met": goal.meets(median) if measured and median is not None else None,
                "rounds_met": sum(goal.meets(v) for v in rounds) if measured else None,
                "rounds": len(rounds),
            }
        )
    return verdicts


def render(verdicts: Sequence[Mapping[str, Any]]) -> list[str]:
    """The verdicts as table lines (under a heading)."""
    lines = ["goals (median over rounds; single rounds that met it):"]
    for v in verdicts:
        if v["met"] is None:
            outcome = f"not judged: this run did not measure it at {GOAL_CONCURRENCY} in flight"
        else:
            outcome = f"{'met' if v['met'] else 'NOT met'} ({v['rounds_met']} of {v['rounds']} rounds)"
        # An unjudged ratio is missing or was measured at another concurrency than the label names.
        median = "-" if v["met"] is None else f"{v['median']:.3f}"
        lines.append(f"  {v['goal'] + ' ' + v['condition']:<48}{median:>7}  {outcome}")
    return lines
