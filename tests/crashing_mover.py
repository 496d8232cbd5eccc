"""Run `dialog-server` or `dialogctl` with movers that die at one step boundary: a crash mid-move.

    python tests/crashing_mover.py STEP dialog-server|dialogctl ARGS...

Every Mover the program builds gets an `after_step` hook that ends the process at once with
CRASHED_EXIT when a move passes STEP (one of server.moves.mover.STEP_BOUNDARIES): os._exit runs no
`finally` block and closes no connection cleanly, as a killed process would not. Every Archiver
gets the same hook for its steps (server.moves.archiver.STEPS): a crash mid-archive.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from server.moves.archiver import STEPS as ARCHIVE_STEPS
from server.moves.archiver import Archiver
from server.moves.mover import STEP_BOUNDARIES, Mover

#: The exit status of a process that crashed at its step.
CRASHED_EXIT = 70


def crashing_argv(step: str, program: str) -> list[str]:
    """The start of a command line running `program` (dialog-server or dialogctl) that dies at `step`."""
    assert step in STEP_BOUNDARIES or step in ARCHIVE_STEPS, step
    return [sys.executable, str(Path(__file__)), step, program]


def exit_at(step: str) -> Callable[[str], Awaitable[None]]:
    """An `after_step` hook that ends this process when a move passes `step`."""

    async def after_step(passed: str) -> None:
        if passed == step:
            logging.getLogger(__name__).error("crashing the mover after step %s", step)
            os._exit(CRASHED_EXIT)

    return after_step


def main(argv: list[str]) -> int:
    step, program, *args = argv
    run: Callable[[list[str]], int]
    if program == "dialog-server":
        from server.__main__ import main as run
    elif program == "dialogctl":
        from server.cli.dialogctl import main as run
    else:
        raise SystemExit(f"unknown program {program!r}: dialog-server or dialogctl")
    with pytest.MonkeyPatch.context() as patch:
        # The programs build their movers deep inside; every one of them gets the hook.
        patch.setattr(Mover, "__init__", functools.partialmethod(Mover.__init__, after_step=exit_at(step)))
        patch.setattr(
            Archiver, "__init__", functools.partialmethod(Archiver.__init__, after_step=exit_at(step))
        )
        return run(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
