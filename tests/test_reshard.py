"""Online resharding while writers run, and after a crash, with `dialogctl reshard`.

Growing 4 -> 8 and 4 -> 16 (bucket units), full reshuffles 4 -> 6 and 6 -> 9 and
shrinking 6 -> 4 (buckets split by hash residue on the target side, the source side or
both); a reshard killed at each step of a move.

Each test gets fresh databases on the four PostgreSQL servers (shard i on server i % 4), so
several shards share a server and at least one is on a different server from the others.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from client.gen.dialog.v1 import admin_service_pb2 as pb
from client.gen.dialog.v1 import admin_service_pb2_grpc, dialog_service_pb2_grpc
from server.config import ServerConfig
from server.dev.embedded_pg import EmbeddedPostgres
from server.moves.mover import STEP_BOUNDARIES
from server.moves.reshard import ReshardRefused, check_target, moving_fraction, plan_steps
from server.routing import NUM_BUCKETS, Pair, bucket_of, calculate_shard, pair_hash
from server.routing.layout import moving_units, unit_of
from server.storage.ids import MessageIdGenerator, id_time
from server.storage.layout import Layout
from tests.crashing_mover import CRASHED_EXIT
from tests.docblocks import marked_blocks as readme_blocks
from tests.processes import child_env, run_async, write_server_config
from tests.support import (
    DIALOGCTL,
    STATE_AFTER_CRASH,
    Metadata,
    Writer,
    dialogctl,
    fresh_cluster,
    make_config,
    preload_pairs,
    read_all,
    serving,
    wait_until,
    write_guard_query,
)


def stored(config: ServerConfig) -> list[tuple[int, str, Pair]]:
    """(shard, message id, pair) of every row of every shard."""
    found = []
    for shard in config.shards:
        with psycopg.connect(shard.dsn) as conn:
            for message_id, low, high in conn.execute(
                f"SELECT message_id, user_low, user_high FROM {shard.table}"
            ).fetchall():
                found.append((shard.shard_id, str(message_id), Pair(low, high)))
    return found


def test_refusals_explain_themselves() -> None:
    with pytest.raises(ReshardRefused, match=r"not a multiple of 4.*about 67% of all pairs.*--full-reshuf"):
        check_target(4, 6, 16, full_reshuffle=False)
    with pytest.raises(ReshardRefused, match=r"shrinking from 8 to 6 shards moves about 75%.*--full-reshuf"):
        check_target(8, 6, 8, full_reshuffle=False)
    with pytest.raises(ReshardRefused, match=r"add \[\[shards\]\] entries for shards 8\.\.15"):
        check_target(4, 16, 8, full_reshuffle=True)
    with pytest.raises(ReshardRefused, match=r"would walk 4,198,400 hash residues"):
        check_target(4, 1025, 2048, full_reshuffle=True)
    check_target(4, 16, 16, full_reshuffle=False)
    check_target(4, 12, 16, full_reshuffle=False)  # a multiple: only the pairs that change shard move
    check_target(4, 6, 16, full_reshuffle=True)
    check_target(8, 4, 8, full_reshuffle=True)
    assert moving_fraction(4, 8) == 0.5 and moving_fraction(4, 16) == 0.75


def test_plan_moves_each_bucket_that_changes_shard_once() -> None:
    steps = plan_steps(Layout(4, 16, frozenset({(4, 0, 4)})), 16, 64)
    moved = [b for s in steps for b in s.buckets]
    assert len(moved) == len(set(moved)) == NUM_BUCKETS * 3 // 4 - 1, "bucket 4 already flipped"
    assert all(
        b % 4 == s.source and b % 16 == s.target and len(s.buckets) <= 64 for s in steps for b in s.buckets
    )


@pytest.mark.parametrize(
    ("start_shards", "target_shards", "flags"),
    # `make test` runs a doubling and a shrinking full reshuffle; the other shapes are slow
    # (`pytest -m slow`), like the soak.
    [
        (4, 8, ()),
        pytest.param(4, 6, ("--full-reshuffle",), marks=pytest.mark.slow),
        (6, 4, ("--full-reshuffle",)),
        pytest.param(6, 9, ("--full-reshuffle",), marks=pytest.mark.slow),
        pytest.param(4, 16, (), marks=pytest.mark.slow),
    ],
    ids=["4-to-8", "4-to-6-full-reshuffle", "6-to-4-shrink", "6-to-9-full-reshuffle", "4-to-16"],
)
async def test_reshard_under_writers_keeps_every_message_once_where_the_hash_says(
    start_shards: int,
    target_shards: int,
    flags: tuple[str, ...],
    pg_servers: list[EmbeddedPostgres],
    jwt_secret: str,
    tmp_path: Path,
    new_pair: Callable[[], tuple[int, int]],
    auth_for: Callable[..., Metadata],
    admin_auth: Metadata,
) -> None:
    config = fresh_cluster(pg_servers, jwt_secret, max(start_shards, target_shards))
    first = make_config([s.dsn for s in config.shards[:start_shards]], jwt_secret)
    pairs = [new_pair() for _ in range(200)]
    pinned = pairs[0]
    # The first server starts with `start_shards` shards: the control database records that layout.
    async with serving(first) as (_, channel):
        history = preload_pairs(config, pairs, 4, start_shards)
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        pin_to = (calculate_shard(*pinned, start_shards) + 1) % start_shards
        await admin.SetShardOverride(
            pb.SetShardOverrideRequest(user_id_1=pinned[0], user_id_2=pinned[1], shard_id=pin_to),
            metadata=admin_auth,
        )
    path = write_server_config(tmp_path / "all.toml", config, "127.0.0.1:1", jwt_secret)
    reshard = ("reshard", "--shards", str(target_shards), *flags)
    if flags:
        refused = await dialogctl(path, "reshard", "--shards", str(target_shards), "--dry-run")
        assert refused.returncode == 1 and "--full-reshuffle" in refused.stderr, refused.stderr
    dry = (await dialogctl(path, *reshard, "--dry-run", "--json")).json()
    should_move = [
        p for p in pairs[1:] if calculate_shard(*p, start_shards) != calculate_shard(*p, target_shards)
    ]
    assert (dry["messages"], dry["pairs"]) == (4 * len(should_move), len(should_move))

    # Every server lists all shards; the layout keeps the old count until the reshard ends.
    async with serving(config) as (running, channel):
        assert running.placement.router.num_shards == start_shards
        stub = dialog_service_pb2_grpc.DialogServiceStub(channel)
        writers = [Writer(stub, a, b, auth_for(a)) for a, b in pairs[:6]]
        stop = asyncio.Event()
        tasks = [asyncio.create_task(w.run(stop, max_messages=80)) for w in writers]
        await wait_until(lambda: all(len(w.acked) >= 5 for w in writers), "the writers are going")
        result = (await dialogctl(path, *reshard, "--buckets-per-step", "256", "--json")).json()
        during = [len(w.acked) for w in writers]
        await wait_until(
            lambda: all(len(w.acked) >= min(n + 5, 80) for w, n in zip(writers, during, strict=True)),
            "the writers wrote after the reshard",
        )
        stop.set()
        await asyncio.gather(*tasks)
        await wait_until(lambda: running.placement.router.num_shards == target_shards, "the mirror saw it")
        for w in writers:
            assert w.other_errors == [], w.other_errors
            pair = Pair.of(w.sender, w.recipient)
            pair_history = {i for _, i, p in stored(config) if p == pair}
            assert await read_all(stub, w.sender, w.recipient, w.auth) == sorted(pair_history)
    assert result["rows_copied"] >= 4 * len(should_move)
    assert result["unused_shards"] == [
        {"shard_id": s, "pinned_pairs": int(s == pin_to)} for s in range(target_shards, start_shards)
    ], "after shrinking, the shards the hash left are listed with what overrides keep there"

    acknowledged = history | {i for w in writers for i in w.acked}
    rows = stored(config)
    counts = Counter(i for _, i, _ in rows)
    assert set(counts) == acknowledged, "nothing lost, nothing extra"
    assert max(counts.values()) == 1, "nothing duplicated"
    for shard_id, _, pair in rows:
        expected = pin_to if pair == Pair.of(*pinned) else calculate_shard(*pair, target_shards)
        assert shard_id == expected
    with psycopg.connect(config.control_dsn) as conn:
        assert conn.execute("SELECT num_shards, target_shards FROM shard_layout").fetchone() == (
            target_shards,
            None,
        )
    assert (await dialogctl(path, "verify", "--json")).json()["clean"] is True
    # The offline calculator follows the stored layout, not the config's count of shards.
    a, b = pairs[1]
    offline = (await dialogctl(path, "--json", "shard-of", "--offline", str(a), str(b))).json()
    assert offline["num_shards"] == target_shards
    assert offline["shard_id"] == calculate_shard(a, b, target_shards)


@pytest.mark.parametrize(
    ("step", "target_shards", "flags"),
    [
        pytest.param("fence_committed", 8, (), id="fence_committed-4-to-8"),
        pytest.param("retired", 8, (), id="retired-4-to-8"),
        # Every step of a full reshuffle's move is a slow test but one (`pytest -m slow`).
        *(
            pytest.param(
                step,
                6,
                ("--full-reshuffle",),
                id=f"{step}-4-to-6",
                marks=() if step == "fenced" else pytest.mark.slow,
            )
            for step in STEP_BOUNDARIES
        ),
    ],
)
async def test_reshard_crashed_mid_step_completes_on_rerun(
    step: str,
    target_shards: int,
    flags: tuple[str, ...],
    pg_servers: list[EmbeddedPostgres],
    jwt_secret: str,
    tmp_path: Path,
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    config = fresh_cluster(pg_servers, jwt_secret, target_shards)
    async with serving(make_config([s.dsn for s in config.shards[:4]], jwt_secret)):
        pass  # records the 4-shard layout and creates the schema
    pairs = [new_pair() for _ in range(100)]
    history = preload_pairs(config, pairs, 2)
    path = write_server_config(tmp_path / "all.toml", config, "127.0.0.1:1", jwt_secret)
    reshard = ("reshard", "--shards", str(target_shards), "--buckets-per-step", "512", *flags)
    crashed = await dialogctl(path, *reshard, crash_at=step)
    assert crashed.returncode == CRASHED_EXIT, crashed.stderr
    with psycopg.connect(config.control_dsn) as conn:
        assert conn.execute("SELECT target_shards FROM shard_layout").fetchone() == (target_shards,)
        assert conn.execute("SELECT count(*) FROM shard_moves WHERE state <> 'done'").fetchone() == (1,)
    status = (await dialogctl(path, "reshard", "--status", "--json")).json()
    assert (status["num_shards"], status["target_shards"]) == (4, target_shards)
    assert 0 <= status["units_moved"] < status["units_total"] == len(moving_units(4, target_shards))
    assert [m["state"] for m in status["unfinished_moves"]] == [STATE_AFTER_CRASH[step]]
    finished = await dialogctl(path, *reshard, "--json")
    assert finished.json()["num_shards"] == target_shards
    human = await dialogctl(path, "reshard", "--status")
    assert f"layout: {target_shards} shards; no reshard running" in human.stdout
    rows = stored(config)
    assert sorted(i for _, i, _ in rows) == sorted(history)
    assert all(shard_id == calculate_shard(*pair, target_shards) for shard_id, _, pair in rows)
    assert (await dialogctl(path, "verify", "--json")).json()["clean"] is True


async def test_a_bucket_group_is_copied_and_synced_in_parts(
    pg_servers: list[EmbeddedPostgres], jwt_secret: str, new_pair: Callable[[], tuple[int, int]]
) -> None:
    """A group bigger than `part_rows` is walked in several parts, each keyset walk over fewer buckets."""
    from server.cli.shards import tool_shards
    from server.storage import transfer

    config = fresh_cluster(pg_servers, jwt_secret, 4)
    async with tool_shards(config) as shards:  # creates the schema
        pairs = [p for p in (new_pair() for _ in range(200)) if calculate_shard(*p, 4) == 0][:20]
        preload_pairs(config, pairs, 3)
        source, target = shards.store(0), shards.store(1)
        unit = transfer.Unit(tuple(sorted({bucket_of(*p) for p in pairs})), pinned=(Pair.of(*pairs[0]),))
        assert len(await transfer._parts(source, unit, 7)) > 1
        copied = await transfer.copy(source, target, unit, chunk_rows=2, part_rows=7)
        assert copied == 3 * (len(pairs) - 1), "every row but the pinned pair's"
        assert await transfer.sync(source, target, unit, chunk_ids=4, part_rows=7) == 0
        assert (await transfer.verify(source, target, unit)).count == copied


async def test_sql_pair_hash_is_the_seed_hash_bit_for_bit(
    pg_servers: list[EmbeddedPostgres], jwt_secret: str
) -> None:
    """The fences and a full reshuffle's selections compute the hash in SQL: it must match Go's."""
    from server.cli.shards import tool_shards

    vectors = json.loads((Path(__file__).parent / "golden" / "calculate_shard_vectors.json").read_text())
    config = fresh_cluster(pg_servers, jwt_secret, 1)
    async with tool_shards(config):  # creates the schema, the function with it
        pass
    pairs = sorted({Pair.of(v["a"], v["b"]) for v in vectors})
    with psycopg.connect(config.shards[0].dsn) as conn:
        rows = conn.execute(
            "SELECT lo, hi, dialog_pair_hash(lo, hi) FROM unnest(%s::bigint[], %s::bigint[]) AS u(lo, hi)",
            ([p.low for p in pairs], [p.high for p in pairs]),
        ).fetchall()
    expected = {Pair.of(v["a"], v["b"]): int(v["hash"]) for v in vectors}
    assert len(rows) == len(pairs) > 1000
    assert [(Pair(lo, hi), int(h)) for lo, hi, h in rows] == [(p, expected[p]) for p in pairs]


async def test_a_residue_fence_holds_back_only_its_part_of_the_bucket(
    pg_servers: list[EmbeddedPostgres], jwt_secret: str, new_pair: Callable[[], tuple[int, int]]
) -> None:
    """A full reshuffle fences the pairs of a bucket going to one shard; the bucket's others write on."""
    from server.cli.shards import tool_shards
    from server.resilience.db_errors import FENCED_SQLSTATE
    from server.storage.fences import FenceState, FenceStore

    config = fresh_cluster(pg_servers, jwt_secret, 1)
    bucket = bucket_of(*new_pair())
    # Two pairs for each of three residues of hash % 6, all in one bucket.
    by_residue: dict[int, list[Pair]] = defaultdict(list)
    low = 1_000_000 + secrets.randbelow(10**9)
    high = low
    while len(by_residue) < 3 or any(len(p) < 2 for p in by_residue.values()):
        high += 1
        if bucket_of(low, high) == bucket:
            by_residue[pair_hash(low, high) % 6].append(Pair(low, high))
    fenced_residue = next(iter(by_residue))
    exempt = by_residue[fenced_residue][1]  # pinned to this shard by an override: stays writable

    async with tool_shards(config) as shards:
        store = shards.store(0)
        async with store.pool.connection() as conn:
            await FenceStore(store.table).set(
                conn,
                [(bucket, -6, fenced_residue)],
                FenceState.FENCED,
                1,
                exempt=[(bucket, exempt.low, exempt.high)],
            )
            for residue, pairs in by_residue.items():
                for pair in pairs:
                    query = write_guard_query(store.table)
                    if residue == fenced_residue and pair != exempt:
                        with pytest.raises(psycopg.Error) as refused:
                            await conn.execute(query, (bucket, pair.low, pair.high))
                        assert refused.value.sqlstate == FENCED_SQLSTATE
                    else:
                        cur = await conn.execute(query, (bucket, pair.low, pair.high))
                        assert await cur.fetchone() == (True,), (residue, pair)


