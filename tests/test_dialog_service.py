"""DialogService end to end: a real grpc.aio server, four real PostgreSQL servers."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from client.gen.dialog.v1 import dialog_service_pb2 as pb
from client.gen.dialog.v1 import dialog_service_pb2_grpc
from server.config import ServerConfig
from server.routing import bucket_of, calculate_shard
from server.runtime.app import running_server
from tests.support import Metadata, rows_for_pair


async def send(
    stub: Any, auth_for: Any, a: int, b: int, text: str, request_id: str = ""
) -> pb.SendMessageResponse:
    response: pb.SendMessageResponse = await stub.SendMessage(
        pb.SendMessageRequest(from_user_id=a, to_user_id=b, text=text, request_id=request_id),
        metadata=auth_for(a),
    )
    return response


async def read_all(
    stub: Any,
    auth_for: Any,
    user: int,
    peer: int,
    *,
    page_size: int,
    order: pb.MessageOrder.ValueType = pb.MESSAGE_ORDER_UNSPECIFIED,
) -> list[pb.Message]:
    messages: list[pb.Message] = []
    token = ""
    while True:
        page = await stub.GetDialog(
            pb.GetDialogRequest(
                user_id=user, peer_user_id=peer, page_size=page_size, page_token=token, order=order
            ),
            metadata=auth_for(user),
        )
        assert len(page.messages) <= page_size
        messages.extend(page.messages)
        token = page.next_page_token
        if not token:
            return messages


async def test_message_is_stored_on_the_hash_shard_and_read_back_by_both_users(
    dialog_stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
    cluster_config: ServerConfig,
) -> None:
    a, b = new_pair()
    sent = (await send(dialog_stub, auth_for, a, b, "hello")).message
    assert (sent.from_user_id, sent.to_user_id, sent.text) == (a, b, "hello")
    assert sent.create_time.seconds > 0
    for reader, peer in ((a, b), (b, a)):
        page = await dialog_stub.GetDialog(
            pb.GetDialogRequest(user_id=reader, peer_user_id=peer), metadata=auth_for(reader)
        )
        assert list(page.messages) == [sent]
        assert page.next_page_token == ""
    stored = rows_for_pair(cluster_config, (a, b))
    shard = calculate_shard(a, b, 4)
    assert list(stored) == [shard]
    (row,) = stored[shard]
    assert str(row[0]) == sent.message_id
    assert row[5] == bucket_of(a, b)


async def test_newest_first_by_default_and_oldest_first_on_request(
    dialog_stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    a, b = new_pair()
    sent = [
        (await send(dialog_stub, auth_for, *((a, b) if i % 2 else (b, a)), f"m{i}")).message for i in range(7)
    ]
    ids = [m.message_id for m in sent]
    assert ids == sorted(ids), "message ids sort by time"
    newest = await read_all(dialog_stub, auth_for, a, b, page_size=3)
    assert [m.message_id for m in newest] == ids[::-1]
    explicit = await read_all(dialog_stub, auth_for, a, b, page_size=3, order=pb.MESSAGE_ORDER_NEWEST_FIRST)
    assert explicit == newest
    oldest = await read_all(dialog_stub, auth_for, b, a, page_size=2, order=pb.MESSAGE_ORDER_OLDEST_FIRST)
    assert [m.message_id for m in oldest] == ids
    assert [m.text for m in oldest] == [f"m{i}" for i in range(7)]


async def test_page_size_default_and_cap(
    dialog_stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    a, b = new_pair()
    await asyncio.gather(*(send(dialog_stub, auth_for, a, b, f"x{i}") for i in range(60)))
    first = await dialog_stub.GetDialog(pb.GetDialogRequest(user_id=a, peer_user_id=b), metadata=auth_for(a))
    assert len(first.messages) == 50 and first.next_page_token
    huge = await dialog_stub.GetDialog(
        pb.GetDialogRequest(user_id=a, peer_user_id=b, page_size=1_000_000), metadata=auth_for(a)
    )
    assert len(huge.messages) == 60 and huge.next_page_token == ""


async def test_paging_while_messages_arrive_has_no_duplicates_or_gaps(
    dialog_stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    a, b = new_pair()
    before = [(await send(dialog_stub, auth_for, a, b, f"old{i}")).message.message_id for i in range(25)]
    for order in (pb.MESSAGE_ORDER_NEWEST_FIRST, pb.MESSAGE_ORDER_OLDEST_FIRST):
        seen: list[str] = []
        token = ""
        arrived: list[str] = []
        while True:
            page = await dialog_stub.GetDialog(
                pb.GetDialogRequest(user_id=a, peer_user_id=b, page_size=4, page_token=token, order=order),
                metadata=auth_for(a),
            )
            seen += [m.message_id for m in page.messages]
            arrived.append((await send(dialog_stub, auth_for, b, a, "new")).message.message_id)
            token = page.next_page_token
            if not token:
                break
        assert len(seen) == len(set(seen)), "no duplicates"
        assert set(before) <= set(seen), "every message present before paging started is seen"
        if order == pb.MESSAGE_ORDER_OLDEST_FIRST:
            # Oldest-first paging walks towards the present: it also sees what arrived meanwhile.
            assert seen[: len(before)] == before
            assert set(seen) - set(before) <= set(arrived)
            assert seen == sorted(seen)
        else:
            assert seen == sorted(seen, reverse=True)
        before = sorted(set(before) | set(arrived))


async def test_retry_with_same_request_id_returns_original_and_stores_once(
    dialog_stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
    cluster_config: ServerConfig,
) -> None:
    a, b = new_pair()
    first = await send(dialog_stub, auth_for, a, b, "pay 10", request_id="req-1")
    again = await send(dialog_stub, auth_for, a, b, "pay 10", request_id="req-1")
    assert not first.replayed and again.replayed
    assert again.message == first.message
    # The same key from the other participant is a different request.
    other = await send(dialog_stub, auth_for, b, a, "pay 10", request_id="req-1")
    assert not other.replayed and other.message.message_id != first.message.message_id
    (rows,) = rows_for_pair(cluster_config, (a, b)).values()
    assert len(rows) == 2


async def test_concurrent_duplicates_race_to_one_message(
    dialog_stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
    cluster_config: ServerConfig,
) -> None:
    a, b = new_pair()
    results = await asyncio.gather(
        *(send(dialog_stub, auth_for, a, b, "once", request_id="dup") for _ in range(20))
    )
    assert len({r.message.message_id for r in results}) == 1
    assert sum(not r.replayed for r in results) == 1
    (rows,) = rows_for_pair(cluster_config, (a, b)).values()
    assert len(rows) == 1


async def test_reused_request_id_with_other_content_is_already_exists(
    dialog_stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
    cluster_config: ServerConfig,
) -> None:
    a, b = new_pair()
    await send(dialog_stub, auth_for, a, b, "original", request_id="k")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await send(dialog_stub, auth_for, a, b, "changed", request_id="k")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "request_id" in (err.value.details() or "")
    (rows,) = rows_for_pair(cluster_config, (a, b)).values()
    assert [r[3] for r in rows] == ["original"]


async def test_text_is_stored_verbatim(
    dialog_stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
    cluster_config: ServerConfig,
) -> None:
    a, b = new_pair()
    texts = [
        "'; DROP TABLE messages_0; --",
        "emoji 👩‍👩‍👧 and RTL \u202e text",
        "  padded\n\ttabs  ",
        "ß" * 4096,
    ]
    for text in texts:
        await send(dialog_stub, auth_for, a, b, text)
    read = await read_all(dialog_stub, auth_for, a, b, page_size=10, order=pb.MESSAGE_ORDER_OLDEST_FIRST)
    assert [m.text for m in read] == texts


async def test_many_parallel_sends_are_each_stored_once_on_their_shard(
    dialog_stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    auth_for: Callable[..., Metadata],
    cluster_config: ServerConfig,
) -> None:
    rng = random.Random(7)
    pairs = [(rng.randrange(1, 2**63), rng.randrange(1, 2**63)) for _ in range(40)]
    jobs = [(a, b, f"{i}") for i in range(10) for a, b in pairs]
    semaphore = asyncio.Semaphore(64)

    async def one(a: int, b: int, text: str) -> pb.Message:
        async with semaphore:
            return (await send(dialog_stub, auth_for, a, b, text, request_id=f"p-{text}")).message

    acked = await asyncio.gather(*(one(*job) for job in jobs))
    assert len({m.message_id for m in acked}) == len(jobs)
    for a, b in pairs:
        via_api = await read_all(dialog_stub, auth_for, b, a, page_size=7)
        expected = sorted(
            (m.message_id for m in acked if {m.from_user_id, m.to_user_id} == {a, b}), reverse=True
        )
        assert [m.message_id for m in via_api] == expected
        stored = rows_for_pair(cluster_config, (a, b))
        assert list(stored) == [calculate_shard(a, b, 4)]
        assert sorted(str(r[0]) for r in stored[calculate_shard(a, b, 4)]) == sorted(expected)


async def test_single_database_layout_of_the_seed(
    single_db_config: ServerConfig, auth_for: Callable[..., Metadata], new_pair: Callable[[], tuple[int, int]]
) -> None:
    """The same code with messages_0..3 side by side in one database."""
    from client.gen.dialog.v1 import dialog_service_pb2_grpc

    async with (
        running_server(single_db_config) as running,
        grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        stub = dialog_service_pb2_grpc.DialogServiceStub(channel)
        a, b = new_pair()
        sent = (await send(stub, auth_for, a, b, "one db")).message
        page = await stub.GetDialog(pb.GetDialogRequest(user_id=a, peer_user_id=b), metadata=auth_for(a))
        assert [m.message_id for m in page.messages] == [sent.message_id]
        assert list(rows_for_pair(single_db_config, (a, b))) == [calculate_shard(a, b, 4)]
        tables = {s.table for s in single_db_config.shards}
        assert tables == {"messages_0", "messages_1", "messages_2", "messages_3"}
        assert len({s.dsn for s in single_db_config.shards}) == 1
