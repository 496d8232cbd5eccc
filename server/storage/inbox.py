"""SQL of the inbox (ListDialogs): per-user dialog rows, sharded by user, kept by a relay.

`<table>_inbox` on inbox shard `inbox_shard(owner, n)` (server.routing.inbox) holds one row per
dialog of each of its owners: the peer, the last message and the message count. The relay
(server.delivery.relay) applies the message logs (server.storage.events) of every message shard
to it: one transaction on the inbox shard takes the source's relay lock (an advisory lock: it
takes no transaction id, so it holds back no log reader while it reads), reads the source's
cursor in `<table>_relayed` and the events after it, adds them up and moves the cursor, so each
event counts once however many servers relay at once (the others skip a source that is locked).

A rebuild (`dialogctl rebuild-inbox`) replaces the rows with counts from the message tables and
sets each cursor to where its snapshot of that source began, remembering the snapshot
(`counted`): the relay then skips the events that snapshot already saw, and counts the rest.

A deletion event (DeleteMessage, server.storage.events) takes its message off both owners' rows
in the same round: `<table>_deletions_relayed` records each (owner, message) taken off (named like
`_relayed`: a backup's row check skips both), so a deletion logged twice (an archived message's,
retried) counts once. When the deleted message was a row's last one, the round asks
`newest_message` (the dialog's newest surviving message, hot or archived, as GetDialog reads it)
for the new last message, and deletes the row when nothing is left. EraseUser deletes the user's
rows and every peer's row of the user (`erase_user`) once the user's events
are gone from the logs. Archiving changes no row: it logs nothing, and the dialogs stay the same.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from psycopg import AsyncConnection

from server.routing.inbox import Snapshot
from server.storage.events import ORIGIN, Event, EventCursor, EventPage
from server.storage.ids import EPOCH, MAX_ID
from server.storage.messages import PageRow

if TYPE_CHECKING:
    from server.resilience import Shard

#: The control table recording how many shards hold the inbox (set once, by the first server).
INBOX_LAYOUT_SCHEMA = """
CREATE TABLE IF NOT EXISTS inbox_layout (
    singleton BOOLEAN PRIMARY KEY DEFAULT true CHECK (singleton),
    num_shards INTEGER NOT NULL CHECK (num_shards > 0)
)
"""


def inbox_schema(table: str) -> list[str]:
    """The statements creating `<table>_inbox` and `<table>_relayed` (idempotent)."""
    return [
        f"""
        CREATE TABLE IF NOT EXISTS {table}_inbox (
            owner_id BIGINT NOT NULL,
            peer_id BIGINT NOT NULL,
            last_message_id UUID NOT NULL,
            last_from_user_id BIGINT NOT NULL,
            last_text TEXT NOT NULL,
            last_created_at TIMESTAMPTZ NOT NULL,
            message_count BIGINT NOT NULL,
            PRIMARY KEY (owner_id, peer_id)
        )
        """,
        f"CREATE INDEX IF NOT EXISTS {table}_inbox_recent_idx ON {table}_inbox (owner_id, last_message_id)",
        f"""
        CREATE TABLE IF NOT EXISTS {table}_relayed (
            source_shard INTEGER PRIMARY KEY,
            xid xid8 NOT NULL,
            message_id UUID NOT NULL,
            counted TEXT
        )
        """,
        f"""
        CREATE TABLE IF NOT EXISTS {table}_deletions_relayed (
            owner_id BIGINT NOT NULL,
            message_id UUID NOT NULL,
            peer_id BIGINT NOT NULL,
            -- Whether taking it off lowered a count (not when the row was not there, or a rebuild
            -- left the message out): only then does its message, relayed later, count.
            lowered BOOLEAN NOT NULL DEFAULT true,
            -- By message first: a round looks up its page's messages (see `relay`).
            PRIMARY KEY (message_id, owner_id)
        )
        """,
    ]


async def inbox_layout(conn: AsyncConnection[Any], configured_shards: int) -> int:
    """The number of inbox shards, recorded as `configured_shards` by the first server to ask."""
    await conn.execute(
        "INSERT INTO inbox_layout (num_shards) VALUES (%s) ON CONFLICT DO NOTHING", (configured_shards,)
    )
    row = await (await conn.execute("SELECT num_shards FROM inbox_layout")).fetchone()
    assert row is not None
    return int(row[0])


@dataclass(frozen=True, slots=True)
class InboxRow:
    """One dialog of an inbox."""

    peer_id: int
    last_message_id: uuid.UUID
    last_from_user_id: int
    last_text: str
    last_created_at: datetime
    message_count: int

    def merged(self, later: InboxRow) -> InboxRow:
        """This row with `later`'s messages added."""
        last = later if later.last_message_id > self.last_message_id else self
        return InboxRow(
            self.peer_id,
            last.last_message_id,
            last.last_from_user_id,
            last.last_text,
            last.last_created_at,
            self.message_count + later.message_count,
        )


