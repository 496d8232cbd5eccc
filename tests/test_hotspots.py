"""Recent-activity counts (made on the call path, flushed to each shard's activity table) and what
reads them: `dialogctl hotspots` finds the heavy pairs; `rebalance` proposes and applies overrides."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import psycopg

from client.gen.dialog.v1 import dialog_service_pb2_grpc
from server.dev.embedded_pg import EmbeddedPostgres
from server.observability.activity import ActivityRecorder, FrequentPairs
from server.routing import Pair, bucket_of, calculate_shard
from server.routing.rebalance import PairLoad, Proposal, propose
from server.storage.activity import TOTAL
from tests.faults import start_server_process
from tests.pgfixtures import free_port
from tests.processes import write_server_config
from tests.support import (
    activity_rows,
    dialogctl,
    fresh_cluster,
    make_config,
    pair_on_shard,
    read_all,
    rows_for_pair,
    send_dialog,
    serving,
    token_provider,
    wait_until,
)


def test_balanced_shards_need_no_move() -> None:
    loads = {0: 100.0, 1: 105.0, 2: 95.0, 3: 100.0}
    assert propose(loads, [PairLoad(Pair(1, 2), 1, 50.0)]) == []


def test_the_move_that_brings_the_heaviest_shard_nearest_the_mean_wins() -> None:
    loads = {0: 300.0, 1: 100.0, 2: 90.0, 3: 110.0}
    candidates = [
        PairLoad(Pair(1, 2), 0, 200.0),
        PairLoad(Pair(3, 4), 0, 100.0),
        PairLoad(Pair(5, 6), 1, 100.0),
    ]
    # Moving the 200-message pair would only make shard 2 the new heaviest (290 > 210).
    assert propose(loads, candidates) == [Proposal(Pair(3, 4), 0, 2, 100.0)]


def test_moves_stop_at_max_moves() -> None:
    loads = {0: 1000.0, 1: 0.0}
    candidates = [PairLoad(Pair(i, i + 1), 0, 100.0) for i in range(1, 20, 2)]
    assert len(propose(loads, candidates, max_moves=3)) == 3
    assert len(propose(loads, candidates)) == 5, "then 500 / 500"


def test_frequent_pairs_keep_every_heavy_pair_in_bounded_memory() -> None:
    summary = FrequentPairs(capacity=8)
    heavy = [Pair(1, 2), Pair(3, 4)]
    for i in range(2000):
        # Every third call is a heavy pair's; the rest are all different light pairs.
        pair = heavy[i % 2] if i % 3 == 0 else Pair(1000 + i, 2000 + i)
        summary.add(0, pair, 7, 1, 10, 0)
        assert len(summary) <= 8
    tracked = {row.pair: row for _, row in summary.rows()}
    for pair in heavy:
        # Each heavy pair made ~333 of the 2000 calls, far above 2000 / 9: it is tracked, and its
        # count is low by at most 2000 / 9.
        assert pair in tracked, tracked
        assert 333 - 2000 / 9 <= tracked[pair].messages <= 334
        assert tracked[pair].bytes == 10 * tracked[pair].messages
    assert summary.rounds > 0, "the light pairs forced decrement rounds"


def test_the_recorder_keeps_exact_bucket_totals_beside_the_heavy_pairs() -> None:
    recorder = ActivityRecorder(max_pairs=2, clock=lambda: 1000.0)
    for i in range(50):
        recorder.sent(1, Pair(i, i + 100), 5, 3)
    recorder.read(1, Pair(0, 100), 5)
    period = recorder.take()
    rows = period.by_shard()[1]
    total = next(r for r in rows if r.pair == TOTAL)
    assert (total.bucket, total.messages, total.bytes, total.reads) == (5, 50, 150, 1)
    assert len([r for r in rows if r.pair != TOTAL]) <= 2
    assert recorder.take().by_shard() == {}, "counting goes on in a fresh period"


async def test_two_servers_add_up_their_counts_of_sends_and_reads(
    pg_servers: list[EmbeddedPostgres], jwt_secret: str, new_pair: Callable[[], tuple[int, int]]
) -> None:
    config = fresh_cluster(pg_servers, jwt_secret, 4)
    pair = new_pair()
    home = calculate_shard(*pair, 4)
    low, high = Pair.of(*pair)
    async with serving(config) as (first, first_channel), serving(config) as (second, second_channel):
        await send_dialog(first_channel, config, pair, 30, prefix="a")
        await send_dialog(second_channel, config, pair, 20, prefix="b")
        auth = (("authorization", f"Bearer {token_provider(config, pair[0])()}"),)
        await read_all(dialog_service_pb2_grpc.DialogServiceStub(second_channel), *pair, auth)
        assert first.activity is not None and second.activity is not None
        await first.activity.flush()
        await second.activity.flush()
        rows = activity_rows(config, home)
        bucket = bucket_of(*pair)
        messages, nbytes, reads = rows[bucket, low, high]
        assert (messages, reads) == (50, 1), rows
        assert nbytes == sum(len(f"{p}{i}") for p, n in (("a", 30), ("b", 20)) for i in range(n))
        assert rows[bucket, 0, 0][0] >= 50, "the bucket's total holds the pair's messages"
        assert first.activity.stats.failures == 0 and second.activity.stats.failures == 0
        for other in set(range(4)) - {home}:
            assert activity_rows(config, other) == {}, "counted on the pair's shard only"


async def test_a_failed_flush_is_dropped_and_counted_and_the_next_one_works(
    pg_servers: list[EmbeddedPostgres], jwt_secret: str, new_pair: Callable[[], tuple[int, int]]
) -> None:
    config = fresh_cluster(pg_servers, jwt_secret, 4)
    pair = new_pair()
    home = config.shards[calculate_shard(*pair, 4)]
    async with serving(config) as (running, channel):
        assert running.activity is not None
        with psycopg.connect(home.dsn, autocommit=True) as conn:
            conn.execute(f"ALTER TABLE {home.table}_activity RENAME TO parked_activity")
        try:
            await send_dialog(channel, config, pair, 7, prefix="x")
            await running.activity.flush()  # fails on the missing table: dropped, not raised
        finally:
            with psycopg.connect(home.dsn, autocommit=True) as conn:
                conn.execute(f"ALTER TABLE parked_activity RENAME TO {home.table}_activity")
        assert running.activity.stats.failures == 1
        assert running.activity.stats.dropped_events == 7
        await send_dialog(channel, config, pair, 3, prefix="y")
        await running.activity.flush()
        low, high = Pair.of(*pair)
        assert activity_rows(config, home.shard_id)[bucket_of(*pair), low, high][0] == 3
        assert running.activity.stats.failures == 1


async def test_hotspots_and_rebalance_apply(
    pg_servers: list[EmbeddedPostgres],
    jwt_secret: str,
    tmp_path: Path,
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    config = fresh_cluster(pg_servers, jwt_secret, 4)
    heavy = new_pair()
    home = calculate_shard(*heavy, 4)
    medium = new_pair()
    while calculate_shard(*medium, 4) != home:
        medium = new_pair()
    light = [new_pair() for _ in range(8)]
    async with serving(config) as (running, channel):
        await send_dialog(channel, config, heavy, 120)
        await send_dialog(channel, config, medium, 60)
        for pair in light:
            await send_dialog(channel, config, pair, 3)
        assert running.activity is not None
        await running.activity.flush()
        path = write_server_config(tmp_path / "c.toml", config, f"127.0.0.1:{running.port}", jwt_secret)
        spots: dict[str, Any] = {}

        async def estimated() -> bool:
            # Stored sizes are PostgreSQL's statistics, which its backends report within seconds.
            nonlocal spots
            spots = (await dialogctl(path, "hotspots", "--json")).json()
            # Every shard's, not only the hot one's: a later report would change the proposals
            # between the dry run and --apply below.
            sent = 120 + 60 + 3 * len(light)
            return (
                any(s["shard_id"] == home and s["messages"] >= 180 for s in spots["shards"])
                and sum(s["messages"] for s in spots["shards"]) >= sent
            )

        await wait_until(estimated, "the statistics show the sent messages", within=30, every=0.5)
        assert [p["pair"] for p in spots["pairs"][:2]] == [list(Pair.of(*heavy)), list(Pair.of(*medium))]
        assert spots["pairs"][0]["shard_id"] == home and spots["pairs"][0]["messages"] == 120
        assert spots["pairs"][0]["recent"] == 120, "written just now"
        by_shard = {s["shard_id"]: s for s in spots["shards"]}
        assert max(by_shard.values(), key=lambda s: s["recent"])["shard_id"] == home
        assert by_shard[home]["recent"] >= 180 and by_shard[home]["messages_estimated"]
        by_rate = (await dialogctl(path, "hotspots", "--by", "rate", "--json")).json()
        assert by_rate["pairs"][0]["rate"] == 120 / 3600
        dry = (await dialogctl(path, "rebalance", "--json")).json()
        first = dry["proposals"][0]
        moved = next(p for p in (heavy, medium) if list(Pair.of(*p)) == first["pair"])
        assert first["source"] == home and dry["applied"] == 0
        assert list(rows_for_pair(config, moved)) == [home], "a dry run changes nothing"
        applied = (await dialogctl(path, "rebalance", "--apply", "--json")).json()
        assert applied["proposals"] == dry["proposals"] and applied["applied"] == len(dry["proposals"])
        rows = rows_for_pair(config, moved)
        assert list(rows) == [first["target"]] and len(rows[first["target"]]) == first["load"]
        after = (await dialogctl(path, "hotspots", "--json")).json()
        where = {tuple(p["pair"]): p["shard_id"] for p in after["pairs"]}
        assert where[tuple(first["pair"])] == first["target"], "a moved pair is listed where it lives now"
        # Every pair here wrote all its messages just now: a moved pair's recent messages count
        # on its new shard, not its old one.
        expected = {s["shard_id"]: s["recent"] for s in spots["shards"]}
        for proposal in applied["proposals"]:
            expected[proposal["source"]] -= proposal["load"]
            expected[proposal["target"]] += proposal["load"]
        assert {s["shard_id"]: s["recent"] for s in after["shards"]} == expected
        again = (await dialogctl(path, "rebalance", "--by", "rate", "--json")).json()
        assert first["pair"] not in [p["pair"] for p in again["proposals"]], (
            "its recent messages count on its new shard, so it is not proposed again"
        )


async def test_rebalance_only_uses_the_shards_the_hash_routes_over(
    pg_servers: list[EmbeddedPostgres],
    jwt_secret: str,
    tmp_path: Path,
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    """Shards listed ahead of a reshard are empty; they must not look like the lightest targets."""
    config = fresh_cluster(pg_servers, jwt_secret, 6)
    heavy = new_pair()
    routed = make_config([s.dsn for s in config.shards[:4]], jwt_secret)
    light = [p for p in (new_pair() for _ in range(200)) if p != heavy]
    async with serving(routed) as (running, channel):  # records the 4-shard layout
        await send_dialog(channel, routed, heavy, 120)
        # Every routed shard holds a little, so only the unrouted ones are empty.
        for s in range(4):
            await send_dialog(channel, routed, next(p for p in light if calculate_shard(*p, 4) == s), 3)
        assert running.activity is not None
        await running.activity.flush()
    path = write_server_config(tmp_path / "six.toml", config, "127.0.0.1:1", jwt_secret)
    for by in ("rate", "messages"):
        found: list[dict[str, Any]] = []

        async def proposed(by: str = by) -> bool:
            nonlocal found
            found = (await dialogctl(path, "rebalance", "--by", by, "--json")).json()["proposals"]
            return bool(found)

        # By messages, the shards' sizes are PostgreSQL's statistics, reported within seconds.
        await wait_until(
            proposed, f"the heavy pair's shard is far above the mean ({by})", within=30, every=0.5
        )
        assert all(p["target"] < 4 for p in found), found


async def test_every_worker_process_flushes_its_own_counts(
    pg_servers: list[EmbeddedPostgres],
    jwt_secret: str,
    tmp_path: Path,
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    """`--workers 2`: each worker counts the calls it serves; their flushes add up on the shard."""
    config = fresh_cluster(pg_servers, jwt_secret, 4)
    port = free_port()
    path = write_server_config(
        tmp_path / "workers.toml",
        config,
        f"127.0.0.1:{port}",
        jwt_secret,
        sections={"activity": {"flush_seconds": 0.5}},
    )
    proc = await start_server_process(path, env={"DIALOG_WORKERS": "2"})
    pair = new_pair()
    low, high = Pair.of(*pair)
    try:
        # A channel is one connection, which the kernel gives one worker: several spread the calls.
        for i in range(6):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await send_dialog(channel, config, pair, 5, prefix=f"c{i}-")
        home = calculate_shard(*pair, 4)

        def counted() -> int:
            return activity_rows(config, home).get((bucket_of(*pair), low, high), (0, 0, 0))[0]

        await wait_until(lambda: counted() == 30, "both workers' counts are flushed", explain=counted)
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()


async def test_windows_past_the_retention_are_pruned(
    pg_servers: list[EmbeddedPostgres], jwt_secret: str, new_pair: Callable[[], tuple[int, int]]
) -> None:
    activity = {"flush_seconds": 0.2, "window_seconds": 1, "retention_seconds": 600}
    config = fresh_cluster(pg_servers, jwt_secret, 4)
    config = make_config([s.dsn for s in config.shards], jwt_secret, activity=activity)
    shard = config.shards[2]
    async with serving(config) as (running, channel):
        with psycopg.connect(shard.dsn, autocommit=True) as conn:
            conn.execute(
                f"INSERT INTO {shard.table}_activity (window_start, bucket, user_low, user_high, messages) "
                "VALUES (now() - interval '2 hours', 2, 0, 0, 5)"
            )
        pair = pair_on_shard(2, 4, new_pair)
        await send_dialog(channel, config, pair, 3)
        assert running.activity is not None
        flusher = running.activity
        await wait_until(
            lambda: flusher.stats.pruned_rows >= 1, "the old window is pruned", explain=lambda: flusher.stats
        )
        rows = activity_rows(config, 2)
        low, high = Pair.of(*pair)
        assert rows[bucket_of(*pair), low, high][0] == 3, "recent windows stay"
        with psycopg.connect(shard.dsn) as conn:
            old = conn.execute(
                f"SELECT count(*) FROM {shard.table}_activity WHERE window_start < now() - interval '1 hour'"
            ).fetchone()
        assert old == (0,)
