"""AdminService.ListMessages (the seed's debug_messages) against the session's real server and shards."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

import grpc
import psycopg
import pytest
import pytest_asyncio

from client import AsyncAdminClient, AsyncDialogClient, ChannelSecurity, DialogShardError, ShardSource
from server.auth import issue_token
from server.config import ServerConfig
from server.routing import Pair, bucket_of, calculate_shard

PLAINTEXT = ChannelSecurity(plaintext=True)


@pytest_asyncio.fixture
async def admin(address: str, cluster_config: ServerConfig) -> AsyncIterator[AsyncAdminClient]:
    token = issue_token(cluster_config.auth, admin=True, ttl_seconds=600)
    async with AsyncAdminClient.connect(address, PLAINTEXT, token=lambda: token) as client:
        yield client


@pytest.fixture
def send(address: str, cluster_config: ServerConfig) -> Callable[..., Awaitable[list[str]]]:
    async def send(a: int, b: int, texts: list[str]) -> list[str]:
        token = issue_token(cluster_config.auth, user_id=a, ttl_seconds=600)
        async with AsyncDialogClient.connect(address, PLAINTEXT, token=lambda: token) as client:
            return [(await client.send_message(a, b, t)).message.message_id for t in texts]

    return send


async def test_pair_listing_shows_shard_reason_and_bucket(
    admin: AsyncAdminClient,
    send: Callable[..., Awaitable[list[str]]],
    new_pair: Callable[[], tuple[int, int]],
    cluster_config: ServerConfig,
) -> None:
    a, b = new_pair()
    ids = await send(a, b, ["one", "two", "three"])
    listed = [m async for m in admin.iter_messages(pair=(b, a), page_size=2)]
    shard = calculate_shard(a, b, cluster_config.num_shards)
    assert [m.message.message_id for m in listed] == ids
    assert [m.message.text for m in listed] == ["one", "two", "three"]
    assert {(m.shard_id, m.source, m.resolved_shard_id, m.bucket) for m in listed} == {
        (shard, ShardSource.HASH, shard, bucket_of(a, b))
    }


async def test_override_is_the_placement_reason(
    admin: AsyncAdminClient,
    send: Callable[..., Awaitable[list[str]]],
    new_pair: Callable[[], tuple[int, int]],
    cluster_config: ServerConfig,
) -> None:
    a, b = new_pair()
    target = (calculate_shard(a, b, cluster_config.num_shards) + 1) % cluster_config.num_shards
    await admin.set_override(a, b, target)
    ids = await send(a, b, ["pinned"])
    page = await admin.list_messages(pair=(a, b))
    assert [(m.message.message_id, m.shard_id, m.source) for m in page.messages] == [
        (ids[0], target, ShardSource.OVERRIDE)
    ]
    assert page.next_page_token == ""


async def test_a_message_off_its_pairs_shard_is_shown_where_it_is(
    admin: AsyncAdminClient,
    send: Callable[..., Awaitable[list[str]]],
    new_pair: Callable[[], tuple[int, int]],
    cluster_config: ServerConfig,
) -> None:
    a, b = new_pair()
    home = calculate_shard(a, b, cluster_config.num_shards)
    ids = await send(a, b, ["at home"])
    # A row left on another shard (as during a move), written straight into that shard's table.
    stray = cluster_config.shards[(home + 2) % cluster_config.num_shards]
    stray_id = uuid.UUID(int=(uuid.UUID(ids[0]).int + 1))
    low, high = Pair.of(a, b)
    with psycopg.connect(stray.dsn, autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO {stray.table} (message_id, user_low, user_high, bucket, from_user_id, to_user_id, "
            "text, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            (stray_id, low, high, bucket_of(a, b), a, b, "left behind", datetime.now(UTC)),
        )
    listed = [m async for m in admin.iter_messages(pair=(a, b), page_size=1)]
    by_shard = {m.shard_id: m for m in listed}
    assert sorted(by_shard) == sorted({home, stray.shard_id})
    assert by_shard[stray.shard_id].resolved_shard_id == home
    assert by_shard[stray.shard_id].message.text == "left behind"
    assert by_shard[home].resolved_shard_id == home
    # Ordered by shard, then id.
    assert [m.shard_id for m in listed] == sorted(by_shard)


async def test_shard_filter_pages_through_one_shard_in_id_order(
    admin: AsyncAdminClient,
    send: Callable[..., Awaitable[list[str]]],
    new_pair: Callable[[], tuple[int, int]],
    cluster_config: ServerConfig,
) -> None:
    a, b = new_pair()
    shard = calculate_shard(a, b, cluster_config.num_shards)
    ids = await send(a, b, ["x", "y"])
    listed = [m async for m in admin.iter_messages(shard_id=shard, page_size=1000)]
    assert {m.shard_id for m in listed} == {shard}
    listed_ids = [m.message.message_id for m in listed]
    assert listed_ids == sorted(listed_ids, key=uuid.UUID)
    assert set(ids) <= set(listed_ids)
    (counted,) = (await admin.get_stats(exact=True, shard_id=shard)).shards
    assert counted.shard_id == shard and counted.message_count_exact
    assert len(listed) == counted.message_count


async def test_page_token_is_bound_to_the_filters(
    admin: AsyncAdminClient,
    send: Callable[..., Awaitable[list[str]]],
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    a, b = new_pair()
    c, d = new_pair()
    await send(a, b, ["1", "2"])
    page = await admin.list_messages(pair=(a, b), page_size=1)
    assert page.next_page_token
    with pytest.raises(DialogShardError) as raised:
        await admin.list_messages(pair=(c, d), page_size=1, page_token=page.next_page_token)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in raised.value.field_violations] == ["page_token"]


async def test_invalid_filters_are_all_reported(
    admin: AsyncAdminClient, cluster_config: ServerConfig
) -> None:
    with pytest.raises(DialogShardError) as raised:
        await admin.list_messages(pair=(5, 0), shard_id=cluster_config.num_shards, page_size=-1)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {v.field for v in raised.value.field_violations} == {"user_id_2", "shard_id", "page_size"}


async def test_only_admins_list_messages(
    address: str, cluster_config: ServerConfig, new_pair: Callable[[], tuple[int, int]]
) -> None:
    a, _ = new_pair()
    token = issue_token(cluster_config.auth, user_id=a, ttl_seconds=60)
    async with AsyncAdminClient.connect(address, PLAINTEXT, token=lambda: token) as client:
        with pytest.raises(DialogShardError) as raised:
            await client.list_messages()
    assert raised.value.code == grpc.StatusCode.PERMISSION_DENIED