@dataclass(frozen=True, slots=True)
class Relayed:
    """What one relay round of a source's log applied to an inbox shard."""

    events: int
    #: Whether more events wait (the round stopped at its page size).
    full: bool
    #: The source's log was pruned past the cursor: events were lost, rebuild the inbox.
    lost: bool
    #: When the newest event applied was stored (None if none).
    newest: datetime | None


#: The dialog's newest surviving message (user, peer), None when none is left.
NewestMessage = Callable[[int, int], Awaitable[PageRow | None]]


def deletions_of(events: Iterable[Event], belongs: Callable[[int], bool]) -> list[tuple[int, int, uuid.UUID]]:
    """The (owner, peer, message) that the deletion events take off, for the owners `belongs` selects."""
    return [
        (owner, peer, e.message_id)
        for e in events
        if e.deleted
        for owner, peer in ((e.from_user_id, e.to_user_id), (e.to_user_id, e.from_user_id))
        if belongs(owner)
    ]


def add_up(
    events: Iterable[Event],
    belongs: Callable[[int], bool],
    taken_off: Collection[tuple[int, uuid.UUID]] = (),
    *,
    only: Collection[tuple[int, uuid.UUID]] | None = None,
) -> dict[tuple[int, int], InboxRow]:
    """The inbox rows (owner, peer) the message events make (deletion events aside), for the owners
    that `belongs` selects, leaving out the (owner, message) already `taken_off` (or with `only`,
    of those (owner, message) alone)."""
    rows: dict[tuple[int, int], InboxRow] = {}
    for e in events:
        if e.deleted:
            continue
        for owner, peer in ((e.from_user_id, e.to_user_id), (e.to_user_id, e.from_user_id)):
            key = (owner, e.message_id)
            if not belongs(owner) or key in taken_off or (only is not None and key not in only):
                continue
            row = InboxRow(peer, e.message_id, e.from_user_id, e.text, e.created_at, 1)
            earlier = rows.get((owner, peer))
            rows[(owner, peer)] = row if earlier is None else earlier.merged(row)
    return rows


_MICROSECOND = timedelta(microseconds=1)


def _rows_json(rows: Iterable[tuple[tuple[int, int], InboxRow]]) -> str:
    return json.dumps(
        [
            {
                "o": owner,
                "p": peer,
                "i": str(r.last_message_id),
                "f": r.last_from_user_id,
                "x": r.last_text,
                "c": (r.last_created_at - EPOCH) // _MICROSECOND,
                "n": r.message_count,
            }
            for (owner, peer), r in rows
        ],
        separators=(",", ":"),
    )


#: Inbox rows from the JSON array `_rows_json` makes.
_ROWS = """
    SELECT r.o, r.p, r.i, r.f, r.x,
           timestamptz '1970-01-01 00:00:00+00' + r.c * interval '1 microsecond', r.n
    FROM json_to_recordset(%s::json) AS r(o int8, p int8, i uuid, f int8, x text, c int8, n int8)
"""


