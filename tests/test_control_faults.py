"""Fault tests of the control database (shard_map, moves, the layout) on a PostgreSQL of its own.

The control database lives on a server started for each test, the two shards in fresh databases of
session servers. Under the bounded load of tests.faults (sends and reads on both shards), the
control server is killed (`kill -9`) or hung (SIGSTOP): sends and reads on every shard go on
(routing is the in-memory mirror), SetShardOverride gets UNAVAILABLE with reason
CONTROL_UNAVAILABLE and a RetryInfo at once once the control database's monitor knows, dialogctl
says so in one line; after the repair the breaker closes, the shard-map listener has reloaded,
overrides work again, and every acknowledged message is stored exactly once. A control DSN naming
a primary and a standby (libpq multi-host, `target_session_attrs=read-write`) follows a promotion
of the standby by itself. Figures are printed (`-s`).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
import pytest_asyncio

from client.gen.dialog.v1 import admin_service_pb2, admin_service_pb2_grpc
from server.auth import issue_token
from server.config import ConfigError, ServerConfig, describe_dsn
from server.dev.embedded_pg import EmbeddedPostgres
from server.resilience import BreakerState
from server.routing import Pair
from server.runtime.app import RunningServer, running_server
from tests.faults import (
    FAST_POOL,
    FAST_RESILIENCE,
    Load,
    LoadReport,
    Watch,
    assert_exactly_once,
    crash,
    fault_server_config,
    frozen,
    pairs_on,
    start_postgres,
    start_replica,
)
from tests.pgfixtures import reachable_temp_dir
from tests.support import (
    dialogctl,
    fresh_database,
    make_config,
    retry_delay_of,
    status_details,
    wait_until,
)

WORKERS_PER_SHARD = 3
rng = random.Random()


@pytest.fixture
def control_base() -> Iterator[Path]:
    with reachable_temp_dir("dialog-shard-control-") as base:
        yield base


@pytest.fixture
def control_pg(control_base: Path) -> EmbeddedPostgres:
    """A PostgreSQL server of this test's own, holding only the control database."""
    return start_postgres(control_base, "control")


def _config(pg_servers: list[EmbeddedPostgres], control_dsn: str, jwt_secret: str) -> ServerConfig:
    shards = [fresh_database(pg_servers[1], "ctlfault"), fresh_database(pg_servers[2], "ctlfault")]
    return make_config(
        shards,
        jwt_secret,
        control_dsn=control_dsn,
        pool=FAST_POOL,
        resilience=FAST_RESILIENCE,
        limits={"send_rate_per_second": 0},
    )


@pytest.fixture
def control_config(
    pg_servers: list[EmbeddedPostgres], control_pg: EmbeddedPostgres, jwt_secret: str
) -> ServerConfig:
    return _config(pg_servers, control_pg.dsn, jwt_secret)


@pytest_asyncio.fixture
async def control_server(control_config: ServerConfig) -> AsyncIterator[RunningServer]:
    async with running_server(control_config) as running:
        yield running


def _control_breaker(running: RunningServer) -> BreakerState:
    return running.placement.control.breaker.state


async def _set_override(
    address: str, config: ServerConfig, pair: tuple[int, int], shard_id: int
) -> tuple[float, grpc.aio.AioRpcError | None]:
    """SetShardOverride; how long it took, and its error (None: it succeeded)."""
    token = issue_token(config.auth, admin=True)
    started = time.monotonic()
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            await admin_service_pb2_grpc.AdminServiceStub(channel).SetShardOverride(
                admin_service_pb2.SetShardOverrideRequest(
                    user_id_1=pair[0], user_id_2=pair[1], shard_id=shard_id
                ),
                metadata=(("authorization", f"Bearer {token}"),),
                timeout=10,
            )
        except grpc.aio.AioRpcError as exc:
            return time.monotonic() - started, exc
    return time.monotonic() - started, None


def _assert_control_unavailable(error: grpc.aio.AioRpcError | None) -> None:
    assert error is not None, "the override was made while the control database was down"
    assert error.code() is grpc.StatusCode.UNAVAILABLE, error.details()
    assert "control database is unavailable" in (error.details() or ""), error.details()
    info, _ = status_details(error)
    assert info is not None and info.reason == "CONTROL_UNAVAILABLE", info
    delay = retry_delay_of(error)
    assert delay is not None and delay > 0, "UNAVAILABLE carries a RetryInfo"


