"""SubscribeMessages: live delivery from the shards' message logs, resuming, limits and auth."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import psycopg

from client import AsyncDialogClient, ChannelSecurity, DeliveredMessage, DialogClient
from client.gen.dialog.v1 import dialog_service_pb2 as pb
from client.gen.dialog.v1 import dialog_service_pb2_grpc as pb_grpc
from server.config import ServerConfig
from server.dev.embedded_pg import EmbeddedPostgres
from server.runtime.app import RunningServer
from tests.processes import channel_per_worker, supervised, write_server_config
from tests.support import (
    Metadata,
    expect_error,
    fresh_database,
    make_config,
    metric_value,
    scrape_metrics,
    serving,
    status_details,
    token_provider,
    wait_until,
)

if TYPE_CHECKING:
    Stub = pb_grpc.DialogServiceAsyncStub
Stream = Any  # grpc.aio.UnaryStreamCall[SubscribeMessagesRequest, SubscribeMessagesResponse]


@asynccontextmanager
async def subscribed(
    stub: Stub, user_id: int, metadata: Metadata, resume_token: str = ""
) -> AsyncIterator[tuple[Stream, str]]:
    """An open subscription, once the server confirmed it, and its first resume token."""
    call = stub.SubscribeMessages(
        pb.SubscribeMessagesRequest(user_id=user_id, resume_token=resume_token), metadata=metadata
    )
    try:
        first = await asyncio.wait_for(call.read(), timeout=10)
        assert isinstance(first, pb.SubscribeMessagesResponse) and not first.HasField("message")
        yield call, first.resume_token
    finally:
        call.cancel()


async def receive(call: Stream, count: int) -> list[pb.SubscribeMessagesResponse]:
    """The next `count` responses of a stream (within a bound: a missing message fails the test)."""
    got: list[pb.SubscribeMessagesResponse] = []
    for _ in range(count):
        response = await asyncio.wait_for(call.read(), timeout=10)
        assert isinstance(response, pb.SubscribeMessagesResponse), f"ended after {len(got)}"
        got.append(response)
    return got


async def send(stub: Stub, metadata: Metadata, sender: int, to: int, text: str) -> pb.Message:
    response = await stub.SendMessage(
        pb.SendMessageRequest(from_user_id=sender, to_user_id=to, text=text), metadata=metadata, timeout=10
    )
    return response.message


async def test_a_subscriber_gets_what_is_sent_to_or_by_it_once_and_resumes_without_gaps(
    dialog_stub: Stub, auth_for: Callable[..., Metadata], new_pair: Callable[[], tuple[int, int]]
) -> None:
    me, friend = new_pair()
    other, stranger = new_pair()
    async with subscribed(dialog_stub, me, auth_for(me)) as (call, _):
        expected = [
            await send(dialog_stub, auth_for(friend), friend, me, "to me"),
            await send(dialog_stub, auth_for(me), me, other, "by me, to someone else"),
        ]
        # Not to nor by the subscriber: never delivered.
        await send(dialog_stub, auth_for(stranger), stranger, other, "none of my business")
        expected.append(await send(dialog_stub, auth_for(me), me, friend, "by me"))
        got = await receive(call, 3)
        # Messages of one dialog in the order stored; the others may interleave in any order.
        assert sorted((r.message for r in got), key=lambda m: m.message_id) == sorted(
            expected, key=lambda m: m.message_id
        )
        to_friend = [r.message.text for r in got if friend in (r.message.from_user_id, r.message.to_user_id)]
        assert to_friend == ["to me", "by me"]
        token = got[-1].resume_token

    # Dropped: what is sent meanwhile comes on resuming from the last token, once, in order.
    missed = [await send(dialog_stub, auth_for(friend), friend, me, f"missed {i}") for i in range(5)]
    async with subscribed(dialog_stub, me, auth_for(me), token) as (call, _):
        got = await receive(call, 5)
        assert [r.message for r in got] == missed
        after_missed = got[-1].resume_token
        live = await send(dialog_stub, auth_for(friend), friend, me, "live again")
        assert [r.message for r in await receive(call, 1)] == [live]
    # Resuming from a token in the middle gives what followed it, and nothing before.
    async with subscribed(dialog_stub, me, auth_for(me), got[1].resume_token) as (call, _):
        assert [r.message for r in await receive(call, 4)] == [*missed[2:], live]
    # The first response's token of a subscription that got nothing resumes there too.
    async with subscribed(dialog_stub, me, auth_for(me), after_missed) as (call, start):
        assert [r.message for r in await receive(call, 1)] == [live]
    quiet = await send(dialog_stub, auth_for(friend), friend, me, "while nobody listened")
    async with subscribed(dialog_stub, me, auth_for(me), start) as (call, _):
        assert [r.message for r in await receive(call, 2)] == [live, quiet]


async def test_streams_are_authenticated_authorized_and_validated(
    dialog_stub: Stub, auth_for: Callable[..., Metadata], new_pair: Callable[[], tuple[int, int]]
) -> None:
    me, other = new_pair()
    request = pb.SubscribeMessagesRequest(user_id=me)
    err = await expect_error(dialog_stub.SubscribeMessages(request).read(), grpc.StatusCode.UNAUTHENTICATED)
    err = await expect_error(
        dialog_stub.SubscribeMessages(request, metadata=auth_for(other)).read(),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    info, _ = status_details(err)
    assert info is not None and info.reason == "NOT_SUBSCRIBER"
    async with subscribed(dialog_stub, other, auth_for(other)) as (_, others_token):
        pass
    # Another user's token, or a forged one, is refused before anything is read.
    for token in (others_token, others_token[:-4] + "AAAA", "garbage"):
        err = await expect_error(
            dialog_stub.SubscribeMessages(
                pb.SubscribeMessagesRequest(user_id=me, resume_token=token), metadata=auth_for(me)
            ).read(),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        _, violations = status_details(err)
        assert [field for field, _ in violations] == ["resume_token"]


def _own_cluster(pg_server: EmbeddedPostgres, jwt_secret: str, **sections: Any) -> ServerConfig:
    """Two shards side by side in a fresh database, with the given config sections."""
    return make_config([fresh_database(pg_server, "subscribe")] * 2, jwt_secret, **sections)


async def _pruned(config: ServerConfig, message_id: str) -> bool:
    """Whether the message's event was pruned from its shard's log (the shards' tables share one
    database here)."""
    async with await psycopg.AsyncConnection.connect(config.shards[0].dsn) as conn:
        union = " UNION ALL ".join(
            f"SELECT 1 FROM {shard.table}_events WHERE message_id = %(id)s" for shard in config.shards
        )
        return await (await conn.execute(union, {"id": message_id})).fetchone() is None


async def test_a_slow_subscriber_is_cut_off_and_resumes_without_loss_and_old_tokens_expire(
    pg_server: EmbeddedPostgres,
    jwt_secret: str,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    config = _own_cluster(
        pg_server,
        jwt_secret,
        limits={"send_rate_per_second": 0},
        delivery={"stream_buffer": 4, "retention_seconds": 3600},
    )
    me, friend = new_pair()
    running: RunningServer
    COUNT = 200
    async with (
        serving(config) as (running, channel),
        # Without BDP probes the connection's window stays at its initial 64 KiB.
        grpc.aio.insecure_channel(
            f"127.0.0.1:{running.port}", options=[("grpc.http2.bdp_probe", 0)]
        ) as slow_channel,
    ):
        stub = pb_grpc.DialogServiceStub(channel)
        big = "€" * 4000  # 12 kB
        async with subscribed(pb_grpc.DialogServiceStub(slow_channel), me, auth_for(me)) as (
            call,
            first_token,
        ):
            # Nobody reads: the connection's window fills, then the buffer, then the cut-off.
            sent = [await send(stub, auth_for(friend), friend, me, f"{i} {big}") for i in range(COUNT)]
            got: list[pb.SubscribeMessagesResponse] = []
            err = await expect_error(receive(call, COUNT + 1), grpc.StatusCode.RESOURCE_EXHAUSTED)
            info, _ = status_details(err)
            assert info is not None and info.reason == "SUBSCRIBER_TOO_SLOW"
        # What it did receive before the cut-off came through; the rest comes on resuming.
        async with subscribed(stub, me, auth_for(me), first_token) as (call, _):
            got = await receive(call, COUNT)
            assert [r.message.message_id for r in got] == [m.message_id for m in sent]
        assert running.delivery is not None
        await wait_until(
            lambda: running.delivery is not None and running.delivery.subscribers == 0, "unsubscribed"
        )

    # Past the retention, a token is refused with what to do instead.
    short = make_config(
        [s.dsn for s in config.shards],
        jwt_secret,
        delivery={"retention_seconds": 0.001, "prune_interval": 0.05},
    )
    async with serving(short) as (running, channel):
        stub = pb_grpc.DialogServiceStub(channel)
        async with subscribed(stub, me, auth_for(me)) as (_, old_token):
            pass
        gone = await send(stub, auth_for(friend), friend, me, "soon pruned")
        await wait_until(lambda: _pruned(short, gone.message_id), "the message's event is pruned")
        err = await expect_error(
            stub.SubscribeMessages(
                pb.SubscribeMessagesRequest(user_id=me, resume_token=old_token), metadata=auth_for(me)
            ).read(),
            grpc.StatusCode.OUT_OF_RANGE,
        )
        info, _ = status_details(err)
        assert info is not None and info.reason == "RESUME_TOKEN_EXPIRED"
        assert "GetDialog" in (err.details() or "")


async def test_subscribers_on_two_workers_get_every_message_of_several_senders_through_both(
    tmp_path: Path,
    server: RunningServer,
    cluster_config: ServerConfig,
    jwt_secret: str,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    config_path = write_server_config(
        tmp_path / "dialog.toml",
        cluster_config,
        "127.0.0.1:0",
        jwt_secret,
        sections={"limits": {"send_rate_per_second": 0}},
    )
    me = new_pair()[0]
    senders = [new_pair()[0] for _ in range(4)]
    per_sender = 10
    async with supervised(config_path, workers=2) as running:
        channels = await channel_per_worker(running)
        stubs = [pb_grpc.DialogServiceStub(channels[pid]) for pid in running.worker_pids]
        try:
            async with (
                subscribed(stubs[0], me, auth_for(me)) as (first, _),
                subscribed(stubs[1], me, auth_for(me)) as (second, _),
            ):

                async def send_all(sender: int) -> list[pb.Message]:
                    # Alternately through each worker: a subscriber gets from both.
                    return [
                        await send(stubs[i % 2], auth_for(sender), sender, me, f"{sender} #{i}")
                        for i in range(per_sender)
                    ]

                sent = await asyncio.gather(*(send_all(sender) for sender in senders))
                for call in (first, second):
                    got = [r.message for r in await receive(call, len(senders) * per_sender)]
                    for sender, theirs in zip(senders, sent, strict=True):
                        assert [m for m in got if m.from_user_id == sender] == theirs
        finally:
            for channel in channels.values():
                await channel.close()


async def test_the_typed_client_resumes_a_cut_off_subscription_and_lists_dialogs(
    pg_server: EmbeddedPostgres,
    jwt_secret: str,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    config = _own_cluster(
        pg_server, jwt_secret, limits={"send_rate_per_second": 0}, delivery={"stream_buffer": 4}
    )
    me, friend = new_pair()
    async with serving(config) as (running, channel):
        address = f"127.0.0.1:{running.port}"
        stub = pb_grpc.DialogServiceStub(channel)
        async with AsyncDialogClient.connect(
            address,
            ChannelSecurity(plaintext=True),
            token=token_provider(config, me),
            options=[("grpc.http2.bdp_probe", 0)],
        ) as client:
            stream = client.subscribe_messages(me)
            assert running.delivery is not None
            # Nobody reads for now: the server cuts the subscription off; the client resumes it.
            first = asyncio.ensure_future(anext(stream))
            await wait_until(
                lambda: running.delivery is not None and running.delivery.subscribers == 1, "subscribed"
            )
            sent = [await send(stub, auth_for(friend), friend, me, f"{i} {'€' * 4000}") for i in range(150)]
            got = [await first] + [await anext(stream) for _ in range(len(sent) - 1)]
            assert [d.message.message_id for d in got] == [m.message_id for m in sent]
            samples, _ = await scrape_metrics(running.metrics_port or 0)
            started = metric_value(
                samples,
                "grpc_server_started_total",
                grpc_method="SubscribeMessages",
                grpc_type="server_stream",
            )
            assert started >= 2, "the stream was cut off and resumed"
            await stream.aclose()

            assert running.delivery.relay is not None
            await running.delivery.relay.catch_up()
            [dialog] = [d async for d in client.iter_dialogs(me, page_size=1)]
            assert (dialog.peer_user_id, dialog.message_count) == (friend, len(sent))
            assert dialog.last_message.message_id == sent[-1].message_id
            assert (await client.list_dialogs(me)).next_page_token == ""


async def test_the_blocking_client_subscribes_and_lists_dialogs(
    address: str,
    server: RunningServer,
    cluster_config: ServerConfig,
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    me, friend = new_pair()
    assert server.delivery is not None and server.delivery.relay is not None
    delivery, relay = server.delivery, server.delivery.relay
    before = delivery.subscribers

    def receive_two() -> list[DeliveredMessage]:
        with DialogClient.connect(
            address, ChannelSecurity(plaintext=True), token=token_provider(cluster_config, me)
        ) as c:
            stream = c.subscribe_messages(me)
            try:
                return [next(stream), next(stream)]
            finally:
                stream.close()  # ends the stream

    receiving = asyncio.create_task(asyncio.to_thread(receive_two))
    await wait_until(lambda: delivery.subscribers > before, "subscribed")
    sent = []
    with DialogClient.connect(
        address, ChannelSecurity(plaintext=True), token=token_provider(cluster_config, friend)
    ) as c:
        for text in ("one", "two"):
            sent.append((await asyncio.to_thread(c.send_message, friend, me, text)).message)
        got = await receiving
        assert [d.message for d in got] == sent and all(d.resume_token for d in got)
        await wait_until(lambda: delivery.subscribers == before, "the stream ended")
        await relay.catch_up()
        dialogs = await asyncio.to_thread(lambda: list(c.iter_dialogs(friend)))
        assert [(d.peer_user_id, d.message_count, d.last_message) for d in dialogs] == [(me, 2, sent[-1])]
        assert (await asyncio.to_thread(c.list_dialogs, friend, page_size=1)).next_page_token == ""


async def _subscription_refusal(stub: Stub, user_id: int, metadata: Metadata) -> str:
    """The ErrorInfo reason a subscription is refused with, or "" when it starts (then it ends)."""
    call = stub.SubscribeMessages(pb.SubscribeMessagesRequest(user_id=user_id), metadata=metadata)
    try:
        await asyncio.wait_for(call.read(), timeout=10)
        return ""
    except grpc.aio.AioRpcError as err:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
        info, _ = status_details(err)
        assert info is not None
        return str(info.reason)
    finally:
        call.cancel()


async def test_streams_have_their_own_cap_and_take_read_tokens(
    pg_server: EmbeddedPostgres,
    jwt_secret: str,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    config = _own_cluster(
        pg_server,
        jwt_secret,
        limits={"read_rate_per_second": 0.001, "read_burst": 2},
        delivery={"max_streams": 1},
    )
    me, friend = new_pair()
    async with serving(config) as (_, channel):
        stub = pb_grpc.DialogServiceStub(channel)
        async with subscribed(stub, me, auth_for(me)):
            assert await _subscription_refusal(stub, me, auth_for(me)) == "TOO_MANY_STREAMS"
            # Unary calls are counted apart: the open stream takes none of their room.
            await send(stub, auth_for(friend), friend, me, "still served")
        # A refusal for the cap takes no read token: the burst's second one starts a stream
        # once the first stream's place is free, and the next one is over the rate.
        reasons: list[str] = []

        async def refused_for_rate() -> bool:
            reasons.append(await _subscription_refusal(stub, me, auth_for(me)))
            return reasons[-1] == "RATE_LIMITED"

        await wait_until(refused_for_rate, "a subscription over the rate")
        assert [r for r in reasons if r != "TOO_MANY_STREAMS"] == ["", "RATE_LIMITED"]
