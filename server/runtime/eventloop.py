"""Which asyncio event loop the server runs on: uvloop when it is installed, else asyncio's own.

uvloop (a dependency wherever it exists, i.e. not on Windows) makes the event loop's own work
cheaper: psycopg registers and removes a reader on every statement, batches wait on timers, and
grpc.aio wakes the loop from its poller thread for every call. What that buys is measured in
docs/performance.md, uvloop. The server behaves the same on either loop;
`--event-loop asyncio` forces the standard one.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from server.errors import StartupError

T = TypeVar("T")

#: Accepted values of `dialog-server --event-loop`.
CHOICES = ("auto", "uvloop", "asyncio")


class EventLoopError(StartupError, RuntimeError):
    """The requested event loop is not available."""


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory of the chosen loop (None: asyncio's default)."""
    if choice == "asyncio":
        return None
    if importlib.util.find_spec("uvloop") is None:
        if choice == "uvloop":
            raise EventLoopError("--event-loop uvloop needs uvloop: pip install uvloop")
        return None
    # Imported by name: uvloop is optional, so its type stubs may be absent.
    factory: Callable[[], asyncio.AbstractEventLoop] = importlib.import_module("uvloop").new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T], choice: str = "auto") -> T:
    """`asyncio.run(main)` on the chosen event loop."""
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)


def name() -> str:
    """The running loop's kind, for the startup log line."""
    loop = asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
