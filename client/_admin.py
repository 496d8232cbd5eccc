"""Typed clients of dialog.v1.AdminService: `AdminClient` (blocking) and `AsyncAdminClient`.

Every call needs a token with the admin claim (give the channel a token provider).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

from client._calls import AsyncCaller, Metadata, SyncCaller, follow_pages, follow_pages_async
from client._errors import build_request
from client._models import (
    ClusterStats,
    OverridePage,
    PlacedMessage,
    PlacedMessagePage,
    ShardOverride,
    ShardResolution,
    ShardSource,
    UserErasure,
)
from client.gen.dialog.v1 import admin_service_pb2 as pb
from client.gen.dialog.v1 import admin_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:  # the async stub type exists only in the generated .pyi
    _AsyncStub: TypeAlias = pb_grpc.AdminServiceAsyncStub
else:
    _AsyncStub = pb_grpc.AdminServiceStub


def _overrides(response: pb.ListShardOverridesResponse) -> OverridePage:
    return OverridePage(
        tuple(ShardOverride.from_proto(o) for o in response.overrides), response.next_page_token
    )


def _messages_request(
    pair: tuple[int, int] | None, shard_id: int | None, page_size: int, page_token: str
) -> pb.ListMessagesRequest:
    fields: dict[str, Any] = {"page_size": page_size, "page_token": page_token}
    if pair is not None:
        fields["user_id_1"], fields["user_id_2"] = pair
    if shard_id is not None:
        fields["shard_id"] = shard_id
    return build_request(pb.ListMessagesRequest, **fields)


def _placed(response: pb.ListMessagesResponse) -> PlacedMessagePage:
    return PlacedMessagePage(
        tuple(PlacedMessage.from_proto(m) for m in response.messages), response.next_page_token
    )


def _resolution(response: pb.ResolveShardResponse) -> ShardResolution:
    return ShardResolution(
        response.shard_id, ShardSource(response.source), response.hash_shard_id, response.bucket
    )


class AdminClient(SyncCaller[pb_grpc.AdminServiceStub]):
    """Blocking AdminService client; methods take keyword-only `timeout` and `metadata` like DialogClient.

    Setting an override is safe to repeat, deleting one is not (a repeat after a lost answer
    would say NOT_FOUND), so only UNAVAILABLE retries `delete_override`.
    """

    stub_class = pb_grpc.AdminServiceStub

    def set_override(
        self,
        user_id_1: int,
        user_id_2: int,
        shard_id: int,
        *,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> ShardOverride:
        """Pin a pair to a shard and move its messages there online; calling again completes a move."""
        request = build_request(
            pb.SetShardOverrideRequest, user_id_1=user_id_1, user_id_2=user_id_2, shard_id=shard_id
        )
        response = self._call(
            self._stub.SetShardOverride, request, timeout=timeout, metadata=metadata, safe_to_repeat=True
        )
        return ShardOverride.from_proto(response.override)

    def delete_override(
        self,
        user_id_1: int,
        user_id_2: int,
        *,
        allow_missing: bool = False,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> int:
        """Send a pair back to its hash shard; returns that shard id."""
        request = build_request(
            pb.DeleteShardOverrideRequest,
            user_id_1=user_id_1,
            user_id_2=user_id_2,
            allow_missing=allow_missing,
        )
        response = self._call(
            self._stub.DeleteShardOverride,
            request,
            timeout=timeout,
            metadata=metadata,
            safe_to_repeat=allow_missing,
        )
        return response.shard_id

    def erase_user(
        self, user_id: int, *, timeout: float | None = None, metadata: Metadata = ()
    ) -> UserErasure:
        """Erase every message of the user from every shard and the archive; calling it again
        completes an erasure that was cut short (and reports what that call removed)."""
        request = build_request(pb.EraseUserRequest, user_id=user_id)
        response = self._call(
            self._stub.EraseUser, request, timeout=timeout, metadata=metadata, safe_to_repeat=True
        )
        return UserErasure.from_proto(response)

    def list_overrides(
        self,
        *,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> OverridePage:
        """One page of overrides, ordered by pair."""
        request = build_request(pb.ListShardOverridesRequest, page_size=page_size, page_token=page_token)
        response = self._call(
            self._stub.ListShardOverrides, request, timeout=timeout, metadata=metadata, safe_to_repeat=True
        )
        return _overrides(response)

    def iter_overrides(
        self,
        *,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> Iterator[ShardOverride]:
        """Every override from `page_token` on, following next_page_token; `timeout` applies per page."""

        def fetch(token: str) -> tuple[Sequence[ShardOverride], str]:
            page = self.list_overrides(
                page_size=page_size, page_token=token, timeout=timeout, metadata=metadata
            )
            return page.overrides, page.next_page_token

        return follow_pages(fetch, page_token)

    def resolve_shard(
        self, user_id_1: int, user_id_2: int, *, timeout: float | None = None, metadata: Metadata = ()
    ) -> ShardResolution:
        """Which shard holds the pair's dialog, and why."""
        request = build_request(pb.ResolveShardRequest, user_id_1=user_id_1, user_id_2=user_id_2)
        response = self._call(
            self._stub.ResolveShard, request, timeout=timeout, metadata=metadata, safe_to_repeat=True
        )
        return _resolution(response)

    def get_stats(
        self,
        *,
        exact: bool = False,
        shard_id: int | None = None,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> ClusterStats:
        """Messages and overrides per shard (or only `shard_id`'s); `exact` counts instead of estimating."""
        response = self._call(
            self._stub.GetShardStats,
            build_request(pb.GetShardStatsRequest, exact=exact, shard_id=shard_id),
            timeout=timeout,
            metadata=metadata,
            safe_to_repeat=True,
        )
        return ClusterStats.from_proto(response)

    def list_messages(
        self,
        *,
        pair: tuple[int, int] | None = None,
        shard_id: int | None = None,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> PlacedMessagePage:
        """One page of stored messages with their placement, by shard then id; filter by pair or shard."""
        request = _messages_request(pair, shard_id, page_size, page_token)
        response = self._call(
            self._stub.ListMessages, request, timeout=timeout, metadata=metadata, safe_to_repeat=True
        )
        return _placed(response)

    def iter_messages(
        self,
        *,
        pair: tuple[int, int] | None = None,
        shard_id: int | None = None,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> Iterator[PlacedMessage]:
        """Every stored message matching the filters from `page_token` on, following next_page_token."""

        def fetch(token: str) -> tuple[Sequence[PlacedMessage], str]:
            page = self.list_messages(
                pair=pair,
                shard_id=shard_id,
                page_size=page_size,
                page_token=token,
                timeout=timeout,
                metadata=metadata,
            )
            return page.messages, page.next_page_token

        return follow_pages(fetch, page_token)


class AsyncAdminClient(AsyncCaller[_AsyncStub]):
    """The asyncio twin of `AdminClient`: same methods, awaited; `async with` closes it."""

    stub_class = pb_grpc.AdminServiceStub

    async def set_override(
        self,
        user_id_1: int,
        user_id_2: int,
        shard_id: int,
        *,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> ShardOverride:
        """Pin a pair to a shard and move its messages there online; calling again completes a move."""
        request = build_request(
            pb.SetShardOverrideRequest, user_id_1=user_id_1, user_id_2=user_id_2, shard_id=shard_id
        )
        response = await self._call(
            self._stub.SetShardOverride, request, timeout=timeout, metadata=metadata, safe_to_repeat=True
        )
        return ShardOverride.from_proto(response.override)

    async def delete_override(
        self,
        user_id_1: int,
        user_id_2: int,
        *,
        allow_missing: bool = False,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> int:
        """Send a pair back to its hash shard; returns that shard id."""
        request = build_request(
            pb.DeleteShardOverrideRequest,
            user_id_1=user_id_1,
            user_id_2=user_id_2,
            allow_missing=allow_missing,
        )
        response = await self._call(
            self._stub.DeleteShardOverride,
            request,
            timeout=timeout,
            metadata=metadata,
            safe_to_repeat=allow_missing,
        )
        return response.shard_id

    async def erase_user(
        self, user_id: int, *, timeout: float | None = None, metadata: Metadata = ()
    ) -> UserErasure:
        """Erase every message of the user from every shard and the archive; calling it again
        completes an erasure that was cut short (and reports what that call removed)."""
        request = build_request(pb.EraseUserRequest, user_id=user_id)
        response = await self._call(
            self._stub.EraseUser, request, timeout=timeout, metadata=metadata, safe_to_repeat=True
        )
        return UserErasure.from_proto(response)

    async def list_overrides(
        self,
        *,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> OverridePage:
        """One page of overrides, ordered by pair."""
        request = build_request(pb.ListShardOverridesRequest, page_size=page_size, page_token=page_token)
        response = await self._call(
            self._stub.ListShardOverrides, request, timeout=timeout, metadata=metadata, safe_to_repeat=True
        )
        return _overrides(response)

    def iter_overrides(
        self,
        *,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> AsyncIterator[ShardOverride]:
        """Every override from `page_token` on, following next_page_token; `timeout` applies per page."""

        async def fetch(token: str) -> tuple[Sequence[ShardOverride], str]:
            page = await self.list_overrides(
                page_size=page_size, page_token=token, timeout=timeout, metadata=metadata
            )
            return page.overrides, page.next_page_token

        return follow_pages_async(fetch, page_token)

    async def resolve_shard(
        self, user_id_1: int, user_id_2: int, *, timeout: float | None = None, metadata: Metadata = ()
    ) -> ShardResolution:
        """Which shard holds the pair's dialog, and why."""
        request = build_request(pb.ResolveShardRequest, user_id_1=user_id_1, user_id_2=user_id_2)
        response = await self._call(
            self._stub.ResolveShard, request, timeout=timeout, metadata=metadata, safe_to_repeat=True
        )
        return _resolution(response)

    async def get_stats(
        self,
        *,
        exact: bool = False,
        shard_id: int | None = None,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> ClusterStats:
        """Messages and overrides per shard (or only `shard_id`'s); `exact` counts instead of estimating."""
        response = await self._call(
            self._stub.GetShardStats,
            build_request(pb.GetShardStatsRequest, exact=exact, shard_id=shard_id),
            timeout=timeout,
            metadata=metadata,
            safe_to_repeat=True,
        )
        return ClusterStats.from_proto(response)

    async def list_messages(
        self,
        *,
        pair: tuple[int, int] | None = None,
        shard_id: int | None = None,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> PlacedMessagePage:
        """One page of stored messages with their placement, by shard then id; filter by pair or shard."""
        request = _messages_request(pair, shard_id, page_size, page_token)
        response = await self._call(
            self._stub.ListMessages, request, timeout=timeout, metadata=metadata, safe_to_repeat=True
        )
        return _placed(response)

    def iter_messages(
        self,
        *,
        pair: tuple[int, int] | None = None,
        shard_id: int | None = None,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> AsyncIterator[PlacedMessage]:
        """Every stored message matching the filters from `page_token` on, following next_page_token."""

        async def fetch(token: str) -> tuple[Sequence[PlacedMessage], str]:
            page = await self.list_messages(
                pair=pair,
                shard_id=shard_id,
                page_size=page_size,
                page_token=token,
                timeout=timeout,
                metadata=metadata,
            )
            return page.messages, page.next_page_token

        return follow_pages_async(fetch, page_token)
