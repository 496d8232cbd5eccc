"""The typed clients (sync and asyncio) against the session's real server and real shards.

The server runs on this process's event loop, so the blocking client runs in a worker thread
(`asyncio.to_thread`). A lost answer is made real with a byte-forwarding gRPC proxy that passes
a call to the server and then tells the client UNAVAILABLE: the message is stored, the client
retries with the same request_id, and the shard holds exactly one row.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
import pytest_asyncio

from client import (
    AdminClient,
    AsyncAdminClient,
    AsyncDialogClient,
    ChannelSecurity,
    DialogClient,
    DialogShardError,
    Order,
    RetryPolicy,
    ShardSource,
    UserErasure,
)
from server.config import ServerConfig
from server.routing import calculate_shard
from tests.support import rows_for_pair

PLAINTEXT = ChannelSecurity(plaintext=True)
FAST_RETRY = RetryPolicy(initial_backoff=0.01, max_backoff=0.05)


class LossyProxy(grpc.GenericRpcHandler):
    """Forwards every call to `upstream`; for the first `drop` SendMessage calls, answers UNAVAILABLE
    after the server has answered (the answer is lost on the way back)."""

    def __init__(self, upstream: str, drop: int) -> None:
        self._upstream = grpc.aio.insecure_channel(upstream)
        self.drop = drop
        self.forwarded: list[str] = []
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers((self,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any]:
        method: str = details.method

        async def forward(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            metadata = [(k, v) for k, v in context.invocation_metadata() or () if k == "authorization"]
            call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = self._upstream.unary_unary(method)
            try:
                answer: bytes = await call(request, metadata=metadata, timeout=10)
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "")
            self.forwarded.append(method)
            if method.endswith("/SendMessage") and self.drop > 0:
                self.drop -= 1
                await context.abort(grpc.StatusCode.UNAVAILABLE, "proxy lost the answer")
            return answer

        return grpc.unary_unary_rpc_method_handler(forward)

    async def close(self) -> None:
        await self.server.stop(0)
        await self._upstream.close()


@pytest_asyncio.fixture
async def lossy_proxy(address: str) -> AsyncIterator[Callable[[int], Any]]:
    proxies: list[LossyProxy] = []

    async def start(drop: int) -> LossyProxy:
        proxy = LossyProxy(address, drop)
        await proxy.server.start()
        proxies.append(proxy)
        return proxy

    yield start
    for proxy in proxies:
        await proxy.close()


async def test_sync_client_sends_and_pages_through_a_dialog(
    address: str, token_for: Callable[..., Callable[[], str]], new_pair: Callable[[], tuple[int, int]]
) -> None:
    a, b = new_pair()

    def scenario() -> tuple[list[str], list[str], list[str]]:
        with DialogClient.connect(address, PLAINTEXT, token=token_for(a)) as client:
            sent = [client.send_message(a, b, f"message {i}").message.message_id for i in range(5)]
            oldest_first = [
                m.message_id for m in client.iter_dialog(a, b, page_size=2, order=Order.OLDEST_FIRST)
            ]
            newest_first = [m.message_id for m in client.iter_dialog(a, b, page_size=3)]
        return sent, oldest_first, newest_first

    sent, oldest_first, newest_first = await asyncio.to_thread(scenario)
    assert oldest_first == sent
    assert newest_first == sent[::-1]


async def test_async_client_sends_and_pages_through_a_dialog(
    address: str, token_for: Callable[..., Callable[[], str]], new_pair: Callable[[], tuple[int, int]]
) -> None:
    a, b = new_pair()
    async with AsyncDialogClient.connect(address, PLAINTEXT, token=token_for(a)) as client:
        sent = [(await client.send_message(a, b, f"message {i}")) for i in range(4)]
        page = await client.get_dialog(a, b, page_size=3, order=Order.OLDEST_FIRST)
        everything = [m async for m in client.iter_dialog(a, b, page_size=3, order=Order.OLDEST_FIRST)]
    assert [m.message for m in sent] == everything
    assert page.messages == tuple(everything[:3])
    assert page.next_page_token
    assert all(not s.replayed for s in sent)
    assert everything[0].create_time.tzinfo is not None


async def test_sync_retry_after_a_lost_answer_stores_one_row(
    lossy_proxy: Callable[[int], Any],
    token_for: Callable[..., Callable[[], str]],
    new_pair: Callable[[], tuple[int, int]],
    cluster_config: ServerConfig,
) -> None:
    a, b = new_pair()
    proxy = await lossy_proxy(2)

    def send() -> Any:
        target = f"127.0.0.1:{proxy.port}"
        with DialogClient.connect(target, PLAINTEXT, token=token_for(a), retry=FAST_RETRY) as client:
            return client.send_message(a, b, "exactly once")

    sent = await asyncio.to_thread(send)
    assert proxy.forwarded.count("/dialog.v1.DialogService/SendMessage") == 3
    assert sent.replayed, "the third attempt found the row the first one stored"
    rows = rows_for_pair(cluster_config, (a, b))
    assert list(rows) == [calculate_shard(a, b, cluster_config.num_shards)]
    (shard_rows,) = rows.values()
    assert len(shard_rows) == 1
    assert shard_rows[0][3:5] == ("exactly once", sent.request_id)
    assert str(shard_rows[0][0]) == sent.message.message_id


async def test_async_retry_after_a_lost_answer_stores_one_row(
    lossy_proxy: Callable[[int], Any],
    token_for: Callable[..., Callable[[], str]],
    new_pair: Callable[[], tuple[int, int]],
    cluster_config: ServerConfig,
) -> None:
    a, b = new_pair()
    proxy = await lossy_proxy(1)
    target = f"127.0.0.1:{proxy.port}"
    async with AsyncDialogClient.connect(target, PLAINTEXT, token=token_for(a), retry=FAST_RETRY) as client:
        sent = await client.send_message(a, b, "exactly once, async")
    assert sent.replayed
    assert proxy.forwarded.count("/dialog.v1.DialogService/SendMessage") == 2
    (shard_rows,) = rows_for_pair(cluster_config, (a, b)).values()
    assert [r[3] for r in shard_rows] == ["exactly once, async"]


async def test_without_retries_the_lost_answer_surfaces_as_unavailable(
    lossy_proxy: Callable[[int], Any],
    token_for: Callable[..., Callable[[], str]],
    new_pair: Callable[[], tuple[int, int]],
    cluster_config: ServerConfig,
) -> None:
    a, b = new_pair()
    proxy = await lossy_proxy(1)
    target = f"127.0.0.1:{proxy.port}"
    async with AsyncDialogClient.connect(
        target, PLAINTEXT, token=token_for(a), retry=RetryPolicy(max_attempts=1)
    ) as client:
        with pytest.raises(DialogShardError) as raised:
            await client.send_message(a, b, "answer lost")
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert raised.value.message == "proxy lost the answer"
    # The message was stored all the same: why retries must carry the same request_id.
    assert len(rows_for_pair(cluster_config, (a, b))) == 1


async def test_server_errors_arrive_as_one_exception_with_details(
    address: str, token_for: Callable[..., Callable[[], str]], new_pair: Callable[[], tuple[int, int]]
) -> None:
    a, b = new_pair()
    async with AsyncDialogClient.connect(address, PLAINTEXT, token=token_for(a)) as client:
        with pytest.raises(DialogShardError) as invalid:
            await client.send_message(a, b, "   ", request_id="bad id with spaces\x01")
        with pytest.raises(DialogShardError) as denied:
            await client.get_dialog(b, a)
        await client.send_message(a, b, "first", request_id="r-1")
        with pytest.raises(DialogShardError) as reused:
            await client.send_message(a, b, "different", request_id="r-1")
    assert invalid.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {v.field for v in invalid.value.field_violations} == {"text", "request_id"}
    assert invalid.value.attempts == 1
    assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert denied.value.reason == "NOT_DIALOG_MEMBER"
    assert reused.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert reused.value.reason == "REQUEST_ID_REUSED"
    assert reused.value.domain == "dialog-shard"
    assert "message_id" in reused.value.metadata


async def test_missing_token_is_unauthenticated(
    address: str, new_pair: Callable[[], tuple[int, int]]
) -> None:
    a, b = new_pair()
    async with AsyncDialogClient.connect(address, PLAINTEXT) as client:
        with pytest.raises(DialogShardError) as raised:
            await client.get_dialog(a, b)
    assert raised.value.code == grpc.StatusCode.UNAUTHENTICATED


async def test_per_call_deadline_against_an_unreachable_server(
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    a, b = new_pair()
    # Nothing listens on port 1: every attempt is UNAVAILABLE until the 0.3 s deadline ends it.
    async with AsyncDialogClient.connect("127.0.0.1:1", PLAINTEXT, retry=FAST_RETRY) as client:
        with pytest.raises(DialogShardError) as raised:
            await client.get_dialog(a, b, timeout=0.3)
    assert raised.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert raised.value.attempts >= 2


async def test_admin_clients(
    address: str,
    token_for: Callable[..., Callable[[], str]],
    new_pair: Callable[[], tuple[int, int]],
    cluster_config: ServerConfig,
) -> None:
    a, b = new_pair()
    hash_shard = calculate_shard(a, b, cluster_config.num_shards)
    target = (hash_shard + 1) % cluster_config.num_shards

    def sync_part() -> tuple[Any, Any, Any]:
        with AdminClient.connect(address, PLAINTEXT, token=token_for(admin=True)) as admin:
            override = admin.set_override(a, b, target)
            resolved = admin.resolve_shard(b, a)
            listed = [
                o
                for o in admin.iter_overrides(page_size=1)
                if (o.user_id_1, o.user_id_2) == (min(a, b), max(a, b))
            ]
            assert [m.shard_id for m in admin.iter_messages(pair=(a, b))] == []
            return override, resolved, listed

    override, resolved, listed = await asyncio.to_thread(sync_part)
    assert (override.user_id_1, override.user_id_2, override.shard_id) == (min(a, b), max(a, b), target)
    assert (resolved.shard_id, resolved.source, resolved.hash_shard_id) == (
        target,
        ShardSource.OVERRIDE,
        hash_shard,
    )
    assert listed == [override]

    async with AsyncAdminClient.connect(address, PLAINTEXT, token=token_for(admin=True)) as admin:
        assert await admin.delete_override(a, b) == hash_shard
        assert (await admin.resolve_shard(a, b)).source == ShardSource.HASH
        stats = await admin.get_stats()
        with pytest.raises(DialogShardError) as missing:
            await admin.delete_override(a, b)
    assert [s.shard_id for s in stats.shards] == list(range(cluster_config.num_shards))
    assert stats.total_message_count == sum(s.message_count for s in stats.shards)
    assert missing.value.code == grpc.StatusCode.NOT_FOUND

    async with AsyncAdminClient.connect(address, PLAINTEXT, token=token_for(a)) as not_admin:
        with pytest.raises(DialogShardError) as refused:
            await not_admin.get_stats()
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert refused.value.reason == "ADMIN_REQUIRED"


async def test_clients_delete_a_message_once_and_erase_a_user(
    address: str, token_for: Callable[..., Callable[[], str]], new_pair: Callable[[], tuple[int, int]]
) -> None:
    a, b = new_pair()
    async with AsyncDialogClient.connect(address, PLAINTEXT, token=token_for(a)) as client:
        sent = [(await client.send_message(a, b, f"message {i}")).message.message_id for i in range(3)]
        assert await client.delete_message(a, b, sent[0]) is True
        assert await client.delete_message(a, b, sent[0]) is False
        assert [m.message_id for m in (await client.get_dialog(a, b)).messages] == sent[:0:-1]

    def delete_as_the_peer() -> DialogShardError:
        with DialogClient.connect(address, PLAINTEXT, token=token_for(b)) as peer:
            try:
                peer.delete_message(b, a, sent[1])
            except DialogShardError as exc:
                return exc
        raise AssertionError("the peer deleted a message it did not send")

    refused = await asyncio.to_thread(delete_as_the_peer)
    assert refused.code is grpc.StatusCode.PERMISSION_DENIED and refused.reason == "NOT_MESSAGE_SENDER"
    async with AsyncAdminClient.connect(address, PLAINTEXT, token=token_for(admin=True)) as admin:
        erased = await admin.erase_user(a)
        assert erased == UserErasure(
            hot_messages_deleted=2,
            archived_messages_erased=0,
            archive_files_rewritten=0,
            tombstones_dropped=0,
        )
        assert (await admin.erase_user(a)).hot_messages_deleted == 0
