"""The seed's placement hash, bit for bit.

The design document's Go code::

    hash := uint64(minID)*2654435761 + uint64(maxID)*2654435789
    hash = hash ^ (hash >> 16)
    hash = hash * 2654435761
    hash = hash ^ (hash >> 16)
    return int(hash % uint64(NumShards))

Python integers do not wrap, so every multiplication and addition is masked to
64 bits; `uint64(x)` of a negative Go `int` is its two's complement, which the
same mask gives. No I/O here: this module is golden-tested against Go output.
"""

from __future__ import annotations

from typing import NamedTuple

_UINT64 = (1 << 64) - 1
_PRIME_LOW = 2654435761
_PRIME_HIGH = 2654435789

#: Number of hash buckets. Resharding moves whole buckets; a bucket maps to
#: shard `bucket % num_shards`, which equals the seed's `hash % num_shards`
#: whenever num_shards divides NUM_BUCKETS (any power of two up to 4096).
NUM_BUCKETS = 4096


class Pair(NamedTuple):
    """An unordered pair of users, stored ordered: `low <= high`."""

    low: int
    high: int

    @classmethod
    def of(cls, user_id_1: int, user_id_2: int) -> Pair:
        return cls(user_id_1, user_id_2) if user_id_1 <= user_id_2 else cls(user_id_2, user_id_1)


def pair_hash(user_id_1: int, user_id_2: int) -> int:
    """The seed's 64-bit hash of the ordered pair (min, max)."""
    low, high = (user_id_1, user_id_2) if user_id_1 <= user_id_2 else (user_id_2, user_id_1)
    value = ((low & _UINT64) * _PRIME_LOW + (high & _UINT64) * _PRIME_HIGH) & _UINT64
    value ^= value >> 16
    value = (value * _PRIME_LOW) & _UINT64
    value ^= value >> 16
    return value


def calculate_shard(user_id1: int, user_id2: int, num_shards: int) -> int:
    """The seed's `calculateShard`: the shard of a pair when no override exists."""
    if num_shards <= 0:
        raise ValueError(f"num_shards must be positive, got {num_shards}")
    return pair_hash(user_id1, user_id2) % num_shards


def bucket_of(user_id_1: int, user_id_2: int) -> int:
    """The pair's hash bucket, in 0..NUM_BUCKETS-1; stored with every message."""
    return pair_hash(user_id_1, user_id_2) % NUM_BUCKETS
