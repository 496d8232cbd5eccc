"""When to retry a failed call and how long to wait: pure logic shared by the sync and async clients.

A logical call has one overall deadline. Each attempt gets what remains of it (or less, with
`RetryPolicy.attempt_timeout`); between attempts the client waits an exponential backoff with
full jitter, or the server's `RetryInfo` delay when it sent one, and never past the deadline.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from client._errors import DialogShardError


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How a client retries; `RetryPolicy(max_attempts=1)` turns retries off."""

    #: Attempts per logical call, the first one included.
    max_attempts: int = 5
    #: Upper bound of the first backoff, in seconds.
    initial_backoff: float = 0.05
    #: Upper bound of any backoff, in seconds.
    max_backoff: float = 2.0
    #: Growth of the backoff bound per attempt.
    multiplier: float = 2.0
    #: Deadline of one attempt in seconds; None gives each attempt all the time that is left.
    #: Set it to retry an attempt that hangs (only calls that are safe to repeat are retried then).
    attempt_timeout: float | None = None

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if not 0 <= self.initial_backoff <= self.max_backoff:
            raise ValueError("backoffs must satisfy 0 <= initial_backoff <= max_backoff")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be at least 1, got {self.multiplier}")
        if self.attempt_timeout is not None and self.attempt_timeout <= 0:
            raise ValueError(f"attempt_timeout must be positive seconds, got {self.attempt_timeout}")

    def backoff(self, retry_number: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, min(max_backoff, initial * multiplier**(n-1))] for retry n >= 1."""
        bound = min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry_number - 1))
        return rng.uniform(0.0, bound)


def is_retryable(error: DialogShardError, *, safe_to_repeat: bool) -> bool:
    """Whether another attempt may succeed without harm.

    UNAVAILABLE means the server (or a shard behind it) could not serve the call; every call
    retries it. DEADLINE_EXCEEDED of one attempt may mean the call took effect, so only calls
    that are safe to repeat (reads, and SendMessage with its request_id) retry it.
    RESOURCE_EXHAUSTED is retried only when the server said when (RetryInfo, e.g. a rate limit).
    """
    if error.code == grpc.StatusCode.UNAVAILABLE:
        return True
    if error.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return safe_to_repeat
    if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return error.retry_delay is not None
    return False


class Attempts:
    """The retry bookkeeping of one logical call with an overall deadline of `timeout` seconds."""

    def __init__(
        self,
        policy: RetryPolicy,
        timeout: float | None,
        *,
        safe_to_repeat: bool,
        rng: random.Random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._policy = policy
        self._clock = clock
        self._deadline = None if timeout is None else clock() + timeout
        self._safe = safe_to_repeat
        self._rng = rng
        #: Attempts started so far.
        self.count = 0

    def next_timeout(self) -> float | None:
        """Start an attempt: its gRPC timeout (None: no deadline)."""
        self.count += 1
        remaining = None if self._deadline is None else max(0.0, self._deadline - self._clock())
        limit = self._policy.attempt_timeout
        if limit is None:
            return remaining
        return limit if remaining is None else min(limit, remaining)

    def delay_before_retry(self, error: DialogShardError) -> float | None:
        """Seconds to wait before the next attempt, or None to give up and raise `error`."""
        if self.count >= self._policy.max_attempts or not is_retryable(error, safe_to_repeat=self._safe):
            return None
        delay = self._policy.backoff(self.count, self._rng)
        if error.retry_delay is not None:
            # The server knows best when it can serve again (e.g. a shard's breaker, a rate limit).
            delay = error.retry_delay
        if self._deadline is not None and self._clock() + delay >= self._deadline:
            return None  # waiting would use up the caller's deadline: report the real failure now
        return delay
