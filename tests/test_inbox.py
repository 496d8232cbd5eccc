"""ListDialogs: the per-user inbox kept by the relay from the message logs, through moves and reshards."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import psycopg

from client.gen.dialog.v1 import admin_service_pb2 as admin_pb
from client.gen.dialog.v1 import dialog_service_pb2 as pb
from client.gen.dialog.v1.admin_service_pb2_grpc import AdminServiceStub
from client.gen.dialog.v1.dialog_service_pb2_grpc import DialogServiceStub
from server.cli.inbox import rebuild_inbox
from server.dev.embedded_pg import EmbeddedPostgres
from server.routing import Pair
from server.runtime.app import RunningServer
from server.storage.events import ORIGIN
from tests.processes import write_server_config
from tests.support import (
    Metadata,
    archived_cluster,
    archiver,
    dialogctl,
    expect_error,
    fresh_cluster,
    make_config,
    metric_value,
    old_messages,
    other_shard,
    scrape_metrics,
    serving,
    status_details,
)

if TYPE_CHECKING:
    from client.gen.dialog.v1.admin_service_pb2_grpc import AdminServiceAsyncStub
    from client.gen.dialog.v1.dialog_service_pb2_grpc import DialogServiceAsyncStub


async def send(
    stub: DialogServiceAsyncStub, auth_for: Callable[..., Metadata], a: int, b: int, text: str
) -> pb.Message:
    reply = await stub.SendMessage(
        pb.SendMessageRequest(from_user_id=a, to_user_id=b, text=text), metadata=auth_for(a), timeout=10
    )
    return reply.message


async def inbox(
    stub: DialogServiceAsyncStub, auth_for: Callable[..., Metadata], user: int, page_size: int = 0
) -> list[pb.DialogSummary]:
    """Every dialog of `user`, page after page."""
    found: list[pb.DialogSummary] = []
    token = ""
    while True:
        page = await stub.ListDialogs(
            pb.ListDialogsRequest(user_id=user, page_size=page_size, page_token=token),
            metadata=auth_for(user),
            timeout=10,
        )
        found += page.dialogs
        token = page.next_page_token
        if not token:
            return found


def summary(dialogs: list[pb.DialogSummary]) -> list[tuple[int, int, str, str]]:
    return [
        (d.peer_user_id, d.message_count, d.last_message.text, d.last_message.message_id) for d in dialogs
    ]


async def test_list_dialogs_shows_each_dialog_with_its_last_message_most_recent_first(
    server: RunningServer,
    dialog_stub: DialogServiceAsyncStub,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    me = new_pair()[0]
    peers = [new_pair()[0] for _ in range(5)]
    last: dict[int, pb.Message] = {}
    for round_ in range(3):
        for i, peer in enumerate(peers):
            if i <= round_ + 1:  # peer i has min(i, ...) fewer messages
                sender, recipient = (me, peer) if (i + round_) % 2 else (peer, me)
                last[peer] = await send(dialog_stub, auth_for, sender, recipient, f"{round_}/{i}")
    assert server.delivery is not None and server.delivery.relay is not None
    await server.delivery.relay.catch_up()
    counts = {peer: sum(1 for r in range(3) if i <= r + 1) for i, peer in enumerate(peers)}
    expected = sorted(
        ((peer, counts[peer], m.text, m.message_id) for peer, m in last.items()),
        key=lambda d: d[3],
        reverse=True,
    )
    assert summary(await inbox(dialog_stub, auth_for, me)) == expected
    # Paged two at a time: the same list.
    assert summary(await inbox(dialog_stub, auth_for, me, page_size=2)) == expected
    listed = await inbox(dialog_stub, auth_for, me)
    assert listed[0].last_message == last[expected[0][0]]
    # A peer's inbox shows the dialog from its side.
    theirs = await inbox(dialog_stub, auth_for, peers[1])
    assert summary(theirs) == [(me, counts[peers[1]], last[peers[1]].text, last[peers[1]].message_id)]


async def test_list_dialogs_checks_the_caller_and_its_tokens(
    dialog_stub: DialogServiceAsyncStub,
    server: RunningServer,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    me, other = new_pair()
    for peer in new_pair():
        await send(dialog_stub, auth_for, me, peer, "hi")
    assert server.delivery is not None and server.delivery.relay is not None
    await server.delivery.relay.catch_up()
    await expect_error(
        dialog_stub.ListDialogs(pb.ListDialogsRequest(user_id=me), metadata=auth_for(other)),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    first = await dialog_stub.ListDialogs(
        pb.ListDialogsRequest(user_id=me, page_size=1), metadata=auth_for(me)
    )
    assert first.next_page_token
    err = await expect_error(
        dialog_stub.ListDialogs(
            pb.ListDialogsRequest(user_id=other, page_token=first.next_page_token), metadata=auth_for(other)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert [f for f, _ in status_details(err)[1]] == ["page_token"]
    await expect_error(
        dialog_stub.ListDialogs(pb.ListDialogsRequest(user_id=me, page_size=-1), metadata=auth_for(me)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


async def test_a_move_neither_loses_nor_doubles_an_inbox_count(
    server: RunningServer,
    dialog_stub: DialogServiceAsyncStub,
    admin_stub: AdminServiceAsyncStub,
    admin_auth: Metadata,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    a, b = new_pair()
    for i in range(3):
        await send(dialog_stub, auth_for, a, b, f"before {i}")
    await admin_stub.SetShardOverride(
        admin_pb.SetShardOverrideRequest(user_id_1=a, user_id_2=b, shard_id=other_shard(a, b)),
        metadata=admin_auth,
    )
    last = await send(dialog_stub, auth_for, b, a, "after the move")
    assert server.delivery is not None and server.delivery.relay is not None
    await server.delivery.relay.catch_up()
    assert summary(await inbox(dialog_stub, auth_for, a)) == [(b, 4, last.text, last.message_id)]
    assert summary(await inbox(dialog_stub, auth_for, b)) == [(a, 4, last.text, last.message_id)]


async def test_the_relay_lag_and_the_subscribers_are_exported(server: RunningServer) -> None:
    assert (
        server.metrics_port is not None and server.delivery is not None and server.delivery.relay is not None
    )
    await server.delivery.relay.catch_up()
    samples, _ = await scrape_metrics(server.metrics_port)
    assert metric_value(samples, "dialog_shard_subscribers") == server.delivery.subscribers
    assert 0 <= metric_value(samples, "dialog_shard_inbox_relay_lag_seconds") < 60


async def _send_all(
    stub: DialogServiceAsyncStub, auth_for: Callable[..., Metadata], pairs: list[tuple[int, int]], tag: str
) -> dict[tuple[int, int], pb.Message]:
    """One message each way of every pair; the last message of each."""
    last = {}
    for a, b in pairs:
        await send(stub, auth_for, a, b, f"{tag} from {a}")
        last[(a, b)] = await send(stub, auth_for, b, a, f"{tag} from {b}")
    return last


async def test_list_dialogs_after_a_reshard_and_a_rebuild_under_writes(
    pg_servers: list[EmbeddedPostgres],
    jwt_secret: str,
    tmp_path: Path,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    config = fresh_cluster(pg_servers, jwt_secret, 8)
    pairs = [new_pair() for _ in range(12)]
    # The first server has 4 shards: the inbox lives on those for good.
    async with serving(make_config([s.dsn for s in config.shards[:4]], jwt_secret)) as (_, channel):
        await _send_all(DialogServiceStub(channel), auth_for, pairs, "before")
    path = write_server_config(tmp_path / "all.toml", config, "127.0.0.1:1", jwt_secret)
    async with serving(config) as (running, channel):
        stub = DialogServiceStub(channel)
        assert running.delivery is not None and running.delivery.relay is not None
        result = await dialogctl(path, "reshard", "--shards", "8", "--json")
        assert result.json()["rows_copied"] > 0
        last = await _send_all(stub, auth_for, pairs, "after")
        await running.delivery.relay.catch_up()
        for (a, b), message in last.items():
            for owner, peer in ((a, b), (b, a)):
                assert summary(await inbox(stub, auth_for, owner)) == [
                    (peer, 4, message.text, message.message_id)
                ]

        # A broken inbox row, rebuilt while messages keep coming: every count is right afterwards.
        with psycopg.connect(config.shards[0].dsn) as conn:
            conn.execute(f"UPDATE {config.shards[0].table}_inbox SET message_count = 999")
        stop = asyncio.Event()

        async def keep_sending() -> int:
            sent = 0
            while not stop.is_set():
                a, b = pairs[sent % len(pairs)]
                await send(stub, auth_for, a, b, "during the rebuild")
                sent += 1
            return sent

        writer = asyncio.create_task(keep_sending())
        rebuilt = (await dialogctl(path, "rebuild-inbox", "--json")).json()
        stop.set()
        sent = await writer
        assert rebuilt["inbox_shards"] == 4 and rebuilt["rows"] == 2 * len(pairs)
        await running.delivery.relay.catch_up()
        for i, (a, b) in enumerate(pairs):
            extra = sum(1 for n in range(sent) if n % len(pairs) == i)
            for owner, peer in ((a, b), (b, a)):
                [row] = await inbox(stub, auth_for, owner)
                assert (row.peer_user_id, row.message_count) == (peer, 4 + extra)


# -- Deletes, erasure and archiving ---------------------------------------------------------------


async def delete(
    stub: DialogServiceAsyncStub, auth_for: Callable[..., Metadata], user: int, peer: int, message_id: str
) -> bool:
    request = pb.DeleteMessageRequest(user_id=user, peer_user_id=peer, message_id=message_id)
    return bool((await stub.DeleteMessage(request, metadata=auth_for(user), timeout=10)).deleted)


async def relayed(server: RunningServer) -> None:
    assert server.delivery is not None and server.delivery.relay is not None
    await server.delivery.relay.catch_up()


async def test_a_deleted_message_leaves_both_inboxes_and_the_previous_one_becomes_the_last(
    server: RunningServer,
    dialog_stub: DialogServiceAsyncStub,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    a, b = new_pair()
    first = await send(dialog_stub, auth_for, a, b, "first")
    second = await send(dialog_stub, auth_for, b, a, "second")
    third = await send(dialog_stub, auth_for, a, b, "third")
    await relayed(server)
    assert summary(await inbox(dialog_stub, auth_for, a)) == [(b, 3, "third", third.message_id)]
    assert await delete(dialog_stub, auth_for, a, b, third.message_id)
    await relayed(server)
    for owner, peer in ((a, b), (b, a)):
        assert summary(await inbox(dialog_stub, auth_for, owner)) == [(peer, 2, "second", second.message_id)]
    # Not the last one: only the count changes; deleting again changes nothing.
    assert await delete(dialog_stub, auth_for, a, b, first.message_id)
    assert not await delete(dialog_stub, auth_for, a, b, first.message_id)
    await relayed(server)
    for owner, peer in ((a, b), (b, a)):
        assert summary(await inbox(dialog_stub, auth_for, owner)) == [(peer, 1, "second", second.message_id)]
    assert await delete(dialog_stub, auth_for, b, a, second.message_id)
    await relayed(server)
    assert await inbox(dialog_stub, auth_for, a) == [] and await inbox(dialog_stub, auth_for, b) == []
    # Subscribers resuming are not sent deleted messages; the relay reads their deletions.
    assert server.delivery is not None
    shard_id = server.placement.router.resolve(a, b).shard_id
    log = server.delivery.log(shard_id)
    live = await log.read(ORIGIN, limit=100, user_id=a)
    assert live.events == []
    everything = await log.read(ORIGIN, limit=100, user_id=a, with_deletions=True)
    deleted = {str(e.message_id) for e in everything.events if e.deleted}
    assert deleted == {first.message_id, second.message_id, third.message_id}


async def test_erase_user_removes_the_users_inbox_and_the_peers_rows_of_the_user(
    server: RunningServer,
    dialog_stub: DialogServiceAsyncStub,
    admin_stub: AdminServiceAsyncStub,
    admin_auth: Metadata,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    user, peer = new_pair()
    other = new_pair()[0]
    await send(dialog_stub, auth_for, user, peer, "to be erased")
    await send(dialog_stub, auth_for, other, user, "to be erased too")
    kept = await send(dialog_stub, auth_for, peer, other, "kept")
    await relayed(server)
    assert len(await inbox(dialog_stub, auth_for, user)) == 2
    await admin_stub.EraseUser(admin_pb.EraseUserRequest(user_id=user), metadata=admin_auth, timeout=30)
    # Sent after the erasure: only this dialog of the user is listed again.
    fresh = await send(dialog_stub, auth_for, peer, user, "after the erasure")
    await relayed(server)
    assert summary(await inbox(dialog_stub, auth_for, user)) == [(peer, 1, fresh.text, fresh.message_id)]
    assert summary(await inbox(dialog_stub, auth_for, other)) == [(peer, 1, "kept", kept.message_id)]
    assert summary(await inbox(dialog_stub, auth_for, peer)) == [
        (user, 1, fresh.text, fresh.message_id),
        (other, 1, "kept", kept.message_id),
    ]


async def test_archiving_changes_no_inbox_and_deletes_reach_into_the_archive(
    pg_servers: list[EmbeddedPostgres],
    jwt_secret: str,
    tmp_path: Path,
    new_pair: Callable[[], tuple[int, int]],
    auth_for: Callable[..., Metadata],
) -> None:
    settings = {"url": str(tmp_path / "archive"), "manifest_max_age": 0.2, "batch_rows": 10}
    async with archived_cluster(pg_servers, jwt_secret, settings) as (config, running, channel):
        stub = DialogServiceStub(channel)
        low, high = Pair.of(*new_pair())
        # old[i] was sent by `low` unless i % 3 == 0: the last one (25) by `low`.
        old = old_messages(config, (low, high), 26, sent=datetime.now(UTC) - timedelta(days=30))
        hot = [await send(stub, auth_for, low, high, f"hot {i}") for i in range(2)]
        await rebuild_inbox(config)  # the messages written straight into the shard
        await relayed(running)
        before = {user: summary(await inbox(stub, auth_for, user)) for user in (low, high)}
        assert before[low] == [(high, 28, "hot 1", hot[1].message_id)]
        report = await archiver(running, config).run(datetime.now(UTC) - timedelta(days=1))
        assert report.total == 26
        await relayed(running)
        for user in (low, high):
            assert summary(await inbox(stub, auth_for, user)) == before[user], "archiving changes no dialog"
        assert (await rebuild_inbox(config))["archived_messages"] == 26
        await relayed(running)
        for user in (low, high):
            assert summary(await inbox(stub, auth_for, user)) == before[user], "a rebuild counts the archive"
        # The last hot messages go: the newest archived one is the last; then archived ones go.
        for message in hot:
            assert await delete(stub, auth_for, low, high, message.message_id)
        await relayed(running)
        newest_old = summary(await inbox(stub, auth_for, high))[0]
        assert newest_old[:2] == (low, 26) and newest_old[3] == old[-1]
        assert await delete(stub, auth_for, low, high, old[-1])
        assert not await delete(stub, auth_for, low, high, old[-1])
        await relayed(running)
        after = {user: summary(await inbox(stub, auth_for, user)) for user in (low, high)}
        assert [(d[0], d[1], d[3]) for d in after[low]] == [(high, 25, old[-2])]
        # A rebuild honours the tombstone, and the deletion logged twice still counts once.
        await rebuild_inbox(config)
        await relayed(running)
        for user in (low, high):
            assert summary(await inbox(stub, auth_for, user)) == after[user]


async def test_a_deletion_relayed_before_its_moved_message_counts_it_once_and_not_as_the_last(
    pg_servers: list[EmbeddedPostgres],
    jwt_secret: str,
    new_pair: Callable[[], tuple[int, int]],
    auth_for: Callable[..., Metadata],
    admin_auth: Metadata,
) -> None:
    config = fresh_cluster(pg_servers, jwt_secret, 4)
    async with serving(config) as (running, channel):
        assert running.delivery is not None and running.delivery.relay is not None
        relay = running.delivery.relay
        await relay.stop()  # this test relays by hand, in the order it chooses
        stub = DialogServiceStub(channel)
        admin = AdminServiceStub(channel)
        relayed_first, not_yet = new_pair(), new_pair()
        await send(stub, auth_for, *relayed_first, "relayed before the move")
        await relay.catch_up()  # the first pair has inbox rows, the second none yet
        expected = {}
        for a, b in (relayed_first, not_yet):
            source = running.placement.router.resolve(a, b).shard_id
            target = other_shard(a, b)
            kept = await send(stub, auth_for, a, b, "moved")
            deleted = await send(stub, auth_for, a, b, "moved, then deleted")
            await admin.SetShardOverride(
                admin_pb.SetShardOverrideRequest(user_id_1=a, user_id_2=b, shard_id=target),
                metadata=admin_auth,
            )
            assert await delete(stub, auth_for, a, b, deleted.message_id)
            # The target's log (the deletion) first, the source's (the messages) after.
            await relay.relay_source(target)
            await relay.relay_source(source)
            count = 2 if (a, b) == relayed_first else 1
            expected[a] = [(b, count, "moved", kept.message_id)]
            expected[b] = [(a, count, "moved", kept.message_id)]
        await relay.catch_up()
        for owner, dialogs in expected.items():
            assert summary(await inbox(stub, auth_for, owner)) == dialogs
