"""Breaking real PostgreSQL servers, and a bounded load that records what was acknowledged.

PYTEST_DONT_REWRITE: imported by test modules as a plain helper.

A PostgreSQL server is the postmaster plus its children (each child runs in a session of its
own, so the postmaster's process group does not reach them): the helpers signal them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psycopg

from client.gen.dialog.v1 import dialog_service_pb2 as pb
from client.gen.dialog.v1 import dialog_service_pb2_grpc
from server.auth import issue_token
from server.config import AuthConfig, ServerConfig, render_config
from server.dev.embedded_pg import EmbeddedPostgres
from server.routing import Pair, calculate_shard
from tests.pgfixtures import free_port
from tests.processes import child_env
from tests.support import retry_delay_of, wait_until, wait_until_blocking

#: Settings of servers that tests crash: commits must reach the OS before they are acknowledged
#: (the session's servers run with synchronous_commit=off, which a SIGKILL could betray).
CRASH_SAFE_SETTINGS = {"synchronous_commit": "on"}
#: Random source of fresh user ids.
rng = random.Random()
#: Short timeouts of servers under fault injection, so each fault plays out in seconds.
FAST_RESILIENCE = {
    "failure_threshold": 3,
    "open_seconds": 0.5,
    "probe_interval": 0.2,
    "probe_timeout": 0.5,
    "statement_timeout": 2.0,
    "reconnect_timeout": 1.0,
    "retry_attempts": 3,
    "retry_backoff": 0.02,
    "retry_backoff_max": 0.2,
}
FAST_POOL = {"min_size": 2, "max_size": 6, "acquire_timeout": 0.5, "open_timeout": 5.0}


def start_postgres(base: Path, name: str) -> EmbeddedPostgres:
    """A fresh PostgreSQL server under `base` (fsync off: only the process, never the OS, crashes)."""
    server = EmbeddedPostgres(
        base / name,
        port=free_port(),
        fsync=False,
        settings=CRASH_SAFE_SETTINGS,
        log_file=base / f"{name}.log",
    )
    server.start(timeout=30)
    return server


def _postmaster_pid(server: EmbeddedPostgres) -> int:
    pid = server._postmaster_pid()
    assert pid is not None, f"{server} is not running"
    return pid


def server_processes(server: EmbeddedPostgres) -> list[int]:
    """The postmaster's pid and its children's."""
    postmaster = _postmaster_pid(server)
    pids = [postmaster]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == postmaster:
                pids.append(int(entry.name))
    return pids


def _signal_all(pids: Sequence[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def crash(server: EmbeddedPostgres, timeout: float = 10.0) -> None:
    """kill -9 the whole server (postmaster and backends) and wait until every process is gone."""
    pids = server_processes(server)
    _signal_all(pids, signal.SIGKILL)
    wait_until_blocking(
        lambda: not any(_alive(pid) for pid in pids),
        "the killed PostgreSQL processes exit",
        within=timeout,
        every=0.01,
    )
    # Until its zombie is reaped, the postmaster's pid still "exists", and a new postmaster would
    # take the lock file for a live one. Wait a moment for the reaper, then drop the stale file.
    reaped_by = time.monotonic() + 2.0
    while Path(f"/proc/{pids[0]}").exists() and time.monotonic() < reaped_by:
        time.sleep(0.01)
    if Path(f"/proc/{pids[0]}").exists():
        (server.data_dir / "postmaster.pid").unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@contextlib.contextmanager
def frozen(server: EmbeddedPostgres) -> Iterator[None]:
    """SIGSTOP the whole server (a hang: connections stay open, nothing answers), SIGCONT on exit."""
    pids = server_processes(server)
    _signal_all(pids, signal.SIGSTOP)
    try:
        yield
    finally:
        _signal_all(pids, signal.SIGCONT)


def pairs_on(shard_id: int, num_shards: int, count: int, rng: random.Random) -> list[tuple[int, int]]:
    """`count` fresh pairs (sender first) that the hash puts on `shard_id`."""
    found: list[tuple[int, int]] = []
    while len(found) < count:
        a, b = rng.randrange(1, 2**62), rng.randrange(1, 2**62)
        if a != b and calculate_shard(a, b, num_shards) == shard_id:
            found.append((a, b))
    return found


@dataclass
class Outcome:
    """One SendMessage attempt as the load generator saw it."""

    shard_id: int
    pair: tuple[int, int]
    text: str
    request_id: str
    started: float
    finished: float
    code: grpc.StatusCode
    message_id: str | None = None
    retry_delay: float | None = None


@dataclass
class Read:
    """One GetDialog call of the load generator (with `reads`)."""

    shard_id: int
    started: float
    finished: float
    code: grpc.StatusCode


@dataclass
class LoadReport:
    """Every attempt, with helpers to summarize them per shard and over time."""

    outcomes: list[Outcome] = field(default_factory=list)
    reads: list[Read] = field(default_factory=list)

    def of(self, shard_id: int) -> list[Outcome]:
        return [o for o in self.outcomes if o.shard_id == shard_id]

    def acked(self, shard_id: int | None = None) -> list[Outcome]:
        return [o for o in self.outcomes if o.code is grpc.StatusCode.OK and shard_id in (None, o.shard_id)]

    def codes(self, shard_id: int) -> Counter[str]:
        return Counter(o.code.name for o in self.of(shard_id))

    def first(self, shard_id: int, code: grpc.StatusCode, after: float) -> Outcome | None:
        matching = [o for o in self.of(shard_id) if o.code is code and o.finished >= after]
        return min(matching, key=lambda o: o.finished, default=None)


class Load:
    """Bounded concurrent SendMessage load: `workers` per pair list, until stopped or `max_seconds`.

    With `reads`, each worker also reads its dialog's newest page (GetDialog) after every send.
    """

    def __init__(
        self,
        address: str,
        auth: AuthConfig,
        pairs: dict[int, list[tuple[int, int]]],
        *,
        deadline: float = 1.5,
        pause: float = 0.005,
        max_seconds: float = 60.0,
        reads: bool = False,
    ) -> None:
        self._address = address
        self._reads = reads
        self._auth = auth
        self._pairs = pairs
        self._deadline = deadline
        self._pause = pause
        self._max_seconds = max_seconds
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.report = LoadReport()
        self._channel: grpc.aio.Channel | None = None

    async def __aenter__(self) -> Load:
        self._channel = grpc.aio.insecure_channel(self._address)
        stub = dialog_service_pb2_grpc.DialogServiceStub(self._channel)
        for shard_id, pairs in self._pairs.items():
            for pair in pairs:
                self._tasks.append(asyncio.create_task(self._worker(stub, shard_id, pair)))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        if self._channel is not None:
            await self._channel.close()

    async def _worker(
        self, stub: dialog_service_pb2_grpc.DialogServiceAsyncStub, shard_id: int, pair: tuple[int, int]
    ) -> None:
        sender, peer = pair
        metadata = (("authorization", f"Bearer {issue_token(self._auth, user_id=sender)}"),)
        ends = time.monotonic() + self._max_seconds
        while not self._stop.is_set() and time.monotonic() < ends:
            text = f"load {uuid.uuid4()}"
            request = pb.SendMessageRequest(
                from_user_id=sender, to_user_id=peer, text=text, request_id=text.split()[1]
            )
            started = time.monotonic()
            outcome = Outcome(shard_id, pair, text, request.request_id, started, started, grpc.StatusCode.OK)
            try:
                response = await stub.SendMessage(request, metadata=metadata, timeout=self._deadline)
                outcome.message_id = response.message.message_id
            except grpc.aio.AioRpcError as exc:
                outcome.code = exc.code()
                outcome.retry_delay = retry_delay_of(exc)
            outcome.finished = time.monotonic()
            self.report.outcomes.append(outcome)
            if self._reads:
                await self._read(stub, shard_id, pair, metadata)
            await asyncio.sleep(self._pause)

    async def _read(
        self,
        stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
        shard_id: int,
        pair: tuple[int, int],
        metadata: tuple[tuple[str, str], ...],
    ) -> None:
        read = Read(shard_id, time.monotonic(), 0.0, grpc.StatusCode.OK)
        try:
            await stub.GetDialog(
                pb.GetDialogRequest(user_id=pair[0], peer_user_id=pair[1], page_size=10),
                metadata=metadata,
                timeout=self._deadline,
            )
        except grpc.aio.AioRpcError as exc:
            read.code = exc.code()
        read.finished = time.monotonic()
        self.report.reads.append(read)

    async def wait_for(self, predicate: Callable[[], bool], within: float, what: str) -> float:
        """Poll `predicate()` until true; returns when (monotonic); fails after `within` seconds."""
        return await wait_until(predicate, what, within=within)


def stored_texts(dsn: str, table: str, pairs: Sequence[tuple[int, int]]) -> Counter[str]:
    """How many rows hold each text, for the given pairs, read straight from the database."""
    counts: Counter[str] = Counter()
    with psycopg.connect(dsn) as conn:
        for a, b in pairs:
            low, high = Pair.of(a, b)
            rows = conn.execute(
                f"SELECT text FROM {table} WHERE user_low = %s AND user_high = %s", (low, high)
            ).fetchall()
            counts.update(r[0] for r in rows)
    return counts


def assert_exactly_once(report: LoadReport, config: ServerConfig, shard_ids: Sequence[int]) -> int:
    """Every acknowledged message is stored once; no message (acknowledged or not) is stored twice."""
    checked = 0
    for shard_id in shard_ids:
        shard = config.shards[shard_id]
        pairs = sorted({o.pair for o in report.of(shard_id)})
        counts = stored_texts(shard.dsn, shard.table, pairs)
        duplicates = {t: n for t, n in counts.items() if n > 1}
        assert not duplicates, f"shard {shard_id} stores messages more than once: {duplicates}"
        missing = [o.text for o in report.acked(shard_id) if counts[o.text] != 1]
        assert not missing, f"shard {shard_id} lost {len(missing)} acknowledged messages: {missing[:5]}"
        checked += len(report.acked(shard_id))
    return checked


class Watch:
    """Samples `read()` every `interval` seconds in the background and keeps its transitions."""

    def __init__(self, read: Callable[[], object], interval: float = 0.005) -> None:
        self._read = read
        self._interval = interval
        self.transitions: list[tuple[float, object]] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Watch:
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _loop(self) -> None:
        while True:
            value = self._read()
            if not self.transitions or self.transitions[-1][1] != value:
                self.transitions.append((time.monotonic(), value))
            await asyncio.sleep(self._interval)

    def first(self, value: object, after: float) -> float | None:
        """When `read()` first returned `value` at or after `after`."""
        return next((t for t, v in self.transitions if v == value and t >= after), None)

    async def wait(self, value: object, after: float, within: float) -> float:
        """When `read()` first returned `value` at or after `after`, waiting up to `within` s for it."""
        await wait_until(
            lambda: self.first(value, after) is not None,
            f"read() returns {value!r}",
            within=within,
            every=0.01,
            explain=lambda: f"saw {self.transitions}",
        )
        when = self.first(value, after)
        assert when is not None
        return when


async def start_server_process(
    config_path: Path, within: float = 30.0, *, env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    """Run `dialog-server --config config_path` (output in `<config>.log`) until it says it serves;
    `env`: DIALOG_* variables of its own (they win over the file, as for an operator)."""
    log_path = config_path.with_suffix(".log")
    offset = log_path.stat().st_size if log_path.exists() else 0
    # A file, not a pipe: nobody reads a pipe after startup, and a full one would block the server.
    with log_path.open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "dialog-server"),
            "--config",
            str(config_path),
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            env=child_env(**(env or {})),
        )
    ends = time.monotonic() + within
    while True:
        output = log_path.read_bytes()[offset:].decode(errors="replace")
        if "dialog-shard serving on" in output:
            return proc
        if proc.returncode is not None or time.monotonic() > ends:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            raise AssertionError(f"dialog-server did not start (exit {proc.returncode}):\n{output}")
        await asyncio.sleep(0.05)


def start_replica(primary: EmbeddedPostgres, base: Path, name: str) -> EmbeddedPostgres:
    """A streaming replica of `primary` made by pg_basebackup -R (standby.signal), started."""
    data_dir = base / name
    data_dir.mkdir(mode=0o700)
    owner = primary.data_dir.stat()
    os.chown(data_dir, owner.st_uid, owner.st_gid)
    argv = [
        str(primary.bin_dir / "pg_basebackup"),
        "-D",
        str(data_dir),
        # Over the primary's unix socket (its data directory): TCP needs the password, the socket
        # is for PostgreSQL's own user, which also runs the replica's WAL receiver.
        "-h",
        str(primary.data_dir),
        "-p",
        str(primary.port),
        "-U",
        "postgres",
        "-X",
        "stream",
        "-R",
        "--no-sync",
        "--checkpoint=fast",  # the default spreads the starting checkpoint over minutes
    ]
    if os.geteuid() == 0:
        argv = ["runuser", "-u", pwd.getpwuid(owner.st_uid).pw_name, "--", *argv]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, cwd="/")
    assert done.returncode == 0, f"pg_basebackup failed: {done.stderr}"
    assert (data_dir / "standby.signal").exists()
    replica = EmbeddedPostgres(
        data_dir, port=free_port(), fsync=False, settings=CRASH_SAFE_SETTINGS, log_file=base / f"{name}.log"
    )
    replica.start(timeout=30)  # the application database came with the base backup
    return replica


async def resend_unacked(address: str, config: ServerConfig, report: LoadReport) -> int:
    """Re-send every unacknowledged message with its request_id, as a retrying client does."""
    unacked = [o for o in report.outcomes if o.code is not grpc.StatusCode.OK]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = dialog_service_pb2_grpc.DialogServiceStub(channel)
        for o in unacked:
            token = issue_token(config.auth, user_id=o.pair[0])
            response = await stub.SendMessage(
                pb.SendMessageRequest(
                    from_user_id=o.pair[0], to_user_id=o.pair[1], text=o.text, request_id=o.request_id
                ),
                metadata=(("authorization", f"Bearer {token}"),),
                timeout=5,
            )
            o.code, o.message_id = grpc.StatusCode.OK, response.message.message_id
    return len(unacked)


@contextmanager
def table_locked(config: ServerConfig, shard_id: int) -> Iterator[None]:
    """Hold an ACCESS EXCLUSIVE lock on the shard's table: every statement on it waits."""
    shard = config.shards[shard_id]
    with psycopg.connect(shard.dsn) as conn, conn.transaction():
        conn.execute(f"LOCK TABLE {shard.table} IN ACCESS EXCLUSIVE MODE")
        yield


