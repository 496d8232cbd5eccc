"""Archiving: moving old messages from the shards into the archive's files, crash-safely.

One run holds the movers' lock (so no move, reshard or repair changes a unit's rows meanwhile,
and no other run writes the manifest) and goes part by part, shard by shard, in batches:

1. `written`: take up to `batch_rows` of the part's messages older than the cutoff from the shard
   and write them as a new file (a crash here leaves an unlisted file, removed by the next run);
2. `verified`: read the file back and compare its count and checksum with the shard's for those
   rows;
3. `published`: list the batch in the manifest (state `verified`): readers now use the file, and
   show a message found in both places once;
4. after every batch of the run is published, wait until every server has loaded the manifest
   (`[archive] manifest_max_age` and a second);
5. `deleted`: delete the batch's messages from every shard (one transaction per shard), each row
   checked against the file's row with the same id: a mismatch rolls back and stops the run;
6. `done`: mark the batch done in the manifest.

A crash at any step leaves the rows on their shard or in a listed file or both: the next run
first finishes the `verified` batches (steps 4-6; deleting rows already deleted deletes nothing),
so nothing is lost and nothing is left twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from server.archive import manifest as manifest_module
from server.archive.files import (
    PARTS,
    Fingerprint,
    Row,
    buckets_of_part,
    decode,
    encode,
    file_name,
    fingerprint,
    row_checksum,
)
from server.archive.manifest import Batch, BatchState, Manifest
from server.archive.store import ArchiveStore
from server.background import repeat_every, stop_task
from server.config import ArchiveConfig
from server.errors import FailedPrecondition
from server.moves.mover import MoverBusy, MoverLease, mover_lock
from server.resilience.db_errors import shard_errors
from server.storage.messages import MessageStore
from server.storage.transfer import ROW_COLUMNS, ROW_FINGERPRINT

log = logging.getLogger(__name__)

#: The step boundaries an `after_step` hook sees, in order.
STEPS = ("written", "verified", "published", "deleted", "done")
#: The application_name the run's lock session shows in pg_stat_activity.
LOCK_HOLDER = "dialog-shard archive"


class ArchiveMismatch(FailedPrecondition):
    """A file or a shard's rows are not what the batch says; the run stops, nothing is deleted."""

    default_reason = "ARCHIVE_NOT_VERIFIED"


def id_floor(moment: datetime) -> uuid.UUID:
    """The smallest message id (UUIDv7) minted at `moment`: ids below it are older."""
    return uuid.UUID(int=int(moment.timestamp() * 1000) << 80)


@dataclass(slots=True)
class ArchiveReport:
    """What a run did (or, dry, would do): messages per shard, files and bytes written."""

    cutoff: datetime
    dry_run: bool
    messages: dict[int, int] = field(default_factory=dict)
    files: int = 0
    bytes: int = 0
    resumed_batches: int = 0
    removed_leftovers: int = 0
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.messages.values())


