"""Helpers shared by the test modules; no test module imports another.

Fixtures live in conftest.py; the focused helper modules beside this one are tests.pgfixtures
(the PostgreSQL servers), tests.faults (breaking them, bounded load), tests.processes (child
processes) and tests.crashing_mover (a mover process that dies at a step).
"""

from __future__ import annotations

import asyncio
import inspect
import random
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import boto3
import grpc
import psycopg
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client.parser import text_string_to_metric_families

from client.gen.dialog.v1 import dialog_service_pb2 as dpb
from client.gen.dialog.v1 import dialog_service_pb2_grpc
from server.archive.store import ArchiveStore
from server.auth import issue_token
from server.config import ServerConfig, config_from_mapping
from server.dev.embedded_pg import EmbeddedPostgres
from server.moves.archiver import Archiver
from server.routing import Pair, bucket_of, calculate_shard
from server.runtime.app import RunningServer, running_server
from server.storage.fences import params_unit, write_guard
from server.storage.ids import MessageIdGenerator, id_time
from tests.crashing_mover import crashing_argv
from tests.processes import Result, run_async

#: gRPC call metadata, e.g. the `authorization` header of `auth_for(user)`.
Metadata = tuple[tuple[str, str], ...]

# -- Waiting for a condition -----------------------------------------------------------------------


def _timed_out(what: str, within: float, explain: Callable[[], object] | None) -> str:
    message = f"timed out after {within:g} s waiting until {what}"
    return f"{message}: {explain()}" if explain is not None else message


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]],
    what: str,
    *,
    within: float = 10.0,
    every: float = 0.02,
    explain: Callable[[], object] | None = None,
) -> float:
    """Poll `condition` (sync or async) until true, failing after `within` s; returns when (monotonic)."""
    deadline = time.monotonic() + within
    while True:
        held = condition()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return time.monotonic()
        if time.monotonic() >= deadline:
            pytest.fail(_timed_out(what, within, explain))
        await asyncio.sleep(every)


def wait_until_blocking(
    condition: Callable[[], bool],
    what: str,
    *,
    within: float = 10.0,
    every: float = 0.02,
    explain: Callable[[], object] | None = None,
) -> float:
    """`wait_until` for code off the event loop: blocks the thread while it polls."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() >= deadline:
            pytest.fail(_timed_out(what, within, explain))
        time.sleep(every)
    return time.monotonic()


# -- Failed calls ----------------------------------------------------------------------------------


def status_details(
    err: grpc.aio.AioRpcError,
) -> tuple[error_details_pb2.ErrorInfo | None, list[tuple[str, str]]]:
    """The ErrorInfo and BadRequest field violations of a failed call (AIP-193)."""
    status = rpc_status.from_call(err)
    info = None
    violations: list[tuple[str, str]] = []
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [(v.field, v.description) for v in bad.field_violations]
    return info, violations


async def expect_error(call: Awaitable[Any], code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    """Await a call that must fail with `code` and a message without a traceback; returns the error."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    err = caught.value
    assert err.code() == code, err.details()
    assert "Traceback" not in (err.details() or "")
    return err


def retry_delay_of(error: grpc.aio.AioRpcError) -> float | None:
    """The google.rpc.RetryInfo delay of a rich error status, if it has one."""
    status = rpc_status.from_call(error)
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToNanoseconds()) / 1e9
    return None


def retry_delay(error: grpc.aio.AioRpcError) -> float:
    """The RetryInfo delay a DIALOG_MOVING error must carry."""
    delay = retry_delay_of(error)
    assert delay is not None, "DIALOG_MOVING without RetryInfo"
    return delay


# -- Configs, databases and rows -------------------------------------------------------------------


def make_config(dsns: list[str], jwt_secret: str, **overrides: Any) -> ServerConfig:
    """A ServerConfig with shard i on dsns[i] (a DSN may repeat: tables side by side)."""
    data = {
        "listen": "127.0.0.1:0",
        "shards": [{"id": i, "dsn": dsn, "table": f"messages_{i}"} for i, dsn in enumerate(dsns)],
        "auth": {"jwt_secret": jwt_secret},
        "shutdown_grace_seconds": 2.0,
        "metrics": {"listen": "127.0.0.1:0"},
        **overrides,
    }
    return config_from_mapping(data, {}, base_dir=Path.cwd())


