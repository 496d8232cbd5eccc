"""SubscribeMessages' resume tokens: a subscriber's position in every shard's message log.

A token is the per-shard cursors (server.storage.events) a subscriber has received everything
up to, signed like a page token (server.pagination) and bound to the subscribing user, so it
cannot be forged, altered or used by another user. It says nothing readable to the client.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Mapping

from server.pagination import InvalidPageToken, PageTokenCodec
from server.storage.events import EventCursor

#: shard id, transaction id, message id.
_ENTRY = struct.Struct(">HQ16s")


class ResumeTokens:
    """Encodes and decodes resume tokens with the service's page token key."""

    def __init__(self, codec: PageTokenCodec) -> None:
        self._codec = codec

    def encode(self, user_id: int, positions: Mapping[int, EventCursor]) -> str:
        body = b"".join(
            _ENTRY.pack(shard_id, cursor.xid, cursor.message_id.bytes)
            for shard_id, cursor in sorted(positions.items())
        )
        return self._codec.encode(PageTokenCodec.SUBSCRIPTION, _binding(user_id), body)

    def decode(self, user_id: int, token: str) -> dict[int, EventCursor]:
        """The positions in `token`; InvalidPageToken when it is malformed, forged or another user's."""
        body = self._codec.decode(token, PageTokenCodec.SUBSCRIPTION, _binding(user_id))
        if len(body) % _ENTRY.size:
            raise InvalidPageToken("resume_token is malformed")
        positions: dict[int, EventCursor] = {}
        for offset in range(0, len(body), _ENTRY.size):
            shard_id, xid, message_id = _ENTRY.unpack_from(body, offset)
            positions[shard_id] = EventCursor(xid, uuid.UUID(bytes=message_id))
        return positions


def _binding(user_id: int) -> bytes:
    return struct.pack(">q", user_id)
