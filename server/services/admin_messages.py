"""AdminService.ListMessages: stored messages with their shard and placement reason (debug_messages).

The listing walks the shards in id order and each shard in message-id order, so a page token is
the pair (shard, last message id), signed and bound to the filters: changing the pair or shard
filter between pages is INVALID_ARGUMENT (AIP-158).
"""

from __future__ import annotations

import struct
import uuid

from client.gen.dialog.v1 import admin_service_pb2 as pb
from server.pagination import InvalidPageToken, PageTokenCodec
from server.placement import Placement
from server.routing import Pair, ShardSource
from server.services.convert import message_to_proto
from server.services.validation import Violations, check_pair, check_shard_id, page_size
from server.storage.listing import ListedMessage, list_messages
from server.storage.pools import ShardSet

DEFAULT_PAGE = 100
MAX_PAGE = 1000
_CURSOR = struct.Struct(">i16s")


def _binding(pair: Pair | None, shard_filter: int | None) -> bytes:
    low, high = pair if pair is not None else (0, 0)
    return struct.pack(">qq?i", low, high, shard_filter is not None, shard_filter or 0)


def _source(source: ShardSource) -> pb.ShardSource.ValueType:
    # By name, so a placement reason added to routing and to the proto needs no edit here.
    return pb.ShardSource.Value(f"SHARD_SOURCE_{source.name}")


def _placed(placement: Placement, shard_id: int, row: ListedMessage) -> pb.PlacedMessage:
    where = placement.resolve(row.pair.low, row.pair.high)
    return pb.PlacedMessage(
        message=message_to_proto(row.message),
        shard_id=shard_id,
        source=_source(where.source),
        resolved_shard_id=where.shard_id,
        bucket=row.bucket,
    )


async def list_placed_messages(
    request: pb.ListMessagesRequest, placement: Placement, shards: ShardSet, tokens: PageTokenCodec
) -> pb.ListMessagesResponse:
    violations = Violations()
    pair: Pair | None = None
    if request.user_id_1 or request.user_id_2:
        check_pair(violations, ("user_id_1", "user_id_2"), (request.user_id_1, request.user_id_2))
        pair = Pair.of(request.user_id_1, request.user_id_2)
    shard_filter = request.shard_id if request.HasField("shard_id") else None
    shard_ids = [c.shard_id for c in shards.configs]
    if shard_filter is not None:
        check_shard_id(violations, "shard_id", shard_filter, len(shard_ids))
    limit = page_size(violations, "page_size", request.page_size, default=DEFAULT_PAGE, maximum=MAX_PAGE)
    binding = _binding(pair, shard_filter)
    start_shard, after = -1, None
    if request.page_token:
        try:
            start_shard, raw_id = _CURSOR.unpack(
                tokens.decode(request.page_token, PageTokenCodec.MESSAGES, binding)
            )
            after = uuid.UUID(bytes=raw_id)
        except (InvalidPageToken, struct.error) as exc:
            violations.add("page_token", str(exc) if isinstance(exc, InvalidPageToken) else "is malformed")
    violations.raise_if_any()

    wanted = [s for s in shard_ids if (shard_filter is None or s == shard_filter) and s >= start_shard]
    found: list[tuple[int, ListedMessage]] = []
    # One row more than asked, across shards, tells whether another page exists.
    for shard_id in wanted:
        rows = await list_messages(
            shards.store(shard_id),
            pair=pair,
            after=after if shard_id == start_shard else None,
            limit=limit + 1 - len(found),
        )
        found += [(shard_id, r) for r in rows]
        if len(found) > limit:
            break
    next_token = ""
    if len(found) > limit:
        found = found[:limit]
        last_shard, last = found[-1]
        next_token = tokens.encode(
            PageTokenCodec.MESSAGES, binding, _CURSOR.pack(last_shard, last.message.message_id.bytes)
        )
    return pb.ListMessagesResponse(
        messages=[_placed(placement, s, r) for s, r in found], next_page_token=next_token
    )