class Archiver:
    """Runs archive passes over the shards (`dialogctl archive`, the servers' schedule)."""

    def __init__(
        self,
        stores: Sequence[MessageStore],
        control_dsn: str,
        store: ArchiveStore,
        config: ArchiveConfig,
        *,
        after_step: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self._stores = {s.shard_id: s for s in stores}
        self._control_dsn = control_dsn
        self._store = store
        self._config = config
        self._after_step = after_step
        self._lease: MoverLease | None = None

    async def run(self, cutoff: datetime, *, dry_run: bool = False, lock_wait: float = 0.0) -> ArchiveReport:
        """Archive every message older than `cutoff`; resumes what a crashed run left first."""
        report = ArchiveReport(cutoff, dry_run)
        started = time.monotonic()
        if dry_run:
            for shard_id, shard in self._stores.items():
                report.messages[shard_id] = await _count_older(shard, id_floor(cutoff))
            return report
        async with mover_lock(self._control_dsn, lock_wait, application_name=LOCK_HOLDER) as lease:
            self._lease = lease
            try:
                await self._refuse_during_moves()
                manifest = await self._load()
                report.resumed_batches = len(manifest.unfinished())
                manifest = await self._delete_published(manifest)
                report.removed_leftovers = await self._remove_leftovers(manifest)
                published: list[Batch] = []
                for part in range(PARTS):
                    for shard in self._stores.values():
                        manifest = await self._archive_part(
                            shard, part, id_floor(cutoff), manifest, published
                        )
                for batch in published:
                    report.messages[batch.shard_id] = report.messages.get(batch.shard_id, 0) + batch.rows
                    report.files += 1
                    report.bytes += batch.bytes
                await self._delete_published(manifest)
            finally:
                self._lease = None
        report.seconds = time.monotonic() - started
        return report

    async def _passed(self, step: str) -> None:
        if self._after_step is not None:
            await self._after_step(step)

    async def _confirm(self) -> None:
        assert self._lease is not None
        await self._lease.confirm()

    async def _refuse_during_moves(self) -> None:
        """A crashed move's unit has rows on two shards and fences: settle it before archiving."""
        async with await psycopg.AsyncConnection.connect(
            self._control_dsn, autocommit=True, connect_timeout=10
        ) as conn:
            row = await (
                await conn.execute("SELECT count(*), min(move_id) FROM shard_moves WHERE state <> 'done'")
            ).fetchone()
        if row is not None and row[0]:
            raise FailedPrecondition(
                f"{row[0]} move(s) are unfinished (e.g. move {row[1]}); complete them first with "
                "`dialogctl moves --resume`, then archive",
                reason="MOVE_IN_PROGRESS",
            )

    async def _load(self) -> Manifest:
        data = await asyncio.to_thread(self._store.read, manifest_module.NAME)
        return Manifest() if data is None else Manifest.from_json(data)

    async def _save(self, manifest: Manifest) -> None:
        await self._confirm()
        await asyncio.to_thread(self._store.write, manifest_module.NAME, manifest.to_json())

    async def _remove_leftovers(self, manifest: Manifest) -> int:
        """Delete files that no manifest entry names: written by a run that crashed before listing them."""
        listed = {b.file for b in manifest.batches}
        leftovers = [n for n in await asyncio.to_thread(self._store.list, "parts") if n not in listed]
        for name in leftovers:
            await asyncio.to_thread(self._store.delete, name)
        return len(leftovers)

    async def _archive_part(
        self, shard: MessageStore, part: int, floor: uuid.UUID, manifest: Manifest, published: list[Batch]
    ) -> Manifest:
        after = uuid.UUID(int=0)
        while True:
            rows = await _older_rows(shard, part, floor, after, self._config.batch_rows)
            if not rows:
                return manifest
            batch_id = uuid.uuid4().hex
            name = file_name(part, batch_id)
            data = encode(rows, row_group_rows=self._config.row_group_rows)
            await self._confirm()
            await asyncio.to_thread(self._store.write, name, data)
            await self._passed("written")
            expected = await _shard_fingerprint(shard, [r[0] for r in rows])
            read_back = await asyncio.to_thread(self._store.read, name)
            found = fingerprint(decode(read_back)) if read_back is not None else Fingerprint(0, 0)
            if found != expected or expected.count != len(rows):
                raise ArchiveMismatch(
                    f"the archive file {self._store.describe(name)} read back holds {found.count} "
                    f"messages with checksum {found.checksum}, shard {shard.shard_id} {expected.count} "
                    f"with checksum {expected.checksum}; nothing was deleted: check the storage and retry"
                )
            await self._passed("verified")
            ids = sorted(str(r[0]) for r in rows)
            batch = Batch(
                batch_id=batch_id,
                shard_id=shard.shard_id,
                part=part,
                file=name,
                rows=len(rows),
                checksum=found.checksum,
                bytes=len(data),
                min_id=ids[0],
                max_id=ids[-1],
                state=BatchState.VERIFIED,
                created_at=datetime.now(UTC).isoformat(),
            )
            manifest = manifest.with_batch(batch)
            await self._save(manifest)
            published.append(batch)
            await self._passed("published")
            after = max(r[0] for r in rows)
            if len(rows) < self._config.batch_rows:
                return manifest

    async def _delete_published(self, manifest: Manifest) -> Manifest:
        """Delete the rows of every `verified` batch from the shards, then mark it done."""
        pending = manifest.unfinished()
        if not pending:
            return manifest
        # Every server reads pages with a manifest at most manifest_max_age old: once this has
        # passed, they all know the files, and no page misses the rows deleted next.
        await asyncio.sleep(self._config.manifest_max_age + 1.0)
        for batch in pending:
            data = await asyncio.to_thread(self._store.read, batch.file)
            rows = decode(data) if data is not None else []
            if fingerprint(rows) != batch.fingerprint:
                raise ArchiveMismatch(
                    f"the archive file {self._store.describe(batch.file)} no longer matches the manifest "
                    f"({len(rows)} messages, {batch.rows} listed); its messages stay on the shards"
                )
            checksums = {r[0]: row_checksum(r) for r in rows}
            for shard in self._stores.values():
                await self._confirm()
                await _delete_archived(shard, checksums, self._store.describe(batch.file))
            await self._passed("deleted")
            manifest = manifest.with_state(batch.batch_id, BatchState.DONE)
            await self._save(manifest)
            await self._passed("done")
        return manifest


_OLDER_ROWS = (
    "SELECT {columns} FROM {table} WHERE bucket = ANY(%s::smallint[]) AND message_id < %s "
    "AND message_id > %s ORDER BY message_id LIMIT %s"
)


async def _older_rows(
    shard: MessageStore, part: int, floor: uuid.UUID, after: uuid.UUID, limit: int
) -> list[Row]:
    async with shard_errors(shard.shard_id), shard.pool.connection() as conn:
        cur = await conn.execute(
            _OLDER_ROWS.format(columns=ROW_COLUMNS, table=shard.table),
            (buckets_of_part(part), floor, after, limit),
        )
        rows: list[Any] = await cur.fetchall()
    return [tuple(r) for r in rows]


async def _count_older(shard: MessageStore, floor: uuid.UUID) -> int:
    async with shard_errors(shard.shard_id), shard.pool.connection() as conn:
        row = await (
            await conn.execute(f"SELECT count(*) FROM {shard.table} WHERE message_id < %s", (floor,))
        ).fetchone()
    return int(row[0]) if row else 0


async def _shard_fingerprint(shard: MessageStore, ids: list[uuid.UUID]) -> Fingerprint:
    async with shard_errors(shard.shard_id), shard.pool.connection() as conn:
        row = await (
            await conn.execute(
                f"SELECT count(*), coalesce(sum({ROW_FINGERPRINT}), 0) FROM {shard.table} "
                "WHERE message_id = ANY(%s::uuid[])",
                (ids,),
            )
        ).fetchone()
    assert row is not None
    return Fingerprint(int(row[0]), int(row[1]))


async def _delete_archived(shard: MessageStore, checksums: dict[uuid.UUID, int], where: str) -> int:
    """Delete these messages from the shard if each row equals the archived one; returns rows deleted."""
    async with shard_errors(shard.shard_id), shard.pool.connection() as conn, conn.transaction():
        cur = await conn.execute(
            f"DELETE FROM {shard.table} WHERE message_id = ANY(%s::uuid[]) "
            f"RETURNING message_id, {ROW_FINGERPRINT}",
            (list(checksums),),
        )
        deleted = await cur.fetchall()
        differing = [r[0] for r in deleted if checksums[r[0]] != int(r[1])]
        if differing:
            # Raising rolls the transaction back: the rows stay.
            raise ArchiveMismatch(
                f"{len(differing)} message(s) on shard {shard.shard_id} differ from their copies in "
                f"{where} (e.g. {differing[0]}); nothing was deleted from that shard: "
                "run `dialogctl verify` and retry"
            )
    return len(deleted)


class ArchiveSchedule:
    """Background task of a server: archives messages older than `[archive] older_than` every
    `schedule_interval` seconds. Whichever server takes the movers' lock runs the pass; the
    others find it held (or nothing left to archive) and wait for the next round."""

    def __init__(self, archiver: Archiver, *, older_than: float, interval: float) -> None:
        self._archiver = archiver
        self._older_than = timedelta(seconds=older_than)
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = repeat_every(
            self._interval,
            self.run_once,
            name="archive-schedule",
            retry_on=(Exception,),
            on_failure=lambda exc: log.warning(
                "the scheduled archive run failed (%s); the next runs in %.0f s", exc, self._interval
            ),
        )

    async def stop(self) -> None:
        await stop_task(self._task)
        self._task = None

    async def run_once(self) -> ArchiveReport | None:
        """One pass; None when a move, reshard, repair, backup or another archive run holds the lock."""
        try:
            report = await self._archiver.run(datetime.now(UTC) - self._older_than)
        except MoverBusy:
            return None
        if report.total:
            log.info(
                "archived %d messages into %d files in %.1f s", report.total, report.files, report.seconds
            )
        return report