async def _refuses_overrides(address: str, config: ServerConfig, pair: tuple[int, int]) -> float:
    """SetShardOverride is refused with CONTROL_UNAVAILABLE; returns how long the refusal took."""
    took, error = await _set_override(address, config, pair, 1)
    _assert_control_unavailable(error)
    return took


async def _traffic_during(load: Load, since: float) -> None:
    """At least 20 sends and 20 reads on each shard started after `since`."""

    def enough() -> bool:
        return all(
            len([o for o in load.report.of(s) if o.started > since]) >= 20
            and len([r for r in load.report.reads if r.shard_id == s and r.started > since]) >= 20
            for s in (0, 1)
        )

    await load.wait_for(enough, 20, "20 sends and reads per shard go on during the outage")


async def _reloaded_and_overrides_work(
    running: RunningServer, config: ServerConfig, reloads_before: int, target: int
) -> tuple[float, tuple[int, int]]:
    """After the repair: the listener has reloaded, and an override (with its move) succeeds again.

    Returns how long after the call the override took effect, and the pair.
    """
    await wait_until(
        lambda: running.placement.reloads > reloads_before,
        "the shard-map listener reloads",
        within=15,
        explain=lambda: f"{running.placement.reloads} reloads",
    )
    (pair,) = pairs_on(1 - target, 2, 1, rng)
    address = f"127.0.0.1:{running.port}"
    took, error = await _set_override(address, config, pair, target)
    assert error is None, f"{error.code().name}: {error.details()}"
    assert running.placement.router.resolve(*pair).shard_id == target
    return took, pair


def _check_traffic(report: LoadReport, since: float, until: float) -> tuple[list[float], list[float]]:
    """Every send and read on both shards succeeded; the latencies of those during [since, until]."""
    for shard_id in (0, 1):
        assert report.of(shard_id) and all(o.code is grpc.StatusCode.OK for o in report.of(shard_id)), (
            shard_id,
            report.codes(shard_id),
        )
    failed_reads = [r for r in report.reads if r.code is not grpc.StatusCode.OK]
    assert report.reads and not failed_reads, [r.code.name for r in failed_reads][:5]
    sends = [o.finished - o.started for o in report.outcomes if since <= o.started and o.finished <= until]
    reads = [r.finished - r.started for r in report.reads if since <= r.started and r.finished <= until]
    assert sends and reads
    return sends, reads


def _ms(values: list[float]) -> str:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (
        f"median {statistics.median(ordered) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
        f"max {ordered[-1] * 1000:.1f} ms over {len(ordered)} calls"
    )


def _print_figures(name: str, lines: list[str], during: tuple[list[float], list[float]]) -> None:
    sends, reads = during
    print(
        "\n".join(
            [
                f"--- {name} ---",
                *lines,
                f"sends during the outage: {_ms(sends)}",
                f"reads during the outage: {_ms(reads)}",
            ]
        )
    )


async def test_kill_9_of_the_control_database(
    control_server: RunningServer,
    control_config: ServerConfig,
    control_pg: EmbeddedPostgres,
    control_base: Path,
    jwt_secret: str,
) -> None:
    running, config = control_server, control_config
    address = f"127.0.0.1:{running.port}"
    config_path = fault_server_config(control_base / "ctl.toml", config, running.port, jwt_secret, 2.0)
    pairs = {s: pairs_on(s, 2, WORKERS_PER_SHARD, rng) for s in (0, 1)}
    (refused_pair,) = pairs_on(0, 2, 1, rng)
    async with (
        Watch(lambda: _control_breaker(running)) as watch,
        Load(address, config.auth, pairs, reads=True) as load,
    ):
        await load.wait_for(
            lambda: all(len(load.report.acked(s)) >= 20 for s in (0, 1)), 15, "the warm-up calls succeed"
        )
        reloads_before = running.placement.reloads
        fault = time.monotonic()
        await asyncio.to_thread(crash, control_pg)
        opened = await watch.wait(BreakerState.OPEN, fault, 10)
        refused = await _refuses_overrides(address, config, refused_pair)
        # Not a speed figure: refused by the open breaker, not after the pool's acquire timeout.
        assert refused < FAST_POOL["acquire_timeout"], refused
        # dialogctl: the RPC's refusal (retried within --timeout), and a command that reads the
        # control database itself, each fail with one line naming it and a non-zero status.
        over_rpc = await dialogctl(
            config_path, "--timeout", "1", "overrides", "set", *map(str, refused_pair), "1"
        )
        assert over_rpc.returncode == 64 + grpc.StatusCode.UNAVAILABLE.value[0], over_rpc.stderr
        assert over_rpc.stderr.count("\n") == 1 and "control database is unavailable" in over_rpc.stderr
        direct = await dialogctl(config_path, "moves")
        assert direct.returncode == 1, direct.stderr
        assert direct.stderr.count("\n") == 1 and "control database" in direct.stderr, direct.stderr
        await _traffic_during(load, opened)
        repaired = time.monotonic()
        await asyncio.to_thread(control_pg.start)
        closed = await watch.wait(BreakerState.CLOSED, repaired, 15)
        took, pair = await _reloaded_and_overrides_work(running, config, reloads_before, 1)
        reloaded = time.monotonic()
        during = _check_traffic(load.report, fault, repaired)
    # Nothing of the refused override was recorded.
    with psycopg.connect(config.control_dsn) as conn:
        low, high = Pair.of(*refused_pair)
        assert conn.execute(
            "SELECT count(*) FROM shard_moves WHERE user_low = %s AND user_high = %s", (low, high)
        ).fetchone() == (0,)
    checked = assert_exactly_once(load.report, config, (0, 1))
    _print_figures(
        "kill -9 of the control database",
        [
            f"breaker open after {opened - fault:.3f} s; SetShardOverride refused in {refused * 1000:.1f} ms",
            f"after restart: breaker closed in {closed - repaired:.3f} s, listener reloaded and an override "
            f"with its move made {reloaded - repaired:.3f} s after the restart began "
            f"(the override {took:.3f} s)",
            f"{checked} acknowledged messages stored exactly once; {pair} pinned to shard 1",
        ],
        during,
    )