def tcp_login_error(port: int, password: str | None = None, *, host: str = "127.0.0.1") -> str | None:
    """None when PostgreSQL's superuser logs in over TCP with `password`, else the server's refusal.

    `password=None` sends none: no password file either (one that does not exist), so nothing of
    the caller's environment can supply one.
    """
    try:
        psycopg.connect(
            host=host,
            port=port,
            user="postgres",
            dbname="postgres",
            password=password,
            passfile="/nonexistent/pgpass",
            connect_timeout=5,
        ).close()
    except psycopg.OperationalError as exc:
        return str(exc)
    return None


def fresh_database(server: EmbeddedPostgres, prefix: str) -> str:
    """A new database with a unique name starting with `prefix` on `server`; returns its DSN."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    server.create_database(name)
    return server.dsn_for(name)


def fresh_cluster(pg_servers: list[EmbeddedPostgres], jwt_secret: str, shards: int) -> ServerConfig:
    """`shards` shards in a fresh database on each server (shard i on server i % 4); control beside 0."""
    dsns = [fresh_database(server, "cluster") for server in pg_servers]
    return make_config([dsns[i % len(dsns)] for i in range(shards)], jwt_secret)


def move_rows(config: ServerConfig, pair: tuple[int, int]) -> list[tuple[str, int, int]]:
    """The pair's recorded moves (state, source, target), oldest first, from the control database."""
    low, high = Pair.of(*pair)
    with psycopg.connect(config.control_dsn) as conn:
        rows = conn.execute(
            "SELECT state, source_shard, target_shard FROM shard_moves "
            "WHERE user_low = %s AND user_high = %s ORDER BY move_id",
            (low, high),
        ).fetchall()
    return [(str(state), int(source), int(target)) for state, source, target in rows]


def rows_for_pair(config: ServerConfig, pair: tuple[int, int]) -> dict[int, list[tuple[Any, ...]]]:
    """Every stored row of a pair, per shard, read straight from PostgreSQL (not through the service)."""
    low, high = Pair.of(*pair)
    found: dict[int, list[tuple[Any, ...]]] = {}
    for shard in config.shards:
        with psycopg.connect(shard.dsn) as conn:
            rows = conn.execute(
                f"SELECT message_id, from_user_id, to_user_id, text, request_id, bucket FROM {shard.table} "
                "WHERE user_low = %s AND user_high = %s ORDER BY message_id",
                (low, high),
            ).fetchall()
        if rows:
            found[shard.shard_id] = rows
    return found


def preload_pairs(
    config: ServerConfig,
    pairs: list[tuple[int, int]],
    per_pair: int,
    shards: int = 4,
    text: Callable[[int], str] = "m{}".format,
) -> set[str]:
    """Messages written straight to each pair's home among the first `shards` shards; returns their ids.

    Message i of a pair says `text(i)` (by default `m<i>`)."""
    ids = MessageIdGenerator()
    by_shard: dict[int, list[tuple[Any, ...]]] = {}
    for a, b in pairs:
        low, high = Pair.of(a, b)
        for i in range(per_pair):
            message_id = ids.next()
            by_shard.setdefault(calculate_shard(a, b, shards), []).append(
                (message_id, low, high, bucket_of(a, b), low, high, text(i), id_time(message_id))
            )
    for shard_id, rows in by_shard.items():
        shard = config.shards[shard_id]
        with psycopg.connect(shard.dsn) as conn, conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {shard.table} (message_id, user_low, user_high, bucket, from_user_id, "
                "to_user_id, text, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                rows,
            )
    return {str(r[0]) for rows in by_shard.values() for r in rows}


def replay(replica: EmbeddedPostgres, action: str) -> None:
    """Pause or resume (`action`) a streaming replica's WAL replay."""
    with psycopg.connect(replica.dsn, autocommit=True) as conn:
        conn.execute(f"SELECT pg_wal_replay_{action}()")


# -- Pairs and shards ------------------------------------------------------------------------------


