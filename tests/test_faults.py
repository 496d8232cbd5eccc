"""Fault tests: break one shard's real PostgreSQL server under a bounded concurrent load.

Shard 1 lives on a PostgreSQL server of its own, started for each test (so killing it harms no
other test); shard 0 and the control tables live in a fresh database of a session server. Each
test records every SendMessage attempt and checks afterwards that shard 0 answered every call,
that shard 1 failed with UNAVAILABLE + RetryInfo while broken and recovered by itself, and that
every acknowledged message is stored exactly once (unacknowledged ones are then re-sent with
their request_id, as a client would, and are stored once too). Figures are printed (`-s`).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import psycopg
import pytest
import pytest_asyncio

from client.gen.dialog.v1 import admin_service_pb2, admin_service_pb2_grpc, dialog_service_pb2_grpc
from client.gen.dialog.v1 import dialog_service_pb2 as pb
from server.auth import issue_token
from server.config import ServerConfig
from server.dev.embedded_pg import EmbeddedPostgres
from server.resilience import BreakerState
from server.runtime.app import RunningServer, running_server
from tests.faults import (
    FAST_POOL,
    FAST_RESILIENCE,
    Load,
    LoadReport,
    Watch,
    assert_exactly_once,
    crash,
    frozen,
    pairs_on,
    resend_unacked,
    start_postgres,
)
from tests.pgfixtures import reachable_temp_dir
from tests.support import fresh_database, make_config, move_rows, retry_delay_of

WORKERS_PER_SHARD = 3
rng = random.Random()


@pytest.fixture
def victim() -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL server of this test's own, for shard 1; stopped and deleted afterwards."""
    with reachable_temp_dir("dialog-shard-fault-") as base:
        yield start_postgres(base, "victim")


@pytest.fixture
def fault_config(
    pg_servers: list[EmbeddedPostgres], victim: EmbeddedPostgres, jwt_secret: str
) -> ServerConfig:
    healthy = pg_servers[1]
    return make_config(
        [fresh_database(healthy, "fault"), victim.dsn],
        jwt_secret,
        pool=FAST_POOL,
        resilience=FAST_RESILIENCE,
        limits={"send_rate_per_second": 0, "read_rate_per_second": 0},
    )


@pytest_asyncio.fixture
async def fault_server(fault_config: ServerConfig) -> AsyncIterator[RunningServer]:
    async with running_server(fault_config) as running:
        yield running


def _breaker(running: RunningServer) -> BreakerState:
    return running.shards.state(1).primary.breaker


async def _shard_stats(address: str, config: ServerConfig) -> list[admin_service_pb2.ShardStats]:
    token = issue_token(config.auth, admin=True)
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await admin_service_pb2_grpc.AdminServiceStub(channel).GetShardStats(
            admin_service_pb2.GetShardStatsRequest(),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=5,
        )
    return list(reply.shards)


async def _list_messages(
    address: str, config: ServerConfig, *, shard_id: int
) -> admin_service_pb2.ListMessagesResponse:
    token = issue_token(config.auth, admin=True)
    async with grpc.aio.insecure_channel(address) as channel:
        return await admin_service_pb2_grpc.AdminServiceStub(channel).ListMessages(
            admin_service_pb2.ListMessagesRequest(shard_id=shard_id),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=5,
        )


def _figures(name: str, report: LoadReport, marks: dict[str, float]) -> None:
    fault = marks["fault"]
    lines = [f"--- {name} ---"]
    for shard_id in (0, 1):
        lines.append(f"shard {shard_id} outcomes: {dict(report.codes(shard_id))}")
    first_unavailable = report.first(1, grpc.StatusCode.UNAVAILABLE, fault)
    if first_unavailable is not None:
        lines.append(f"time to first UNAVAILABLE: {first_unavailable.finished - fault:.3f}s")
    lines.append(f"time to breaker open: {marks['opened'] - fault:.3f}s")
    fast = [
        o.finished - o.started
        for o in report.of(1)
        if o.code is grpc.StatusCode.UNAVAILABLE and o.started >= marks["opened"]
    ]
    if fast:
        lines.append(
            f"UNAVAILABLE latency while open: median {statistics.median(fast) * 1000:.1f} ms, "
            f"max {max(fast) * 1000:.1f} ms over {len(fast)} calls"
        )
    lines.append(f"time to recover (first ack after repair): {marks['recovered'] - marks['repaired']:.3f}s")
    print("\n".join(lines))


