"""AdminService: overrides win, stay coherent across processes, and move the messages they place."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psycopg
import pytest

from client.gen.dialog.v1 import admin_service_pb2 as pb
from client.gen.dialog.v1 import admin_service_pb2_grpc, dialog_service_pb2_grpc
from client.gen.dialog.v1 import dialog_service_pb2 as dpb
from server.config import ServerConfig
from server.routing import Pair, bucket_of, calculate_shard
from server.runtime.app import RunningServer
from server.storage.channel import CHANNEL
from server.storage.overrides import LISTENER_APPLICATION_NAME
from tests.processes import child_env, write_server_config
from tests.support import Metadata, expect_error, other_shard, rows_for_pair, wait_until


async def test_resolve_shard_reports_hash_then_override(
    admin_stub: admin_service_pb2_grpc.AdminServiceAsyncStub,
    admin_auth: Metadata,
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    a, b = new_pair()
    hashed = await admin_stub.ResolveShard(
        pb.ResolveShardRequest(user_id_1=b, user_id_2=a), metadata=admin_auth
    )
    assert (hashed.shard_id, hashed.source) == (calculate_shard(a, b, 4), pb.SHARD_SOURCE_HASH)
    assert hashed.hash_shard_id == hashed.shard_id and hashed.bucket == bucket_of(a, b)
    target = other_shard(a, b)
    set_reply = await admin_stub.SetShardOverride(
        pb.SetShardOverrideRequest(user_id_1=b, user_id_2=a, shard_id=target), metadata=admin_auth
    )
    assert (set_reply.override.user_id_1, set_reply.override.user_id_2) == tuple(Pair.of(a, b))
    overridden = await admin_stub.ResolveShard(
        pb.ResolveShardRequest(user_id_1=a, user_id_2=b), metadata=admin_auth
    )
    assert (overridden.shard_id, overridden.source, overridden.hash_shard_id) == (
        target,
        pb.SHARD_SOURCE_OVERRIDE,
        calculate_shard(a, b, 4),
    )


async def test_override_wins_for_sends_and_reads(
    admin_stub: admin_service_pb2_grpc.AdminServiceAsyncStub,
    dialog_stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    admin_auth: Metadata,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
    cluster_config: ServerConfig,
) -> None:
    a, b = new_pair()
    target = other_shard(a, b)
    await admin_stub.SetShardOverride(
        pb.SetShardOverrideRequest(user_id_1=a, user_id_2=b, shard_id=target), metadata=admin_auth
    )
    sent = await dialog_stub.SendMessage(
        dpb.SendMessageRequest(from_user_id=a, to_user_id=b, text="pinned"), metadata=auth_for(a)
    )
    assert list(rows_for_pair(cluster_config, (a, b))) == [target]
    page = await dialog_stub.GetDialog(dpb.GetDialogRequest(user_id=b, peer_user_id=a), metadata=auth_for(b))
    assert [m.message_id for m in page.messages] == [sent.message.message_id]


async def test_override_moves_the_pairs_messages(
    admin_stub: admin_service_pb2_grpc.AdminServiceAsyncStub,
    dialog_stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    admin_auth: Metadata,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
    cluster_config: ServerConfig,
) -> None:
    a, b = new_pair()
    sent = [
        (
            await dialog_stub.SendMessage(
                dpb.SendMessageRequest(from_user_id=a, to_user_id=b, text=f"m{i}", request_id=f"r{i}"),
                metadata=auth_for(a),
            )
        ).message.message_id
        for i in range(3)
    ]
    home = calculate_shard(a, b, 4)
    target = other_shard(a, b)
    await admin_stub.SetShardOverride(
        pb.SetShardOverrideRequest(user_id_1=a, user_id_2=b, shard_id=target), metadata=admin_auth
    )
    rows = rows_for_pair(cluster_config, (a, b))
    assert list(rows) == [target], "moved, and gone from the hash shard"
    assert [str(r[0]) for r in rows[target]] == sent
    page = await dialog_stub.GetDialog(
        dpb.GetDialogRequest(user_id=b, peer_user_id=a, order=dpb.MESSAGE_ORDER_OLDEST_FIRST),
        metadata=auth_for(b),
    )
    assert [m.message_id for m in page.messages] == sent
    # request_id idempotency travels with the messages.
    replay = await dialog_stub.SendMessage(
        dpb.SendMessageRequest(from_user_id=a, to_user_id=b, text="m1", request_id="r1"), metadata=auth_for(a)
    )
    assert replay.replayed and replay.message.message_id == sent[1]
    # Pinning it back home moves it back.
    await admin_stub.SetShardOverride(
        pb.SetShardOverrideRequest(user_id_1=a, user_id_2=b, shard_id=home), metadata=admin_auth
    )
    assert {k: [str(r[0]) for r in v] for k, v in rows_for_pair(cluster_config, (a, b)).items()} == {
        home: sent
    }


async def test_delete_override_returns_pair_to_hash_shard(
    admin_stub: admin_service_pb2_grpc.AdminServiceAsyncStub,
    dialog_stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    admin_auth: Metadata,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
    cluster_config: ServerConfig,
) -> None:
    a, b = new_pair()
    target = other_shard(a, b)
    await admin_stub.SetShardOverride(
        pb.SetShardOverrideRequest(user_id_1=a, user_id_2=b, shard_id=target), metadata=admin_auth
    )
    reply = await admin_stub.DeleteShardOverride(
        pb.DeleteShardOverrideRequest(user_id_1=a, user_id_2=b), metadata=admin_auth
    )
    assert reply.shard_id == calculate_shard(a, b, 4)
    err = await expect_error(
        admin_stub.DeleteShardOverride(
            pb.DeleteShardOverrideRequest(user_id_1=a, user_id_2=b), metadata=admin_auth
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    assert "no shard override" in (err.details() or "")
    await admin_stub.DeleteShardOverride(
        pb.DeleteShardOverrideRequest(user_id_1=a, user_id_2=b, allow_missing=True), metadata=admin_auth
    )
    # With messages on the override shard, deleting the override moves them home.
    await admin_stub.SetShardOverride(
        pb.SetShardOverrideRequest(user_id_1=a, user_id_2=b, shard_id=target), metadata=admin_auth
    )
    await dialog_stub.SendMessage(
        dpb.SendMessageRequest(from_user_id=b, to_user_id=a, text="x"), metadata=auth_for(b)
    )
    await admin_stub.DeleteShardOverride(
        pb.DeleteShardOverrideRequest(user_id_1=a, user_id_2=b), metadata=admin_auth
    )
    home = calculate_shard(a, b, 4)
    rows = rows_for_pair(cluster_config, (a, b))
    assert list(rows) == [home] and [r[3] for r in rows[home]] == ["x"]


async def test_invalid_admin_requests(
    admin_stub: admin_service_pb2_grpc.AdminServiceAsyncStub,
    admin_auth: Metadata,
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    a, b = new_pair()
    for request in (
        pb.SetShardOverrideRequest(user_id_1=a, user_id_2=b, shard_id=4),
        pb.SetShardOverrideRequest(user_id_1=a, user_id_2=b, shard_id=-1),
        pb.SetShardOverrideRequest(user_id_1=0, user_id_2=b, shard_id=0),
        pb.SetShardOverrideRequest(user_id_1=a, user_id_2=a, shard_id=0),
    ):
        await expect_error(
            admin_stub.SetShardOverride(request, metadata=admin_auth), grpc.StatusCode.INVALID_ARGUMENT
        )
    await expect_error(
        admin_stub.ListShardOverrides(pb.ListShardOverridesRequest(page_size=-3), metadata=admin_auth),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    await expect_error(
        admin_stub.ListShardOverrides(pb.ListShardOverridesRequest(page_token="forged"), metadata=admin_auth),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


async def test_list_overrides_pages_through_all(
    admin_stub: admin_service_pb2_grpc.AdminServiceAsyncStub,
    admin_auth: Metadata,
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    mine = set()
    for _ in range(7):
        a, b = new_pair()
        await admin_stub.SetShardOverride(
            pb.SetShardOverrideRequest(user_id_1=a, user_id_2=b, shard_id=2), metadata=admin_auth
        )
        mine.add(tuple(Pair.of(a, b)))
    listed: list[tuple[int, int]] = []
    token = ""
    while True:
        page = await admin_stub.ListShardOverrides(
            pb.ListShardOverridesRequest(page_size=3, page_token=token), metadata=admin_auth
        )
        assert len(page.overrides) <= 3
        listed += [(o.user_id_1, o.user_id_2) for o in page.overrides]
        token = page.next_page_token
        if not token:
            break
    assert listed == sorted(set(listed)), "ordered by pair, no duplicates"
    assert mine <= set(listed)


async def test_shard_stats_count_messages_and_overrides(
    admin_stub: admin_service_pb2_grpc.AdminServiceAsyncStub,
    dialog_stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    admin_auth: Metadata,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
    cluster_config: ServerConfig,
) -> None:
    before = await admin_stub.GetShardStats(pb.GetShardStatsRequest(exact=True), metadata=admin_auth)
    assert [s.shard_id for s in before.shards] == [0, 1, 2, 3]
    assert all(s.message_count_exact for s in before.shards)
    assert before.num_shards == 4 and all(s.available for s in before.shards)
    assert [s.table_name for s in before.shards] == [f"messages_{i}" for i in range(4)]
    assert len({s.location for s in before.shards}) == 4, "four separate servers"
    assert all("postgres@" not in s.location for s in before.shards)
    a, b = new_pair()
    for i in range(3):
        await dialog_stub.SendMessage(
            dpb.SendMessageRequest(from_user_id=a, to_user_id=b, text=str(i)), metadata=auth_for(a)
        )
    after = await admin_stub.GetShardStats(pb.GetShardStatsRequest(exact=True), metadata=admin_auth)
    shard = calculate_shard(a, b, 4)
    # Other tests may write concurrently only in other test modules' sessions; here the suite is sequential.
    assert after.shards[shard].message_count - before.shards[shard].message_count == 3
    assert after.total_message_count == sum(s.message_count for s in after.shards)
    assert after.override_count == sum(s.override_count for s in after.shards)
    with psycopg.connect(cluster_config.control_dsn) as conn:
        row = conn.execute("SELECT count(*) FROM shard_map").fetchone()
    assert row is not None
    (count,) = row
    assert after.override_count == count


async def test_stats_estimate_without_a_scan_and_count_one_shard_on_request(
    admin_stub: admin_service_pb2_grpc.AdminServiceAsyncStub,
    dialog_stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    admin_auth: Metadata,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    a, b = new_pair()
    shard = calculate_shard(a, b, 4)
    for i in range(4):
        await dialog_stub.SendMessage(
            dpb.SendMessageRequest(from_user_id=a, to_user_id=b, text=str(i)), metadata=auth_for(a)
        )
    counted = await admin_stub.GetShardStats(
        pb.GetShardStatsRequest(exact=True, shard_id=shard), metadata=admin_auth
    )
    assert [s.shard_id for s in counted.shards] == [shard] and counted.shards[0].message_count_exact
    exact = counted.shards[0].message_count
    assert counted.total_message_count == exact >= 4

    async def estimate() -> pb.ShardStats:
        reply = await admin_stub.GetShardStats(pb.GetShardStatsRequest(), metadata=admin_auth)
        assert len(reply.shards) == 4
        return reply.shards[shard]

    async def caught_up() -> bool:
        return (await estimate()).message_count == exact

    # PostgreSQL's statistics take in the inserts within seconds (an idle backend flushes its
    # counters after at most 10 s); nothing else writes meanwhile, so they reach the exact count.
    await wait_until(caught_up, "the estimate caught up with the exact count", within=30, every=0.5)
    assert not (await estimate()).message_count_exact

    for bad in (-1, 4):
        err = await expect_error(
            admin_stub.GetShardStats(pb.GetShardStatsRequest(shard_id=bad), metadata=admin_auth),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert f"must be a shard id in 0..3, got {bad}" in (err.details() or "")


async def test_listener_reloads_the_whole_map_after_reconnect(
    server: RunningServer,
    admin_stub: admin_service_pb2_grpc.AdminServiceAsyncStub,
    admin_auth: Metadata,
    new_pair: Callable[[], tuple[int, int]],
    cluster_config: ServerConfig,
) -> None:
    """A change made while the listener was disconnected (no NOTIFY seen) is picked up by the reload."""
    a, b = new_pair()
    target = other_shard(a, b)
    reloads = server.placement.reloads
    with psycopg.connect(cluster_config.control_dsn, autocommit=True) as conn:
        killed = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = %s",
            (LISTENER_APPLICATION_NAME,),
        ).fetchone()
        assert killed == (1,)
        low, high = Pair.of(a, b)
        conn.execute(
            "INSERT INTO shard_map (user1, user2, shard_id) VALUES (%s, %s, %s)", (low, high, target)
        )
    await wait_until(
        lambda: server.placement.reloads != reloads,
        "the listener reconnects and reloads",
        within=15,
        every=0.05,
    )
    resolved = await admin_stub.ResolveShard(
        pb.ResolveShardRequest(user_id_1=a, user_id_2=b), metadata=admin_auth
    )
    assert (resolved.shard_id, resolved.source) == (target, pb.SHARD_SOURCE_OVERRIDE)


@pytest.fixture
def second_server(tmp_path: Path, cluster_config: ServerConfig, jwt_secret: str) -> Iterator[str]:
    """Another `dialog-server` process on the same shards and control database."""
    config = write_server_config(tmp_path / "second.toml", cluster_config, "127.0.0.1:0", jwt_secret)
    binary = Path(sys.executable).parent / "dialog-server"
    proc = subprocess.Popen(
        [str(binary), "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=child_env(),
    )
    try:
        assert proc.stdout is not None
        output = []
        for line in proc.stdout:
            output.append(line)
            match = re.search(r"serving on (\S+:\d+)", line)
            if match:
                yield match.group(1)
                break
        else:
            pytest.fail("second server did not start:\n" + "".join(output))
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0


async def test_second_process_sees_new_override_without_restart(
    second_server: str,
    admin_stub: admin_service_pb2_grpc.AdminServiceAsyncStub,
    admin_auth: Metadata,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
    cluster_config: ServerConfig,
) -> None:
    a, b = new_pair()
    target = other_shard(a, b)
    async with grpc.aio.insecure_channel(second_server) as channel:
        remote_admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        first = await remote_admin.ResolveShard(
            pb.ResolveShardRequest(user_id_1=a, user_id_2=b), metadata=admin_auth
        )
        assert first.source == pb.SHARD_SOURCE_HASH
        await admin_stub.SetShardOverride(
            pb.SetShardOverrideRequest(user_id_1=a, user_id_2=b, shard_id=target), metadata=admin_auth
        )

        async def resolve() -> pb.ResolveShardResponse:
            reply: pb.ResolveShardResponse = await remote_admin.ResolveShard(
                pb.ResolveShardRequest(user_id_1=a, user_id_2=b), metadata=admin_auth
            )
            return reply

        async def sees_the_override() -> bool:
            return (await resolve()).source == pb.SHARD_SOURCE_OVERRIDE

        await wait_until(sees_the_override, "the second process sees the override", within=5)
        assert (await resolve()).shard_id == target
        from client.gen.dialog.v1 import dialog_service_pb2_grpc

        remote_dialog = dialog_service_pb2_grpc.DialogServiceStub(channel)
        await remote_dialog.SendMessage(
            dpb.SendMessageRequest(from_user_id=a, to_user_id=b, text="via 2nd"), metadata=auth_for(a)
        )
    assert list(rows_for_pair(cluster_config, (a, b))) == [target]


async def test_override_naming_an_unconfigured_shard_fails_cleanly(
    server: RunningServer,
    dialog_stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
    cluster_config: ServerConfig,
) -> None:
    """A shard_map row written by hand for shard 9 must not crash the call (no INTERNAL)."""
    a, b = new_pair()
    low, high = Pair.of(a, b)
    with psycopg.connect(cluster_config.control_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO shard_map (user1, user2, shard_id) VALUES (%s, %s, 9)", (low, high))
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"set {low} {high} 9"))
    await wait_until(
        lambda: server.placement.router.override_of(Pair(low, high)) == 9,
        "the server applies the NOTIFY of shard 9",
        within=5,
    )
    err = await expect_error(
        dialog_stub.SendMessage(
            dpb.SendMessageRequest(from_user_id=a, to_user_id=b, text="x"), metadata=auth_for(a)
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert "shard 9 is not configured" in (err.details() or "")
    assert rows_for_pair(cluster_config, (a, b)) == {}
