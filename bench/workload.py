"""The benchmark's data: users per shard, seeded dialogs, request payloads and the pgbench scripts.

The pgbench statements are taken from the service's own `MessageStore`, so the database ceiling is
measured with the very statements the service runs.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, cast

import psycopg

from server.config import LimitsConfig
from server.pagination import items_budget
from server.routing import Resolution, ShardRouter
from server.storage.ids import MAX_ID
from server.storage.messages import MessageStore

#: About the size of a chat message.
MESSAGE_TEXT = "benchmark message: the quick brown fox jumps over the lazy dog, 0123456789, ok?"

# A UUIDv7-shaped id made in SQL (ms timestamp, version 7, random bits, variant 10): time-ordered like
# the service's ids, so pgbench inserts into the same index positions as the service does.
_SQL_UUIDV7 = (
    "(lpad(to_hex((extract(epoch FROM clock_timestamp()) * 1000)::bigint), 12, '0') || '7'"
    " || lpad(to_hex((random() * 4095)::int), 3, '0') || to_hex(8 + (random() * 3)::int)"
    " || lpad(to_hex((random() * 2 ^ 59)::bigint), 15, '0'))::uuid"
)


@dataclass(frozen=True, slots=True)
class Dialog:
    """A pair of users; `sender` sends and reads, `peer` is the other side."""

    sender: int
    peer: int
    where: Resolution

    @property
    def shard_id(self) -> int:
        return self.where.shard_id


def dialogs_per_shard(num_shards: int, first_user: int) -> list[Dialog]:
    """One pair of fresh users per shard (by the service's own hash), in shard order."""
    router = ShardRouter(num_shards)
    found: dict[int, Dialog] = {}
    user = first_user
    while len(found) < num_shards:
        where = router.resolve(user, user + 1)
        found.setdefault(where.shard_id, Dialog(user, user + 1, where))
        user += 2
    return [found[s] for s in range(num_shards)]


def seed_dialog(dsn: str, table: str, dialog: Dialog, count: int) -> None:
    """`count` messages of `dialog` straight into its shard's table, ids increasing with time."""
    base_ms = int(time.time() * 1000) - count - 3_600_000
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f"""
            INSERT INTO {table} (message_id, user_low, user_high, bucket, from_user_id, to_user_id,
                                 text, created_at, request_id)
            SELECT (lpad(to_hex(%(base)s + i), 12, '0') || '70008' || lpad(to_hex(i), 15, '0'))::uuid,
                   %(low)s, %(high)s, %(bucket)s,
                   CASE WHEN mod(i, 2) = 0 THEN %(low)s ELSE %(high)s END,
                   CASE WHEN mod(i, 2) = 0 THEN %(high)s ELSE %(low)s END,
                   'seeded message number ' || i, to_timestamp((%(base)s + i) / 1000.0), NULL
            FROM generate_series(1, %(n)s) AS i
            """,
            {
                "base": base_ms,
                "low": dialog.where.pair.low,
                "high": dialog.where.pair.high,
                "bucket": dialog.where.bucket,
                "n": count,
            },
        )
        conn.execute(f"ANALYZE {table}")


def seed_other_dialogs(dsn: str, table: str, rows: int, dialogs: int, first_user: int) -> None:
    """`rows` messages of `dialogs` other pairs, spread over the last hour: a shard that is not just
    the benchmark's dialogs (its statistics, and so its query plans, look like a real shard's)."""
    now_ms = int(time.time() * 1000)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f"""
            INSERT INTO {table} (message_id, user_low, user_high, bucket, from_user_id, to_user_id,
                                 text, created_at, request_id)
            SELECT (lpad(to_hex(t), 12, '0') || '70009' || lpad(to_hex(i), 15, '0'))::uuid,
                   %(first)s + 2 * k, %(first)s + 2 * k + 1, mod(k, 4096),
                   %(first)s + 2 * k, %(first)s + 2 * k + 1,
                   'other dialog message ' || i, to_timestamp(t / 1000.0), NULL
            FROM generate_series(1::bigint, %(n)s) AS i,
                 LATERAL (SELECT %(start)s + i * 3600000 / %(n)s AS t, mod(i * 7919, %(pairs)s) AS k) AS x
            """,
            {"first": first_user, "n": rows, "pairs": dialogs, "start": now_ms - 3_600_000},
        )
        conn.execute(f"ANALYZE {table}")