async def _refused_while_open(load: Load, marks: dict[str, float]) -> None:
    """Wait until 20 calls to the broken shard started after its breaker opened."""
    await load.wait_for(
        lambda: len([o for o in load.report.of(1) if o.started > marks["opened"]]) >= 20,
        10,
        "20 calls are refused",
    )


async def _check_outcome(
    address: str, config: ServerConfig, report: LoadReport, marks: dict[str, float]
) -> None:
    """The common checks, then every acknowledged (and re-sent unacknowledged) message stored once."""
    _check_common(report, marks)
    resent = await resend_unacked(address, config, report)
    checked = assert_exactly_once(report, config, (0, 1))
    print(f"re-sent {resent} unacknowledged; {checked} messages stored exactly once")


def _check_common(report: LoadReport, marks: dict[str, float]) -> None:
    healthy = report.of(0)
    assert healthy and all(o.code is grpc.StatusCode.OK for o in healthy), report.codes(0)
    during = [o for o in report.of(1) if marks["opened"] <= o.started and o.finished <= marks["repaired"]]
    unavailable = [o for o in during if o.code is grpc.StatusCode.UNAVAILABLE]
    assert unavailable, f"no UNAVAILABLE while shard 1 was down: {report.codes(1)}"
    assert all(o.retry_delay is not None and o.retry_delay > 0 for o in unavailable)
    assert set(report.codes(1)) <= {"OK", "UNAVAILABLE", "DEADLINE_EXCEEDED"}, report.codes(1)


async def _warm(load: Load) -> None:
    await load.wait_for(
        lambda: len(load.report.acked(0)) >= 20 and len(load.report.acked(1)) >= 20,
        15,
        "the warm-up calls are acknowledged",
    )


async def _until_recovered(load: Load, running: RunningServer, marks: dict[str, float]) -> None:
    repaired = marks["repaired"]
    marks["recovered"] = await load.wait_for(
        lambda: load.report.first(1, grpc.StatusCode.OK, repaired) is not None, 30, "shard 1 recovers"
    )
    marks["recovered"] = load.report.first(1, grpc.StatusCode.OK, repaired).finished  # type: ignore[union-attr]
    after = marks["recovered"]
    await load.wait_for(
        lambda: len([o for o in load.report.acked(1) if o.started > after]) >= 20,
        15,
        "20 more calls are acknowledged",
    )
    assert _breaker(running) is BreakerState.CLOSED


@asynccontextmanager
async def _warmed_load(running: RunningServer, config: ServerConfig) -> AsyncIterator[tuple[Watch, Load]]:
    """Both shards under the bounded load, past its warm-up, with shard 1's breaker watched."""
    pairs = {s: pairs_on(s, 2, WORKERS_PER_SHARD, rng) for s in (0, 1)}
    async with (
        Watch(lambda: _breaker(running)) as watch,
        Load(f"127.0.0.1:{running.port}", config.auth, pairs) as load,
    ):
        await _warm(load)
        yield watch, load


async def test_kill_9_of_a_shard_server(
    fault_server: RunningServer, fault_config: ServerConfig, victim: EmbeddedPostgres
) -> None:
    address = f"127.0.0.1:{fault_server.port}"
    marks: dict[str, float] = {}
    async with _warmed_load(fault_server, fault_config) as (watch, load):
        marks["fault"] = time.monotonic()
        await asyncio.to_thread(crash, victim)
        marks["opened"] = await watch.wait(BreakerState.OPEN, marks["fault"], 10)
        # Operators see it: AdminService reports the shard's primary down, with its breaker and why.
        healthy, broken = await _shard_stats(address, fault_config)
        assert healthy.primary.up and healthy.primary.breaker_state == admin_service_pb2.BREAKER_STATE_CLOSED
        assert not broken.available and not broken.primary.up and broken.primary.last_error
        assert broken.primary.breaker_state in (
            admin_service_pb2.BREAKER_STATE_OPEN,
            admin_service_pb2.BREAKER_STATE_HALF_OPEN,
        )
        await _refused_while_open(load, marks)
        marks["repaired"] = time.monotonic()
        await asyncio.to_thread(victim.start)
        await _until_recovered(load, fault_server, marks)
    _figures("kill -9 of shard 1's PostgreSQL", load.report, marks)
    _, recovered = await _shard_stats(address, fault_config)
    assert recovered.available and recovered.primary.up and not recovered.primary.last_error
    assert recovered.primary.breaker_trips >= 1
    await _check_outcome(address, fault_config, load.report, marks)


