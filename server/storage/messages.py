"""SQL of one shard's message table: idempotent insert and keyset pages.

Statements are built once per shard (the table name is a validated
identifier from the config) and always parameterized; the pool prepares them
on first use (`prepare_threshold=0`). The hot statements (insert, page) ask for
binary results: PostgreSQL then sends ids and timestamps as bytes instead of
formatting them as text, which costs it less CPU, and they load faster. Every
statement runs through the shard's gate (server.resilience): breaker, deadline,
retries and error mapping.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from psycopg import AsyncConnection
from psycopg import errors as pg_errors
from psycopg_pool import AsyncConnectionPool

from server.routing import Pair, bucket_of
from server.storage.events import log_inserted
from server.storage.fences import params_unit, read_guard, write_guard
from server.storage.ids import MAX_ID, MIN_ID

if TYPE_CHECKING:
    from server.resilience import Shard


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message about to be stored."""

    message_id: uuid.UUID
    pair: Pair
    bucket: int
    from_user_id: int
    to_user_id: int
    text: str
    created_at: datetime
    request_id: str | None

    def stored(self) -> StoredMessage:
        """The message as a shard returns it once stored (the same values: it stores them exactly)."""
        return StoredMessage(self.message_id, self.from_user_id, self.to_user_id, self.text, self.created_at)


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A message as read back from a shard."""

    message_id: uuid.UUID
    from_user_id: int
    to_user_id: int
    text: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class InsertResult:
    """The stored message, and whether it was stored by an earlier call with the same request_id."""

    message: StoredMessage
    replayed: bool


_COLUMNS = "message_id, from_user_id, to_user_id, text, created_at"
#: A page's columns: the id as text, which is what GetDialog answers with. Made by PostgreSQL, it
#: spares the server a uuid.UUID and a str() per message (docs/performance-history.md, "Levers, one by one").
#: Named apart: as `message_id` it would be what ORDER BY message_id sorts by (a sort, not the index).
_PAGE_COLUMNS = "message_id::text AS message_id_text, from_user_id, to_user_id, text, created_at"
#: One message of a dialog page: (message_id as text, from_user_id, to_user_id, text, created_at).
PageRow = tuple[str, int, int, str, datetime]
#: Bytes a dialog.v1.Message in a GetDialogResponse takes besides its text's UTF-8 bytes, at most:
#: tags and lengths, the 36-character id, two int64 varints, the timestamp (about 85 in all).
PAGE_MESSAGE_OVERHEAD = 96


def insert_params(message: NewMessage) -> dict[str, Any]:
    """The parameters of `MessageStore.insert_sql` for `message`."""
    return {
        "id": message.message_id,
        "low": message.pair.low,
        "high": message.pair.high,
        "bucket": message.bucket,
        "from": message.from_user_id,
        "to": message.to_user_id,
        "text": message.text,
        "created": message.created_at,
        "request_id": message.request_id,
    }


class MessageStore:
    """Reads and writes one shard's `messages_N` table through the shard's gates."""

    def __init__(self, shard_id: int, table: str, shard: Shard) -> None:
        self.shard_id = shard_id
        self.table = table
        self.shard = shard
        # One statement serves both first tries and retries: when request_id
        # matched an earlier row, ON CONFLICT skips the insert and the second
        # branch returns that row instead, in the same round trip. The WHERE
        # clause is the move fence (server.storage.fences): it raises while the
        # pair's messages are moving away from this shard, and costs one index probe otherwise.
        # `logged` writes what was inserted to the shard's message log (server.storage.events)
        # in the same transaction.
        self.insert_sql = f"""
            WITH inserted AS (
                INSERT INTO {table} (message_id, user_low, user_high, bucket, from_user_id,
                                     to_user_id, text, created_at, request_id)
                SELECT %(id)s::uuid, %(low)s::bigint, %(high)s::bigint, %(bucket)s::smallint,
                       %(from)s::bigint, %(to)s::bigint, %(text)s::text, %(created)s::timestamptz,
                       %(request_id)s::text
                WHERE {write_guard(table, params_unit("%(bucket)s", "%(low)s", "%(high)s"))}
                ON CONFLICT (user_low, user_high, from_user_id, request_id)
                    WHERE request_id IS NOT NULL DO NOTHING
                RETURNING {_COLUMNS}, user_low, user_high
            ),
            logged AS ({log_inserted(table, "inserted")})
            SELECT {_COLUMNS}, false FROM inserted
            UNION ALL
            SELECT {_COLUMNS}, true FROM {table}
            WHERE user_low = %(low)s AND user_high = %(high)s AND from_user_id = %(from)s
              AND request_id = %(request_id)s AND NOT EXISTS (SELECT 1 FROM inserted)
        """
        self._by_id_sql = f"SELECT {_COLUMNS}, false FROM {table} WHERE message_id = %s"
        self._primary_key = f"{table}_pkey"
        self._by_request_sql = f"""
            SELECT {_COLUMNS}, true FROM {table}
            WHERE user_low = %s AND user_high = %s AND from_user_id = %s AND request_id = %s
        """
        # The pair and cursor bound the dialog index's columns as one range of row values, with
        # no equality on the pair: ORDER BY over all three columns can then be served only by
        # the dialog index (range scan, no sort). With `user_low = .. AND user_high = ..` the
        # planner treats the pair as constants, so ordering by message_id alone fits, and it may
        # walk the primary key backwards filtering by pair (LIMIT's guess that the pair's rows
        # are spread evenly), reading every newer row of other dialogs: a dialog that stops
        # being written while others are costs more per page the more they write.
        # The subquery names the pair and cursor once (it is pulled up: they stay parameters).
        # The last condition runs once per statement (an InitPlan): it raises when the
        # pair has moved away from this shard, for a reader whose routing is stale.
        pair_and_cursor = "(SELECT %s::bigint AS lo, %s::bigint AS hi, %s::uuid AS cursor) AS p"
        # A page ends at a byte budget too (the last two parameters): a running sum of the rows'
        # sizes, over the index order (a WindowAgg streaming on the index scan: no sort, and LIMIT
        # still stops the scan). The rows that fit come with their text; the first row that does
        # not comes without it (its text stays in PostgreSQL), only to say that more exist. The
        # first row always fits. `octet_length` of a TOASTed text reads its header, not the text.
        size = f"octet_length(text) + {PAGE_MESSAGE_OVERHEAD}"
        self.page_sql = {
            oldest_first: f"""
                SELECT message_id_text, from_user_id, to_user_id,
                       CASE WHEN upto <= %s::bigint OR n = 1 THEN text END, created_at
                FROM (
                    SELECT {_PAGE_COLUMNS}, sum({size}) OVER w AS upto, count(*) OVER w AS n
                    FROM {table}, {pair_and_cursor}
                    WHERE (user_low, user_high, message_id) {before} (p.lo, p.hi, p.cursor)
                      AND (user_low, user_high, message_id) {beyond} (p.lo, p.hi, '{edge}'::uuid)
                      AND {read_guard(table, "%s", "%s", "%s")}
                    WINDOW w AS (ORDER BY {order} ROWS UNBOUNDED PRECEDING)
                    ORDER BY {order} LIMIT %s
                ) AS page
                WHERE upto - ({size}) <= %s::bigint OR n <= 2
            """
            for oldest_first, before, beyond, edge, order in (
                (False, "<", ">", MIN_ID, "user_low DESC, user_high DESC, message_id DESC"),
                (True, ">", "<", MAX_ID, "user_low, user_high, message_id"),
            )
        }
        self._count_sql = f"SELECT count(*) FROM {table}"
        # Live rows as PostgreSQL's statistics track them (every insert and delete counts, flushed
        # within seconds); ANALYZE's reltuples where the statistics were reset (a crash, a restore).
        self._estimate_sql = (
            "SELECT coalesce(nullif(s.n_live_tup, 0), greatest(c.reltuples, 0)::bigint) "
            "FROM pg_class c LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid "
            "WHERE c.oid = to_regclass(%s)"
        )

    @property
    def pool(self) -> AsyncConnectionPool[Any]:
        """The primary's pool (statements should go through `shard` instead, to get its policy)."""
        return self.shard.primary.pool

    async def insert(self, message: NewMessage) -> InsertResult:
        """Store `message`, or return the message stored earlier under the same request_id.

        Safe to retry whatever happened to an earlier attempt (the gate retries it when the
        connection broke after sending it): `message_id` is minted once per call, so an
        attempt that finds its own id already stored returns that row, and a request_id
        already stored returns the earlier message.
        """
        params = insert_params(message)

        async def op(conn: AsyncConnection[Any]) -> tuple[Any, ...] | None:
            try:
                row = await (await conn.execute(self.insert_sql, params, binary=True)).fetchone()
            except pg_errors.UniqueViolation as exc:
                if exc.diag.constraint_name != self._primary_key:
                    raise
                # An earlier attempt of this very call committed before its answer was lost.
                return await (await conn.execute(self._by_id_sql, (message.message_id,))).fetchone()
            if row is None:
                # A concurrent call with the same request_id committed after this
                # statement's snapshot was taken: its row is visible now.
                row = await (
                    await conn.execute(
                        self._by_request_sql,
                        (message.pair.low, message.pair.high, message.from_user_id, message.request_id),
                    )
                ).fetchone()
            return row

        row = await self.shard.write(op, idempotent=True)
        if row is None:  # pragma: no cover - the conflicting row cannot vanish: rows are never deleted here
            raise RuntimeError("insert returned no row")
        return InsertResult(StoredMessage(*row[:5]), replayed=bool(row[5]))

    async def page(
        self, pair: Pair, *, after: uuid.UUID | None, oldest_first: bool, limit: int, max_bytes: int
    ) -> tuple[list[PageRow], bool]:
        """The pair's messages strictly beyond the cursor `after`, in the given order, and whether
        more follow: at most `limit` of them, and no more than fit `max_bytes` (counting each as
        its text's UTF-8 bytes + PAGE_MESSAGE_OVERHEAD), but always one if there is one.

        May be served by a replica within the configured lag (or any replica while the primary
        is down): a page can then miss the newest messages, never show a wrong one.
        """
        cursor = after if after is not None else (MIN_ID if oldest_first else MAX_ID)
        bucket = bucket_of(*pair)
        params = (max_bytes, pair.low, pair.high, cursor, bucket, pair.low, pair.high, limit + 1, max_bytes)

        async def op(conn: AsyncConnection[Any]) -> list[PageRow]:
            cur = await conn.execute(self.page_sql[oldest_first], params, binary=True)
            return cast(list[PageRow], await cur.fetchall())

        rows = await self.shard.read(op, stale_ok=True)
        # Rows past the budget come without text (at most one, the last): they only say "more".
        page = [row for row in rows[:limit] if row[3] is not None]
        return page, len(page) < len(rows)

    async def count(self) -> int:
        """Number of messages on this shard (exact, on the primary)."""

        async def op(conn: AsyncConnection[Any]) -> int:
            row = await (await conn.execute(self._count_sql)).fetchone()
            return int(row[0]) if row else 0

        return await self.shard.read(op, stale_ok=False)

    async def estimate(self) -> int:
        """Number of messages on this shard as PostgreSQL's statistics have it (no scan, on the primary)."""

        async def op(conn: AsyncConnection[Any]) -> int:
            row = await (await conn.execute(self._estimate_sql, (self.table,))).fetchone()
            return int(row[0]) if row and row[0] is not None else 0

        return await self.shard.read(op, stale_ok=False)
