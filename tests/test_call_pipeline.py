"""The per-call machinery on its own: fused interceptors and the gate's bounded wait (`within`).

Pure asyncio and plain gRPC handler objects, no server: the end-to-end behaviors (deadlines
cancelling statements, auth, metrics, logs) have their own tests against real servers.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import grpc
import pytest

from server.interceptors._wrap import (
    Behavior,
    CallCheck,
    CallInterceptor,
    Check,
    FusedInterceptors,
    Wrapper,
)
from server.resilience.gate import within
from tests.support import wait_until


class Recording(CallInterceptor):
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def wrapper(self, method: str) -> Wrapper:
        def wrap(behavior: Behavior) -> Behavior:
            async def recorded(request: Any, context: Any) -> Any:
                self.log.append(f"{self.name}>")
                result = await behavior(request, context)
                self.log.append(f"<{self.name}")
                return result

            return recorded

        return wrap


class RecordingCheck(CallCheck):
    def __init__(self, name: str, log: list[str], methods: frozenset[str] = frozenset({"/s/M"})) -> None:
        self.name, self.log, self.methods = name, log, methods

    def check(self, method: str) -> Check | None:
        if method not in self.methods:
            return None
        return lambda request, context: self.log.append(self.name)


#: The handlers under test never look at their context.
NO_CONTEXT = cast(grpc.ServicerContext, None)


class Details(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


async def test_fused_interceptors_build_each_handler_once_and_keep_the_order() -> None:
    log: list[str] = []

    async def behavior(request: Any, context: Any) -> Any:
        log.append(f"behavior({request})")
        return request * 2

    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "/s/M": grpc.unary_unary_rpc_method_handler(behavior),
        "/s/ClientStream": grpc.stream_unary_rpc_method_handler(behavior),
    }
    lookups: list[str] = []

    async def continuation(details: grpc.HandlerCallDetails) -> Any:
        lookups.append(details.method)
        return handlers.get(details.method)

    fused = FusedInterceptors(
        [
            Recording("outer", log),
            RecordingCheck("check1", log),
            RecordingCheck("check2", log),
            Recording("middle", log),
            RecordingCheck("check3", log),
            RecordingCheck("elsewhere", log, frozenset({"/s/Other"})),
        ]
    )
    first = await fused.intercept_service(continuation, Details("/s/M"))
    again = await fused.intercept_service(continuation, Details("/s/M"))
    assert first is again and lookups == ["/s/M"]
    assert first is not None and first.unary_unary is not None
    assert await first.unary_unary(21, NO_CONTEXT) == 42
    # The same order as the interceptors one by one; checks of other methods do not run.
    assert log == ["outer>", "check1", "check2", "middle>", "check3", "behavior(21)", "<middle", "<outer"]
    # Client streams and unknown methods pass through untouched, looked up each time.
    client_stream = await fused.intercept_service(continuation, Details("/s/ClientStream"))
    assert client_stream is handlers["/s/ClientStream"]
    assert await fused.intercept_service(continuation, Details("/s/Nope")) is None
    assert await fused.intercept_service(continuation, Details("/s/Nope")) is None
    assert lookups == ["/s/M", "/s/ClientStream", "/s/Nope", "/s/Nope"]


class Writes:
    """The one part of a servicer context a wrapped stream uses: `write`."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    async def write(self, response: Any) -> None:
        self.log.append(f"write({response})")


async def test_a_server_stream_is_wrapped_like_a_unary_call_and_writes_each_response() -> None:
    log: list[str] = []

    async def stream(request: Any, context: Any) -> Any:
        log.append("stream")
        for n in range(request):
            yield n

    async def continuation(details: grpc.HandlerCallDetails) -> Any:
        return grpc.unary_stream_rpc_method_handler(stream)

    fused = FusedInterceptors([Recording("outer", log), RecordingCheck("check", log, frozenset({"/s/S"}))])
    handler = await fused.intercept_service(continuation, Details("/s/S"))
    assert handler is not None and handler.unary_stream is not None and handler.unary_unary is None
    # The whole stream runs inside the wrappers: the outer one ends after the last response.
    # Wrapped, the stream is a coroutine that writes its responses (the stubs type it an iterator).
    assert (
        await cast(Behavior, handler.unary_stream)(2, cast(grpc.aio.ServicerContext[Any, Any], Writes(log)))
        is None
    )
    assert log == ["outer>", "check", "stream", "write(0)", "write(1)", "<outer"]


async def test_a_failing_check_refuses_a_stream_before_its_first_response() -> None:
    log: list[str] = []

    class Refusing(CallCheck):
        def check(self, method: str) -> Check:
            def refuse(request: Any, context: Any) -> None:
                raise PermissionError("no")

            return refuse

    async def stream(request: Any, context: Any) -> Any:
        log.append("stream")
        yield 1

    async def continuation(details: grpc.HandlerCallDetails) -> Any:
        return grpc.unary_stream_rpc_method_handler(stream)

    handler = await FusedInterceptors([Refusing()]).intercept_service(continuation, Details("/s/S"))
    assert handler is not None and handler.unary_stream is not None
    with pytest.raises(PermissionError):
        await cast(Behavior, handler.unary_stream)(
            None, cast(grpc.aio.ServicerContext[Any, Any], Writes(log))
        )
    assert log == []


async def test_a_failing_check_stops_the_call_before_the_behavior() -> None:
    log: list[str] = []

    def refuse(request: Any, context: Any) -> None:
        raise PermissionError("no")

    class Refusing(CallCheck):
        def check(self, method: str) -> Check:
            return refuse

    async def behavior(request: Any, context: Any) -> Any:
        log.append("behavior")

    async def continuation(details: grpc.HandlerCallDetails) -> Any:
        return grpc.unary_unary_rpc_method_handler(behavior)

    handler = await FusedInterceptors([RecordingCheck("first", log), Refusing()]).intercept_service(
        continuation, Details("/s/M")
    )
    assert handler is not None
    with pytest.raises(PermissionError):
        assert handler.unary_unary is not None
        await handler.unary_unary(None, NO_CONTEXT)
    assert log == ["first"]


class SlowToCancel:
    """Work that never finishes by itself and takes until `release` to wind down when cancelled
    (as psycopg waits for the server's answer to its cancel request)."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.cancelled = False
        self.finished = False

    async def run(self) -> None:
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            await self.release.wait()
            raise
        finally:
            self.finished = True


async def test_within_returns_the_result_of_work_that_ends_in_time() -> None:
    async def work() -> str:
        await asyncio.sleep(0)
        return "done"

    assert await within(5.0, work()) == "done"

    async def failing() -> None:
        raise ValueError("from the work")

    with pytest.raises(ValueError, match="from the work"):
        await within(5.0, failing())


async def _let_finish(work: SlowToCancel) -> None:
    """Let the abandoned work wind down, and check that it does."""
    work.release.set()
    await wait_until(lambda: work.finished, "the abandoned work finishes", within=5, every=0.01)


async def test_within_answers_at_the_budget_and_cancels_the_work_in_the_background() -> None:
    work = SlowToCancel()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await within(0.05, work.run())
    # Answered without waiting for the work to wind down; the work was told to stop.
    assert not work.finished
    await asyncio.sleep(0)
    assert work.cancelled
    await _let_finish(work)
    assert time.monotonic() - started < 5


async def test_a_cancelled_caller_of_within_is_cancelled_at_once_and_so_is_the_work() -> None:
    work = SlowToCancel()
    caller = asyncio.ensure_future(within(60.0, work.run()))
    await work.started.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert not work.finished
    await asyncio.sleep(0)
    assert work.cancelled
    await _let_finish(work)
