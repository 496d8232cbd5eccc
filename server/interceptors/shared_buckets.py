"""Per-user token buckets shared by the worker processes of one host (`dialog-server --workers N`).

Without sharing, each worker keeps its own buckets and a user spreading calls over connections to N
workers gets N times the configured rate. The supervising parent therefore creates one table file per
limit (`SharedLimitTables`, in /dev/shm when there is one) before it starts the workers; every worker
maps the same file, so a call's token comes from the one bucket of its user on this host.

The table is fixed-size: stripes of `SLOTS_PER_STRIPE` slots, each slot a user id (0: empty), its
tokens and the time of its last update (`time.monotonic`, one clock for every process of the host).
A user id hashes to one stripe; a call locks that stripe's bytes with a POSIX record lock
(`fcntl.lockf`, released by the kernel if the process dies), reads the stripe in one unpack, finds
the user's slot or takes the least recently updated one, writes the slot back and unlocks. Each call
stays a local operation of a few microseconds (`make bench` measures it), no database round trip.

Memory is bounded by the table (`capacity` users, 24 bytes each). A stripe that is full gives its
least recently updated slot to the newcomer: usually a bucket idle long enough to be full again,
which is the same as a new one; otherwise that user gets a fresh burst early (counted in
`evictions`, the metric `dialog_shard_rate_limit_evictions_total`). The table fails open for those
few users rather than refuse calls for lack of room.

Limits hold per host (per server instance), not across hosts: several instances behind a load
balancer each allow the configured rate. A cluster-wide count would need a shared store on the call
path (a PostgreSQL or Redis round trip per call), which costs more than the calls it protects.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import mmap
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from server.errors import StartupError

#: Slots per stripe (one lock each): a stripe is read and written in one struct call.
SLOTS_PER_STRIPE = 16
_MAGIC = b"dsbucket"
_HEADER = struct.Struct("<8sII")  # magic, stripes, slots per stripe
_HEADER_BYTES = 64
_SLOT = struct.Struct("<qdd")  # user id (0: empty), tokens, updated (monotonic seconds)
_STRIPE = struct.Struct("<" + "qdd" * SLOTS_PER_STRIPE)
_MIX = 0x9E3779B97F4A7C15  # Fibonacci hashing: spreads consecutive ids over the stripes
_MASK64 = (1 << 64) - 1


class SharedTableError(StartupError, OSError):
    """The table file is missing or not a bucket table."""


def create_table(path: Path, capacity: int) -> None:
    """Write an empty table for at least `capacity` users at `path` (replacing any file there)."""
    stripes = max(1, math.ceil(capacity / SLOTS_PER_STRIPE))
    with path.open("wb") as f:
        f.write(_HEADER.pack(_MAGIC, stripes, SLOTS_PER_STRIPE).ljust(_HEADER_BYTES, b"\0"))
        f.truncate(_HEADER_BYTES + stripes * _STRIPE.size)


class SharedTokenBuckets:
    """Token buckets by user id in a table file shared between processes.

    The same contract as `TokenBucketLimiter.acquire`: 0.0 when a token was taken, else the seconds
    until one is there (nothing taken). Use from one thread per process: POSIX record locks
    exclude other processes, not other threads of the same one.
    """

    def __init__(
        self,
        path: Path,
        *,
        rate_per_second: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_second <= 0 or burst < 1:
            raise ValueError("rate_per_second must be > 0 and burst >= 1")
        self.rate_per_second = rate_per_second
        self.burst = burst
        self._clock = clock
        self._refill_seconds = burst / rate_per_second
        #: Buckets this process took over before they were full again (see the module docstring).
        self.evictions = 0
        try:
            self._fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            raise SharedTableError(f"cannot open the rate-limit table {path}: {exc.strerror}") from None
        try:
            size = os.fstat(self._fd).st_size
            magic, stripes, slots = _HEADER.unpack(os.pread(self._fd, _HEADER.size, 0))
            if magic != _MAGIC or slots != SLOTS_PER_STRIPE or size != _HEADER_BYTES + stripes * _STRIPE.size:
                raise SharedTableError(f"{path} is not a rate-limit table of this version")
            self._map = mmap.mmap(self._fd, size)
        except BaseException:
            os.close(self._fd)
            raise
        self._stripes = int(stripes)

    @property
    def capacity(self) -> int:
        """Users the table holds."""
        return self._stripes * SLOTS_PER_STRIPE

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)

    def acquire(self, key: int) -> float:
        """Take a token for user `key` (>= 1): 0.0 when allowed, else the seconds until a token is there."""
        stripe = ((key * _MIX) & _MASK64) % self._stripes
        offset = _HEADER_BYTES + stripe * _STRIPE.size
        fcntl.lockf(self._fd, fcntl.LOCK_EX, _STRIPE.size, offset)
        try:
            now = self._clock()
            values = _STRIPE.unpack_from(self._map, offset)
            keys = values[0::3]
            burst = float(self.burst)
            if key in keys:
                slot = keys.index(key)
                tokens, updated = values[3 * slot + 1], values[3 * slot + 2]
                tokens = min(burst, tokens + max(0.0, now - updated) * self.rate_per_second)
            else:
                # An empty slot has updated 0.0, so it is the least recently updated one.
                updates = values[2::3]
                slot = updates.index(min(updates))
                if keys[slot] != 0 and now - updates[slot] < self._refill_seconds:
                    self.evictions += 1
                tokens = burst
            wait = 0.0
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self.rate_per_second
            _SLOT.pack_into(self._map, offset + slot * _SLOT.size, key, tokens, now)
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, _STRIPE.size, offset)
        return wait


class SharedLimitTables:
    """The table files of one `dialog-server --workers N`: created by the parent, removed on exit.

    `directory` is what the workers are given; a worker opens `path(name)` for each limit.
    """

    def __init__(self, names: tuple[str, ...], capacity: int) -> None:
        base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else None
        self.directory = Path(tempfile.mkdtemp(prefix="dialog-shard-limits-", dir=base))
        for name in names:
            create_table(self.path(name), capacity)

    def path(self, name: str) -> Path:
        return table_path(self.directory, name)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    @classmethod
    @contextlib.contextmanager
    def created(cls, names: tuple[str, ...], capacity: int) -> Iterator[SharedLimitTables]:
        tables = cls(names, capacity)
        try:
            yield tables
        finally:
            tables.remove()


def table_path(directory: Path, name: str) -> Path:
    """The file of limit `name` (e.g. `send`, `read`) among a server's shared tables."""
    return directory / f"{name}.buckets"