def waiting_statements(config: ServerConfig, shard_id: int) -> list[str]:
    """Statements of the service's pool on the shard that are running (waiting for the lock)."""
    shard = config.shards[shard_id]
    with psycopg.connect(shard.dsn) as conn:
        rows = conn.execute(
            "SELECT query FROM pg_stat_activity WHERE application_name = %s AND state = 'active'",
            (f"dialog-shard shard-{shard_id}",),
        ).fetchall()
    return [r[0] for r in rows if shard.table in r[0]]


def fault_server_config(path: Path, config: ServerConfig, port: int, jwt_secret: str, grace: float) -> Path:
    """A `dialog-server` config file on `config`'s shards: FAST_POOL, FAST_RESILIENCE, no rate limit."""
    path.write_text(
        render_config(
            shard_dsns=[s.dsn for s in config.shards],
            tables=[s.table for s in config.shards],
            control_dsn=config.control_dsn,
            listen=f"127.0.0.1:{port}",
            auth={"jwt_secret": jwt_secret},
            settings={"shutdown_grace_seconds": grace},
            sections={
                "pool": FAST_POOL,
                "resilience": FAST_RESILIENCE,
                "limits": {"send_rate_per_second": 0, "read_rate_per_second": 0},
            },
        )
    )
    return path
