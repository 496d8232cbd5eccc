"""Per-user rate limiting: a token bucket per user (pure logic) and the interceptor applying it.

Each user has a bucket of `burst` tokens refilled at `rate` tokens per second;
a call takes one token or is refused with RESOURCE_EXHAUSTED and a RetryInfo
saying when the next token is there. Memory stays bounded: a bucket idle long
enough to be full again is indistinguishable from a new one, so it is dropped,
and beyond `max_keys` buckets the least recently used is dropped as well.

`TokenBucketLimiter` keeps the buckets of one process (a single-process server);
the workers of `dialog-server --workers N` share theirs through
`server.interceptors.shared_buckets.SharedTokenBuckets`, with the same contract (`Limiter`).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Protocol

import grpc

from server.auth import current_principal
from server.errors import ResourceExhausted
from server.interceptors._wrap import CallCheck, Check


class Limiter(Protocol):
    """Per-user token buckets: one process's own, or shared by the workers of a host."""

    rate_per_second: float
    burst: int
    #: Buckets dropped for room before they were full again (those users got a fresh burst early).
    evictions: int

    def acquire(self, key: int) -> float:
        """Take a token for user `key`: 0.0 when allowed, else the seconds until one is there."""
        ...


class TokenBucketLimiter:
    """Token buckets by key; `clock` returns monotonic seconds (injected by tests)."""

    def __init__(
        self,
        *,
        rate_per_second: float,
        burst: int,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_second <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate_per_second must be > 0, burst and max_keys >= 1")
        self.rate_per_second = rate_per_second
        self.burst = burst
        self._max_keys = max_keys
        self._clock = clock
        self._refill_seconds = burst / rate_per_second
        self.evictions = 0
        # key -> (tokens, time of the last update); ordered from least to most recently used.
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def acquire(self, key: Hashable) -> float:
        """Take a token for `key`: 0.0 when allowed, else the seconds until a token is there (none taken)."""
        now = self._clock()
        self._forget_idle(now)
        tokens, updated = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + max(0.0, now - updated) * self.rate_per_second)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate_per_second
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self._max_keys:
            _, (_, dropped) = self._buckets.popitem(last=False)
            if now - dropped < self._refill_seconds:
                self.evictions += 1
        return wait

    def _forget_idle(self, now: float) -> None:
        # The front is the least recently updated bucket; stop at the first one not yet full again.
        while self._buckets:
            _, (_, updated) = next(iter(self._buckets.items()))
            if now - updated < self._refill_seconds:
                return
            self._buckets.popitem(last=False)


class RateLimitInterceptor(CallCheck):
    """Applies a per-user limiter to some methods; must run after the auth interceptor."""

    def __init__(self, limiter: Limiter, methods: frozenset[str]) -> None:
        self._limiter = limiter
        self._methods = methods

    def check(self, method: str) -> Check | None:
        if method not in self._methods:
            return None
        limiter = self._limiter
        name = method.rsplit("/", 1)[-1]

        def limit(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            principal = current_principal.get(None)
            if principal is not None and principal.user_id is not None:
                wait = limiter.acquire(principal.user_id)
                if wait > 0:
                    raise ResourceExhausted(
                        f"too many {name} calls: at most {limiter.rate_per_second:g} per second per user "
                        f"(bursts of {limiter.burst}); retry in {max(wait, 0.001):.3f} s",
                        retry_after_seconds=wait,
                        reason="RATE_LIMITED",
                        metadata={"method": name},
                    )

        return limit
