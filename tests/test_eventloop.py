"""`dialog-server --event-loop`: uvloop when installed, asyncio's own loop otherwise or on request."""

from __future__ import annotations

import importlib.util

import pytest

from server.runtime import eventloop


async def _kind() -> str:
    return eventloop.name()


def test_asyncio_is_always_available_and_auto_takes_uvloop_only_when_installed() -> None:
    assert eventloop.loop_factory("asyncio") is None
    assert eventloop.run(_kind(), "asyncio") == "asyncio"
    installed = importlib.util.find_spec("uvloop") is not None
    assert eventloop.run(_kind(), "auto") == ("uvloop" if installed else "asyncio")
    if installed:
        assert eventloop.run(_kind(), "uvloop") == "uvloop"
    else:
        with pytest.raises(eventloop.EventLoopError, match=r"pip install 'dialog-shard\[fast\]'"):
            eventloop.loop_factory("uvloop")
