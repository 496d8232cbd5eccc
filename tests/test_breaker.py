"""The circuit breaker's transitions and the retry policy's pure parts, on a fake clock."""

from __future__ import annotations

import random

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import PoolTimeout

from server.resilience.breaker import BreakerState, CircuitBreaker
from server.resilience.retry import backoff, is_shard_failure, is_transient, may_have_run


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def state_of(breaker: CircuitBreaker) -> BreakerState:
    """The breaker's state, read through a call: mypy would carry the narrowing of an earlier
    `assert breaker.state is ...` across the record_*() calls that change it."""
    return breaker.state


def test_opens_after_consecutive_failures_only() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=3, open_seconds=2.0, clock=clock)
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # a success in between resets the count
    breaker.record_failure()
    breaker.record_failure()
    assert state_of(breaker) is BreakerState.CLOSED and breaker.admit() is False
    breaker.record_failure()
    assert state_of(breaker) is BreakerState.OPEN and breaker.trips == 1
    assert breaker.admit() is None
    assert breaker.retry_after() == 2.0


def test_half_open_admits_one_trial_whose_outcome_decides() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, open_seconds=2.0, clock=clock)
    breaker.record_failure()
    clock.now += 1.5
    assert state_of(breaker) is BreakerState.OPEN and abs(breaker.retry_after() - 0.5) < 1e-9
    clock.now += 0.5
    assert state_of(breaker) is BreakerState.HALF_OPEN
    assert breaker.admit() is True  # the trial
    assert breaker.admit() is None  # only one at a time
    breaker.record_failure()  # the trial failed: open again, for a whole cool-down
    assert state_of(breaker) is BreakerState.OPEN and breaker.retry_after() == 2.0
    assert breaker.trips == 1  # re-opening is not a new trip
    clock.now += 2.0
    assert breaker.admit() is True
    breaker.release_trial()  # cancelled: tells nothing, the next caller may try
    assert breaker.admit() is True
    breaker.record_success()
    assert state_of(breaker) is BreakerState.CLOSED and breaker.admit() is False


def test_starts_open_for_a_shard_down_at_startup_and_trip_restarts_cool_down() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=5, open_seconds=1.0, opened=True, clock=clock)
    assert state_of(breaker) is BreakerState.OPEN and breaker.trips == 0
    clock.now += 0.9
    breaker.trip()  # a failed probe
    clock.now += 0.9
    assert state_of(breaker) is BreakerState.OPEN


def test_error_classes() -> None:
    lost = psycopg.OperationalError("server closed the connection unexpectedly")
    shutdown = pg_errors.AdminShutdown("terminating connection due to administrator command")
    serialization = pg_errors.SerializationFailure("could not serialize access")
    refused = pg_errors.UniqueViolation("duplicate key")
    assert is_shard_failure(lost) and is_shard_failure(shutdown) and is_shard_failure(PoolTimeout())
    assert not is_shard_failure(serialization) and is_transient(serialization)
    assert not is_transient(refused)
    # Only errors raised before the statement was sent, or that rolled it back, have a known outcome.
    assert may_have_run(lost) and may_have_run(shutdown)
    assert not may_have_run(PoolTimeout()) and not may_have_run(serialization)


def test_backoff_is_full_jitter_under_a_growing_cap() -> None:
    rng = random.Random(7)
    for attempt, cap in ((1, 0.05), (2, 0.1), (3, 0.2), (8, 1.0)):
        delays = [backoff(attempt, base=0.05, maximum=1.0, rng=rng) for _ in range(200)]
        assert all(0 <= d <= cap for d in delays)
        assert max(delays) > cap * 0.8 and min(delays) < cap * 0.2
