"""A circuit breaker: closed -> open after consecutive failures -> half-open trial -> closed.

Pure state, no I/O and an injectable clock, so its transitions are unit-tested
exactly. `ShardGate` owns one per shard and reports every call's outcome to it;
`ShardMonitor` probes the shard and closes or re-opens it from the probe's result.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable


class BreakerState(enum.StrEnum):
    """Where a breaker stands; the value is what metrics and the admin API show."""

    #: Calls go through; consecutive failures are counted.
    CLOSED = "closed"
    #: Calls are refused at once until the cool-down has passed.
    OPEN = "open"
    #: The cool-down has passed: one trial call at a time goes through to test the shard.
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Consecutive-failure breaker with a cool-down and one trial call at a time when half-open."""

    def __init__(
        self,
        *,
        failure_threshold: int,
        open_seconds: float,
        opened: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.open_seconds = open_seconds
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = clock() if opened else None
        self._trial_in_flight = False
        #: Times the breaker opened (a counter for metrics).
        self.trips = 0

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._clock() - self._opened_at < self.open_seconds:
            return BreakerState.OPEN
        return BreakerState.HALF_OPEN

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def retry_after(self) -> float:
        """Seconds until the breaker lets a trial call through (0 when it does now)."""
        if self._opened_at is None:
            return 0.0
        return max(0.0, self._opened_at + self.open_seconds - self._clock())

    def admit(self) -> bool | None:
        """May a call go through? None: no; False: yes; True: yes, as the half-open trial call.

        A trial call must end with `record_success`, `record_failure` or `release_trial`.
        """
        state = self.state
        if state is BreakerState.CLOSED:
            return False
        if state is BreakerState.OPEN or self._trial_in_flight:
            return None
        self._trial_in_flight = True
        return True

    def release_trial(self) -> None:
        """The trial call ended without telling anything about the shard (e.g. it was cancelled)."""
        self._trial_in_flight = False

    def record_success(self) -> None:
        """The shard answered: close the breaker."""
        self._failures = 0
        self._opened_at = None
        self._trial_in_flight = False

    def record_failure(self) -> None:
        """The shard failed a call; open after `failure_threshold` in a row, or at once when half-open."""
        self._failures += 1
        if self._opened_at is not None:
            if self.state is BreakerState.HALF_OPEN:
                self.trip()
            return
        if self._failures >= self.failure_threshold:
            self.trip()

    def trip(self) -> None:
        """Open now (or restart the cool-down of an open breaker), e.g. because a probe failed."""
        if self._opened_at is None:
            self.trips += 1
        self._opened_at = self._clock()
        self._trial_in_flight = False
