"""The one way to a shard's database: circuit breaker, deadline, retries and error mapping.

Every statement a `MessageStore` runs goes through `ShardGate.run(op)`:

1. the breaker admits the call (or it fails at once with UNAVAILABLE and a retry hint);
2. the pool wait and the statement share a budget: the RPC's remaining deadline, at most the
   configured statement ceiling (the pool's connections also carry that ceiling as their
   server-side `statement_timeout`, so a statement never outlives it even if a cancel is lost);
3. the attempt runs in its own task: when the budget runs out or the RPC is cancelled, the caller
   is answered at once while the task cancels the statement on the server (psycopg sends a cancel
   request on asyncio cancellation) and hands the connection back, in the background. A hung
   server thus costs the caller its budget, not the driver's cancellation timeouts on top;
4. transient failures are retried with full-jitter backoff while the deadline leaves room, but a
   statement whose outcome is unknown (the connection broke after it was sent) only when the
   caller says it is idempotent;
5. a statement refused because its dialog is moving (server.storage.fences) is DialogMoving,
   and does not count against the shard;
6. each outcome is reported to the breaker, and a failure wakes the shard's monitor, which probes
   the server right away and opens the breaker if the probe fails too;
7. when the monitor declares the server down or hung (`declare_down`), every call waiting on it
   gets UNAVAILABLE at once instead of at its deadline or the statement ceiling.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from server.config import ResilienceConfig
from server.errors import CONTROL_SHARD, DeadlineExceeded, DialogMoving, ShardUnavailable, unavailable
from server.resilience.breaker import BreakerState, CircuitBreaker
from server.resilience.db_errors import FENCED_SQLSTATE, describe_db_error
from server.resilience.deadline import remaining
from server.resilience.retry import backoff, is_shard_failure, is_transient, may_have_run

log = logging.getLogger(__name__)

T = TypeVar("T")
Operation = Callable[[AsyncConnection[Any]], Awaitable[T]]

#: The budget of `ShardGate.guard`'s work: none of its own (a day), the caller's deadline applies.
_NO_CEILING = 86400.0
#: Smallest retry hint sent to callers, in seconds.
_MIN_RETRY_AFTER = 0.1
#: Tasks left behind to finish a cancellation; referenced so they are not garbage-collected.
_background: set[asyncio.Task[Any]] = set()


def _forget(task: asyncio.Task[Any]) -> None:
    _background.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log "exception was never retrieved"


def abandon(task: asyncio.Task[Any]) -> None:
    """Cancel `task` without waiting for it; it finishes (and releases what it holds) on its own."""
    if task.done():
        _forget(task)
        return
    task.cancel()
    _background.add(task)
    task.add_done_callback(_forget)


class Interrupted(Exception):
    """The wait of `within` was ended by its `interrupt` future, not by the work or the budget."""


async def within(
    budget: float, work: Coroutine[Any, Any, T], *, interrupt: asyncio.Future[None] | None = None
) -> T:
    """`work` in its own task, bounded by `budget` seconds without waiting for its cancellation.

    Raises TimeoutError when the budget runs out first, Interrupted when `interrupt` completes
    first. Whatever ends the wait early (the budget, the interrupt, or the caller being
    cancelled), the task is cancelled and left to finish on its own. (The same as
    `asyncio.timeout` around `asyncio.shield(task)`, with one future and one timer instead of
    their per-call machinery: every statement of the service goes through here.)
    """
    loop = asyncio.get_running_loop()
    task = loop.create_task(work)
    waiter = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    task.add_done_callback(wake)
    if interrupt is not None:
        interrupt.add_done_callback(wake)
    timer = loop.call_later(budget, wake)
    try:
        await waiter
    except BaseException:
        abandon(task)
        raise
    finally:
        timer.cancel()
        task.remove_done_callback(wake)
        if interrupt is not None:
            interrupt.remove_done_callback(wake)
    if not task.done():
        abandon(task)
        if interrupt is not None and interrupt.done():
            raise Interrupted
        raise TimeoutError
    return task.result()


class ShardGate:
    """One database endpoint of a shard (its primary or a replica): pool, breaker and call policy."""

    def __init__(
        self,
        shard_id: int,
        pool: AsyncConnectionPool[Any],
        resilience: ResilienceConfig,
        *,
        acquire_timeout: float,
        role: str = "primary",
        location: str = "",
        ready: bool = True,
    ) -> None:
        self.shard_id = shard_id
        #: How logs name the endpoint's database: `shard 2`, or `the control database`.
        self.name = "the control database" if shard_id == CONTROL_SHARD else f"shard {shard_id}"
        #: The same in one word, for connection and task names: `shard-2`, `control`.
        self.tag = "control" if shard_id == CONTROL_SHARD else f"shard-{shard_id}"
        self.pool = pool
        self.role = role
        self.location = location
        self.breaker = CircuitBreaker(
            failure_threshold=resilience.failure_threshold,
            open_seconds=resilience.open_seconds,
            opened=not ready,
        )
        #: False until the endpoint was reached once (and, for a primary, its schema applied).
        self.ready = ready
        #: Why the last call or probe failed, for UNAVAILABLE messages and the admin API.
        self.last_error: str | None = None if ready else "not reachable since startup"
        self._resilience = resilience
        self._acquire_timeout = acquire_timeout
        self._wake_monitor: Callable[[], None] = lambda: None
        # Completed when the monitor declares the endpoint down: wakes every call waiting on it.
        # A fresh one is made by the first call after that.
        self._down: asyncio.Future[None] | None = None

    def on_failure(self, wake: Callable[[], None]) -> None:
        """Call `wake` after every failed call (the monitor then probes the server at once)."""
        self._wake_monitor = wake

    @property
    def available(self) -> bool:
        """Calls are let through (the breaker is not open and the endpoint was reached once)."""
        return self.ready and self.breaker.state is not BreakerState.OPEN

    @property
    def healthy(self) -> bool:
        """Reached and not recovering: the breaker closed, not just letting a trial call through."""
        return self.ready and self.breaker.state is BreakerState.CLOSED

    def declare_down(self, cause: str) -> None:
        """The server is down or hung (the monitor's verdict): open the breaker, fail waiting calls."""
        self.last_error = cause
        self.breaker.trip()
        if self._down is not None and not self._down.done():
            self._down.set_result(None)

    def _down_signal(self) -> asyncio.Future[None]:
        if self._down is None or self._down.done():
            self._down = asyncio.get_running_loop().create_future()
        return self._down

    def unavailable(self, cause: str | None = None) -> ShardUnavailable:
        """The error a refused or failed call raises, with a retry hint from the breaker."""
        hint = self.breaker.retry_after() or self._resilience.open_seconds
        return unavailable(
            self.shard_id,
            cause or self.last_error or "circuit breaker open",
            retry_after_seconds=max(_MIN_RETRY_AFTER, hint),
        )

    async def run(self, op: Operation[T], *, idempotent: bool) -> T:
        """Run `op` on a pooled connection under the policy above; returns its result."""
        attempt = 0
        while True:
            attempt += 1
            trial = self.breaker.admit() if self.ready else None
            if trial is None:
                raise self.unavailable()
            budget, by_deadline = remaining(self._resilience.statement_timeout)
            if budget <= 0:
                if trial:
                    self.breaker.release_trial()
                raise DeadlineExceeded("the call's deadline passed before the shard was reached")
            try:
                result = await within(budget, self._attempt(op, budget), interrupt=self._down_signal())
            except Interrupted:
                # The monitor found the server down or hung while this call waited on it; the
                # breaker is open already, so this is no further evidence against the shard.
                if trial:
                    self.breaker.release_trial()
                raise self.unavailable() from None
            except TimeoutError:
                if by_deadline:
                    # The caller's own deadline: not evidence against the shard (unless it repeats,
                    # which the monitor's probe then sees).
                    if trial:
                        self.breaker.release_trial()
                    self._wake_monitor()
                    raise DeadlineExceeded(
                        f"shard {self.shard_id} did not answer within the deadline"
                    ) from None
                self._failed(f"no answer within {budget:.1f}s")
                raise self.unavailable(f"no answer within {budget:.1f}s") from None
            except asyncio.CancelledError:
                if trial:
                    self.breaker.release_trial()
                raise
            except Exception as exc:
                if isinstance(exc, psycopg.Error) and exc.sqlstate == FENCED_SQLSTATE:
                    self._succeeded()
                    raise DialogMoving(self.shard_id) from None
                if not is_transient(exc):
                    self._succeeded()  # the server answered; the statement was refused
                    raise
                cause = describe_db_error(exc)
                if is_shard_failure(exc):
                    self._failed(cause)
                elif trial:
                    self.breaker.release_trial()
                delay = backoff(
                    attempt, base=self._resilience.retry_backoff, maximum=self._resilience.retry_backoff_max
                )
                left, _ = remaining(self._resilience.statement_timeout)
                retry = (
                    attempt < self._resilience.retry_attempts
                    and (idempotent or not may_have_run(exc))
                    and self.breaker.state is not BreakerState.OPEN
                    and left > delay
                )
                if not retry:
                    raise self.unavailable(cause) from exc
                log.debug(
                    "shard %d %s: retrying after %s (attempt %d)", self.shard_id, self.role, cause, attempt
                )
                await asyncio.sleep(delay)
            else:
                self._succeeded()
                return result

    async def guard(self, work: Coroutine[Any, Any, T]) -> T:
        """Run `work`, which uses the pool (or its own connections) its own way, under the breaker.

        For long or multi-statement work that does not fit `run`'s statement ceiling (a move, with
        its locks and transactions in the control database): refused at once while the breaker is
        open, and answered with UNAVAILABLE as soon as the monitor declares the endpoint down or
        hung while it runs (the work's task is then cancelled in the background; a move shields its
        own steps and stays recorded for a re-run). An UNAVAILABLE of this endpoint raised by the
        work counts against it and wakes the monitor. No deadline is added: the caller's applies.
        """
        trial = self.breaker.admit() if self.ready else None
        if trial is None:
            work.close()
            raise self.unavailable()
        try:
            result = await within(_NO_CEILING, work, interrupt=self._down_signal())
        except Interrupted:
            if trial:
                self.breaker.release_trial()
            raise self.unavailable() from None
        except ShardUnavailable as exc:
            if exc.shard_id == self.shard_id:
                self._failed(exc.message)
            elif trial:
                self.breaker.release_trial()
            raise
        except BaseException:
            if trial:
                self.breaker.release_trial()
            raise
        self._succeeded()
        return result

    async def _attempt(self, op: Operation[T], budget: float) -> T:
        async with self.pool.connection(timeout=min(self._acquire_timeout, budget)) as conn:
            return await op(conn)

    def _succeeded(self) -> None:
        if self.breaker.state is not BreakerState.CLOSED or self.breaker.consecutive_failures:
            self.breaker.record_success()

    def _failed(self, cause: str) -> None:
        self.last_error = cause
        self.breaker.record_failure()
        self._wake_monitor()