def settle_after_load(dsn: str, table: str) -> None:
    """VACUUM (ANALYZE) and CHECKPOINT after seeding, as `pgbench -i` does after its own load.

    Otherwise autovacuum's first pass over the freshly loaded rows, and the checkpoint their WAL
    calls for, run during whichever measurements come first, and take their CPU from them.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"VACUUM (ANALYZE) {table}")
        conn.execute("CHECKPOINT")


def count_rows(dsn: str, table: str, dialogs: list[Dialog]) -> int:
    with psycopg.connect(dsn) as conn:
        total = 0
        for d in dialogs:
            row = conn.execute(
                f"SELECT count(*) FROM {table} WHERE user_low = %s AND user_high = %s",
                (d.where.pair.low, d.where.pair.high),
            ).fetchone()
            total += int(row[0]) if row else 0
        return total


def _service_sql(table: str) -> tuple[str, str, str]:
    """The service's own INSERT and newest-first page statements for `table`, and where they came from."""
    store = MessageStore(0, table, cast(Any, None))
    return store.insert_sql, store.page_sql[False], "server.storage.messages.MessageStore"


def pgbench_scripts(table: str) -> tuple[str, str, str]:
    """pgbench scripts (INSERT, SELECT of the latest page) in pgbench's `:var` syntax, and their source."""
    insert, page, source = _service_sql(table)
    literal = {"id": _SQL_UUIDV7, "created": "clock_timestamp()", "request_id": "NULL::text"}
    insert = re.sub(r"%\((\w+)\)s", lambda m: literal.get(m.group(1), f":{m.group(1)}"), insert)
    # MessageStore.page's parameters: the byte budget, the pair and cursor, the move fence's
    # (bucket, pair), the limit, the byte budget again.
    names = [":max_bytes", ":low", ":high", ":cursor", ":bucket", ":low", ":high", ":limit", ":max_bytes"]
    if page.count("%s") != len(names):
        raise RuntimeError(
            f"MessageStore.page_sql takes {page.count('%s')} parameters; update pgbench_scripts"
        )
    page = re.sub(r"%s", lambda _m: names.pop(0), page)
    # pgbench wants one statement per line unless continued; collapse whitespace.
    return " ".join(insert.split()) + ";\n", " ".join(page.split()) + ";\n", source


def plain_insert_script(table: str) -> str:
    """pgbench script: the row `pgbench_scripts`' INSERT stores, by a plain INSERT (no fence, no
    idempotency, nothing returned): what PostgreSQL spends on the row alone."""
    values = ", ".join(
        [_SQL_UUIDV7, ":low", ":high", ":bucket", ":from", ":to", ":text", "clock_timestamp()", "NULL"]
    )
    return (
        f"INSERT INTO {table} (message_id, user_low, user_high, bucket, from_user_id, to_user_id, text, "
        f"created_at, request_id) VALUES ({values});\n"
    )


def pgbench_variables(dialog: Dialog, page_size: int) -> tuple[dict[str, str], dict[str, str]]:
    """Variables for the INSERT and SELECT scripts (same users and text as the gRPC payloads)."""
    pair = dialog.where.pair
    insert = {
        "low": str(pair.low),
        "high": str(pair.high),
        "bucket": str(dialog.where.bucket),
        "from": str(dialog.sender),
        "to": str(dialog.peer),
        "text": MESSAGE_TEXT,
    }
    # The service asks for one row more than the page size to know whether another page exists,
    # with the byte budget of a server with the default limits (the benchmark's).
    select = {
        "max_bytes": str(items_budget(LimitsConfig().max_response_bytes)),
        "bucket": str(dialog.where.bucket),
        "low": str(pair.low),
        "high": str(pair.high),
        "cursor": str(MAX_ID),
        "limit": str(page_size + 1),
    }
    return insert, select