async def test_hung_control_database_sigstop_then_sigcont(
    control_server: RunningServer, control_config: ServerConfig, control_pg: EmbeddedPostgres
) -> None:
    running, config = control_server, control_config
    address = f"127.0.0.1:{running.port}"
    pairs = {s: pairs_on(s, 2, WORKERS_PER_SHARD, rng) for s in (0, 1)}
    first, second = pairs_on(0, 2, 2, rng)
    resilience = config.resilience
    detection = resilience.probe_interval + resilience.hung_after_probes * resilience.probe_timeout
    async with (
        Watch(lambda: _control_breaker(running)) as watch,
        Load(address, config.auth, pairs, reads=True) as load,
    ):
        await load.wait_for(
            lambda: all(len(load.report.acked(s)) >= 20 for s in (0, 1)), 15, "the warm-up calls succeed"
        )
        reloads_before = running.placement.reloads
        with frozen(control_pg):
            fault = time.monotonic()
            # Sent at once: it waits on the hung database until the monitor declares it hung.
            first_refused = await _refuses_overrides(address, config, first)
            opened = await watch.wait(BreakerState.OPEN, fault, 10)
            # Not a speed figure: the monitor's verdict, not the mover's 10 s connect timeout.
            assert first_refused < detection + 1.0, first_refused
            refused = await _refuses_overrides(address, config, second)
            assert refused < FAST_POOL["acquire_timeout"], refused
            await _traffic_during(load, opened)
            repaired = time.monotonic()
        closed = await watch.wait(BreakerState.CLOSED, repaired, 15)
        took, pair = await _reloaded_and_overrides_work(running, config, reloads_before, 1)
        reloaded = time.monotonic()
        during = _check_traffic(load.report, fault, repaired)
    # The refused overrides were not made later either: their callers were told they failed.
    with psycopg.connect(config.control_dsn) as conn:
        for refused_pair in (first, second):
            low, high = Pair.of(*refused_pair)
            assert conn.execute(
                "SELECT count(*) FROM shard_map WHERE user1 = %s AND user2 = %s", (low, high)
            ).fetchone() == (0,)
    checked = assert_exactly_once(load.report, config, (0, 1))
    _print_figures(
        "SIGSTOP (hang) of the control database, then SIGCONT",
        [
            f"breaker open after {opened - fault:.3f} s (detection bound {detection:g} s)",
            f"SetShardOverride sent at the hang refused after {first_refused:.3f} s; "
            f"once open, in {refused * 1000:.1f} ms",
            f"after SIGCONT: breaker closed in {closed - repaired:.3f} s, listener reloaded and an override "
            f"with its move made {reloaded - repaired:.3f} s after SIGCONT (the override {took:.3f} s)",
            f"{checked} acknowledged messages stored exactly once; {pair} pinned to shard 1",
        ],
        during,
    )


