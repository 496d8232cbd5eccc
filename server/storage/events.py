"""SQL of one shard's message log `<table>_events`: what live delivery (SubscribeMessages) reads.

Every message stored by SendMessage is also written, by the same statement and so in the same
transaction, to `<table>_events` with the id of the transaction that wrote it (`xid`, a 64-bit
`xid8`: it never wraps around). Moves and reshards copy messages without writing events, so a
message is logged once, on the shard that first stored it.

Positions in the log are cursors `(xid, message_id)`. A reader never reads past the oldest
transaction still running (`pg_snapshot_xmin` of the statement's own snapshot): every
transaction with a smaller xid has ended, and every later one gets a larger xid, so nothing can
appear behind a cursor once read past it. A transaction that took its xid earlier but commits
later than another is therefore never skipped; its events wait (as do the ones after them) until
it ends. Within one transaction (a batch of messages), events come in message id order.

Events older than the retention are deleted (`prune`); `<table>_pruned` keeps the largest cursor
deleted, so that a reader resuming from before it learns that its events are gone instead of
silently missing them.

A deleted message (DeleteMessage) is logged too, as a *deletion event* (`deleted`, empty text)
written by the statement deleting its row (`log_deleted`), or for a message only the archive holds,
by DeleteMessage after its tombstone (`log_archived_deletion`: the archive still finds the message,
so a retry logs it again, and the inbox relay applies a deletion once per message). Readers for
subscribers (`read` without `with_deletions`) skip deletion events and the messages they delete;
the relay reads both. EraseUser deletes every event of the user's dialogs (`erase_user_sql`).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from psycopg import AsyncConnection

from server.storage.ids import MAX_ID, MIN_ID

if TYPE_CHECKING:
    from server.resilience import Shard


def events_schema(table: str) -> list[str]:
    """The statements creating `<table>_events` and `<table>_pruned` (idempotent)."""
    return [
        f"""
        CREATE TABLE IF NOT EXISTS {table}_events (
            xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
            message_id UUID NOT NULL,
            user_low BIGINT NOT NULL,
            user_high BIGINT NOT NULL,
            from_user_id BIGINT NOT NULL,
            to_user_id BIGINT NOT NULL,
            text TEXT NOT NULL,
            created_at TIMESTAMPTZ NOT NULL,
            PRIMARY KEY (xid, message_id)
        )
        """,
        # A constant default: adding the column rewrites no existing log.
        f"ALTER TABLE {table}_events ADD COLUMN IF NOT EXISTS deleted BOOLEAN NOT NULL DEFAULT false",
        # Only deletion events are indexed (a partial index): a send's insert never touches it.
        f"CREATE INDEX IF NOT EXISTS {table}_events_deletions_idx ON {table}_events (message_id) "
        "WHERE deleted",
        # Pruning selects by age; rows are appended in about that order, which BRIN summarizes
        # for next to nothing on the insert path.
        f"CREATE INDEX IF NOT EXISTS {table}_events_age_idx ON {table}_events USING brin (created_at)",
        f"""
        CREATE TABLE IF NOT EXISTS {table}_pruned (
            -- Named: the generated name would pass the length derived names may take.
            singleton BOOLEAN PRIMARY KEY DEFAULT true CONSTRAINT {table}_pruned_one CHECK (singleton),
            xid xid8 NOT NULL,
            message_id UUID NOT NULL
        )
        """,
    ]


def log_inserted(table: str, inserted: str) -> str:
    """A data-modifying CTE's statement logging the rows of the CTE `inserted` (which returns
    message_id, user_low, user_high, from_user_id, to_user_id, text and created_at)."""
    return f"""
        INSERT INTO {table}_events (message_id, user_low, user_high, from_user_id, to_user_id,
                                    text, created_at)
        SELECT message_id, user_low, user_high, from_user_id, to_user_id, text, created_at
        FROM {inserted}
    """


def log_deleted(table: str, deleted: str) -> str:
    """A data-modifying CTE's statement logging the deletion of the rows of the CTE `deleted`
    (which returns message_id, user_low, user_high, from_user_id and to_user_id): a deletion is
    logged in the transaction that deletes the row, or not at all."""
    return f"""
        INSERT INTO {table}_events (message_id, user_low, user_high, from_user_id, to_user_id,
                                    text, created_at, deleted)
        SELECT message_id, user_low, user_high, from_user_id, to_user_id, '', now(), true
        FROM {deleted}
    """


def log_archived_deletion_sql(table: str) -> str:
    """The statement logging the deletion of a message that only the archive holds (parameters:
    message_id, user_low, user_high, from_user_id, to_user_id)."""
    return f"""
        INSERT INTO {table}_events (message_id, user_low, user_high, from_user_id, to_user_id,
                                    text, created_at, deleted)
        VALUES (%s, %s, %s, %s, %s, '', now(), true)
    """


def erase_user_sql(table: str) -> str:
    """The statement deleting every event of a user's dialogs (parameters: the user twice): an
    erased user's messages are neither resumed nor relayed. A scan of the log, which holds the
    retention's events only (EraseUser is rare)."""
    return f"DELETE FROM {table}_events WHERE user_low = %s OR user_high = %s"


