"""`dialogctl verify` finds messages on the wrong shard and duplicated ones, names them, and repairs them."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from server.cli.shards import tool_shards
from server.config import ServerConfig
from server.dev.embedded_pg import EmbeddedPostgres
from server.moves.verify import _pair_summaries, verify
from server.resilience.db_errors import FENCED_SQLSTATE
from server.routing import Pair, bucket_of, calculate_shard
from server.storage.ids import MessageIdGenerator, id_time
from tests.processes import run_async, write_server_config
from tests.support import fresh_cluster, make_config, preload_pairs, write_guard_query

DIALOGCTL = Path(sys.executable).parent / "dialogctl"


@pytest.fixture(scope="module")
def verify_config(pg_servers: list[EmbeddedPostgres], jwt_secret: str) -> ServerConfig:
    """Four shards on the four servers, in databases of their own (nothing else writes there)."""
    for server in pg_servers:
        server.create_database("verify")
    return make_config([s.dsn_for("verify") for s in pg_servers], jwt_secret)


def plant(
    config: ServerConfig, shard_id: int, pair: tuple[int, int], message_id: uuid.UUID, text: str
) -> None:
    low, high = Pair.of(*pair)
    shard = config.shards[shard_id]
    with psycopg.connect(shard.dsn) as conn:
        conn.execute(
            f"INSERT INTO {shard.table} (message_id, user_low, user_high, bucket, from_user_id, to_user_id, "
            "text, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            (message_id, low, high, bucket_of(low, high), low, high, text, id_time(message_id)),
        )


def ids_on(config: ServerConfig, shard_id: int, pair: tuple[int, int]) -> list[str]:
    shard = config.shards[shard_id]
    with psycopg.connect(shard.dsn) as conn:
        rows = conn.execute(
            f"SELECT message_id FROM {shard.table} WHERE user_low = %s AND user_high = %s "
            "ORDER BY message_id",
            tuple(Pair.of(*pair)),
        ).fetchall()
    return [str(r[0]) for r in rows]


async def test_verify_reports_and_repairs_a_misplaced_and_a_duplicated_message(
    verify_config: ServerConfig, tmp_path: Path, jwt_secret: str, new_pair: Callable[[], tuple[int, int]]
) -> None:
    config = write_server_config(tmp_path / "verify.toml", verify_config, "127.0.0.1:1", jwt_secret)
    first = await run_async(DIALOGCTL, "--config", str(config), "verify", "--json")
    assert first.json()["clean"] is True, "an empty cluster is clean (and the schema gets created)"
    ids = MessageIdGenerator()
    pair = new_pair()
    home = calculate_shard(*pair, 4)
    wrong, other_wrong = (home + 1) % 4, (home + 2) % 4
    good, stray, copied = ids.next(), ids.next(), ids.next()
    plant(verify_config, home, pair, good, "at home")
    plant(verify_config, wrong, pair, stray, "only on a wrong shard")
    plant(verify_config, home, pair, copied, "twice")
    plant(verify_config, other_wrong, pair, copied, "twice")

    found = await run_async(DIALOGCTL, "--config", str(config), "verify", "--json")
    assert found.returncode == 1, found.stderr
    report = json.loads(found.stdout)
    assert report["clean"] is False and report["messages"] == 4
    findings = {
        (f["kind"], f["shard_id"], f["expected_shard_id"]): f["message_ids"] for f in report["findings"]
    }
    assert findings == {
        ("misplaced", wrong, home): [str(stray)],
        ("duplicate", other_wrong, home): [str(copied)],
    }

    text = await run_async(DIALOGCTL, "--config", str(config), "verify")
    assert text.returncode == 1 and str(stray) in text.stdout and "misplaced" in text.stdout

    repaired = await run_async(DIALOGCTL, "--config", str(config), "verify", "--repair", "--json")
    assert repaired.json()["clean"] is True
    assert (repaired.json()["copied"], repaired.json()["deleted"]) == (1, 2)
    assert ids_on(verify_config, home, pair) == sorted([str(good), str(stray), str(copied)])
    assert ids_on(verify_config, wrong, pair) == [] and ids_on(verify_config, other_wrong, pair) == []
    # As after a move: a server still routing to a wrong shard is turned away, not given a new stray.
    assert not writable(verify_config, wrong, pair) and not writable(verify_config, other_wrong, pair)
    assert writable(verify_config, home, pair)
    again = await run_async(DIALOGCTL, "--config", str(config), "verify", "--json")
    assert again.json()["clean"] is True and again.json()["findings"] == []


async def test_verify_leaves_conflicting_copies_to_a_person(
    verify_config: ServerConfig, tmp_path: Path, jwt_secret: str, new_pair: Callable[[], tuple[int, int]]
) -> None:
    config = write_server_config(tmp_path / "verify.toml", verify_config, "127.0.0.1:1", jwt_secret)
    pair = new_pair()
    home = calculate_shard(*pair, 4)
    message_id = MessageIdGenerator().next()
    plant(verify_config, home, pair, message_id, "one text")
    plant(verify_config, (home + 3) % 4, pair, message_id, "another text")
    result = await run_async(DIALOGCTL, "--config", str(config), "verify", "--repair", "--json")
    assert result.returncode == 1
    kinds = [(f["kind"], f["message_ids"]) for f in json.loads(result.stdout)["findings"]]
    assert kinds == [("conflict", [str(message_id)])]
    assert ids_on(verify_config, (home + 3) % 4, pair) == [str(message_id)], "not deleted"
    with psycopg.connect(verify_config.shards[(home + 3) % 4].dsn) as conn:
        conn.execute(
            f"DELETE FROM {verify_config.shards[(home + 3) % 4].table} WHERE message_id = %s", (message_id,)
        )


def fence(config: ServerConfig, shard_id: int, key: tuple[int, int, int], state: str) -> None:
    shard = config.shards[shard_id]
    with psycopg.connect(shard.dsn) as conn:
        conn.execute(
            f"INSERT INTO {shard.table}_fences (bucket, user_low, user_high, state, writers_awaited)"
            " VALUES (%s, %s, %s, %s, NULLIF(%s <> 'open', false))"
            " ON CONFLICT (bucket, user_low, user_high)"
            " DO UPDATE SET state = EXCLUDED.state, writers_awaited = EXCLUDED.writers_awaited",
            (*key, state, state),
        )


def fence_rows(config: ServerConfig, shard_id: int, bucket: int) -> dict[tuple[int, int], str]:
    shard = config.shards[shard_id]
    with psycopg.connect(shard.dsn) as conn:
        rows = conn.execute(
            f"SELECT user_low, user_high, state FROM {shard.table}_fences WHERE bucket = %s", (bucket,)
        ).fetchall()
    return {(r[0], r[1]): r[2] for r in rows}


def writable(config: ServerConfig, shard_id: int, pair: tuple[int, int]) -> bool:
    """Whether an insert of the pair passes the shard's fence guard (False: DIALOG_MOVING)."""
    shard = config.shards[shard_id]
    low, high = Pair.of(*pair)
    with psycopg.connect(shard.dsn) as conn:
        try:
            conn.execute(write_guard_query(shard.table), (bucket_of(low, high), low, high))
        except psycopg.Error as exc:
            assert exc.sqlstate == FENCED_SQLSTATE, exc
            return False
    return True


