"""Helpers for tests that run the project's real programs as child processes.

The session's gRPC server runs on pytest's event loop, so tests that call it from a child
process use `run_async` (a blocking subprocess.run would stall the server being called).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.config import ServerConfig, render_config


@dataclass(frozen=True)
class Result:
    """Exit code and output of a finished child process."""

    program: str
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        assert self.returncode == 0, f"{self.program} exit {self.returncode}: {self.stderr}"
        return json.loads(self.stdout)


def child_env(**extra: str) -> dict[str, str]:
    """This environment without DIALOG_* variables (they would win over a child's config file).

    A child server's metrics endpoint takes a free port, never the default one (several test runs
    and a developer's `make run` share this machine).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIALOG_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["DIALOG_METRICS_LISTEN"] = "127.0.0.1:0"
    env.update(extra)
    return env


#: A child still running after this long is killed and the test fails.
CHILD_TIMEOUT_SECONDS = 60.0


async def run_async(*argv: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> Result:
    """Run a program to completion without blocking the event loop."""
    proc = await asyncio.create_subprocess_exec(
        *(str(a) for a in argv),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
        env=env if env is not None else child_env(),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=CHILD_TIMEOUT_SECONDS)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Result(Path(argv[0]).name, proc.returncode, out.decode(), err.decode())


def write_server_config(
    path: Path,
    config: ServerConfig,
    listen: str,
    jwt_secret: str,
    *,
    sections: Mapping[str, Mapping[str, object]] | None = None,
) -> Path:
    """A TOML file for a `dialog-server`/`dialogctl` process on the same shards as `config`,
    with any further `sections` (e.g. `{"limits": {...}}`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        render_config(
            shard_dsns=[s.dsn for s in config.shards],
            tables=[s.table for s in config.shards],
            control_dsn=config.control_dsn,
            listen=listen,
            auth={"jwt_secret": jwt_secret},
            sections=sections,
        )
    )
    return path
