"""AdminService.ListMessages: stored messages with their shard and placement reason (debug_messages).

The listing walks the shards in id order and each shard in message-id order, so a page token is
the pair (shard, last message id), signed and bound to the filters: changing the pair or shard
filter between pages is INVALID_ARGUMENT (AIP-158).
"""

from __future__ import annotations

import struct
import uuid

from client.gen.dialog.v1 import admin_service_pb2 as pb
from server.pagination import InvalidPageToken, PageTokenCodec, items_budget
from server.placement import Placement
from server.routing import Pair, ShardSource
from server.services.convert import message_to_proto
from server.services.validation import Violations, check_pair, check_shard_id, page_size
from server.storage.listing import ListedMessage, list_messages
from server.storage.pools import ShardSet

DEFAULT_PAGE = 100
MAX_PAGE = 1000
#: Rows read from a shard at a time: a page's memory stays near its byte budget, whatever its size.
_CHUNK_ROWS = 64
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
    request: pb.ListMessagesRequest,
    placement: Placement,
    shards: ShardSet,
    tokens: PageTokenCodec,
    *,
    max_response_bytes: int,
) -> pb.ListMessagesResponse:
    """One page of stored messages; it ends at `page_size` messages or at the byte budget, whichever
    comes first (always one message at least), like GetDialog's pages."""
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
    budget = items_budget(max_response_bytes)
    page: list[pb.PlacedMessage] = []
    used = 0
    last: tuple[int, uuid.UUID] | None = None
    more = False
    # Read in chunks until the page is full (by count or bytes) and one row more shows that
    # another page exists.
    for shard_id in wanted:
        cursor = after if shard_id == start_shard else None
        while not more:
            rows = await list_messages(
                shards.store(shard_id), pair=pair, after=cursor, limit=min(_CHUNK_ROWS, limit + 1 - len(page))
            )
            for row in rows:
                placed = _placed(placement, shard_id, row)
                size = placed.ByteSize() + 8  # the field's tag and length
                if len(page) == limit or (page and used + size > budget):
                    more = True
                    break
                page.append(placed)
                used += size
                last = (shard_id, row.message.message_id)
            if more or not rows:
                break
            cursor = rows[-1].message.message_id
        if more:
            break
    next_token = ""
    if more and last is not None:
        next_token = tokens.encode(PageTokenCodec.MESSAGES, binding, _CURSOR.pack(last[0], last[1].bytes))
    return pb.ListMessagesResponse(messages=page, next_page_token=next_token)