def pair_in_bucket_other_than(bucket: int, new_pair: Callable[[], tuple[int, int]]) -> tuple[int, int]:
    while True:
        pair = new_pair()
        if bucket_of(*pair) != bucket:
            return pair


async def test_verify_reports_stale_fences_and_repair_reconciles_them(
    verify_config: ServerConfig, tmp_path: Path, jwt_secret: str, new_pair: Callable[[], tuple[int, int]]
) -> None:
    config = write_server_config(tmp_path / "verify.toml", verify_config, "127.0.0.1:1", jwt_secret)
    assert (await run_async(DIALOGCTL, "--config", str(config), "verify", "--json")).json()["clean"] is True
    # A pair moved away once, now routed home again: its `moved` row at home is stale, the
    # one on another shard is right (a stale writer must not write there).
    returned = new_pair()
    low, high = Pair.of(*returned)
    home = calculate_shard(*returned, 4)
    fence(verify_config, home, (bucket_of(low, high), low, high), "moved")
    fence(verify_config, (home + 1) % 4, (bucket_of(low, high), low, high), "moved")
    # A bucket a reshard once moved away from its hash shard: stale there, right elsewhere.
    bucket_pair = pair_in_bucket_other_than(bucket_of(low, high), new_pair)
    bucket = bucket_of(*bucket_pair)
    fence(verify_config, bucket % 4, (bucket, 0, 0), "moved")
    fence(verify_config, (bucket + 1) % 4, (bucket, 0, 0), "moved")
    # A pair an override pins to a shard its bucket was moved away from: refused by the bucket row.
    pinned = pair_in_bucket_other_than(bucket, new_pair)
    pinned_low, pinned_high = Pair.of(*pinned)
    pinned_bucket = bucket_of(*pinned)
    pinned_to = (pinned_bucket + 2) % 4
    fence(verify_config, pinned_to, (pinned_bucket, 0, 0), "moved")
    # A pair whose move is unfinished: its fence belongs to the move, verify leaves it alone.
    moving = pair_in_bucket_other_than(bucket, new_pair)
    moving_low, moving_high = Pair.of(*moving)
    moving_home = calculate_shard(*moving, 4)
    fence(verify_config, moving_home, (bucket_of(*moving), moving_low, moving_high), "fenced")
    with psycopg.connect(verify_config.control_dsn) as conn:
        conn.execute(
            "INSERT INTO shard_map (user1, user2, shard_id) VALUES (%s, %s, %s)",
            (pinned_low, pinned_high, pinned_to),
        )
        conn.execute(
            "INSERT INTO shard_moves (bucket, user_low, user_high, source_shard, target_shard, flip, state) "
            "VALUES (%s, %s, %s, %s, %s, 'set_override', 'fenced')",
            (bucket_of(*moving), moving_low, moving_high, moving_home, (moving_home + 1) % 4),
        )
    try:
        assert not writable(verify_config, home, returned)
        assert not writable(verify_config, pinned_to, pinned)

        found = await run_async(DIALOGCTL, "--config", str(config), "verify", "--json")
        assert found.returncode == 1, found.stderr
        report = json.loads(found.stdout)
        assert report["clean"] is False and report["findings"] == []
        stale = {
            (f["shard_id"], f["bucket"], f["user_low"], f["user_high"], f["state"])
            for f in report["stale_fences"]
        }
        assert stale == {
            (home, bucket_of(low, high), low, high, "moved"),
            (bucket % 4, bucket, 0, 0, "moved"),
            (pinned_to, pinned_bucket, 0, 0, "moved"),
        }
        assert report["skipped_moving_buckets"] == 1
        text = await run_async(DIALOGCTL, "--config", str(config), "verify")
        assert (
            text.returncode == 1 and "stale_fence" in text.stdout and f"pair ({low}, {high})" in text.stdout
        )

        repaired = await run_async(DIALOGCTL, "--config", str(config), "verify", "--repair", "--json")
        assert repaired.returncode == 0, repaired.stdout + repaired.stderr
        assert repaired.json()["clean"] is True and repaired.json()["fences_repaired"] == 3
        assert writable(verify_config, home, returned)
        assert fence_rows(verify_config, home, bucket_of(low, high)).get((low, high)) is None
        assert not writable(verify_config, (home + 1) % 4, returned), "a right fence stays"
        assert fence_rows(verify_config, bucket % 4, bucket) == {}, (
            "4 divides 4096: the bucket lives here alone"
        )
        assert fence_rows(verify_config, (bucket + 1) % 4, bucket) == {(0, 0): "moved"}
        assert writable(verify_config, pinned_to, pinned)
        assert fence_rows(verify_config, pinned_to, pinned_bucket) == {
            (0, 0): "moved",
            (pinned_low, pinned_high): "open",
        }
        assert not writable(verify_config, moving_home, moving), "an unfinished move's fence stays"

        again = await run_async(DIALOGCTL, "--config", str(config), "verify", "--json")
        assert again.returncode == 0 and again.json()["stale_fences"] == []
    finally:
        with psycopg.connect(verify_config.control_dsn) as conn:
            conn.execute("DELETE FROM shard_map WHERE user1 = %s AND user2 = %s", (pinned_low, pinned_high))
            conn.execute(
                "DELETE FROM shard_moves WHERE user_low = %s AND user_high = %s", (moving_low, moving_high)
            )
        shard = verify_config.shards[moving_home]
        with psycopg.connect(shard.dsn) as conn:
            conn.execute(f"DELETE FROM {shard.table}_fences WHERE user_low = %s", (moving_low,))