@dataclass(frozen=True, slots=True, order=True)
class EventCursor:
    """A position in one shard's log: every event at or before it has been read."""

    xid: int
    message_id: uuid.UUID

    @classmethod
    def before(cls, xid: int) -> EventCursor:
        """The cursor just before every event of transaction `xid` and later ones."""
        return cls(xid, MIN_ID)


#: The log's start: before every event.
ORIGIN = EventCursor(0, MIN_ID)
#: Past every event.
END = EventCursor(2**64 - 1, MAX_ID)


@dataclass(frozen=True, slots=True)
class Event:
    """A stored message, as the log has it."""

    cursor: EventCursor
    from_user_id: int
    to_user_id: int
    text: str
    created_at: datetime
    #: A deletion event: the message was deleted (read `with_deletions` only).
    deleted: bool = False

    @property
    def message_id(self) -> uuid.UUID:
        return self.cursor.message_id


@dataclass(frozen=True, slots=True)
class EventPage:
    """Events read after a cursor, and where the next read starts."""

    events: list[Event]
    #: Where to continue: the last event's cursor, or (nothing found) the oldest running
    #: transaction's, since every event before that has been read.
    next_cursor: EventCursor
    #: The largest cursor pruned so far (ORIGIN if none): a reader behind it has lost events.
    pruned: EventCursor
    #: Whether the page was cut at its limit (more events may follow at once).
    full: bool
    #: Whether a transaction was running: events after it wait for it to end, and whoever ends it
    #: may not say so (a NOTIFY's own transaction, a relay's), so read again soon.
    held_back: bool = False


_HORIZON_SQL = "SELECT pg_snapshot_xmin(pg_current_snapshot())::text"