async def test_hung_shard_server_sigstop_then_sigcont(
    fault_server: RunningServer, fault_config: ServerConfig, victim: EmbeddedPostgres
) -> None:
    address = f"127.0.0.1:{fault_server.port}"
    marks: dict[str, float] = {}
    async with _warmed_load(fault_server, fault_config) as (watch, load):
        with frozen(victim):
            marks["fault"] = time.monotonic()
            marks["opened"] = await watch.wait(BreakerState.OPEN, marks["fault"], 10)
            await _refused_while_open(load, marks)
            # An operator's listing of the hung shard is refused by the same open breaker, not
            # left waiting on a connection that will not answer until the call's deadline.
            asked = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as listing:
                await _list_messages(address, fault_config, shard_id=1)
            refused_after = time.monotonic() - asked
            assert listing.value.code() is grpc.StatusCode.UNAVAILABLE, listing.value.details()
            assert "shard 1 is unavailable" in (listing.value.details() or "")
            # Not a speed figure: refused by the breaker, it never waited out the pool's acquire
            # timeout for a connection (what the listing did before it went through the gate).
            assert refused_after < FAST_POOL["acquire_timeout"], refused_after
            marks["repaired"] = time.monotonic()
        await _until_recovered(load, fault_server, marks)
    _figures("SIGSTOP (hang) of shard 1's PostgreSQL, then SIGCONT", load.report, marks)
    await _check_outcome(address, fault_config, load.report, marks)


async def test_restart_of_a_shard_server(
    fault_server: RunningServer, fault_config: ServerConfig, victim: EmbeddedPostgres
) -> None:
    address = f"127.0.0.1:{fault_server.port}"
    marks: dict[str, float] = {}
    async with _warmed_load(fault_server, fault_config) as (watch, load):
        marks["fault"] = time.monotonic()
        await asyncio.to_thread(victim.stop, "fast")
        marks["opened"] = await watch.wait(BreakerState.OPEN, marks["fault"], 10)
        await _refused_while_open(load, marks)
        marks["repaired"] = time.monotonic()
        await asyncio.to_thread(victim.start)
        await _until_recovered(load, fault_server, marks)
    _figures("restart (fast shutdown, start) of shard 1's PostgreSQL", load.report, marks)
    await _check_outcome(address, fault_config, load.report, marks)


