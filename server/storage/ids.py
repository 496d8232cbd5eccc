"""Message ids: UUIDv7, globally unique without coordination and ordered by time.

A per-process monotonic counter fills the 12 `rand_a` bits (RFC 9562 method 1),
so ids minted by one process strictly increase even within a millisecond;
62 random bits keep processes apart. The millisecond timestamp is also the
message's create_time, so sorting by id is sorting by time.
"""

from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, datetime

#: The Unix epoch, the origin that timestamps are converted from (ids, Timestamps, batch rows).
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_MAX_COUNTER = 0xFFF
_RANDOM_MASK = (1 << 62) - 1


class _RandomBits:
    """62-bit values from the OS's CSPRNG, read 4 KiB at a time instead of one syscall per id."""

    _CHUNK = 4096

    def __init__(self) -> None:
        self._buffer = b""
        self._offset = 0

    def reset(self) -> None:
        """Forget buffered bytes (a forked child must never reuse its parent's)."""
        self._buffer, self._offset = b"", 0

    def next62(self) -> int:
        if self._offset >= len(self._buffer):
            self._buffer, self._offset = os.urandom(self._CHUNK), 0
        value = int.from_bytes(self._buffer[self._offset : self._offset + 8], "big")
        self._offset += 8
        return value & _RANDOM_MASK


_random_bits = _RandomBits()
os.register_at_fork(after_in_child=_random_bits.reset)


class MessageIdGenerator:
    """Mints strictly increasing UUIDv7 values for this process."""

    def __init__(self) -> None:
        self._last_ms = 0
        self._counter = 0

    def next(self) -> uuid.UUID:
        now_ms = time.time_ns() // 1_000_000
        if now_ms > self._last_ms:
            self._last_ms, self._counter = now_ms, 0
        elif self._counter < _MAX_COUNTER:
            self._counter += 1
        else:
            # Counter exhausted (or the clock stepped back): borrow from the next
            # millisecond rather than break monotonicity.
            self._last_ms, self._counter = self._last_ms + 1, 0
        value = (
            (self._last_ms << 80) | (0x7 << 76) | (self._counter << 64) | (0b10 << 62) | _random_bits.next62()
        )
        return uuid.UUID(int=value)


def id_time(message_id: uuid.UUID) -> datetime:
    """The creation time encoded in a UUIDv7."""
    return datetime.fromtimestamp((message_id.int >> 80) / 1000, tz=UTC)


#: Smallest and largest UUIDs, the open ends of a keyset cursor.
MIN_ID = uuid.UUID(int=0)
MAX_ID = uuid.UUID(int=(1 << 128) - 1)