def _most_rows_in_one_block(config: ServerConfig) -> int:
    shard = config.shards[0]
    with psycopg.connect(shard.dsn) as conn:
        row = conn.execute(
            f"SELECT max(n) FROM (SELECT count(*) AS n FROM {shard.table} "
            "GROUP BY (ctid::text::point)[0]) AS per_block"
        ).fetchone()
    assert row is not None
    return int(row[0])


async def test_the_scan_reads_in_chunks_that_add_up_to_the_whole_shard_at_a_bounded_rate(
    pg_servers: list[EmbeddedPostgres], jwt_secret: str, new_pair: Callable[[], tuple[int, int]]
) -> None:
    config = fresh_cluster(pg_servers, jwt_secret, 1)
    sizes = [1, 2, 7, 30, 300, 1, 160]  # pairs larger than a chunk, and chunks ending inside pairs
    total = sum(sizes)
    async with tool_shards(config) as shards:  # opening applies the schema
        for size in sizes:
            await asyncio.to_thread(preload_pairs, config, [new_pair()], size, shards=1)
        store = shards.store(0)
        whole = await _pair_summaries(store, 0.0, chunk_blocks=10**6)
        assert sorted(n for *_, n, _checksum in whole) == sorted(sizes)
        chunked = await _pair_summaries(store, 0.0, chunk_blocks=1)
        assert sorted(chunked) == sorted(whole), "every pair once, with all of its rows, summed over chunks"
        per_block = await asyncio.to_thread(_most_rows_in_one_block, config)
        assert per_block < total, "the pairs span several blocks"
        rate = 1000.0
        started = time.monotonic()
        paced = await _pair_summaries(store, rate, chunk_blocks=1)
        took = time.monotonic() - started
    assert sorted(paced) == sorted(whole)
    # Not a speed figure but the bound itself: all rows but the last chunk's were paid for in time.
    assert took >= (total - per_block) / rate, took
    async with tool_shards(config) as shards:
        report = await verify(shards, lambda pair: 0, rows_per_second=5000.0)
    assert report.clean and report.messages == total and report.pairs == len(sizes)