class InboxStore:
    """Reads and relays into one inbox shard's `<table>_inbox` through the shard's gates."""

    def __init__(self, shard_id: int, table: str, shard: Shard) -> None:
        self.shard_id = shard_id
        self.table = table
        self.shard = shard
        self._page_sql = f"""
            SELECT peer_id, last_message_id, last_from_user_id, last_text, last_created_at, message_count
            FROM {table}_inbox
            WHERE owner_id = %s AND last_message_id < %s
            ORDER BY owner_id DESC, last_message_id DESC
            LIMIT %s
        """
        newer = "excluded.last_message_id > i.last_message_id"
        self._add_sql = f"""
            INSERT INTO {table}_inbox AS i (owner_id, peer_id, last_message_id, last_from_user_id,
                                            last_text, last_created_at, message_count)
            {_ROWS}
            ON CONFLICT (owner_id, peer_id) DO UPDATE SET
                message_count = i.message_count + excluded.message_count,
                last_message_id = greatest(i.last_message_id, excluded.last_message_id),
                last_from_user_id = CASE WHEN {newer} THEN excluded.last_from_user_id
                                         ELSE i.last_from_user_id END,
                last_text = CASE WHEN {newer} THEN excluded.last_text ELSE i.last_text END,
                last_created_at = CASE WHEN {newer} THEN excluded.last_created_at
                                       ELSE i.last_created_at END
        """
        self._cursor_sql = (
            f"SELECT xid::text, message_id, counted FROM {table}_relayed WHERE source_shard = %s"
        )
        self._new_cursor_sql = (
            f"INSERT INTO {table}_relayed (source_shard, xid, message_id) VALUES (%s, '0', %s) "
            "RETURNING xid::text, message_id, counted"
        )
        # A deletion counts once per owner and message.
        self._record_taken_off_sql = f"""
            INSERT INTO {table}_deletions_relayed (owner_id, message_id, peer_id)
            VALUES (%(owner)s, %(message)s, %(peer)s) ON CONFLICT DO NOTHING
        """
        self._lower_sql = f"""
            UPDATE {table}_inbox SET message_count = message_count - 1
            WHERE owner_id = %(owner)s AND peer_id = %(peer)s
            RETURNING message_count, last_message_id
        """
        self._not_lowered_sql = f"""
            UPDATE {table}_deletions_relayed SET lowered = false
            WHERE message_id = %(message)s AND owner_id = %(owner)s
        """
        self._taken_off_sql = (
            f"SELECT owner_id, message_id, lowered FROM {table}_deletions_relayed "
            "WHERE message_id = ANY(%s::uuid[])"
        )
        self._count_late_sql = (
            f"UPDATE {table}_inbox SET message_count = message_count + %s "
            "WHERE owner_id = %s AND peer_id = %s"
        )
        self._set_last_sql = f"""
            UPDATE {table}_inbox SET last_message_id = %s, last_from_user_id = %s, last_text = %s,
                                     last_created_at = %s
            WHERE owner_id = %s AND peer_id = %s
        """
        self._drop_row_sql = f"DELETE FROM {table}_inbox WHERE owner_id = %s AND peer_id = %s"
        self._move_cursor_sql = (
            f"UPDATE {table}_relayed SET xid = %s::text::xid8, message_id = %s, counted = %s "
            "WHERE source_shard = %s"
        )

    async def page(self, owner_id: int, *, before: uuid.UUID | None, limit: int) -> list[InboxRow]:
        """Up to `limit` dialogs of `owner_id` whose last message is older than `before`, most
        recent first."""
        params = (owner_id, before or MAX_ID, limit)

        async def op(conn: AsyncConnection[Any]) -> list[tuple[Any, ...]]:
            return await (await conn.execute(self._page_sql, params)).fetchall()

        return [InboxRow(*row) for row in await self.shard.read(op, stale_ok=True)]

    async def relay(
        self,
        source_shard: int,
        read: Callable[[EventCursor], Awaitable[EventPage]],
        belongs: Callable[[int], bool],
        newest_message: NewestMessage | None = None,
    ) -> Relayed | None:
        """Apply the next page of `source_shard`'s log (`read(cursor)`, deletion events included)
        to this inbox shard, for the owners `belongs` selects; None when another relay holds that
        source's cursor. `newest_message` replaces a deleted last message (without it, the row keeps it
        until a rebuild, unless nothing is left)."""

        async def op(conn: AsyncConnection[Any]) -> Relayed | None:
            async with conn.transaction():
                # An advisory lock, not a row lock: it takes no transaction id, so this transaction
                # holds back no log reader's horizon while it reads the source (server.storage.events).
                if not await relay_lock(conn, self.table, source_shard, wait=False):
                    return None  # another relay holds it
                row = await (await conn.execute(self._cursor_sql, (source_shard,))).fetchone()
                if row is None:
                    cur = await conn.execute(self._new_cursor_sql, (source_shard, ORIGIN.message_id))
                    row = await cur.fetchone()
                    assert row is not None
                cursor = EventCursor(int(row[0]), row[1])
                counted = Snapshot.parse(row[2]) if row[2] else None
                page = await read(cursor)
                events = [e for e in page.events if counted is None or not counted.sees(e.cursor.xid)]
                taken_off = await self._taken_off(conn, events)
                rows = add_up(events, belongs, taken_off)
                lowered = {key for key, was_lowered in taken_off.items() if was_lowered}
                for (owner, peer), late in add_up(events, belongs, only=lowered).items():
                    # Its deletion came first (from the shard a move took it to) and took it off
                    # a count it was not in yet: it counts now, but is nobody's last message.
                    await conn.execute(self._count_late_sql, (late.message_count, owner, peer))
                if rows:
                    await conn.execute(self._add_sql, (_rows_json(sorted(rows.items())),))
                for owner, peer, message_id in deletions_of(events, belongs):
                    await self._take_off(conn, owner, peer, message_id, newest_message)
                if counted is not None and page.next_cursor.xid >= counted.xmax:
                    counted = None  # past everything the rebuild's snapshot saw
                await conn.execute(
                    self._move_cursor_sql,
                    (
                        str(page.next_cursor.xid),
                        page.next_cursor.message_id,
                        None if counted is None else row[2],
                        source_shard,
                    ),
                )
            newest = max((e.created_at for e in events), default=None)
            return Relayed(len(events), page.full, page.pruned > cursor, newest)

        return await self.shard.write(op, idempotent=True)

    async def _taken_off(
        self, conn: AsyncConnection[Any], events: list[Event]
    ) -> dict[tuple[int, uuid.UUID], bool]:
        """The (owner, message) of these events already taken off, and whether that lowered a
        count: a message moved to another shard is deleted there, whose log may be relayed first."""
        ids = [e.message_id for e in events if not e.deleted]
        if not ids:
            return {}
        cur = await conn.execute(self._taken_off_sql, (ids,))
        return {(int(r[0]), r[1]): bool(r[2]) for r in await cur.fetchall()}

    async def _take_off(
        self,
        conn: AsyncConnection[Any],
        owner: int,
        peer: int,
        message_id: uuid.UUID,
        newest: NewestMessage | None,
    ) -> None:
        """Take a deleted message off the owner's row of the dialog (once per message)."""
        params = {"owner": owner, "peer": peer, "message": message_id}
        if (await conn.execute(self._record_taken_off_sql, params)).rowcount == 0:
            return  # taken off already
        row = await (await conn.execute(self._lower_sql, params)).fetchone()
        if row is None:
            # No row yet (its message comes from a log not relayed so far) or none left (erased).
            await conn.execute(self._not_lowered_sql, params)
            return
        count, last_id = int(row[0]), row[1]
        if last_id != message_id and count > 0:
            return
        # Deletes are rare: this read of the dialog (one page of one message) is their cost.
        # Nothing left, unless a message is on its way from a log not relayed so far: ask.
        found = None if newest is None else await newest(owner, peer)
        if found is None:
            if count <= 0 or newest is not None:
                await conn.execute(self._drop_row_sql, (owner, peer))
            return
        found_id, from_user_id, _, text, created_at = found
        await conn.execute(self._set_last_sql, (found_id, from_user_id, text, created_at, owner, peer))

    async def erase_user(self, user_id: int, sources: Iterable[int]) -> int:
        """Delete the user's rows and every row of a dialog with the user, holding every source's
        relay lock (the user's events are gone from the logs: no round adds them back); the rows
        deleted."""

        async def op(conn: AsyncConnection[Any]) -> int:
            async with conn.transaction():
                for source in sorted(sources):
                    await relay_lock(conn, self.table, source, wait=True)
                cur = await conn.execute(
                    f"DELETE FROM {self.table}_inbox WHERE owner_id = %s OR peer_id = %s", (user_id, user_id)
                )
                await conn.execute(
                    f"DELETE FROM {self.table}_deletions_relayed WHERE owner_id = %s OR peer_id = %s",
                    (user_id, user_id),
                )
                return cur.rowcount

        return await self.shard.write(op, idempotent=True)