def write_guard_query(table: str) -> str:
    """The service's insert guard (server.storage.fences) alone: `SELECT` it with (bucket, low, high);
    true, or SQLSTATE DSM01 when the pair is fenced on that shard."""
    return f"SELECT {write_guard(table, params_unit('%s', '%s', '%s'))}"


#: Counts the backends that wait out a message table's writers after a fence change (server.storage.fences).
AWAITING_WRITERS = (
    "SELECT count(*) FROM pg_stat_activity"
    " WHERE state = 'active' AND query LIKE 'SELECT dialog_await_writers%'"
)


async def until_one(conn: psycopg.AsyncConnection[Any], count_query: str, *, within: float = 5.0) -> None:
    """Wait until `count_query` (a `SELECT count(*) ...` without parameters) answers 1."""

    async def one() -> bool:
        return (await (await conn.execute(count_query)).fetchone()) == (1,)

    await wait_until(one, count_query, within=within, every=0.01)


def pair_on_shard(shard: int, num_shards: int, new_pair: Callable[[], tuple[int, int]]) -> tuple[int, int]:
    """A fresh pair (from the `new_pair` fixture) whose hash shard is `shard`."""
    while True:
        a, b = new_pair()
        if calculate_shard(a, b, num_shards) == shard:
            return a, b


def other_shard(a: int, b: int) -> int:
    """A shard of the four that is not the pair's hash shard."""
    return (calculate_shard(a, b, 4) + 1) % 4


# -- Servers, tokens and dialogctl -----------------------------------------------------------------


@asynccontextmanager
async def serving(config: ServerConfig) -> AsyncIterator[tuple[RunningServer, grpc.aio.Channel]]:
    """A server of this test's own on `config`, and a channel to it."""
    async with (
        running_server(config) as running,
        grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        yield running, channel


def token_provider(
    config: ServerConfig, user_id: int | None = None, *, admin: bool = False
) -> Callable[[], str]:
    """A bearer token provider for a user (or the admin), as an application passes to the client."""
    return lambda: issue_token(config.auth, user_id=user_id, admin=admin, ttl_seconds=300)


#: The `dialogctl` of this virtualenv.
DIALOGCTL = Path(sys.executable).parent / "dialogctl"


async def run_dialogctl(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, crash_at: str | None = None
) -> Result:
    """Run `dialogctl args...`, which never prints a traceback; with `crash_at`, its movers die there."""
    program = [str(DIALOGCTL)] if crash_at is None else crashing_argv(crash_at, "dialogctl")
    result = await run_async(*program, *args, cwd=cwd, env=env)
    assert "Traceback" not in result.stderr, result.stderr
    assert "Traceback" not in result.stdout, result.stdout
    return result


async def dialogctl(config_path: Path, *args: str, crash_at: str | None = None) -> Result:
    """Run `dialogctl --config config_path args...` (see run_dialogctl)."""
    return await run_dialogctl("--config", str(config_path), *args, crash_at=crash_at)


# -- Metrics ---------------------------------------------------------------------------------------

Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]


async def scrape_metrics(port: int) -> tuple[Samples, dict[str, set[str]]]:
    """Every sample by (name, sorted labels), and the label names of every sample name."""

    def fetch() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            assert reply.status == 200
            return str(reply.read().decode())

    samples: Samples = {}
    label_names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(await asyncio.to_thread(fetch)):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
            label_names.setdefault(sample.name, set()).update(sample.labels)
    return samples, label_names


def metric_value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= set(ls))


# -- Moves -----------------------------------------------------------------------------------------

#: The state a move is left in by a mover that died right after each step.
STATE_AFTER_CRASH = {
    "copied": "copying",
    "fence_committed": "copying",
    "fenced": "fenced",
    "target_opened": "fenced",
    "flipped": "flipped",
    "retired": "flipped",
    "deleted": "flipped",
}


def dialog_moving(error: grpc.aio.AioRpcError) -> bool:
    """The call was refused because its dialog is moving (UNAVAILABLE, DIALOG_MOVING): retry it."""
    info, _ = status_details(error)
    return error.code() == grpc.StatusCode.UNAVAILABLE and info is not None and info.reason == "DIALOG_MOVING"


