"""dialogctl's progress line: redrawn in place on a terminal, silent otherwise, cleared at the end."""

from __future__ import annotations

import io

from server.cli.progress import Progress


def test_progress_redraws_one_line_and_clears_it() -> None:
    stream = io.StringIO()
    with Progress("backup", stream=stream, enabled=True) as progress:
        progress.update("shard-0 (1/2)")
        progress.update("control (2/2)")
    text = stream.getvalue()
    assert text.split("\r")[1:] == [
        "backup: shard-0 (1/2)",
        "backup: control (2/2)",
        " " * len("backup: control (2/2)"),
        "",
    ]


def test_progress_is_silent_when_nobody_watches() -> None:
    stream = io.StringIO()  # not a terminal
    with Progress("backup", stream=stream) as progress:
        progress.update("shard-0 (1/2)")
    assert stream.getvalue() == ""
