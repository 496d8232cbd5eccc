"""The automatic rebalancer (issue 24), against real PostgreSQL servers and real server processes:
a hot shard is evened out with every message readable exactly once, one server of several acts
(another takes over when it dies), a hotspot no move can help makes no move, operators' pins win,
and it pauses while a shard is down or a move is unfinished."""

from __future__ import annotations

import asyncio
import json
import re
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest

from client.gen.dialog.v1 import admin_service_pb2 as apb
from client.gen.dialog.v1 import admin_service_pb2_grpc, dialog_service_pb2_grpc
from server.config import ConfigError, ServerConfig, config_from_mapping
from server.dev.embedded_pg import EmbeddedPostgres
from server.routing import Pair
from tests.faults import FAST_POOL, FAST_RESILIENCE, crash, start_postgres, start_server_process
from tests.pgfixtures import free_port, reachable_temp_dir
from tests.processes import write_server_config
from tests.support import (
    Metadata,
    dialogctl,
    fresh_database,
    make_config,
    metric_value,
    pair_on_shard,
    read_all,
    rows_for_pair,
    scrape_metrics,
    send_dialog,
    serving,
    token_provider,
    wait_until,
)

#: The least config_from_mapping accepts.
BASE: dict[str, Any] = {"shards": [{"id": 0, "dsn": "postgresql:///x"}], "auth": {"jwt_secret": "k" * 32}}
#: A rebalancer (and activity flushes) fast enough for a test, otherwise the defaults.
FAST = {"rebalance": {"auto": True, "interval": 0.3}, "activity": {"flush_seconds": 0.3}}


def test_the_environment_turns_it_on_and_sets_its_interval_over_the_file() -> None:
    section = {"rebalance": {"auto": False, "interval": 60}}
    env = {"DIALOG_REBALANCE_AUTO": "1", "DIALOG_REBALANCE_INTERVAL": "5"}
    config = config_from_mapping({**section, **BASE}, env, base_dir=Path.cwd())
    assert (config.rebalance.auto, config.rebalance.interval) == (True, 5.0)
    assert config_from_mapping(BASE, {}, base_dir=Path.cwd()).rebalance.auto is False, "off by default"
    for bad, words in (
        ({"rebalance": {"settle": 1.5}}, "settle"),
        ({"rebalance": {"by": "bytes"}}, "rebalance.by"),
        ({"rebalance": {"window": 7200}}, "retention_seconds"),
        ({"rebalance": {"atuo": True}}, "unknown keys in [rebalance]"),
    ):
        with pytest.raises(ConfigError, match=re.escape(words)):
            config_from_mapping({**bad, **BASE}, {}, base_dir=Path.cwd())


def _messages_per_shard(config: ServerConfig) -> list[int]:
    counts = []
    for shard in config.shards:
        with psycopg.connect(shard.dsn) as conn:
            row = conn.execute(f"SELECT count(*) FROM {shard.table}").fetchone()
        counts.append(int(row[0]) if row else 0)
    return counts


def _decisions(config: ServerConfig, kind: str) -> list[tuple[Any, ...]]:
    """rebalance_decisions rows of a kind: (instance, outcome, user_low, user_high, target, reason)."""
    with psycopg.connect(config.control_dsn) as conn:
        return conn.execute(
            "SELECT instance, outcome, user_low, user_high, target_shard, reason FROM rebalance_decisions "
            "WHERE kind = %s ORDER BY decision_id",
            (kind,),
        ).fetchall()


def _automatic(config: ServerConfig) -> dict[Pair, bool]:
    """shard_map's pairs and whether the rebalancer made each override."""
    with psycopg.connect(config.control_dsn) as conn:
        rows = conn.execute("SELECT user1, user2, automatic FROM shard_map").fetchall()
    return {Pair(r[0], r[1]): bool(r[2]) for r in rows}


