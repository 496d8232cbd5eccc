"""Helpers for tests that run the project's real programs as child processes.

The session's gRPC server runs on pytest's event loop, so tests that call it from a child
process use `run_async` (a blocking subprocess.run would stall the server being called).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

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


# -- dialog-server --workers N -----------------------------------------------------------------

SERVING_LINE = re.compile(
    r"dialog-shard serving on (\S+):(\d+) with (\d+) worker processes \(pids ([\d, ]+)\)"
)
#: A fresh connection lands on one of two workers by hash: 40 tries miss one with odds 2**-39.
MAX_CONNECTIONS = 40


@dataclass
class Supervised:
    """A running `dialog-server --workers N`: the parent, its port, its workers and its output."""

    process: asyncio.subprocess.Process
    port: int
    worker_pids: list[int]
    output: list[str]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


async def start_supervised(config_path: Path, workers: int, *args: str) -> Supervised:
    """`dialog-server --workers N` on `config_path`, once it says it serves (its output kept)."""
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "dialog-server"),
        "--config",
        str(config_path),
        "--workers",
        str(workers),
        "--log-level",
        "WARNING",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=child_env(),
    )
    assert process.stdout is not None
    output: list[str] = []

    async def serving() -> re.Match[str]:
        assert process.stdout is not None
        async for raw in process.stdout:
            output.append(raw.decode().rstrip())
            if match := SERVING_LINE.search(output[-1]):
                return match
        raise AssertionError("dialog-server exited before serving:\n" + "\n".join(output))

    match = await asyncio.wait_for(serving(), timeout=60)
    pids = [int(p) for p in match.group(4).split(", ")]

    async def drain_output() -> None:
        assert process.stdout is not None
        async for raw in process.stdout:
            output.append(raw.decode().rstrip())

    asyncio.get_running_loop().create_task(drain_output())
    return Supervised(process, int(match.group(2)), pids, output)


@contextlib.asynccontextmanager
async def supervised(config_path: Path, workers: int, *args: str) -> AsyncIterator[Supervised]:
    """`start_supervised`, killed with its workers on the way out."""
    running = await start_supervised(config_path, workers, *args)
    try:
        yield running
    finally:
        if running.process.returncode is None:
            running.process.kill()
            await running.process.wait()
        for pid in running.worker_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def server_connections(port: int) -> dict[int, int]:
    """Inode -> remote port of every established TCP socket whose local port is `port`."""
    found: dict[int, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                parts = line.split()
                local, remote, state, inode = parts[1], parts[2], parts[3], int(parts[9])
                if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:
                    found[inode] = int(remote.rsplit(":", 1)[1], 16)
    return found


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


async def channel_per_worker(running: Supervised) -> dict[int, grpc.aio.Channel]:
    """Worker pid -> a channel whose one connection that worker accepted (found in /proc)."""
    channels: dict[int, grpc.aio.Channel] = {}
    for _ in range(MAX_CONNECTIONS):
        if len(channels) == len(running.worker_pids):
            return channels
        before = set(server_connections(running.port))
        channel = grpc.aio.insecure_channel(running.address, options=[("grpc.use_local_subchannel_pool", 1)])
        await asyncio.wait_for(channel.channel_ready(), 10)
        new = set(server_connections(running.port)) - before
        owner = [pid for pid in running.worker_pids if new & socket_inodes(pid)]
        if len(new) == 1 and len(owner) == 1 and owner[0] not in channels:
            channels[owner[0]] = channel
        else:
            await channel.close()
    raise AssertionError(f"connections reached only workers {sorted(channels)}")