async def test_a_stray_copy_on_the_target_stops_the_step_until_verify_repairs_it(
    pg_servers: list[EmbeddedPostgres],
    jwt_secret: str,
    tmp_path: Path,
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    from server.cli.shards import tool_shards

    config = fresh_cluster(pg_servers, jwt_secret, 8)
    async with serving(make_config([s.dsn for s in config.shards[:4]], jwt_secret)):
        pass  # records the 4-shard layout and creates the schema
    async with tool_shards(config):
        pass  # creates the new shards' tables too
    pairs = [p for p in (new_pair() for _ in range(400)) if calculate_shard(*p, 4) != calculate_shard(*p, 8)]
    history = preload_pairs(config, pairs[:50], 2)
    # A message of a moving pair that only its future shard holds: nothing the mover wrote.
    stray_pair = pairs[0]
    message_id = MessageIdGenerator().next()
    low, high = Pair.of(*stray_pair)
    shard = config.shards[calculate_shard(*stray_pair, 8)]
    with psycopg.connect(shard.dsn) as conn:
        conn.execute(
            f"INSERT INTO {shard.table} (message_id, user_low, user_high, bucket, from_user_id, to_user_id, "
            "text, created_at) VALUES (%s, %s, %s, %s, %s, %s, 'stray', %s)",
            (message_id, low, high, bucket_of(low, high), low, high, id_time(message_id)),
        )
    stray = {str(message_id)}
    path = write_server_config(tmp_path / "all.toml", config, "127.0.0.1:1", jwt_secret)

    failed = await dialogctl(path, "reshard", "--shards", "8", "--buckets-per-step", "4096")
    assert failed.returncode == 1
    assert "nothing was moved" in failed.stderr and "Traceback" not in failed.stderr, failed.stderr
    with psycopg.connect(config.control_dsn) as conn:
        flipped = conn.execute("SELECT bucket, source_shard, target_shard FROM unit_flips").fetchall()
    assert unit_of(pair_hash(*stray_pair), 4, 8) not in flipped, "the failed step did not flip"
    repaired = (await dialogctl(path, "verify", "--repair", "--json")).json()
    assert repaired["copied"] == 1, repaired
    finished = await dialogctl(path, "reshard", "--shards", "8", "--buckets-per-step", "4096", "--json")
    assert finished.json()["num_shards"] == 8
    rows = stored(config)
    assert sorted(i for _, i, _ in rows) == sorted(history | stray)
    assert all(shard_id == calculate_shard(*pair, 8) for shard_id, _, pair in rows)


async def test_a_server_completes_the_step_a_crashed_reshard_left_fenced(
    pg_servers: list[EmbeddedPostgres],
    jwt_secret: str,
    tmp_path: Path,
    new_pair: Callable[[], tuple[int, int]],
    auth_for: Callable[..., Metadata],
) -> None:
    from client.gen.dialog.v1 import dialog_service_pb2 as dpb

    config = fresh_cluster(pg_servers, jwt_secret, 8)
    async with serving(make_config([s.dsn for s in config.shards[:4]], jwt_secret)):
        pass  # records the 4-shard layout and creates the schema
    pairs = [new_pair() for _ in range(200)]
    history = preload_pairs(config, pairs, 2)
    path = write_server_config(tmp_path / "all.toml", config, "127.0.0.1:1", jwt_secret)
    reshard = ("reshard", "--shards", "8", "--buckets-per-step", "4096")
    crashed = await dialogctl(path, *reshard, crash_at="fenced")
    assert crashed.returncode == CRASHED_EXIT, crashed.stderr

    def unfinished() -> list[tuple[int, int, int]]:
        with psycopg.connect(config.control_dsn) as conn:
            return conn.execute(
                "SELECT move_id, source_shard, target_shard FROM shard_moves WHERE state <> 'done'"
            ).fetchall()

    [(move_id, source, target)] = unfinished()
    fenced = next(p for p in pairs if (calculate_shard(*p, 4), calculate_shard(*p, 8)) == (source, target))
    resuming = make_config([s.dsn for s in config.shards], jwt_secret, resilience={"move_resume_after": 0.5})
    async with serving(resuming) as (_, channel):
        # Nobody re-runs the reshard: the server sees the move idle with its lock free.
        await wait_until(lambda: unfinished() == [], "a server completed the move", within=20)
        stub = dialog_service_pb2_grpc.DialogServiceStub(channel)
        sent = await stub.SendMessage(
            dpb.SendMessageRequest(from_user_id=fenced[0], to_user_id=fenced[1], text="after"),
            metadata=auth_for(fenced[0]),
        )
    with psycopg.connect(config.control_dsn) as conn:
        assert conn.execute("SELECT state FROM shard_moves WHERE move_id = %s", (move_id,)).fetchone() == (
            "done",
        )
    placed = {i: shard for shard, i, _ in stored(config)}
    assert placed[sent.message.message_id] == target, "written to the pair's new shard"
    finished = await dialogctl(path, *reshard, "--json")
    assert finished.json()["num_shards"] == 8
    rows = stored(config)
    assert sorted(i for _, i, _ in rows) == sorted(history | {sent.message.message_id})
    assert all(shard_id == calculate_shard(*pair, 8) for shard_id, _, pair in rows)


async def test_a_pair_overrides_once_moved_away_returns_with_its_unit(
    pg_servers: list[EmbeddedPostgres],
    jwt_secret: str,
    tmp_path: Path,
    new_pair: Callable[[], tuple[int, int]],
    auth_for: Callable[..., Metadata],
    admin_auth: Metadata,
) -> None:
    """Its old fence row on the shard its unit moves to must not keep refusing its writes there."""
    from client.gen.dialog.v1 import dialog_service_pb2 as dpb

    config = fresh_cluster(pg_servers, jwt_secret, 6)
    pair = next(
        p
        for p in (new_pair() for _ in range(1000))
        if calculate_shard(*p, 6) < 4 and calculate_shard(*p, 6) != calculate_shard(*p, 4)
    )
    home, comes_to = calculate_shard(*pair, 4), calculate_shard(*pair, 6)
    elsewhere = next(s for s in range(4) if s not in (home, comes_to))
    a, b = pair
    sent: list[str] = []

    async def send(stub: dialog_service_pb2_grpc.DialogServiceAsyncStub, text: str) -> None:
        request = dpb.SendMessageRequest(from_user_id=a, to_user_id=b, text=text)
        sent.append((await stub.SendMessage(request, metadata=auth_for(a))).message.message_id)

    async with serving(make_config([s.dsn for s in config.shards[:4]], jwt_secret)) as (_, channel):
        stub = dialog_service_pb2_grpc.DialogServiceStub(channel)
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        await send(stub, "at home")
        # Pinned to the shard its unit will move to, then away from it (leaving a fence row there),
        # then back to its hash shard.
        for shard_id in (comes_to, elsewhere):
            request = pb.SetShardOverrideRequest(user_id_1=a, user_id_2=b, shard_id=shard_id)
            await admin.SetShardOverride(request, metadata=admin_auth)
            await send(stub, f"pinned to {shard_id}")
        await admin.DeleteShardOverride(
            pb.DeleteShardOverrideRequest(user_id_1=a, user_id_2=b), metadata=admin_auth
        )
    path = write_server_config(tmp_path / "all.toml", config, "127.0.0.1:1", jwt_secret)
    await dialogctl(path, "reshard", "--shards", "6", "--full-reshuffle", "--json")
    async with serving(config) as (_, channel):
        stub = dialog_service_pb2_grpc.DialogServiceStub(channel)
        await send(stub, "after the reshuffle")
        assert await read_all(stub, a, b, auth_for(a)) == sorted(sent)
    assert {shard for shard, i, _ in stored(config) if i in sent} == {comes_to}


async def test_a_reshard_waits_for_every_running_server_to_know_the_new_shards(
    pg_servers: list[EmbeddedPostgres],
    jwt_secret: str,
    tmp_path: Path,
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    config = fresh_cluster(pg_servers, jwt_secret, 8)
    path = write_server_config(tmp_path / "all.toml", config, "127.0.0.1:1", jwt_secret)
    async with serving(make_config([s.dsn for s in config.shards[:4]], jwt_secret)):
        history = preload_pairs(config, [new_pair() for _ in range(40)], 2)
        for args in (("--dry-run",), ()):
            refused = await dialogctl(path, "reshard", "--shards", "8", *args)
            assert refused.returncode == 1
            assert f"server process {os.getpid()}" in refused.stderr and "lists 4" in refused.stderr, (
                refused.stderr
            )
        with psycopg.connect(config.control_dsn) as conn:
            assert conn.execute("SELECT num_shards, target_shards FROM shard_layout").fetchone() == (4, None)
    # That server stopped (withdrawing its presence): nothing else stands in the way.
    finished = await dialogctl(path, "reshard", "--shards", "8", "--json")
    assert finished.json()["num_shards"] == 8
    assert sorted(i for _, i, _ in stored(config)) == sorted(history)


async def test_the_readme_resharding_commands_run_as_written(
    pg_servers: list[EmbeddedPostgres],
    jwt_secret: str,
    tmp_path: Path,
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    """The README's 4 -> 6 block, verbatim, with `dialogctl` on PATH and a server serving meanwhile."""
    (block,) = [b.body for b in readme_blocks() if b.kind == "reshard"]
    config = fresh_cluster(pg_servers, jwt_secret, 6)
    pairs = [new_pair() for _ in range(60)]
    async with serving(make_config([s.dsn for s in config.shards[:4]], jwt_secret)):
        history = preload_pairs(config, pairs, 3)
    path = write_server_config(tmp_path / "dialog-shard.toml", config, "127.0.0.1:1", jwt_secret)
    async with serving(config) as (running, _):
        env = child_env(DIALOG_CONFIG=str(path), PATH=f"{DIALOGCTL.parent}:{os.environ['PATH']}")
        result = await run_async("bash", "-c", "set -eo pipefail\n" + block, cwd=tmp_path, env=env)
        assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        await wait_until(lambda: running.placement.router.num_shards == 6, "the server follows the layout")
    moved = [p for p in pairs if calculate_shard(*p, 4) != calculate_shard(*p, 6)]
    # The dry run changed nothing, the reshard moved what it said, the status shows it finished.
    dry_run = f"dry run: 4 -> 6 shards would move {3 * len(moved)} messages of {len(moved)} pairs"
    assert dry_run in result.stdout
    assert re.search(rf"^resharded to 6 shards: \d+ steps, {3 * len(moved)} rows copied", result.stdout, re.M)
    assert "layout: 6 shards; no reshard running" in result.stdout
    assert re.search(r"^live servers: 1\n  \S+ pid \d+: 6 shards configured$", result.stdout, re.M)
    rows = stored(config)
    assert sorted(i for _, i, _ in rows) == sorted(history)
    assert all(shard == calculate_shard(*pair, 6) for shard, _, pair in rows)
    status = (await dialogctl(path, "--json", "reshard", "--status")).json()
    assert status["num_shards"] == 6 and status["target_shards"] is None
