"""Pure placement logic: the seed's hash, buckets and override resolution."""

from server.routing.hash import NUM_BUCKETS, Pair, bucket_of, calculate_shard, pair_hash
from server.routing.layout import Layout, UnitKey
from server.routing.router import Resolution, ShardRouter, ShardSource

__all__ = [
    "NUM_BUCKETS",
    "Layout",
    "Pair",
    "Resolution",
    "ShardRouter",
    "ShardSource",
    "UnitKey",
    "bucket_of",
    "calculate_shard",
    "pair_hash",
]
