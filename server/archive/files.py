"""What an archive file holds and where it lives.

A file holds one batch of one shard's messages of one *part*: the hash buckets with the same
`bucket % PARTS`. Parts depend on the pair's hash alone, never on the shard count, so a reshard moves
no archived file, and a dialog's archived messages are all in its part's files. Inside a file rows
are sorted by (pair, message id) and written in row groups whose statistics (min and max of each
column) let a reader skip every group that cannot hold the dialog's next messages.

A file's fingerprint (count and summed row checksum) is the movers' (server.storage.transfer's
ROW_FINGERPRINT), computed here in Python: an archive run compares the shard's figure for the rows
it took with the figure of the file it reads back, before it deletes the rows.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import uuid
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from server.routing import Pair, pair_hash

#: Parts of the archive: a bucket's part is `bucket % PARTS` (a divisor of the 4096 buckets).
PARTS = 64
#: One message as an archive run takes it from a shard, in server.storage.transfer.ROW_COLUMNS order:
#: (message_id, user_low, user_high, bucket, from_user_id, to_user_id, text, created_at, request_id).
Row = tuple[uuid.UUID, int, int, int, int, int, str, datetime, str | None]
#: One message of a dialog page, as a shard's page returns it:
#: (message_id as text, from_user_id, to_user_id, text, created_at).
PageRow = tuple[str, int, int, str, datetime]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)

SCHEMA = pa.schema(
    [
        ("message_id", pa.binary(16)),
        ("user_low", pa.int64()),
        ("user_high", pa.int64()),
        ("bucket", pa.int16()),
        # to_user_id is the pair's other member: not stored.
        ("from_user_id", pa.int64()),
        ("text", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("request_id", pa.string()),
    ]
)
#: The footer's key-value entry listing the file's pairs (sorted 32-bit keys, `pair_key`): a page of
#: a dialog absent from a file reads none of its row groups.
PAIRS_KEY = b"dialog_shard.pairs"
#: What a page reads of a row group (bucket and request_id stay in the file).
PAGE_COLUMNS = ["message_id", "user_low", "user_high", "from_user_id", "text", "created_at"]


def part_of(bucket: int) -> int:
    return bucket % PARTS


def buckets_of_part(part: int) -> list[int]:
    return list(range(part, 4096, PARTS))


def file_name(part: int, batch_id: str) -> str:
    """Where a batch's file lives: under its part's folder."""
    return f"parts/{part:02d}/{batch_id}.parquet"


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """Count and order-independent checksum of a set of rows."""

    count: int
    checksum: int


def row_checksum(row: Row) -> int:
    """The row's checksum as server.storage.transfer.ROW_FINGERPRINT computes it in SQL."""
    message_id, low, high, bucket, sender, recipient, text, created_at, request_id = row
    micros = (created_at - _EPOCH) // _MICROSECOND
    fields = [
        str(message_id),
        str(low),
        str(high),
        str(bucket),
        str(sender),
        str(recipient),
        text,
        str(micros),
    ]
    fields.append("\\N" if request_id is None else request_id)
    return int(hashlib.md5("|".join(fields).encode()).hexdigest()[:15], 16)


def fingerprint(rows: Sequence[Row]) -> Fingerprint:
    return Fingerprint(len(rows), sum(row_checksum(r) for r in rows))