class EventLog:
    """Reads and prunes one shard's `<table>_events` through the shard's gates (on the primary)."""

    def __init__(self, shard_id: int, table: str, shard: Shard) -> None:
        self.shard_id = shard_id
        self.table = table
        self.shard = shard
        #: The NOTIFY channel that wakes the log's readers (server.delivery.wakeups).
        self.channel = f"dialog_events_{table}"
        # One statement, one snapshot: the horizon, the pruned mark and the events agree.
        # `user` (or NULL: everybody) selects one user's events, `upto` bounds the page.
        self._read_sql = f"""
            WITH s AS (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS horizon,
                              pg_snapshot_xmax(pg_current_snapshot()) AS next_xid),
            p AS (SELECT xid, message_id FROM {table}_pruned)
            SELECT e.xid::text, e.message_id, e.from_user_id, e.to_user_id, e.text, e.created_at,
                   e.deleted, s.horizon::text, (SELECT xid::text FROM p), (SELECT message_id FROM p),
                   s.horizon < s.next_xid
            FROM s LEFT JOIN LATERAL (
                SELECT * FROM {table}_events e
                WHERE (e.xid, e.message_id) > (%(xid)s::text::xid8, %(id)s::uuid)
                  AND (e.xid, e.message_id) <= (%(upto_xid)s::text::xid8, %(upto_id)s::uuid)
                  AND e.xid < s.horizon
                  AND (%(user)s::bigint IS NULL OR e.user_low = %(user)s OR e.user_high = %(user)s)
                  AND (%(with_deletions)s OR NOT (e.deleted OR EXISTS (
                      SELECT 1 FROM {table}_events d WHERE d.deleted AND d.message_id = e.message_id)))
                ORDER BY e.xid, e.message_id
                LIMIT %(limit)s
            ) e ON true
        """
        self._prune_sql = f"""
            WITH gone AS (
                DELETE FROM {table}_events
                WHERE ctid = ANY (ARRAY(
                    SELECT ctid FROM {table}_events
                    WHERE created_at < now() - %(retention)s * interval '1 second'
                    LIMIT %(limit)s
                ))
                RETURNING xid, message_id
            ),
            mark AS (
                INSERT INTO {table}_pruned AS p (singleton, xid, message_id)
                SELECT true, xid, message_id FROM gone ORDER BY xid DESC, message_id DESC LIMIT 1
                ON CONFLICT (singleton) DO UPDATE SET xid = excluded.xid, message_id = excluded.message_id
                WHERE (p.xid, p.message_id) < (excluded.xid, excluded.message_id)
            )
            SELECT count(*) FROM gone
        """

    async def read(
        self,
        after: EventCursor,
        *,
        limit: int,
        user_id: int | None = None,
        upto: EventCursor | None = None,
        with_deletions: bool = False,
    ) -> EventPage:
        """Up to `limit` events after `after` (and at or before `upto`), of `user_id` or everyone's,
        in log order; only events of transactions that have ended. Without `with_deletions`,
        neither deletion events nor the messages they delete (in this log)."""
        bound = upto or END
        params = {
            "xid": str(after.xid),
            "id": after.message_id,
            "upto_xid": str(bound.xid),
            "upto_id": bound.message_id,
            "user": user_id,
            "limit": limit,
            "with_deletions": with_deletions,
        }

        async def op(conn: AsyncConnection[Any]) -> list[tuple[Any, ...]]:
            return await (await conn.execute(self._read_sql, params)).fetchall()

        rows = await self.shard.read(op, stale_ok=False)
        first = rows[0]
        pruned = ORIGIN if first[8] is None else EventCursor(int(first[8]), first[9])
        events = [
            Event(EventCursor(int(r[0]), r[1]), r[2], r[3], r[4], r[5], r[6])
            for r in rows
            if r[0] is not None
        ]
        full = len(events) == limit
        next_cursor = events[-1].cursor if events else after
        if not full:
            # Every event of a transaction older than the horizon (up to `upto`) has been read.
            next_cursor = max(next_cursor, min(EventCursor.before(int(first[7])), bound))
        return EventPage(events, next_cursor, pruned, full, held_back=bool(first[10]))

    async def horizon(self) -> EventCursor:
        """The cursor before the oldest running transaction: where a reader starting now begins."""

        async def op(conn: AsyncConnection[Any]) -> int:
            row = await (await conn.execute(_HORIZON_SQL)).fetchone()
            return int(row[0]) if row else 0

        return EventCursor.before(await self.shard.read(op, stale_ok=False))

    async def notify(self) -> None:
        """Wake this log's readers in every server (a NOTIFY on `channel`)."""

        async def op(conn: AsyncConnection[Any]) -> None:
            await conn.execute("SELECT pg_notify(%s, '')", (self.channel,))

        await self.shard.write(op, idempotent=True)

    async def prune(self, retention_seconds: float, *, limit: int = 10_000) -> int:
        """Delete up to `limit` events older than the retention, recording the largest cursor
        deleted; the number deleted."""
        params = {"retention": retention_seconds, "limit": limit}

        async def op(conn: AsyncConnection[Any]) -> int:
            row = await (await conn.execute(self._prune_sql, params)).fetchone()
            return int(row[0]) if row else 0

        return await self.shard.write(op, idempotent=True)
