"""Progress lines for long dialogctl operations, on stderr and only when a person is watching.

On a terminal the line is redrawn in place (`\\r`); otherwise (scripts, pipes, tests) nothing is
printed, so stdout stays clean for `--json` and stderr for errors.
"""

from __future__ import annotations

import sys
from typing import TextIO


class Progress:
    """`with Progress("backup") as p: p.update("shard 2 of 4")`; the last line is cleared at the end."""

    def __init__(self, label: str, *, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._enabled = self._stream.isatty() if enabled is None else enabled
        self._label = label
        self._width = 0

    def update(self, status: str) -> None:
        if not self._enabled:
            return
        line = f"{self._label}: {status}"
        self._stream.write("\r" + line.ljust(self._width))
        self._stream.flush()
        self._width = len(line)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._enabled and self._width:
            self._stream.write("\r" + " " * self._width + "\r")
            self._stream.flush()