async def relay_lock(conn: AsyncConnection[Any], table: str, source_shard: int, *, wait: bool) -> bool:
    """Take (or with `wait=False`, try) the lock of relaying `source_shard` into `table`'s inbox,
    until `conn`'s transaction ends; whether it is held."""
    key = (table, source_shard)
    if wait:
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s), %s)", key)
        return True
    row = await (await conn.execute("SELECT pg_try_advisory_xact_lock(hashtext(%s), %s)", key)).fetchone()
    return bool(row and row[0])


async def replace_inbox(
    conn: AsyncConnection[Any],
    table: str,
    rows: Sequence[tuple[tuple[int, int], InboxRow]],
    cursors: Mapping[int, tuple[EventCursor, str]],
    taken_off: Sequence[tuple[int, int, uuid.UUID]] = (),
) -> None:
    """Replace every row of `table`'s inbox and every source's cursor (with the snapshot it
    counted), in the caller's transaction on `conn`, which holds every source's `relay_lock` (a rebuild).
    `taken_off` (owner, peer, message) are deletions the rows already left out: the relays skip
    their deletion events."""
    await conn.execute(f"DELETE FROM {table}_inbox")
    for start in range(0, len(rows), 1000):
        await conn.execute(f"INSERT INTO {table}_inbox {_ROWS}", (_rows_json(rows[start : start + 1000]),))
    if taken_off:
        await conn.execute(
            f"""
            INSERT INTO {table}_deletions_relayed (owner_id, peer_id, message_id, lowered)
            SELECT *, false FROM unnest(%s::int8[], %s::int8[], %s::uuid[]) ON CONFLICT DO NOTHING
            """,
            ([t[0] for t in taken_off], [t[1] for t in taken_off], [t[2] for t in taken_off]),
        )
    for source, (cursor, snapshot) in cursors.items():
        await conn.execute(
            f"""
            INSERT INTO {table}_relayed (source_shard, xid, message_id, counted)
            VALUES (%s, %s::text::xid8, %s, %s)
            ON CONFLICT (source_shard) DO UPDATE SET
                xid = excluded.xid, message_id = excluded.message_id, counted = excluded.counted
            """,
            (source, str(cursor.xid), cursor.message_id, snapshot),
        )