async def test_a_move_touching_a_down_shard_is_refused_before_anything_is_recorded(
    fault_server: RunningServer, fault_config: ServerConfig, victim: EmbeddedPostgres
) -> None:
    address = f"127.0.0.1:{fault_server.port}"
    into_down, out_of_down = pairs_on(0, 2, 1, rng)[0], pairs_on(1, 2, 1, rng)[0]
    admin = (("authorization", f"Bearer {issue_token(fault_config.auth, admin=True)}"),)
    async with grpc.aio.insecure_channel(address) as channel:
        dialogs = dialog_service_pb2_grpc.DialogServiceStub(channel)
        sender = (("authorization", f"Bearer {issue_token(fault_config.auth, user_id=into_down[0])}"),)
        sent = await dialogs.SendMessage(
            pb.SendMessageRequest(from_user_id=into_down[0], to_user_id=into_down[1], text="before"),
            metadata=sender,
            timeout=5,
        )
        admin_stub = admin_service_pb2_grpc.AdminServiceStub(channel)
        async with Watch(lambda: _breaker(fault_server)) as watch:
            fault = time.monotonic()
            await asyncio.to_thread(crash, victim)
            await watch.wait(BreakerState.OPEN, fault, 10)
        # Into the down shard, and out of it: both refused by its breaker, at once (not a speed
        # figure: the mover used to wait out the pool's acquire timeout for a connection first).
        for (a, b), target in ((into_down, 1), (out_of_down, 0)):
            asked = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await admin_stub.SetShardOverride(
                    admin_service_pb2.SetShardOverrideRequest(user_id_1=a, user_id_2=b, shard_id=target),
                    metadata=admin,
                    timeout=10,
                )
            refused_after = time.monotonic() - asked
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE, refused.value.details()
            assert "shard 1 is unavailable" in (refused.value.details() or "")
            assert retry_delay_of(refused.value), "UNAVAILABLE carries a retry delay"
            assert refused_after < FAST_POOL["acquire_timeout"], refused_after
        # Nothing half-done: no recorded move for a resumer to finish later, no override.
        assert move_rows(fault_config, into_down) == [] and move_rows(fault_config, out_of_down) == []
        with psycopg.connect(fault_config.control_dsn) as conn:
            assert conn.execute("SELECT count(*) FROM shard_map").fetchone() == (0,)
        # Once the shard is back (its breaker closed), the same request moves the dialog.
        repaired = time.monotonic()
        async with Watch(lambda: _breaker(fault_server)) as watch:
            await asyncio.to_thread(victim.start)
            await watch.wait(BreakerState.CLOSED, repaired, 15)
        reply = await admin_stub.SetShardOverride(
            admin_service_pb2.SetShardOverrideRequest(
                user_id_1=into_down[0], user_id_2=into_down[1], shard_id=1
            ),
            metadata=admin,
            timeout=30,
        )
        assert reply.override.shard_id == 1
        page = await dialogs.GetDialog(
            pb.GetDialogRequest(user_id=into_down[0], peer_user_id=into_down[1]), metadata=sender, timeout=5
        )
        assert [m.message_id for m in page.messages] == [sent.message.message_id]


async def test_a_call_on_a_hung_shard_fails_fast_with_the_default_settings(
    pg_servers: list[EmbeddedPostgres], victim: EmbeddedPostgres, jwt_secret: str
) -> None:
    """SIGSTOP of shard 1's PostgreSQL: a call sent right after gets UNAVAILABLE once the monitor
    declares the shard hung (probe_interval + hung_after_probes x probe_timeout, about 3 s), not
    after the 10 s statement ceiling; shard 0 keeps answering meanwhile."""
    config = make_config(
        [fresh_database(pg_servers[1], "hung"), victim.dsn], jwt_secret, limits={"send_rate_per_second": 0}
    )
    defaults = config.resilience
    assert (defaults.probe_interval, defaults.probe_timeout, defaults.hung_after_probes) == (1.0, 1.0, 2)
    detection = defaults.probe_interval + defaults.hung_after_probes * defaults.probe_timeout
    (hung_pair,) = pairs_on(1, 2, 1, rng)
    (healthy_pair,) = pairs_on(0, 2, 1, rng)
    async with running_server(config) as running:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        stub = dialog_service_pb2_grpc.DialogServiceStub(channel)

        def send(pair: tuple[int, int], text: str) -> grpc.aio.UnaryUnaryCall[Any, Any]:
            token = issue_token(config.auth, user_id=pair[0])
            return stub.SendMessage(
                pb.SendMessageRequest(from_user_id=pair[0], to_user_id=pair[1], text=text),
                metadata=(("authorization", f"Bearer {token}"),),
            )

        await send(hung_pair, "before")  # the pool's connections to shard 1 are open and in use
        with frozen(victim):
            started = time.monotonic()
            hung_call = asyncio.ensure_future(send(hung_pair, "during"))
            await send(healthy_pair, "the other shard answers")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await hung_call
            failed_after = time.monotonic() - started
        await channel.close()
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE, refused.value.details()
    assert "shard 1 is unavailable" in (refused.value.details() or "")
    print(f"\nhung shard: UNAVAILABLE after {failed_after:.2f} s (detection bound {detection:g} s)")
    # Not a speed figure: the bound tells the monitor's verdict from the statement ceiling (10 s).
    assert failed_after < detection + 1.0 < defaults.statement_timeout, failed_after
