"""dialog.v1.AdminService: overrides, shard resolution and shard statistics."""

from __future__ import annotations

import asyncio
import struct
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from client.gen.dialog.v1 import admin_service_pb2 as pb
from client.gen.dialog.v1 import admin_service_pb2_grpc as pb_grpc
from server.config import ArchiveConfig
from server.errors import ShardUnavailable
from server.moves.archiver import Archiver
from server.pagination import InvalidPageToken, PageTokenCodec
from server.placement import Placement
from server.routing import Pair, ShardSource
from server.services.admin_messages import list_placed_messages
from server.services.convert import timestamp
from server.services.shard_state import endpoint_health
from server.services.validation import Violations, check_pair, check_shard_id, check_user_id, page_size
from server.storage.overrides import OverrideRow
from server.storage.pools import ShardSet

Context = grpc.aio.ServicerContext[Any, Any]

_PAIR_FIELDS = ("user_id_1", "user_id_2")
_DEFAULT_OVERRIDE_PAGE = 100
_MAX_OVERRIDE_PAGE = 1000
_SOURCES = {ShardSource.HASH: pb.SHARD_SOURCE_HASH, ShardSource.OVERRIDE: pb.SHARD_SOURCE_OVERRIDE}


def _override_to_proto(row: OverrideRow) -> pb.ShardOverride:
    return pb.ShardOverride(
        user_id_1=row.pair.low,
        user_id_2=row.pair.high,
        shard_id=row.shard_id,
        create_time=timestamp(row.created_at),
        automatic=row.automatic,
    )


class AdminService(pb_grpc.AdminServiceServicer):
    def __init__(
        self,
        placement: Placement,
        shards: ShardSet,
        tokens: PageTokenCodec,
        *,
        max_response_bytes: int,
        archiver: Archiver | None = None,
        erase_inbox: Callable[[int], Awaitable[int]] | None = None,
    ) -> None:
        self._placement = placement
        self._archiver = archiver
        #: Deletes an erased user's inbox and the peers' rows of the user (the inbox relay's).
        self._erase_inbox = erase_inbox
        self._shards = shards
        self._tokens = tokens
        self._max_response_bytes = max_response_bytes

    def _pair(self, violations: Violations, request: Any) -> Pair:
        check_pair(violations, _PAIR_FIELDS, (request.user_id_1, request.user_id_2))
        return Pair.of(request.user_id_1, request.user_id_2)

    async def SetShardOverride(
        self, request: pb.SetShardOverrideRequest, context: Context
    ) -> pb.SetShardOverrideResponse:
        violations = Violations()
        pair = self._pair(violations, request)
        check_shard_id(violations, "shard_id", request.shard_id, len(self._shards))
        violations.raise_if_any()
        row = await self._placement.set_override(pair, request.shard_id, self._shards)
        return pb.SetShardOverrideResponse(override=_override_to_proto(row))

    async def DeleteShardOverride(
        self, request: pb.DeleteShardOverrideRequest, context: Context
    ) -> pb.DeleteShardOverrideResponse:
        violations = Violations()
        pair = self._pair(violations, request)
        violations.raise_if_any()
        shard_id = await self._placement.delete_override(
            pair, self._shards, allow_missing=request.allow_missing
        )
        return pb.DeleteShardOverrideResponse(shard_id=shard_id)

    async def ListShardOverrides(
        self, request: pb.ListShardOverridesRequest, context: Context
    ) -> pb.ListShardOverridesResponse:
        violations = Violations()
        limit = page_size(
            violations,
            "page_size",
            request.page_size,
            default=_DEFAULT_OVERRIDE_PAGE,
            maximum=_MAX_OVERRIDE_PAGE,
        )
        after: Pair | None = None
        if request.page_token:
            try:
                cursor = self._tokens.decode(request.page_token, PageTokenCodec.OVERRIDES, b"")
                after = Pair(*struct.unpack(">qq", cursor))
            except (InvalidPageToken, struct.error) as exc:
                violations.add(
                    "page_token", str(exc) if isinstance(exc, InvalidPageToken) else "is malformed"
                )
        violations.raise_if_any()
        rows = await self._placement.list_overrides(after, limit + 1)
        next_token = ""
        if len(rows) > limit:
            rows = rows[:limit]
            last = rows[-1].pair
            next_token = self._tokens.encode(
                PageTokenCodec.OVERRIDES, b"", struct.pack(">qq", last.low, last.high)
            )
        return pb.ListShardOverridesResponse(
            overrides=[_override_to_proto(r) for r in rows], next_page_token=next_token
        )

    async def ResolveShard(
        self, request: pb.ResolveShardRequest, context: Context
    ) -> pb.ResolveShardResponse:
        violations = Violations()
        self._pair(violations, request)
        violations.raise_if_any()
        where = self._placement.resolve(request.user_id_1, request.user_id_2)
        return pb.ResolveShardResponse(
            shard_id=where.shard_id,
            source=_SOURCES[where.source],
            hash_shard_id=where.hash_shard_id,
            bucket=where.bucket,
        )

    async def GetShardStats(
        self, request: pb.GetShardStatsRequest, context: Context
    ) -> pb.GetShardStatsResponse:
        overrides_per_shard = Counter(self._placement.router.overrides().values())
        configs, states = self._shards.configs, self._shards.states()
        if request.HasField("shard_id"):
            violations = Violations()
            check_shard_id(violations, "shard_id", request.shard_id, len(configs))
            violations.raise_if_any()
            configs, states = configs[request.shard_id : request.shard_id + 1], [states[request.shard_id]]

        async def count(shard_id: int) -> int | None:
            store = self._shards.store(shard_id)
            try:
                return await (store.count() if request.exact else store.estimate())
            except ShardUnavailable:
                return None

        counts = await asyncio.gather(*(count(c.shard_id) for c in configs))
        stats = [
            pb.ShardStats(
                shard_id=c.shard_id,
                message_count=n or 0,
                override_count=overrides_per_shard.get(c.shard_id, 0),
                table_name=c.table,
                location=c.location,
                available=n is not None,
                primary=endpoint_health(state.primary),
                replicas=[endpoint_health(r) for r in state.replicas],
                message_count_exact=request.exact and n is not None,
            )
            for c, n, state in zip(configs, counts, states, strict=True)
        ]
        return pb.GetShardStatsResponse(
            shards=stats,
            num_shards=self._placement.router.num_shards,
            total_message_count=sum(n or 0 for n in counts),
            override_count=self._placement.router.override_count,
        )

    async def ListMessages(
        self, request: pb.ListMessagesRequest, context: Context
    ) -> pb.ListMessagesResponse:
        return await list_placed_messages(
            request, self._placement, self._shards, self._tokens, max_response_bytes=self._max_response_bytes
        )

    async def EraseUser(self, request: pb.EraseUserRequest, context: Context) -> pb.EraseUserResponse:
        violations = Violations()
        check_user_id(violations, "user_id", request.user_id)
        violations.raise_if_any()
        archiver = self._archiver or Archiver(
            [self._shards.store(c.shard_id) for c in self._shards.configs],
            self._placement.control_dsn,
            None,
            ArchiveConfig(),
        )
        erased = await self._placement.control.guard(archiver.erase_user(request.user_id))
        if self._erase_inbox is not None:
            # After the messages and their log events: no relay round brings the rows back.
            await self._erase_inbox(request.user_id)
        return pb.EraseUserResponse(
            hot_messages_deleted=erased.hot_messages,
            archived_messages_erased=erased.archived_messages,
            archive_files_rewritten=erased.files_rewritten,
            tombstones_dropped=erased.tombstones,
        )