@dataclass
class Writer:
    """Sends messages as `sender` until stopped, retrying DIALOG_MOVING with the same request_id."""

    stub: dialog_service_pb2_grpc.DialogServiceAsyncStub
    sender: int
    recipient: int
    auth: Metadata
    acked: list[str] = field(default_factory=list)
    moving_retries: int = 0
    longest_pause: float = 0.0
    other_errors: list[str] = field(default_factory=list)

    async def run(self, stop: asyncio.Event, *, max_messages: int = 90) -> None:
        """Send until `stop` is set or `max_messages` are acknowledged; other errors end it."""
        while not stop.is_set() and len(self.acked) < max_messages:
            request = dpb.SendMessageRequest(
                from_user_id=self.sender,
                to_user_id=self.recipient,
                text=f"live {len(self.acked)}",
                request_id=f"w{self.sender}-{len(self.acked)}",
            )
            first_try = time.monotonic()
            for _ in range(100):
                try:
                    reply = await self.stub.SendMessage(request, metadata=self.auth, timeout=10)
                    break
                except grpc.aio.AioRpcError as err:
                    if not dialog_moving(err):
                        self.other_errors.append(f"{err.code().name}: {err.details()}")
                        return
                    self.moving_retries += 1
                    await asyncio.sleep(retry_delay(err))
            else:
                self.other_errors.append("still moving after 100 retries")
                return
            self.longest_pause = max(self.longest_pause, time.monotonic() - first_try)
            self.acked.append(reply.message.message_id)
            # A steady trickle, not a flood: the move under test must get its turns too.
            await asyncio.sleep(0.01)


async def read_all(
    stub: dialog_service_pb2_grpc.DialogServiceAsyncStub, user: int, peer: int, auth: Metadata
) -> list[str]:
    """Every message of the dialog through GetDialog, oldest first, following page tokens."""
    ids: list[str] = []
    token = ""
    while True:
        page = await stub.GetDialog(
            dpb.GetDialogRequest(
                user_id=user,
                peer_user_id=peer,
                page_size=1000,
                page_token=token,
                order=dpb.MESSAGE_ORDER_OLDEST_FIRST,
            ),
            metadata=auth,
        )
        ids += [m.message_id for m in page.messages]
        token = page.next_page_token
        if not token:
            return ids


async def dialog_pages(
    stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    user: int,
    peer: int,
    auth: Metadata,
    *,
    order: dpb.MessageOrder.ValueType = dpb.MESSAGE_ORDER_OLDEST_FIRST,
    page_size: int = 1000,
) -> list[dpb.GetDialogResponse]:
    """Every page of the dialog through GetDialog in `order`, following page tokens to the end."""
    pages: list[dpb.GetDialogResponse] = []
    token = ""
    while True:
        request = dpb.GetDialogRequest(
            user_id=user, peer_user_id=peer, page_size=page_size, page_token=token, order=order
        )
        pages.append(await stub.GetDialog(request, metadata=auth, timeout=30))
        token = pages[-1].next_page_token
        if not token:
            return pages


# -- The archive -----------------------------------------------------------------------------------

#: Credentials the tests' S3-compatible server (moto) accepts; any value does.
S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass(frozen=True)
class S3Server:
    """A local S3-compatible server (moto's standalone server) and its endpoint."""

    endpoint_url: str

    def new_bucket(self) -> str:
        """`s3://<fresh bucket>/archive`, the bucket created."""
        name = f"archive-{uuid.uuid4().hex[:12]}"
        client = boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1")
        client.create_bucket(Bucket=name)
        return f"s3://{name}/archive"


