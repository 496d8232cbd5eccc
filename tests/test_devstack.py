"""The README's `make run` path: `dialog-server --dev` with its embedded PostgreSQL, end to end.

Real processes only: the console scripts `dialog-server` and `dialogctl`, the grpcurl binary and a
real PostgreSQL cluster in a data directory on tmpfs. Each test starts the dev server, sends a
message, stops it with one signal, starts it again on the same data directory, reads the message
back and stops it with the other signal: SIGTERM (a service manager) and SIGINT delivered to the
whole process group (Ctrl-C in a terminal) both end in a clean exit with PostgreSQL stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.dev.embedded_pg import EmbeddedPostgres, EmbeddedPostgresError
from tests.pgfixtures import free_port, reachable_temp_dir
from tests.processes import child_env
from tests.support import tcp_login_error, wait_until_blocking

BIN = Path(sys.executable).parent
DIALOG_SERVER = BIN / "dialog-server"
DIALOGCTL = BIN / "dialogctl"
GRPCURL = BIN / "grpcurl"

START_TIMEOUT = 60.0  # initdb on a loaded machine
STOP_TIMEOUT = 10.0


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class DevServer:
    """One `dialog-server --dev` process whose combined stdout/stderr is read line by line."""

    def __init__(self, data_dir: Path, pg_port: int, grpc_port: int) -> None:
        self.data_dir = data_dir
        self.pg_port = pg_port
        self.address = f"127.0.0.1:{grpc_port}"
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()

    def start(self) -> None:
        self.lines = []
        self._queue = queue.Queue()
        argv = [
            str(DIALOG_SERVER),
            "--dev",
            "--data-dir",
            str(self.data_dir),
            "--pg-port",
            str(self.pg_port),
            "--listen",
            self.address,
        ]
        # Own process group, as a foreground job in a terminal has: Ctrl-C signals the whole group.
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=self.data_dir.parent,
            env=child_env(),
            start_new_session=True,
        )
        stream = self.proc.stdout
        assert stream is not None

        def pump(out: Any = stream, sink: queue.Queue[str | None] = self._queue) -> None:
            for line in out:
                sink.put(line)
            sink.put(None)

        threading.Thread(target=pump, daemon=True).start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_line(self, needle: str, timeout: float = START_TIMEOUT) -> str:
        """The first output line containing `needle`; fails on timeout or if the process ends first."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no line with {needle!r} within {timeout}s; output so far:\n{self.output}")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                assert self.proc is not None
                pytest.fail(f"dialog-server exited ({self.proc.wait()}) before {needle!r}:\n{self.output}")
            self.lines.append(line)
            if needle in line:
                return line

    def drain(self, timeout: float = 5.0) -> None:
        """Collect the remaining output up to EOF (the process has exited)."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                return
            if line is None:
                return
            self.lines.append(line)

    def stop(self, sig: signal.Signals, timeout: float = STOP_TIMEOUT) -> tuple[int, float]:
        """Deliver `sig` (SIGINT to the whole group, like Ctrl-C); return exit status and seconds taken."""
        assert self.proc is not None
        began = time.monotonic()
        if sig == signal.SIGINT:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)
        try:
            returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"dialog-server did not exit within {timeout}s of {sig.name}:\n{self.output}")
        self.drain()
        return returncode, time.monotonic() - began

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def dev_dir() -> Iterator[Path]:
    with reachable_temp_dir("dialog-shard-devstack-") as base:
        yield base


def run(*argv: str | Path, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=timeout, env=child_env(), check=False
    )


def grpcurl_json(address: str, token: str, method: str, request: dict[str, Any]) -> Any:
    result = run(
        GRPCURL,
        "-plaintext",
        "-max-time",
        "20",
        "-H",
        f"authorization: Bearer {token}",
        "-d",
        json.dumps(request),
        address,
        f"dialog.v1.DialogService/{method}",
    )
    assert result.returncode == 0, f"grpcurl {method} exit {result.returncode}: {result.stderr}"
    return json.loads(result.stdout)


def assert_clean_exit(dev: DevServer, sig: signal.Signals, pg: EmbeddedPostgres) -> None:
    returncode, seconds = dev.stop(sig)
    assert returncode == 0, f"exit {returncode} after {sig.name}:\n{dev.output}"
    assert seconds < STOP_TIMEOUT
    assert "Traceback" not in dev.output, dev.output
    assert "stopping embedded PostgreSQL" in dev.output
    # PostgreSQL is down, not orphaned: no lock file, nothing on its port.
    assert not (pg.data_dir / "postmaster.pid").exists(), dev.output
    assert not pg.is_running()
    assert not _port_open(dev.pg_port)
    assert not _port_open(int(dev.address.rsplit(":", 1)[1]))


@pytest.mark.parametrize(
    ("first", "second"),
    [(signal.SIGTERM, signal.SIGINT), (signal.SIGINT, signal.SIGTERM)],
    ids=["sigterm-then-ctrl-c", "ctrl-c-then-sigterm"],
)
def test_dev_server_keeps_data_across_restarts(
    dev_dir: Path, first: signal.Signals, second: signal.Signals
) -> None:
    pg_port, grpc_port = free_port(), free_port()
    while grpc_port == pg_port:
        grpc_port = free_port()
    data_dir = dev_dir / "data"
    dev = DevServer(data_dir, pg_port, grpc_port)
    pg = EmbeddedPostgres(data_dir / "postgres", port=pg_port)
    try:
        dev.start()
        serving = dev.wait_for_line("dialog-shard serving on")
        assert f"serving on {dev.address} with 4 shards" in serving
        dev.wait_for_line("Stop with Ctrl-C")  # the banner's last line
        assert f'-d \'{{"from_user_id": 1, "to_user_id": 2, "text": "hello"}}\' {dev.address}' in dev.output
        assert '.venv/bin/grpcurl -plaintext -H "authorization: Bearer $TOKEN"' in dev.output
        assert "dialog.v1.DialogService/SendMessage" in dev.output
        assert "dialog.v1.DialogService/GetDialog" in dev.output

        config = data_dir / "dialog-shard.toml"
        assert config.is_file()
        # Safe defaults: a private dev key, and the dev PostgreSQL's TCP port needs its password,
        # which the config does not hold (its DSN names the 0600 password file).
        assert stat.S_IMODE((data_dir / "dev-jwt-secret").stat().st_mode) == 0o600
        assert "no password supplied" in (tcp_login_error(pg_port) or "")
        assert tcp_login_error(pg_port, pg.password()) is None
        assert pg.password() not in config.read_text()
        assert f"passfile={pg.password_file}" in config.read_text()
        token_result = run(DIALOGCTL, "--config", config, "token", "--user", "1")
        assert token_result.returncode == 0, token_result.stderr
        token = token_result.stdout.strip()

        text = f"kept across restarts {uuid.uuid4()}"
        sent = grpcurl_json(
            dev.address, token, "SendMessage", {"from_user_id": 1, "to_user_id": 2, "text": text}
        )["message"]
        assert (sent["from_user_id"], sent["to_user_id"], sent["text"]) == ("1", "2", text)

        assert_clean_exit(dev, first, pg)

        dev.start()
        dev.wait_for_line("dialog-shard serving on")
        # The dev key survived too: the first run's token still works.
        page = grpcurl_json(dev.address, token, "GetDialog", {"user_id": 1, "peer_user_id": 2})
        assert [(m["message_id"], m["text"]) for m in page["messages"]] == [(sent["message_id"], text)]
        stats = run(DIALOGCTL, "--config", config, "--json", "stats", "--exact")
        assert stats.returncode == 0, stats.stderr
        assert json.loads(stats.stdout)["total_message_count"] == "1"

        assert_clean_exit(dev, second, pg)
    finally:
        dev.kill()
        with contextlib.suppress(EmbeddedPostgresError, OSError):
            pg.stop("immediate")


def test_sigterm_during_startup_leaves_no_postgres_running(dev_dir: Path) -> None:
    """Stopped while the embedded PostgreSQL is coming up (before serving): nothing is orphaned."""
    pg_port, grpc_port = free_port(), free_port()
    data_dir = dev_dir / "data"
    dev = DevServer(data_dir, pg_port, grpc_port)
    pg = EmbeddedPostgres(data_dir / "postgres", port=pg_port)
    try:
        dev.start()
        wait_until_blocking(
            lambda: _port_open(pg_port),
            "the embedded PostgreSQL listens",
            within=START_TIMEOUT,
            every=0.005,
            explain=lambda: dev.output,
        )
        assert dev.proc is not None
        dev.proc.send_signal(signal.SIGTERM)
        returncode = dev.proc.wait(timeout=STOP_TIMEOUT)
        dev.drain()
        # Depending on timing the signal lands during startup (130) or after serving began (0).
        assert returncode in (0, 130), dev.output
        assert "Traceback" not in dev.output, dev.output
        assert not pg.is_running(), dev.output
        assert not _port_open(pg_port)
    finally:
        dev.kill()
        with contextlib.suppress(EmbeddedPostgresError):
            pg.stop()


def _refused_dev_start(data_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """`dialog-server --dev` that must refuse at once: exit 2, one line, no PostgreSQL started."""
    pg_port = free_port()
    result = run(DIALOG_SERVER, "--dev", "--data-dir", data_dir, "--pg-port", str(pg_port), *extra)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "starting embedded PostgreSQL" not in result.stdout
    assert not (data_dir / "postgres").exists()
    assert not _port_open(pg_port)
    return result


@pytest.mark.parametrize("listen", ["0.0.0.0:50051", "[::]:50051", "192.0.2.7:50051", ":50051"])
def test_dev_refuses_a_listen_address_beyond_loopback(dev_dir: Path, listen: str) -> None:
    data_dir = dev_dir / "data"
    result = _refused_dev_start(data_dir, "--listen", listen)
    assert (
        f"--dev serves only on a loopback address (127.0.0.1, ::1, localhost), not {listen!r}"
        in result.stderr
    )
    assert not data_dir.exists()  # nothing was created either


def test_dev_refuses_a_dev_key_others_can_read(dev_dir: Path) -> None:
    data_dir = dev_dir / "data"
    data_dir.mkdir()
    key = data_dir / "dev-jwt-secret"
    key.write_text("k" * 64 + "\n")
    key.chmod(0o644)
    result = _refused_dev_start(data_dir)
    assert f"the dev key {key} is -rw-r--r--" in result.stderr
    assert f"Run `chmod 600 {key}`" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_dev_refuses_a_dev_key_owned_by_another_user(dev_dir: Path) -> None:
    data_dir = dev_dir / "data"
    data_dir.mkdir()
    key = data_dir / "dev-jwt-secret"
    key.write_text("k" * 64 + "\n")
    key.chmod(0o600)
    os.chown(key, 65534, 65534)  # nobody
    result = _refused_dev_start(data_dir)
    assert f"the dev key {key} belongs to " in result.stderr
    assert "not to root who runs the server" in result.stderr