def _multi_host(primary: EmbeddedPostgres, standby: EmbeddedPostgres) -> str:
    return (
        f"host={primary.host},{standby.host} port={primary.port},{standby.port} "
        f"dbname={primary.database} user=postgres target_session_attrs=read-write connect_timeout=2 "
        # The standby is a copy of the primary's data directory, password file included.
        f"passfile={primary.password_file}"
    )


def test_multi_host_control_dsns_load_and_are_described() -> None:
    dsn = (
        "host=10.0.0.1,10.0.0.2 port=5432,5433 dbname=dialog user=u password=secret "
        "target_session_attrs=read-write"
    )
    config = make_config(["postgresql://u@10.0.0.9/dialog"], "x" * 40, control_dsn=dsn)
    assert config.control_dsn == dsn
    assert describe_dsn(dsn) == "10.0.0.1:5432,10.0.0.2:5433/dialog"
    assert describe_dsn("postgresql://u:secret@a:5432,b:5433/d") == "a:5432,b:5433/d"
    assert describe_dsn("host=a,b port=6432 dbname=d") == "a:6432,b:6432/d"
    with pytest.raises(ConfigError, match="control_dsn is not a valid"):
        make_config(["postgresql://u@10.0.0.9/dialog"], "x" * 40, control_dsn="host='unterminated")


async def test_a_standby_of_the_control_database_takes_over_when_promoted(
    pg_servers: list[EmbeddedPostgres], control_pg: EmbeddedPostgres, control_base: Path, jwt_secret: str
) -> None:
    standby = await asyncio.to_thread(start_replica, control_pg, control_base, "standby")
    config = _config(pg_servers, _multi_host(control_pg, standby), jwt_secret)
    async with running_server(config) as running:
        address = f"127.0.0.1:{running.port}"
        (before,) = pairs_on(0, 2, 1, rng)
        _, error = await _set_override(address, config, before, 1)
        assert error is None, error.details()
        low, high = Pair.of(*before)

        def replicated() -> bool:
            with psycopg.connect(standby.dsn) as conn:
                row = conn.execute(
                    "SELECT shard_id FROM shard_map WHERE user1 = %s AND user2 = %s", (low, high)
                ).fetchone()
            return row == (1,)

        await wait_until(lambda: asyncio.to_thread(replicated), "the standby has the override", within=10)
        pairs = {s: pairs_on(s, 2, 2, rng) for s in (0, 1)}
        async with (
            Watch(lambda: _control_breaker(running)) as watch,
            Load(address, config.auth, pairs, reads=True) as load,
        ):
            await load.wait_for(
                lambda: all(len(load.report.acked(s)) >= 10 for s in (0, 1)), 15, "the warm-up calls succeed"
            )
            reloads_before = running.placement.reloads
            fault = time.monotonic()
            await asyncio.to_thread(crash, control_pg)
            opened = await watch.wait(BreakerState.OPEN, fault, 10)
            # The standby answers, but read-only: no override is made there.
            await _refuses_overrides(address, config, pairs_on(0, 2, 1, rng)[0])
            # Probed through the multi-host DSN, the read-only standby did not count as the database.
            assert watch.first(BreakerState.CLOSED, opened) is None, watch.transitions
            promoted_at = time.monotonic()
            with psycopg.connect(standby.dsn, autocommit=True) as conn:
                assert conn.execute("SELECT pg_promote()").fetchone() == (True,)
            closed = await watch.wait(BreakerState.CLOSED, promoted_at, 15)
            took, pair = await _reloaded_and_overrides_work(running, config, reloads_before, 1)
            reconnected = time.monotonic()
            during = _check_traffic(load.report, fault, promoted_at)
        # Both overrides are in the promoted standby, and the mirror routes by them.
        with psycopg.connect(standby.dsn) as conn:
            assert conn.execute("SELECT count(*) FROM shard_map").fetchone() == (2,)
        assert running.placement.router.resolve(*before).shard_id == 1
        assert running.placement.control.location == describe_dsn(config.control_dsn)
    checked = assert_exactly_once(load.report, config, (0, 1))
    _print_figures(
        "kill -9 of the control primary, then promotion of its standby",
        [
            f"breaker open after {opened - fault:.3f} s; closed {closed - promoted_at:.3f} s after "
            f"pg_promote() was called; an override with its move made {reconnected - promoted_at:.3f} s "
            f"after it (the override {took:.3f} s)",
            f"{checked} acknowledged messages stored exactly once; {pair} pinned to shard 1",
        ],
        during,
    )
