"""The documentation's commands, run exactly as written against a server set up as the README assumes.

The marked blocks of README.md and docs/*.md (tests/docblocks.py finds them): blocks preceded by
`<!-- readme-test: sh -->` are shell commands; they run in reading order in one bash session (so
`export TOKEN=...` reaches the later blocks), from a directory laid out like a checkout after
`make run`: `.venv`, `node_modules` and `examples/` of this repository, and
`.data/dialog-shard.toml` naming this session's shard servers. A server listens on
127.0.0.1:50051, the address the README uses. `<!-- readme-test: file PATH -->` marks a block
that must equal the file PATH of the repository (the client example, which a shell block runs).
`<!-- readme-test: reshard -->` blocks change the cluster's layout: tests/test_reshard.py runs
them against a cluster of their own.

The port is fixed by the README, so concurrent runs on one machine take turns (a file lock).
"""

from __future__ import annotations

import asyncio
import fcntl
import re
import socket
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import pytest_asyncio

from server.config import ServerConfig
from server.runtime.app import RunningServer, running_server
from tests.docblocks import ROOT, Block, marked_blocks, marker_count
from tests.processes import child_env, run_async, write_server_config

README_ADDRESS = ("127.0.0.1", 50051)
_SEPARATOR = "--- readme block {} ---"


def test_readme_marks_its_command_blocks() -> None:
    blocks = marked_blocks()
    shell = "\n".join(b.body for b in blocks if b.kind == "sh")
    assert "grpcurl" in shell
    assert "npx --no-install buf curl" in shell
    assert ".venv/bin/python examples/client_example.py" in shell
    # Every marker is followed by a fenced block (a marker the regex missed would silently skip it).
    assert marker_count() == len(blocks)


@pytest.mark.parametrize("block", [b for b in marked_blocks() if b.kind == "file"], ids=lambda b: b.path)
def test_readme_shows_the_example_file_verbatim(block: Block) -> None:
    assert block.path is not None
    assert (ROOT / block.path).read_text() == block.body


def _port_is_free() -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(README_ADDRESS)
        except OSError:
            return False
    return True


@pytest_asyncio.fixture
async def readme_server(cluster_config: ServerConfig) -> AsyncIterator[RunningServer]:
    lock_path = Path(tempfile.gettempdir()) / "dialog-shard-readme-test.lock"
    with lock_path.open("w") as lock:
        await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not _port_is_free():
            if loop.time() > deadline:
                pytest.fail(
                    f"{README_ADDRESS[0]}:{README_ADDRESS[1]} stays busy (is `make run` running?); "
                    "the README's commands need that address"
                )
            await asyncio.sleep(0.2)
        listen = f"{README_ADDRESS[0]}:{README_ADDRESS[1]}"
        async with running_server(replace(cluster_config, listen=listen)) as running:
            yield running


@pytest.fixture
def checkout(tmp_path: Path, cluster_config: ServerConfig, jwt_secret: str) -> Path:
    """A directory that looks like this repository after `make run` (which writes .data/)."""
    home = tmp_path / "checkout"
    home.mkdir()
    venv = Path(sys.executable).parent.parent
    for name, target in (
        (".venv", venv),
        ("node_modules", ROOT / "node_modules"),
        ("examples", ROOT / "examples"),
    ):
        assert target.exists(), f"{target} is missing (make install; npm ci)"
        (home / name).symlink_to(target)
    write_server_config(home / ".data" / "dialog-shard.toml", cluster_config, "127.0.0.1:50051", jwt_secret)
    return home


async def test_readme_commands_run_as_written(readme_server: RunningServer, checkout: Path) -> None:
    shell_blocks = [b.body for b in marked_blocks() if b.kind == "sh"]
    script = "set -eo pipefail\n" + "".join(
        f"echo '{_SEPARATOR.format(n)}'\n{body}" for n, body in enumerate(shell_blocks)
    )
    result = await run_async("bash", "-c", script, cwd=checkout, env=child_env())
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    outputs = re.split(r"^--- readme block \d+ ---\n", result.stdout, flags=re.M)[1:]
    assert len(outputs) == len(shell_blocks)
    quick_start, buf_curl, example, operations = outputs

    assert '"text": "hello"' in quick_start
    assert "dialog.v1.DialogService" in quick_start  # grpcurl list
    assert "SHARD" in quick_start and "p-value" in quick_start  # dialogctl stats
    assert re.search(r"^shard\s+\d+$", quick_start, re.M)  # dialogctl shard-of 1 2

    assert '"text": "hello"' in buf_curl  # GetDialog via buf curl
    assert '"source": "SHARD_SOURCE_HASH"' in buf_curl

    assert re.search(r"^stored \S+ replayed: False$", example, re.M)
    assert re.search(r" 1 -> 2 hello from Python$", example, re.M)
    assert "refused: INVALID_ARGUMENT ['text']" in example

    # dialogctl operations: the Quick start's message listed with its placement, every database
    # up to date, full and one-shard backups with manifests, and the shard restored and checked.
    assert re.search(r"^\s*\d+\s+\S+\s+1\s+2\s.*hash.*hello$", operations, re.M)
    assert "up to date" in operations
    assert (checkout / "backups" / "today" / "manifest.json").is_file()
    assert (checkout / "b" / "s2" / "shard-2.dump").is_file()
    assert "restored 1 item from b/s2" in operations