def start_s3_server() -> tuple[subprocess.Popen[bytes], S3Server]:
    """moto_server on a free loopback port, answering; stop the process when done."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    program = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen(
        [str(program), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
        except OSError:
            return False
        return True

    try:
        wait_until_blocking(answers, "moto_server answers", within=30)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, S3Server(endpoint)


def old_messages(
    config: ServerConfig, pair: tuple[int, int], count: int, *, sent: datetime, shards: int = 4
) -> list[str]:
    """`count` messages of the pair sent around `sent` (a millisecond apart), written straight into
    the pair's hash shard among the first `shards`; returns their ids, oldest first."""
    low, high = Pair.of(*pair)
    start_ms = int(sent.timestamp() * 1000)
    rows = []
    for i in range(count):
        message_id = uuid.UUID(
            int=((start_ms + i) << 80) | (0x7 << 76) | (0b10 << 62) | random.getrandbits(62)
        )
        sender, recipient = (low, high) if i % 3 else (high, low)
        rows.append(
            (
                message_id,
                low,
                high,
                bucket_of(low, high),
                sender,
                recipient,
                f"old message {i} " + "é" * (i % 7),
                id_time(message_id),
                f"r{i}" if i % 5 == 0 else None,
            )
        )
    shard = config.shards[calculate_shard(low, high, shards)]
    with psycopg.connect(shard.dsn) as conn, conn.cursor() as cur:
        cur.executemany(
            f"INSERT INTO {shard.table} (message_id, user_low, user_high, bucket, from_user_id, to_user_id, "
            "text, created_at, request_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            rows,
        )
    return [str(r[0]) for r in rows]


def hot_count(config: ServerConfig, pair: tuple[int, int]) -> int:
    """Rows of the pair on every shard together."""
    return sum(len(rows) for rows in rows_for_pair(config, pair).values())


# -- Sending through the service -------------------------------------------------------------------


async def send_dialog(
    channel: grpc.aio.Channel, config: ServerConfig, pair: tuple[int, int], count: int, *, prefix: str = "m"
) -> list[str]:
    """`count` messages of the pair through SendMessage, the two users taking turns (so each stays
    within the default per-user burst), message i saying `<prefix><i>`; returns their ids in order.

    DIALOG_MOVING is retried with the same request_id, as a client would."""
    stub = dialog_service_pb2_grpc.DialogServiceStub(channel)
    a, b = pair
    auth = {
        user: (("authorization", f"Bearer {issue_token(config.auth, user_id=user, ttl_seconds=600)}"),)
        for user in pair
    }
    ids: list[str] = []
    for i in range(count):
        sender, recipient = (a, b) if i % 2 == 0 else (b, a)
        request = dpb.SendMessageRequest(
            from_user_id=sender, to_user_id=recipient, text=f"{prefix}{i}", request_id=f"{prefix}-{i}"
        )
        for _ in range(200):
            try:
                reply = await stub.SendMessage(request, metadata=auth[sender], timeout=10)
                break
            except grpc.aio.AioRpcError as err:
                if not dialog_moving(err):
                    raise
                await asyncio.sleep(retry_delay(err))
        else:
            raise AssertionError(f"pair {pair}: still moving after 200 retries")
        ids.append(reply.message.message_id)
    return ids


def activity_rows(config: ServerConfig, shard_id: int) -> dict[tuple[int, int, int], tuple[int, int, int]]:
    """A shard's recent-activity table summed over its windows: (bucket, low, high) ->
    (messages, bytes, reads); low = high = 0 is the bucket's total."""
    shard = config.shards[shard_id]
    with psycopg.connect(shard.dsn) as conn:
        rows = conn.execute(
            f"SELECT bucket, user_low, user_high, sum(messages), sum(bytes), sum(reads) "
            f"FROM {shard.table}_activity GROUP BY 1, 2, 3"
        ).fetchall()
    return {(r[0], r[1], r[2]): (int(r[3]), int(r[4]), int(r[5])) for r in rows}


# -- The archive ---------------------------------------------------------------------------------


def store_of(config: ServerConfig) -> ArchiveStore:
    assert config.archive.url is not None
    return ArchiveStore(config.archive.url, endpoint_url=config.archive.endpoint_url)


def archiver(running: RunningServer, config: ServerConfig, **hooks: Any) -> Archiver:
    stores = [running.shards.store(s.shard_id) for s in config.shards]
    return Archiver(stores, config.control_dsn, store_of(config), config.archive, **hooks)


@asynccontextmanager
async def archived_cluster(
    pg_servers: list[EmbeddedPostgres], jwt_secret: str, settings: dict[str, Any], shards: int = 4
) -> AsyncIterator[tuple[ServerConfig, RunningServer, Any]]:
    base = fresh_cluster(pg_servers, jwt_secret, shards)
    config = make_config([s.dsn for s in base.shards], jwt_secret, archive=settings)
    async with serving(config) as (running, channel):
        yield config, running, channel
