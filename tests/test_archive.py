"""Archiving old messages into Parquet files (a local directory and an S3-compatible server), reading
dialogs across the boundary in both orders, a crash at each step of a run, and a move and a reshard
of archived pairs."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pyarrow.parquet as pq
import pytest

from client.gen.dialog.v1 import admin_service_pb2 as apb
from client.gen.dialog.v1 import admin_service_pb2_grpc, dialog_service_pb2_grpc
from client.gen.dialog.v1 import dialog_service_pb2 as dpb
from server.archive import manifest as manifest_module
from server.archive.files import PARTS, decode, encode, fingerprint, may_hold_pair, pairs_of, part_of
from server.archive.manifest import Manifest
from server.archive.merge import merge_pages
from server.archive.reader import ArchiveReader
from server.config import ConfigError, ServerConfig, parse_duration
from server.dev.embedded_pg import EmbeddedPostgres
from server.moves.archiver import STEPS, ArchiveReport
from server.moves.mover import Mover
from server.routing import Pair, bucket_of, calculate_shard
from server.storage.ids import id_time
from tests.crashing_mover import CRASHED_EXIT
from tests.processes import write_server_config
from tests.support import (
    S3_CREDENTIALS,
    Metadata,
    S3Server,
    archived_cluster,
    archiver,
    dialog_pages,
    dialogctl,
    expect_error,
    fresh_cluster,
    hot_count,
    make_config,
    old_messages,
    other_shard,
    serving,
    status_details,
    store_of,
    wait_until,
)

#: Small batches and row groups, so that a few hundred messages make several files and groups.
SMALL = {"manifest_max_age": 0.2, "batch_rows": 100, "row_group_rows": 16}
LONG_AGO = timedelta(days=30)


def archive_settings(kind: str, tmp_path: Path, s3: S3Server | None) -> dict[str, Any]:
    if kind == "local":
        return {"url": str(tmp_path / "archive"), **SMALL}
    assert s3 is not None
    return {"url": s3.new_bucket(), "endpoint_url": s3.endpoint_url, **SMALL}


def manifest_of(config: ServerConfig) -> Manifest:
    data = store_of(config).read(manifest_module.NAME)
    return Manifest() if data is None else Manifest.from_json(data)


def cutoff() -> datetime:
    return datetime.now(UTC) - timedelta(days=1)


@pytest.fixture(params=["local", "s3"])
def archive_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def s3_if_needed(archive_kind: str, request: pytest.FixtureRequest) -> S3Server | None:
    return request.getfixturevalue("s3_server") if archive_kind == "s3" else None


async def send(channel: Any, auth: Metadata, a: int, b: int, count: int) -> list[str]:
    stub = dialog_service_pb2_grpc.DialogServiceStub(channel)
    ids = []
    for i in range(count):
        reply = await stub.SendMessage(
            dpb.SendMessageRequest(from_user_id=a, to_user_id=b, text=f"new {i}"), metadata=auth
        )
        ids.append(reply.message.message_id)
    return ids


async def walk(
    channel: Any, auth: Metadata, a: int, b: int, *, oldest_first: bool, page_size: int
) -> list[str]:
    stub = dialog_service_pb2_grpc.DialogServiceStub(channel)
    order = dpb.MESSAGE_ORDER_OLDEST_FIRST if oldest_first else dpb.MESSAGE_ORDER_NEWEST_FIRST
    pages = await dialog_pages(stub, a, b, auth, order=order, page_size=page_size)
    empty_dialog = len(pages) == 1 and not pages[0].messages
    assert empty_dialog or all(0 < len(p.messages) <= page_size for p in pages)
    return [m.message_id for p in pages for m in p.messages]


async def assert_dialog_is(channel: Any, auth: Metadata, a: int, b: int, expected: list[str]) -> None:
    """Every page size and order walks exactly `expected` (oldest first), each message once."""
    for page_size in (7, 1000):
        assert await walk(channel, auth, a, b, oldest_first=True, page_size=page_size) == expected
        assert await walk(channel, auth, a, b, oldest_first=False, page_size=page_size) == expected[::-1]


# -- Pure parts ------------------------------------------------------------------------------------


def row(n: int, text: str = "t") -> tuple[str, int, int, str, datetime]:
    return (str(uuid.UUID(int=n)), 1, 2, text, datetime.now(UTC))


def test_merge_keeps_each_message_once_and_stops_at_a_source_with_more() -> None:
    hot = [row(5), row(6), row(9)]
    cold = [row(1), row(5), row(7)]  # 5 is in both: archived, not yet deleted from its shard
    page, more, _ = merge_pages(
        hot, True, cold, False, oldest_first=True, limit=10, max_bytes=10**6, overhead=0
    )
    # The hot source has more after 9; everything up to 9 is certain.
    assert [r[0] for r in page] == [str(uuid.UUID(int=n)) for n in (1, 5, 6, 7, 9)] and more
    page, more, _ = merge_pages(
        hot[::-1], False, cold[::-1], True, oldest_first=False, limit=10, max_bytes=10**6, overhead=0
    )
    # Newest first, the archive has more beyond 1: the page ends there.
    assert [r[0] for r in page] == [str(uuid.UUID(int=n)) for n in (9, 7, 6, 5, 1)] and more
    page, more, after = merge_pages(
        hot, False, cold, False, oldest_first=True, limit=2, max_bytes=10**6, overhead=0
    )
    assert [r[0] for r in page] == [str(uuid.UUID(int=n)) for n in (1, 5)] and more and after == page[-1][0]
    # Deleted messages are passed over; the next page continues after the last one passed.
    gone = {str(uuid.UUID(int=n)) for n in (1, 5, 6, 7, 9)}
    page, more, after = merge_pages(
        hot, True, cold, False, oldest_first=True, limit=2, max_bytes=10**6, overhead=0, deleted=gone
    )
    assert page == [] and more and after == str(uuid.UUID(int=9))


def test_merge_ends_a_page_at_the_byte_budget_but_never_empty() -> None:
    cold = [row(1, "x" * 50), row(2, "y" * 50)]
    page, more, _ = merge_pages(
        [], False, cold, False, oldest_first=True, limit=10, max_bytes=60, overhead=10
    )
    assert [r[3] for r in page] == ["x" * 50] and more
    page, more, _ = merge_pages([], False, cold, False, oldest_first=True, limit=10, max_bytes=1, overhead=10)
    assert len(page) == 1 and more


def test_a_file_round_trips_its_rows_and_fingerprint() -> None:
    moment = datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    rows = [
        (
            uuid.UUID(int=(1 << 100) + i),
            10,
            20 + i % 2,
            7,
            10 if i % 2 else 20 + i % 2,
            20 + i % 2 if i % 2 else 10,
            f"text {i} ✓",
            moment,
            None if i % 3 else f"req{i}",
        )
        for i in range(40)
    ]
    data = encode(rows, row_group_rows=8)
    decoded = decode(data)
    assert sorted(decoded) == sorted(rows)
    assert fingerprint(decoded) == fingerprint(rows)
    footer = pq.ParquetFile(io.BytesIO(data)).metadata
    assert footer.num_row_groups == 5
    keys = pairs_of(footer)
    assert keys is not None and len(keys) == 2
    assert may_hold_pair(keys, Pair(10, 20)) and may_hold_pair(keys, Pair(10, 21))
    assert not may_hold_pair(keys, Pair(10, 22))


def test_parts_follow_the_hash_bucket_not_the_shard_count() -> None:
    assert 4096 % PARTS == 0
    for a, b in ((1, 2), (3, 10**18), (2**62, 5)):
        assert part_of(bucket_of(a, b)) == bucket_of(a, b) % PARTS


def test_archive_settings_are_checked() -> None:
    assert parse_duration("90d") == 90 * 86400 and parse_duration("1.5h") == 5400
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("soon")
    with pytest.raises(ConfigError, match=r"unknown keys in \[archive\]: bucket"):
        make_config(["postgresql://x@h/db"], "s" * 32, archive={"bucket": "b"})
    with pytest.raises(ConfigError, match=r"archive\.older_than"):
        make_config(["postgresql://x@h/db"], "s" * 32, archive={"older_than": "a year"})
    with pytest.raises(ConfigError, match="max_files_per_part must be at least 1"):
        make_config(["postgresql://x@h/db"], "s" * 32, archive={"max_files_per_part": 0})
    relative = make_config(["postgresql://x@h/db"], "s" * 32, archive={"url": "cold"})
    assert relative.archive.url is not None and Path(relative.archive.url).is_absolute()


# -- Archiving and reading -------------------------------------------------------------------------


async def test_archived_messages_read_across_the_boundary_in_both_orders(
    archive_kind: str,
    s3_if_needed: S3Server | None,
    pg_servers: list[EmbeddedPostgres],
    jwt_secret: str,
    tmp_path: Path,
    new_pair: Callable[[], tuple[int, int]],
    auth_for: Callable[..., Metadata],
) -> None:
    settings = archive_settings(archive_kind, tmp_path, s3_if_needed)
    async with archived_cluster(pg_servers, jwt_secret, settings) as (config, running, channel):
        a, b = new_pair()
        short_a, short_b = new_pair()
        old = old_messages(config, (a, b), 250, sent=datetime.now(UTC) - LONG_AGO)
        old_short = old_messages(config, (short_a, short_b), 3, sent=datetime.now(UTC) - LONG_AGO)
        new = await send(channel, auth_for(a), a, b, 12)
        report: ArchiveReport = await archiver(running, config).run(cutoff())
        assert report.total == 253 and report.files >= 3
        assert hot_count(config, (a, b)) == 12 and hot_count(config, (short_a, short_b)) == 0
        manifest = manifest_of(config)
        assert manifest.totals()["messages"] == 253 and not manifest.unfinished()
        await assert_dialog_is(channel, auth_for(a), a, b, old + new)
        await assert_dialog_is(channel, auth_for(short_b), short_b, short_a, old_short)
        # The archived messages come back exactly as they were sent.
        stub = dialog_service_pb2_grpc.DialogServiceStub(channel)
        page = await stub.GetDialog(
            dpb.GetDialogRequest(
                user_id=a, peer_user_id=b, page_size=3, order=dpb.MESSAGE_ORDER_OLDEST_FIRST
            ),
            metadata=auth_for(a),
        )
        low, high = Pair.of(a, b)
        assert [(m.from_user_id, m.to_user_id, m.text) for m in page.messages] == [
            (high, low, "old message 0 "),
            (low, high, "old message 1 é"),
            (low, high, "old message 2 éé"),
        ]
        assert page.messages[0].create_time.ToDatetime(UTC) == id_time(uuid.UUID(old[0]))
        # A second run finds nothing more to archive.
        assert (await archiver(running, config).run(cutoff())).total == 0


async def test_a_deep_archived_page_reads_a_bounded_number_of_row_groups(
    pg_servers: list[EmbeddedPostgres],
    jwt_secret: str,
    tmp_path: Path,
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    settings = {"url": str(tmp_path / "archive"), **SMALL, "batch_rows": 100_000}
    async with archived_cluster(pg_servers, jwt_secret, settings) as (config, running, _):
        a, b = new_pair()
        old = old_messages(config, (a, b), 2000, sent=datetime.now(UTC) - LONG_AGO)
        await archiver(running, config).run(cutoff())
        reader = ArchiveReader(store_of(config), max_age=60)
        pair = Pair.of(a, b)
        for oldest_first in (True, False):
            for cursor in (old[10], old[1000], old[1990]):
                before = reader.stats.row_groups
                rows, _ = await reader.page(pair, after=cursor, oldest_first=oldest_first, limit=20)
                index = old.index(cursor)
                expected = (
                    old[index + 1 : index + 21] if oldest_first else old[max(0, index - 20) : index][::-1]
                )
                assert [r[0] for r in rows] == expected
                # 20 messages span at most 3 groups of 16 (one file): not the 125 groups of the dialog.
                assert reader.stats.row_groups - before <= 3
        assert reader.stats.footers == 1 and reader.stats.manifests == 1
        # A dialog the file does not hold costs no row group: the footer lists the file's pairs.
        while True:
            absent = Pair.of(*new_pair())
            if part_of(bucket_of(*absent)) == part_of(bucket_of(*pair)):
                break
        before = reader.stats.row_groups
        assert await reader.page(absent, after=None, oldest_first=True, limit=20) == ([], False)
        assert await reader.find(absent, old[5]) is None
        assert reader.stats.row_groups == before


async def test_dialogctl_archive_counts_archives_and_reports(
    pg_servers: list[EmbeddedPostgres],
    jwt_secret: str,
    tmp_path: Path,
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    settings = {"url": str(tmp_path / "archive"), **SMALL}
    async with archived_cluster(pg_servers, jwt_secret, settings) as (config, _, _):
        a, b = new_pair()
        old_messages(config, (a, b), 30, sent=datetime.now(UTC) - LONG_AGO)
        path = write_server_config(
            tmp_path / "ctl.toml", config, "127.0.0.1:1", jwt_secret, sections={"archive": settings}
        )
        dry = (await dialogctl(path, "archive", "--older-than", "7d", "--dry-run", "--json")).json()
        assert dry["messages"] == 30 and dry["dry_run"] is True
        assert hot_count(config, (a, b)) == 30
        refused = await dialogctl(path, "archive", "--before", datetime.now(UTC).isoformat())
        assert refused.returncode == 2 and "may still be committing" in refused.stderr
        done = (await dialogctl(path, "archive", "--older-than", "7d", "--json")).json()
        assert done["messages"] == 30 and done["files"] == 1 and done["bytes"] > 0
        assert hot_count(config, (a, b)) == 0
        status = (await dialogctl(path, "archive", "--status", "--json")).json()
        assert (status["messages"], status["files"], status["unfinished_batches"]) == (30, 1, 0)
        unconfigured = write_server_config(tmp_path / "none.toml", config, "127.0.0.1:1", jwt_secret)
        missing = await dialogctl(unconfigured, "archive", "--older-than", "7d")
        assert missing.returncode != 0 and "set [archive] url" in missing.stderr


async def test_a_server_archives_on_its_schedule(
    pg_servers: list[EmbeddedPostgres],
    jwt_secret: str,
    tmp_path: Path,
    new_pair: Callable[[], tuple[int, int]],
    auth_for: Callable[..., Metadata],
) -> None:
    settings = {"url": str(tmp_path / "archive"), **SMALL, "older_than": "7d", "schedule_interval": 0.3}
    base = fresh_cluster(pg_servers, jwt_secret, 4)
    config = make_config([s.dsn for s in base.shards], jwt_secret, archive=settings)
    a, b = new_pair()
    async with serving(config) as (_, channel):
        old = old_messages(config, (a, b), 40, sent=datetime.now(UTC) - LONG_AGO)
        new = await send(channel, auth_for(a), a, b, 2)
        await wait_until(
            lambda: hot_count(config, (a, b)) == 2, "the server archived the old messages", within=30
        )
        await assert_dialog_is(channel, auth_for(a), a, b, old + new)
    assert manifest_of(config).totals()["messages"] == 40


async def assert_archived_once(
    config: ServerConfig,
    channel: Any,
    auth: Metadata,
    pair: tuple[int, int],
    *,
    archived: list[str],
    hot: list[str],
) -> None:
    """After a finished run: `archived` in listed files only (no batch unfinished, no unlisted
    file), `hot` on the shards, and the dialog shows each once."""
    manifest = manifest_of(config)
    assert not manifest.unfinished() and manifest.totals()["messages"] == len(archived)
    assert sorted(batch.file for batch in manifest.batches) == store_of(config).list("parts")
    assert hot_count(config, pair) == len(hot)
    await assert_dialog_is(channel, auth, *pair, archived + hot)


class Crash(Exception):
    """The archive run dies at a step (the lock goes with its session, as with a killed process)."""


@pytest.mark.parametrize("step", STEPS)
async def test_a_run_crashed_at_each_step_completes_on_the_next_with_every_message_once(
    step: str,
    pg_servers: list[EmbeddedPostgres],
    jwt_secret: str,
    tmp_path: Path,
    new_pair: Callable[[], tuple[int, int]],
    auth_for: Callable[..., Metadata],
) -> None:
    settings = {"url": str(tmp_path / "archive"), **SMALL}
    async with archived_cluster(pg_servers, jwt_secret, settings) as (config, running, channel):
        a, b = new_pair()
        old = old_messages(config, (a, b), 150, sent=datetime.now(UTC) - LONG_AGO)
        new = await send(channel, auth_for(a), a, b, 3)

        async def crash_at(passed: str) -> None:
            if passed == step:
                raise Crash(step)

        with pytest.raises(Crash):
            await archiver(running, config, after_step=crash_at).run(cutoff())
        # Whatever the step, readers see every message once meanwhile.
        await assert_dialog_is(channel, auth_for(a), a, b, old + new)
        report = await archiver(running, config).run(cutoff())
        assert report.removed_leftovers == (1 if step in ("written", "verified") else 0)
        # Both batches are published before the first is deleted.
        assert report.resumed_batches == {"published": 1, "deleted": 2, "done": 1}.get(step, 0)
        await assert_archived_once(config, channel, auth_for(a), (a, b), archived=old, hot=new)


async def test_archived_pairs_move_and_reshard_without_their_files(
    pg_servers: list[EmbeddedPostgres],
    jwt_secret: str,
    tmp_path: Path,
    new_pair: Callable[[], tuple[int, int]],
    auth_for: Callable[..., Metadata],
    admin_auth: Metadata,
) -> None:
    settings = {"url": str(tmp_path / "archive"), **SMALL}
    base = fresh_cluster(pg_servers, jwt_secret, 8)
    eight = make_config([s.dsn for s in base.shards], jwt_secret, archive=settings)
    four = make_config([s.dsn for s in base.shards[:4]], jwt_secret, archive=settings)
    pairs = [new_pair() for _ in range(12)]
    history: dict[tuple[int, int], list[str]] = {}
    async with serving(four) as (running, channel):
        for pair in pairs:
            history[pair] = old_messages(four, pair, 20, sent=datetime.now(UTC) - LONG_AGO)
            history[pair] += await send(channel, auth_for(pair[0]), *pair, 2)
        await archiver(running, four).run(cutoff())
        files = manifest_of(four).batches
        a, b = pairs[0]
        target = other_shard(a, b)
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        await admin.SetShardOverride(
            apb.SetShardOverrideRequest(user_id_1=a, user_id_2=b, shard_id=target), metadata=admin_auth
        )
        assert set(rows_on(four, (a, b))) == {target}
        await assert_dialog_is(channel, auth_for(a), a, b, history[(a, b)])
    path = write_server_config(
        tmp_path / "eight.toml", eight, "127.0.0.1:1", jwt_secret, sections={"archive": settings}
    )
    resharded = await dialogctl(path, "reshard", "--shards", "8", "--json")
    assert resharded.returncode == 0, resharded.stderr
    assert manifest_of(eight).batches == files, "a reshard moves no archive file"
    async with serving(eight) as (_, channel):
        for pair in pairs:
            await assert_dialog_is(channel, auth_for(pair[0]), *pair, history[pair])
    moved = [p for p in pairs[1:] if calculate_shard(*p, 8) >= 4]
    assert all(set(rows_on(eight, p)) == {calculate_shard(*p, 8)} for p in moved)


def rows_on(config: ServerConfig, pair: tuple[int, int]) -> list[int]:
    """The shards holding rows of the pair."""
    low, high = Pair.of(*pair)
    found = []
    for shard in config.shards:
        with psycopg.connect(shard.dsn) as conn:
            if conn.execute(
                f"SELECT 1 FROM {shard.table} WHERE user_low = %s AND user_high = %s LIMIT 1", (low, high)
            ).fetchone():
                found.append(shard.shard_id)
    return found


# -- Deleting and erasing --------------------------------------------------------------------------


async def test_a_sender_deletes_hot_and_archived_messages_once_and_nobody_elses(
    pg_servers: list[EmbeddedPostgres],
    jwt_secret: str,
    tmp_path: Path,
    new_pair: Callable[[], tuple[int, int]],
    auth_for: Callable[..., Metadata],
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = {"url": str(tmp_path / "archive"), **SMALL}
    async with archived_cluster(pg_servers, jwt_secret, settings) as (config, running, channel):
        a, b = new_pair()
        low, high = Pair.of(a, b)
        old = old_messages(config, (a, b), 30, sent=datetime.now(UTC) - LONG_AGO)
        mine = await send(channel, auth_for(a), a, b, 2)
        theirs = await send(channel, auth_for(b), b, a, 1)
        await archiver(running, config).run(cutoff())
        stub = dialog_service_pb2_grpc.DialogServiceStub(channel)

        async def delete(user: int, peer: int, message_id: str, auth: Metadata | None = None) -> bool:
            request = dpb.DeleteMessageRequest(user_id=user, peer_user_id=peer, message_id=message_id)
            reply = await stub.DeleteMessage(request, metadata=auth or auth_for(user))
            return bool(reply.deleted)

        # old[i] was sent by `low` unless i % 3 == 0 (then by `high`).
        archived_mine = next(m for i, m in enumerate(old) if (low if i % 3 else high) == a)
        archived_theirs = next(m for i, m in enumerate(old) if (low if i % 3 else high) == b)
        with caplog.at_level("INFO", logger="server.rpc"):
            assert await delete(a, b, mine[0]) is True
            assert await delete(a, b, mine[0]) is False, "deleting again is a success that deletes nothing"
            assert await delete(a, b, archived_mine) is True
            assert await delete(a, b, archived_mine) is False
        for message_id in (theirs[0], archived_theirs):
            denied = await expect_error(delete(a, b, message_id), grpc.StatusCode.PERMISSION_DENIED)
            assert "only the sender" in (denied.details() or "")
        impostor = await expect_error(delete(b, a, theirs[0], auth_for(a)), grpc.StatusCode.PERMISSION_DENIED)
        assert "user_id must be the authenticated user" in (impostor.details() or "")
        bad = await expect_error(delete(a, b, "not-an-id"), grpc.StatusCode.INVALID_ARGUMENT)
        assert "message_id" in (bad.details() or "")
        logged = [(r.grpc_method, r.principal) for r in caplog.records if r.name == "server.rpc"]  # type: ignore[attr-defined]
        assert logged == [("DeleteMessage", f"user:{a}")] * 4
        expected = [m for m in old + mine + theirs if m not in (mine[0], archived_mine)]
        expected.sort()
        await assert_dialog_is(channel, auth_for(a), a, b, expected)
        # The next run compacts: the file is written again without the deleted message.
        report = await archiver(running, config).run(cutoff())
        assert (report.compacted_messages, report.compacted_files) == (1, 1)
        assert manifest_of(config).totals()["messages"] == 29
        assert sorted(b.file for b in manifest_of(config).batches) == store_of(config).list("parts")
        with psycopg.connect(config.control_dsn) as conn:
            assert conn.execute("SELECT count(*) FROM message_tombstones").fetchone() == (0,)
        await assert_dialog_is(channel, auth_for(a), a, b, expected)


async def test_erase_user_removes_every_message_of_the_user_everywhere_and_again_nothing(
    pg_servers: list[EmbeddedPostgres],
    jwt_secret: str,
    tmp_path: Path,
    new_pair: Callable[[], tuple[int, int]],
    auth_for: Callable[..., Metadata],
    admin_auth: Metadata,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = {"url": str(tmp_path / "archive"), **SMALL}
    async with archived_cluster(pg_servers, jwt_secret, settings) as (config, running, channel):
        user, peer = new_pair()
        other_peer, bystander = new_pair()
        kept = old_messages(config, (other_peer, bystander), 25, sent=datetime.now(UTC) - LONG_AGO)
        for someone in (peer, other_peer):
            old_messages(config, (user, someone), 40, sent=datetime.now(UTC) - LONG_AGO)
        await archiver(running, config).run(cutoff())
        await send(channel, auth_for(user), user, peer, 3)
        await send(channel, auth_for(other_peer), other_peer, user, 2)
        # An erasure cut short after rewriting one file: the next call completes it.

        async def cut_short(passed: str) -> None:
            if passed == "rewritten":
                raise Crash(passed)

        with pytest.raises(Crash):
            await archiver(running, config, after_step=cut_short).erase_user(user)
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        with caplog.at_level("INFO", logger="server.rpc"):
            erased = await admin.EraseUser(apb.EraseUserRequest(user_id=user), metadata=admin_auth)
        logged = [(r.grpc_method, r.principal) for r in caplog.records if r.name == "server.rpc"]  # type: ignore[attr-defined]
        assert logged == [("EraseUser", "admin")]
        assert erased.hot_messages_deleted == 0, "the first call deleted the hot messages"
        assert (erased.archived_messages_erased, erased.archive_files_rewritten) == (40, 1)
        again = await admin.EraseUser(apb.EraseUserRequest(user_id=user), metadata=admin_auth)
        assert (
            again.hot_messages_deleted,
            again.archived_messages_erased,
            again.archive_files_rewritten,
        ) == (0, 0, 0)
        for someone in (peer, other_peer):
            assert await walk(channel, auth_for(user), user, someone, oldest_first=True, page_size=50) == []
            assert hot_count(config, (user, someone)) == 0
        assert all(
            user not in (r[1], r[2])
            for b in manifest_of(config).batches
            for r in decode(store_of(config).read(b.file) or b"")
        )
        await assert_dialog_is(channel, auth_for(bystander), bystander, other_peer, kept)
        refused = await expect_error(
            admin.EraseUser(apb.EraseUserRequest(user_id=user), metadata=auth_for(user)),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        assert refused.code() is grpc.StatusCode.PERMISSION_DENIED


async def test_verify_checks_the_archive_and_backups_name_its_files(
    pg_servers: list[EmbeddedPostgres],
    jwt_secret: str,
    tmp_path: Path,
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    settings = {"url": str(tmp_path / "archive"), **SMALL}
    async with archived_cluster(pg_servers, jwt_secret, settings) as (config, running, _):
        a, b = new_pair()
        old_messages(config, (a, b), 120, sent=datetime.now(UTC) - LONG_AGO)
        await archiver(running, config).run(cutoff())
        path = write_server_config(
            tmp_path / "ctl.toml", config, "127.0.0.1:1", jwt_secret, sections={"archive": settings}
        )
        verified = (await dialogctl(path, "verify", "--json")).json()
        assert verified["clean"] is True
        assert (verified["archive"]["files"], verified["archive"]["messages"]) == (2, 120)
        backup = await dialogctl(path, "backup", "--out", str(tmp_path / "backup"), "--json")
        assert backup.returncode == 0, backup.stderr
        listed = backup.json()["archive"]
        assert sorted(f["file"] for f in listed["files"]) == store_of(config).list("parts")
        assert sum(f["rows"] for f in listed["files"]) == 120
        lost = manifest_of(config).batches[0]
        store_of(config).delete(lost.file)
        store_of(config).write("parts/00/stray.parquet", b"not parquet")
        broken = await dialogctl(path, "verify", "--json")
        assert broken.returncode == 1
        findings = {(f["kind"], f["file"]) for f in json.loads(broken.stdout)["archive"]["findings"]}
        assert findings == {("missing", lost.file), ("unlisted", "parts/00/stray.parquet")}
        restored = await dialogctl(path, "restore", str(tmp_path / "backup"), "--yes", "--json")
        assert restored.json()["archive_files_missing"] == [lost.file]
        assert "archive file(s) the backup relies on are gone" in restored.stderr


async def test_an_unreachable_archive_is_unavailable_with_a_reason_not_an_internal_error(
    pg_servers: list[EmbeddedPostgres],
    jwt_secret: str,
    new_pair: Callable[[], tuple[int, int]],
    auth_for: Callable[..., Metadata],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    settings = {"url": "s3://nowhere/archive", "endpoint_url": "http://127.0.0.1:1", **SMALL}
    async with archived_cluster(pg_servers, jwt_secret, settings) as (_, _, channel):
        a, b = new_pair()
        stub = dialog_service_pb2_grpc.DialogServiceStub(channel)
        error = await expect_error(
            stub.GetDialog(dpb.GetDialogRequest(user_id=a, peer_user_id=b), metadata=auth_for(a)),
            grpc.StatusCode.UNAVAILABLE,
        )
        assert "the archive at s3://nowhere/archive" in (error.details() or "")
        info, _ = status_details(error)
        assert info is not None and info.reason == "ARCHIVE_UNAVAILABLE"


async def test_runs_merge_a_parts_small_files_and_the_dialog_reads_the_same(
    pg_servers: list[EmbeddedPostgres],
    jwt_secret: str,
    tmp_path: Path,
    new_pair: Callable[[], tuple[int, int]],
    auth_for: Callable[..., Metadata],
) -> None:
    settings = {"url": str(tmp_path / "archive"), **SMALL, "max_files_per_part": 2}
    async with archived_cluster(pg_servers, jwt_secret, settings) as (config, running, channel):
        a, b = new_pair()
        history: list[str] = []
        merged = 0
        for days in (40, 35, 30, 25):
            history += old_messages(config, (a, b), 20, sent=datetime.now(UTC) - timedelta(days=days))
            merged += (await archiver(running, config).run(cutoff())).merged_files
        part = part_of(bucket_of(a, b))
        files = [batch for batch in manifest_of(config).batches if batch.part == part]
        assert merged >= 2 and len(files) <= 2
        assert sum(batch.rows for batch in files) == 80
        assert sorted(batch.file for batch in manifest_of(config).batches) == store_of(config).list("parts")
        await assert_dialog_is(channel, auth_for(a), a, b, history)


# The in-process crash test above covers every step in `make test`; a real kill of the process
# after every step but one is slow (`pytest -m slow`).
@pytest.mark.parametrize(
    "step", [s if s == "deleted" else pytest.param(s, marks=pytest.mark.slow) for s in STEPS]
)
async def test_dialogctl_archive_killed_at_each_step_completes_on_the_next_run(
    step: str,
    pg_servers: list[EmbeddedPostgres],
    jwt_secret: str,
    tmp_path: Path,
    new_pair: Callable[[], tuple[int, int]],
    auth_for: Callable[..., Metadata],
) -> None:
    settings = {"url": str(tmp_path / "archive"), **SMALL}
    async with archived_cluster(pg_servers, jwt_secret, settings) as (config, _, channel):
        a, b = new_pair()
        old = old_messages(config, (a, b), 150, sent=datetime.now(UTC) - LONG_AGO)
        path = write_server_config(
            tmp_path / "ctl.toml", config, "127.0.0.1:1", jwt_secret, sections={"archive": settings}
        )
        killed = await dialogctl(path, "archive", "--older-than", "7d", crash_at=step)
        assert killed.returncode == CRASHED_EXIT, killed.stderr
        await assert_dialog_is(channel, auth_for(a), a, b, old)
        finished = (await dialogctl(path, "archive", "--older-than", "7d", "--json")).json()
        # The second run archives what no listed batch holds: 100 of them were listed when it died
        # after publishing (and both batches are listed before any is deleted).
        newly = {"written": 150, "verified": 150, "published": 50, "deleted": 0, "done": 0}[step]
        assert finished["messages"] == newly
        await assert_archived_once(config, channel, auth_for(a), (a, b), archived=old, hot=[])


async def test_a_message_deleted_while_its_dialog_moves_is_gone_from_both_shards_and_the_move_verifies(
    pg_servers: list[EmbeddedPostgres],
    jwt_secret: str,
    new_pair: Callable[[], tuple[int, int]],
    auth_for: Callable[..., Metadata],
) -> None:
    base = fresh_cluster(pg_servers, jwt_secret, 4)
    async with serving(base) as (running, channel):
        a, b = new_pair()
        sent = await send(channel, auth_for(a), a, b, 5)
        stub = dialog_service_pb2_grpc.DialogServiceStub(channel)
        deleted: list[bool] = []

        async def delete_after_the_copy(step: str) -> None:
            # The move has copied the dialog to its target and not fenced the source yet.
            if step == "copied":
                request = dpb.DeleteMessageRequest(user_id=a, peer_user_id=b, message_id=sent[2])
                deleted.append((await stub.DeleteMessage(request, metadata=auth_for(a))).deleted)

        source = calculate_shard(a, b, 4)
        target = other_shard(a, b)
        mover = Mover(
            base.control_dsn,
            running.placement.control_pool,
            running.shards,
            running.placement.router,
            after_step=delete_after_the_copy,
        )
        result = await mover.move_pair(Pair.of(a, b), target)
        assert deleted == [True] and result.shard_id == target
        assert rows_on(base, (a, b)) == [target]
        assert hot_count(base, (a, b)) == 4
        await assert_dialog_is(channel, auth_for(a), a, b, [m for m in sent if m != sent[2]])
        assert source != target


async def test_deleting_again_removes_a_copy_a_move_left_on_its_target(
    pg_servers: list[EmbeddedPostgres],
    jwt_secret: str,
    new_pair: Callable[[], tuple[int, int]],
    auth_for: Callable[..., Metadata],
) -> None:
    base = fresh_cluster(pg_servers, jwt_secret, 4)
    async with serving(base) as (_, channel):
        a, b = new_pair()
        sent = await send(channel, auth_for(a), a, b, 2)
        low, high = Pair.of(a, b)
        source, target = base.shards[calculate_shard(a, b, 4)], base.shards[other_shard(a, b)]
        # What a mover's copy written just after a delete leaves: the message on the target only.
        columns = "message_id, user_low, user_high, bucket, from_user_id, to_user_id, text, created_at"
        with psycopg.connect(source.dsn) as conn:
            row = conn.execute(
                f"DELETE FROM {source.table} WHERE message_id = %s RETURNING {columns}", (sent[0],)
            ).fetchone()
        with psycopg.connect(target.dsn) as conn:
            conn.execute(
                f"INSERT INTO {target.table} ({columns}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)", row
            )
        with psycopg.connect(base.control_dsn) as conn:
            conn.execute(
                "INSERT INTO shard_moves (bucket, buckets, user_low, user_high, source_shard, target_shard, "
                "flip, state) VALUES (%s, %s, %s, %s, %s, %s, 'set_override', 'copying')",
                (bucket_of(a, b), [bucket_of(a, b)], low, high, source.shard_id, target.shard_id),
            )
        stub = dialog_service_pb2_grpc.DialogServiceStub(channel)
        request = dpb.DeleteMessageRequest(user_id=a, peer_user_id=b, message_id=sent[0])
        assert (await stub.DeleteMessage(request, metadata=auth_for(a))).deleted is True
        assert (await stub.DeleteMessage(request, metadata=auth_for(a))).deleted is False
        assert hot_count(base, (a, b)) == 1
        with psycopg.connect(base.control_dsn) as conn:
            conn.execute(
                "UPDATE shard_moves SET state = 'done' WHERE user_low = %s AND user_high = %s", (low, high)
            )