async def _read_each_once(
    channel: grpc.aio.Channel, config: ServerConfig, sent: dict[tuple[int, int], list[str]]
) -> None:
    """Every pair's messages are readable through GetDialog, each exactly once, in one shard."""
    stub = dialog_service_pb2_grpc.DialogServiceStub(channel)
    for pair, ids in sent.items():
        auth: Metadata = (("authorization", f"Bearer {token_provider(config, pair[0])()}"),)
        read = await read_all(stub, *pair, auth)
        assert sorted(read) == sorted(ids), f"pair {pair}: {len(read)} read, {len(ids)} sent"
        assert len(rows_for_pair(config, pair)) == 1, f"pair {pair} has rows on more than one shard"


async def test_a_hot_shard_comes_within_1_5x_the_mean_with_every_message_once(
    pg_server: EmbeddedPostgres, jwt_secret: str, tmp_path: Path, new_pair: Callable[[], tuple[int, int]]
) -> None:
    """Issue 24: `make run`'s layout (four tables in one database) plus DIALOG_REBALANCE_AUTO=1 and
    DIALOG_REBALANCE_INTERVAL=5; 14 pairs of 90 messages on shard 0, 20 pairs of 5 elsewhere."""
    dsn = fresh_database(pg_server, "hot")
    config = make_config([dsn] * 4, jwt_secret)
    port = free_port()
    path = write_server_config(tmp_path / "hot.toml", config, f"127.0.0.1:{port}", jwt_secret)
    proc = await start_server_process(
        path, env={"DIALOG_REBALANCE_AUTO": "1", "DIALOG_REBALANCE_INTERVAL": "5"}
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            hot = [pair_on_shard(0, 4, new_pair) for _ in range(14)]
            light = [pair_on_shard(1 + i % 3, 4, new_pair) for i in range(20)]
            counts = {**{p: 90 for p in hot}, **{p: 5 for p in light}}
            sent = dict(
                zip(
                    counts,
                    await asyncio.gather(*(send_dialog(channel, config, p, n) for p, n in counts.items())),
                    strict=True,
                )
            )
            assert _messages_per_shard(config)[0] == 14 * 90

            def balanced() -> bool:
                per_shard = _messages_per_shard(config)
                return max(per_shard) <= 1.5 * sum(per_shard) / len(per_shard)

            await wait_until(
                balanced,
                "the heaviest shard is at most 1.5x the mean",
                within=180,
                every=1.0,
                explain=lambda: _messages_per_shard(config),
            )
            await _read_each_once(channel, config, sent)
            overrides = _automatic(config)
            assert overrides and all(overrides.values()), "every override it made is marked automatic"
            assert set(overrides) <= {Pair.of(*p) for p in hot}, "only pairs of the hot shard moved"
            status = (await dialogctl(path, "rebalance", "--status", "--json")).json()
            assert status["leader"] and str(proc.pid) in status["leader"]
            moves = [m for m in status["moves_last_hour"] if m["kind"] == "move"]
            assert len(moves) == len(overrides) and all(m["source"] == 0 for m in moves)
            assert all(m["rows_moved"] == 90 for m in moves)
            # One log line per decision, with its reason and fields (JSON: stderr is not a terminal).
            lines = [
                json.loads(line)
                for line in path.with_suffix(".log").read_text().splitlines()
                if line.startswith("{")
            ]
            decided = [e for e in lines if e.get("logger") == "server.moves.rebalancer"]
            assert any(e.get("outcome") == "moves" and "x the mean" in e["message"] for e in decided)
            assert sum(1 for e in decided if e.get("outcome") == "moved") == len(moves)
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()


async def test_of_two_servers_one_acts_and_the_other_takes_over_when_it_dies(
    pg_servers: list[EmbeddedPostgres],
    jwt_secret: str,
    tmp_path: Path,
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    config = make_config([fresh_database(s, "two") for s in pg_servers], jwt_secret)
    env = {"DIALOG_REBALANCE_AUTO": "1", "DIALOG_REBALANCE_INTERVAL": "0.5"}
    ports = [free_port(), free_port()]
    procs = []
    for i, port in enumerate(ports):
        path = write_server_config(
            tmp_path / f"s{i}.toml", config, f"127.0.0.1:{port}", jwt_secret, sections=FAST
        )
        procs.append(await start_server_process(path, env=env))
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{ports[0]}") as first,
            grpc.aio.insecure_channel(f"127.0.0.1:{ports[1]}") as second,
        ):
            hot = [pair_on_shard(0, 4, new_pair) for _ in range(6)]
            light = [pair_on_shard(1 + i % 3, 4, new_pair) for i in range(6)]
            # Half of the load through each server: both record activity, both could act.
            await asyncio.gather(
                *(send_dialog(first if i % 2 else second, config, p, 40) for i, p in enumerate(hot)),
                *(send_dialog(first, config, p, 4) for p in light),
            )
            status: dict[str, Any] = {}

            async def moved() -> bool:
                nonlocal status
                status = (await dialogctl(tmp_path / "s0.toml", "rebalance", "--status", "--json")).json()
                return any(m["kind"] == "move" for m in status["moves_last_hour"])

            await wait_until(moved, "the rebalancer moved a pair", within=60, every=0.5)
            acting = next(p for p in procs if f":{p.pid}" in str(status["leader"]))
            other = next(p for p in procs if p is not acting)
            instances = {row[0] for kind in ("round", "move") for row in _decisions(config, kind)}
            assert len(instances) == 1 and str(acting.pid) in instances.pop(), "one server acted"
            acting.kill()  # SIGKILL: its lock goes with its connection
            await acting.wait()

            async def taken_over() -> bool:
                found = (await dialogctl(tmp_path / "s1.toml", "rebalance", "--status", "--json")).json()
                return f":{other.pid}" in str(found["leader"])

            await wait_until(taken_over, "the other server holds the rebalancer lock", within=30, every=0.5)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                await proc.wait()


async def test_a_hotspot_no_move_can_help_makes_no_move(
    pg_servers: list[EmbeddedPostgres], jwt_secret: str, new_pair: Callable[[], tuple[int, int]]
) -> None:
    config = make_config([fresh_database(s, "giant") for s in pg_servers], jwt_secret, **FAST)
    giant = pair_on_shard(0, 4, new_pair)
    small = [pair_on_shard(s, 4, new_pair) for s in range(4) for _ in range(2)]
    async with serving(config) as (running, channel):
        await send_dialog(channel, config, giant, 150)
        for pair in small:
            await send_dialog(channel, config, pair, 4)
        rebalancer = running.rebalancer
        assert rebalancer is not None
        await wait_until(
            lambda: rebalancer.stats.rounds["unhelpable"] >= 3,
            "three rounds found the hotspot unhelpable",
            within=60,
            explain=lambda: (rebalancer.stats.last_outcome, rebalancer.stats.last_reason),
        )
        assert rebalancer.stats.moves == 0 and _automatic(config) == {}
        assert "alone carries" in rebalancer.stats.last_reason
        low, high = Pair.of(*giant)
        skips = _decisions(config, "skip")
        assert any(r[2:4] == (low, high) and "fair share" in r[5] for r in skips), skips
        assert running.metrics_port is not None
        samples, _ = await scrape_metrics(running.metrics_port)
        assert metric_value(samples, "dialog_shard_rebalance_rounds_total", outcome="unhelpable") >= 3
        assert metric_value(samples, "dialog_shard_rebalance_leader") == 1
        assert metric_value(samples, "dialog_shard_rebalance_moves_total") == 0
        # A move left unfinished (a mover that died) pauses it, and says so.
        with psycopg.connect(config.control_dsn, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO shard_moves (bucket, user_low, user_high, source_shard, target_shard, flip, "
                "state) VALUES (1, 1, 2, 0, 1, 'set_override', 'copying')"
            )
        try:
            paused = rebalancer.stats.rounds["paused"]
            await wait_until(lambda: rebalancer.stats.rounds["paused"] > paused, "a round paused")
            assert "unfinished" in rebalancer.stats.last_reason
        finally:
            with psycopg.connect(config.control_dsn, autocommit=True) as conn:
                conn.execute("DELETE FROM shard_moves WHERE user_low = 1 AND user_high = 2")


async def test_operators_pins_are_never_moved_and_a_later_pin_wins(
    pg_servers: list[EmbeddedPostgres],
    jwt_secret: str,
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    config = make_config([fresh_database(s, "pins") for s in pg_servers], jwt_secret, **FAST)
    hot = [pair_on_shard(0, 4, new_pair) for _ in range(6)]
    light = [pair_on_shard(1 + i % 3, 4, new_pair) for i in range(3)]
    admin: Metadata = (("authorization", f"Bearer {token_provider(config, admin=True)()}"),)
    async with serving(config) as (running, channel):
        stub = admin_service_pb2_grpc.AdminServiceStub(channel)
        pinned = Pair.of(*hot[0])
        # Pinned where it is: no data moves, but it is the operator's.
        await stub.SetShardOverride(
            apb.SetShardOverrideRequest(user_id_1=pinned.low, user_id_2=pinned.high, shard_id=0),
            metadata=admin,
        )
        sent = {p: await send_dialog(channel, config, p, 60 if p == hot[0] else 40) for p in hot}
        sent |= {p: await send_dialog(channel, config, p, 4) for p in light}
        rebalancer = running.rebalancer
        assert rebalancer is not None
        await wait_until(lambda: rebalancer.stats.moves >= 2, "the rebalancer moved pairs", within=60)
        await wait_until(lambda: rebalancer.stats.last_outcome == "balanced", "it is balanced", within=60)
        overrides = _automatic(config)
        assert overrides[pinned] is False and list(rows_for_pair(config, hot[0])) == [0]
        moved = [p for p, automatic in overrides.items() if automatic]
        assert len(set(moved) & {Pair.of(*h) for h in hot[1:]}) >= 2, "hot pairs moved off shard 0"
        skips = _decisions(config, "skip")
        assert any(r[2:4] == (pinned.low, pinned.high) and "operator" in r[5] for r in skips), skips
        listed = await stub.ListShardOverrides(apb.ListShardOverridesRequest(page_size=100), metadata=admin)
        assert {Pair(o.user_id_1, o.user_id_2): o.automatic for o in listed.overrides} == overrides
        await _read_each_once(channel, config, sent)
        # An operator pins a pair the rebalancer moved: the pin is the operator's from then on.
        target = next(s for s in range(4) if s != running.placement.router.override_of(moved[0]))
        await stub.SetShardOverride(
            apb.SetShardOverrideRequest(user_id_1=moved[0].low, user_id_2=moved[0].high, shard_id=target),
            metadata=admin,
        )
        assert _automatic(config)[moved[0]] is False


async def test_it_pauses_while_a_shard_is_down(
    pg_servers: list[EmbeddedPostgres], jwt_secret: str, new_pair: Callable[[], tuple[int, int]]
) -> None:
    with reachable_temp_dir("dialog-shard-rebalance-") as base:
        victim = start_postgres(base, "victim")
        victim.create_database("shard1")
        dsns = [fresh_database(pg_servers[0], "pause"), victim.dsn_for("shard1")]
        dsns += [fresh_database(s, "pause") for s in pg_servers[2:]]
        config = make_config(dsns, jwt_secret, pool=FAST_POOL, resilience=FAST_RESILIENCE, **FAST)
        async with serving(config) as (running, channel):
            rebalancer = running.rebalancer
            assert rebalancer is not None
            crash(victim)
            await wait_until(lambda: not running.shards.state(1).primary.available, "shard 1 is down")
            # A hot shard 0, which a round would otherwise even out at once.
            for pair in [pair_on_shard(0, 4, new_pair) for _ in range(4)]:
                await send_dialog(channel, config, pair, 30)
            paused = rebalancer.stats.rounds["paused"]
            await wait_until(
                lambda: rebalancer.stats.rounds["paused"] >= paused + 3,
                "three rounds paused",
                explain=lambda: rebalancer.stats,
            )
            assert "shard(s) 1 not healthy" in rebalancer.stats.last_reason
            assert rebalancer.stats.moves == 0 and _automatic(config) == {}
            outcomes = [r[1] for r in _decisions(config, "round")]
            assert "paused" in outcomes and "moves" not in outcomes, outcomes