def dialog_totals_sql(table: str) -> str:
    """Every pair of a message table with its last message and message count (a rebuild's read)."""
    return f"""
        SELECT DISTINCT ON (user_low, user_high) user_low, user_high, message_id, from_user_id, text,
               created_at, count(*) OVER (PARTITION BY user_low, user_high)
        FROM {table}
        ORDER BY user_low, user_high, message_id DESC
    """


async def read_dialog_totals(
    conn: AsyncConnection[Any], table: str, routed_here: Callable[[int, int], bool]
) -> tuple[EventCursor, str, list[tuple[tuple[int, int], InboxRow]]]:
    """In one snapshot of `conn`'s shard: where its log's relay should start, the snapshot (what
    it counted), and both owners' inbox rows of every pair `routed_here` keeps."""
    rows: list[tuple[tuple[int, int], InboxRow]] = []
    async with conn.transaction():
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        snapshot_sql = "SELECT pg_current_snapshot()::text, pg_snapshot_xmin(pg_current_snapshot())::text"
        row = await (await conn.execute(snapshot_sql)).fetchone()
        assert row is not None
        snapshot, xmin = str(row[0]), int(row[1])
        async with conn.cursor(name="dialog_totals") as cur:
            await cur.execute(dialog_totals_sql(table))
            async for low, high, last_id, last_from, text, created_at, count in cur:
                if not routed_here(low, high):
                    continue  # a copy an unfinished move left: counted where routing sends the pair
                for owner, peer in ((low, high), (high, low)):
                    rows.append(((owner, peer), InboxRow(peer, last_id, last_from, text, created_at, count)))
    return EventCursor.before(xmin), snapshot, rows