def encode(rows: Sequence[Row], *, row_group_rows: int) -> bytes:
    """A Parquet file (zstd) of the rows, sorted by (pair, message id), with row-group statistics."""
    ordered = sorted(rows, key=lambda r: (r[1], r[2], r[0].bytes))
    table = pa.table(
        {
            "message_id": pa.array([r[0].bytes for r in ordered], pa.binary(16)),
            "user_low": pa.array([r[1] for r in ordered], pa.int64()),
            "user_high": pa.array([r[2] for r in ordered], pa.int64()),
            "bucket": pa.array([r[3] for r in ordered], pa.int16()),
            "from_user_id": pa.array([r[4] for r in ordered], pa.int64()),
            "text": pa.array([r[6] for r in ordered], pa.string()),
            "created_at": pa.array([r[7] for r in ordered], pa.timestamp("us", tz="UTC")),
            "request_id": pa.array([r[8] for r in ordered], pa.string()),
        },
        schema=SCHEMA,
    )
    pairs = sorted({pair_key(Pair(r[1], r[2])) for r in ordered})
    out = io.BytesIO()
    with pq.ParquetWriter(
        out,
        SCHEMA,
        # The pairs' list is in the footer once; Arrow's copy of the schema would hold it again.
        store_schema=False,
        compression="zstd",
        compression_level=9,
        write_statistics=True,
        # Ids are random past their time prefix: a dictionary would only cost.
        use_dictionary=["user_low", "user_high", "bucket", "from_user_id", "request_id"],
    ) as writer:
        writer.write_table(table, row_group_size=row_group_rows)
        writer.add_key_value_metadata({PAIRS_KEY: array("I", pairs).tobytes()})
    return out.getvalue()


def pair_key(pair: Pair) -> int:
    """A pair's 32-bit key in a file's list of pairs: the upper half of its hash (the lower bits
    are alike within a part)."""
    return pair_hash(*pair) >> 32


def pairs_of(footer: Any) -> array[int] | None:
    """The sorted pair keys a file's footer lists; None when it lists none (any pair may be there)."""
    listed = (footer.metadata or {}).get(PAIRS_KEY)
    if listed is None:
        return None
    keys: array[int] = array("I")
    keys.frombytes(listed)
    return keys


def may_hold_pair(keys: array[int] | None, pair: Pair) -> bool:
    """Whether a file whose footer lists `keys` can hold the pair (no row group read when not)."""
    if keys is None:
        return True
    key = pair_key(pair)
    at = bisect.bisect_left(keys, key)
    return at < len(keys) and keys[at] == key


def decode(data: bytes | Any) -> list[Row]:
    """Every row of a file (its bytes or an open file), in file order."""
    table = pq.read_table(io.BytesIO(data) if isinstance(data, bytes) else data, schema=SCHEMA)
    return rows_of(table)


def rows_of(table: pa.Table) -> list[Row]:
    columns = {name: table.column(name).to_pylist() for name in SCHEMA.names}
    rows: list[Row] = []
    for i in range(table.num_rows):
        low, high, sender = columns["user_low"][i], columns["user_high"][i], columns["from_user_id"][i]
        rows.append(
            (
                uuid.UUID(bytes=columns["message_id"][i]),
                low,
                high,
                columns["bucket"][i],
                sender,
                high if sender == low else low,
                columns["text"][i],
                columns["created_at"][i],
                columns["request_id"][i],
            )
        )
    return rows


def page_rows(
    table: pa.Table, pair: Pair, *, cursor: bytes | None, oldest_first: bool, wanted: int
) -> list[tuple[bytes, PageRow]]:
    """The pair's first `wanted` rows beyond `cursor` (an id's bytes) in the page's order, of a row
    group read with PAGE_COLUMNS, with their ids' bytes. Only those rows become Python values."""
    lows = table.column("user_low").to_pylist()
    highs = table.column("user_high").to_pylist()
    ids = table.column("message_id").to_pylist()
    wanted_rows = [i for i in range(table.num_rows) if lows[i] == pair.low and highs[i] == pair.high]
    if cursor is not None:
        wanted_rows = [i for i in wanted_rows if (ids[i] > cursor if oldest_first else ids[i] < cursor)]
    if not oldest_first:
        wanted_rows.reverse()
    wanted_rows = wanted_rows[:wanted]
    if not wanted_rows:
        return []
    picked = table.take(pa.array(wanted_rows, pa.int64()))
    senders = picked.column("from_user_id").to_pylist()
    texts = picked.column("text").to_pylist()
    times = picked.column("created_at").to_pylist()
    result = []
    for n, i in enumerate(wanted_rows):
        key = ids[i]
        recipient = pair.high if senders[n] == pair.low else pair.low
        result.append((key, (str(uuid.UUID(bytes=key)), senders[n], recipient, texts[n], times[n])))
    return result
