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

Files are rewritten (never changed in place) by compaction, at the end of every run: files holding
messages their senders deleted (tombstones, server.storage.tombstones) are written again without
them, verified, swapped in the manifest, and the old files removed once no server reads them;
then those tombstones go. EraseUser (`erase_user`) deletes a user's dialogs from every shard and
rewrites every file holding any of their messages the same way; it is idempotent, so calling it
again completes an erasure that was cut short. Last, a part with more than `max_files_per_part`
files has its smallest finished files merged into one (verified against the sum of their
fingerprints), so a dialog archived by many runs stays in a few files.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
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
from server.archive.manifest import Batch, BatchState, Manifest, read_manifest
from server.archive.store import ArchiveStore
from server.background import repeat_every, stop_task
from server.config import ArchiveConfig
from server.errors import FailedPrecondition
from server.moves.mover import MoverBusy, MoverLease, mover_lock
from server.resilience.db_errors import shard_errors
from server.storage import deletion, tombstones
from server.storage.messages import MessageStore
from server.storage.transfer import ROW_COLUMNS, ROW_FINGERPRINT

log = logging.getLogger(__name__)

#: The step boundaries of archiving a batch an `after_step` hook sees, in order (a file rewritten
#: by compaction or an erasure passes `written` and `verified`, then `rewritten`).
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
class EraseReport:
    """What an erasure removed."""

    hot_messages: int = 0
    archived_messages: int = 0
    files_rewritten: int = 0
    tombstones: int = 0


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
    #: Deleted messages compaction removed from files, and the files it rewrote.
    compacted_messages: int = 0
    compacted_files: int = 0
    #: Small files merged into larger ones.
    merged_files: int = 0
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
        store: ArchiveStore | None,
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
        if self._store is None:
            raise FailedPrecondition(
                "no archive is configured: set [archive] url (a directory or s3://bucket/prefix)",
                reason="ARCHIVE_NOT_CONFIGURED",
            )
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
                manifest = await self._delete_published(manifest)
                manifest = await self._compact(manifest, report)
                await self._merge_small_files(manifest, report)
            finally:
                self._lease = None
        report.seconds = time.monotonic() - started
        return report

    async def erase_user(self, user_id: int, *, lock_wait: float = 30.0) -> EraseReport:
        """Delete every message of the user's dialogs from every shard and the archive."""
        report = EraseReport()
        async with mover_lock(self._control_dsn, lock_wait, application_name=LOCK_HOLDER) as lease:
            self._lease = lease
            try:
                for shard in self._stores.values():
                    await self._confirm()
                    report.hot_messages += await deletion.erase_user(shard, user_id)
                if self._store is not None:
                    manifest = await self._load()
                    erased = await self._rewrite(manifest, lambda r: user_id in (r[1], r[2]), parts=None)
                    report.archived_messages, report.files_rewritten = erased[1], erased[2]
                async with await psycopg.AsyncConnection.connect(
                    self._control_dsn, autocommit=True, connect_timeout=10
                ) as conn:
                    report.tombstones = await tombstones.drop_user(conn, user_id)
            finally:
                self._lease = None
        return report

    async def _compact(self, manifest: Manifest, report: ArchiveReport) -> Manifest:
        """Rewrite the files holding deleted messages without them, then drop those tombstones."""
        async with await psycopg.AsyncConnection.connect(
            self._control_dsn, autocommit=True, connect_timeout=10
        ) as conn:
            deleted = await tombstones.all_ids(conn)
        if not deleted:
            return manifest
        manifest, report.compacted_messages, report.compacted_files = await self._rewrite(
            manifest, lambda r: r[0] in deleted, parts=None
        )
        await self._confirm()
        async with await psycopg.AsyncConnection.connect(
            self._control_dsn, autocommit=True, connect_timeout=10
        ) as conn:
            # Only the tombstones read above: one recorded since may hide a message in a file
            # this pass did not rewrite.
            await tombstones.drop(conn, sorted(deleted))
        return manifest

    async def _merge_small_files(self, manifest: Manifest, report: ArchiveReport) -> Manifest:
        """In every part with more than `max_files_per_part` files, merge the smallest finished
        files (up to `batch_rows` rows together) into one, so that a dialog's archived messages
        stay in a few files however many runs archived them."""
        replaced: list[str] = []
        for part in sorted({b.part for b in manifest.batches}):
            files = [b for b in manifest.batches if b.part == part]
            if len(files) <= self._config.max_files_per_part:
                continue
            chosen: list[Batch] = []
            for batch in sorted((b for b in files if b.state == BatchState.DONE), key=lambda b: b.rows):
                if chosen and sum(b.rows for b in chosen) + batch.rows > self._config.batch_rows:
                    break
                chosen.append(batch)
            if len(chosen) < 2:
                continue
            rows: list[Row] = []
            for batch in chosen:
                found = await self._rows_of(batch.file)
                if fingerprint(found) != batch.fingerprint:
                    raise ArchiveMismatch(
                        f"the archive file {self._files.describe(batch.file)} does not match the manifest; "
                        "run `dialogctl verify`"
                    )
                rows += found
            expected = Fingerprint(sum(b.rows for b in chosen), sum(b.checksum for b in chosen))
            merged = await self._write_verified(min(b.shard_id for b in chosen), part, rows, expected)
            manifest = manifest.replacing(
                {b.batch_id for b in chosen}, replace(merged, state=BatchState.DONE)
            )
            await self._save(manifest)
            await self._passed("merged")
            replaced += [b.file for b in chosen]
            report.merged_files += len(chosen)
        if replaced:
            await asyncio.sleep(self._config.manifest_max_age + 1.0)
            for name in replaced:
                await asyncio.to_thread(self._files.delete, name)
        return manifest

    async def _rewrite(
        self, manifest: Manifest, dropped: Callable[[Row], bool], *, parts: set[int] | None
    ) -> tuple[Manifest, int, int]:
        """Write again, without the `dropped` rows, every listed file holding any; returns the
        manifest, rows removed and files rewritten. Each new file is verified before the manifest
        names it instead of the old one; the old files go once no server can still read them."""
        removed = 0
        replaced: list[str] = []
        for batch in list(manifest.batches):
            if parts is not None and batch.part not in parts:
                continue
            rows = await self._rows_of(batch.file)
            kept = [r for r in rows if not dropped(r)]
            if len(kept) == len(rows):
                continue
            new_batch: Batch | None = None
            if kept:
                new_batch = await self._write_verified(batch.shard_id, batch.part, kept, fingerprint(kept))
                new_batch = replace(new_batch, state=batch.state)
            manifest = manifest.replacing({batch.batch_id}, new_batch)
            await self._save(manifest)
            removed += len(rows) - len(kept)
            replaced.append(batch.file)
            await self._passed("rewritten")
        if replaced:
            await asyncio.sleep(self._config.manifest_max_age + 1.0)
            for name in replaced:
                await asyncio.to_thread(self._files.delete, name)
        return manifest, removed, len(replaced)

    @property
    def _files(self) -> ArchiveStore:
        if self._store is None:
            raise FailedPrecondition("no archive is configured", reason="ARCHIVE_NOT_CONFIGURED")
        return self._store

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
        return await asyncio.to_thread(read_manifest, self._files)

    async def _save(self, manifest: Manifest) -> None:
        await self._confirm()
        await asyncio.to_thread(self._files.write, manifest_module.NAME, manifest.to_json())

    async def _remove_leftovers(self, manifest: Manifest) -> int:
        """Delete files that no manifest entry names: written by a run that crashed before listing them."""
        listed = {b.file for b in manifest.batches}
        leftovers = [n for n in await asyncio.to_thread(self._files.list, "parts") if n not in listed]
        if leftovers:
            # A file a crashed rewrite just unlisted may still be read by a server's older manifest.
            await asyncio.sleep(self._config.manifest_max_age + 1.0)
        for name in leftovers:
            await asyncio.to_thread(self._files.delete, name)
        return len(leftovers)

    async def _archive_part(
        self, shard: MessageStore, part: int, floor: uuid.UUID, manifest: Manifest, published: list[Batch]
    ) -> Manifest:
        after = uuid.UUID(int=0)
        while True:
            rows = await _older_rows(shard, part, floor, after, self._config.batch_rows)
            if not rows:
                return manifest
            expected = await _shard_fingerprint(shard, [r[0] for r in rows])
            if expected.count != len(rows):
                raise ArchiveMismatch(
                    f"shard {shard.shard_id} changed while a batch was read ({expected.count} of "
                    f"{len(rows)} messages left); nothing was deleted: retry"
                )
            batch = await self._write_verified(shard.shard_id, part, rows, expected)
            manifest = manifest.with_batch(batch)
            await self._save(manifest)
            published.append(batch)
            await self._passed("published")
            after = max(r[0] for r in rows)
            if len(rows) < self._config.batch_rows:
                return manifest

    async def _rows_of(self, name: str) -> list[Row]:
        """The rows of an archive file; none when it is missing (a fingerprint then tells)."""
        data = await asyncio.to_thread(self._files.read, name)
        return decode(data) if data is not None else []

    async def _write_verified(
        self, shard_id: int, part: int, rows: list[Row], expected: Fingerprint
    ) -> Batch:
        """Write the rows as a new file and read it back: it must hold `expected`."""
        batch_id = uuid.uuid4().hex
        name = file_name(part, batch_id)
        data = encode(rows, row_group_rows=self._config.row_group_rows)
        await self._confirm()
        await asyncio.to_thread(self._files.write, name, data)
        await self._passed("written")
        found = fingerprint(await self._rows_of(name))
        if found != expected:
            raise ArchiveMismatch(
                f"the archive file {self._files.describe(name)} read back holds {found.count} messages "
                f"with checksum {found.checksum}, not the {expected.count} with checksum "
                f"{expected.checksum} written (shard {shard_id}); nothing was deleted: "
                "check the storage and retry"
            )
        await self._passed("verified")
        ids = sorted(str(r[0]) for r in rows)
        return Batch(
            batch_id=batch_id,
            shard_id=shard_id,
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

    async def _delete_published(self, manifest: Manifest) -> Manifest:
        """Delete the rows of every `verified` batch from the shards, then mark it done."""
        pending = manifest.unfinished()
        if not pending:
            return manifest
        # Every server reads pages with a manifest at most manifest_max_age old: once this has
        # passed, they all know the files, and no page misses the rows deleted next.
        await asyncio.sleep(self._config.manifest_max_age + 1.0)
        for batch in pending:
            rows = await self._rows_of(batch.file)
            if fingerprint(rows) != batch.fingerprint:
                raise ArchiveMismatch(
                    f"the archive file {self._files.describe(batch.file)} no longer matches the manifest "
                    f"({len(rows)} messages, {batch.rows} listed); its messages stay on the shards"
                )
            checksums = {r[0]: row_checksum(r) for r in rows}
            for shard in self._stores.values():
                await self._confirm()
                await _delete_archived(shard, checksums, self._files.describe(batch.file))
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
