"""Reading a dialog's archived messages: the manifest as of at most `max_age` seconds ago, the
files' footers (cached: files never change) and only the row groups that can hold the page.

A page beyond a cursor reads, in each file of the dialog's part, the row groups whose statistics
admit the pair and ids beyond the cursor, in the page's order, until it has `limit + 1` of the
pair's messages: about `limit / row_group_rows + 1` groups per file, however deep the page is.
"""

from __future__ import annotations

import asyncio
import threading
import time
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq

from server.archive.files import PAGE_COLUMNS, PageRow, may_hold_pair, page_rows, pairs_of, part_of
from server.archive.manifest import Batch, Manifest, read_manifest
from server.archive.store import ArchiveStore
from server.routing import Pair, bucket_of

#: Footers kept in memory (a few KiB each, and 4 bytes per pair of the file).
_FOOTERS = 4096


@dataclass(slots=True)
class ReadStats:
    """What pages cost: manifests loaded, footers and row groups read (for tests and benchmarks)."""

    manifests: int = 0
    footers: int = 0
    row_groups: int = 0


class ArchiveReader:
    """The archive as the servers read it."""

    def __init__(self, store: ArchiveStore, *, max_age: float) -> None:
        self.store = store
        self._max_age = max_age
        self._manifest = Manifest()
        self._by_part: dict[int, list[Batch]] = {}
        self._newest: dict[int, str] = {}
        self._loaded_at = -float("inf")
        self._lock = asyncio.Lock()
        self._footers: OrderedDict[str, tuple[Any, array[int] | None]] = OrderedDict()
        # Pages read files in worker threads: the cache is shared between them.
        self._footers_lock = threading.Lock()
        self.stats = ReadStats()

    async def manifest(self) -> Manifest:
        """The manifest, loaded again when the one held is older than `max_age` seconds."""
        if time.monotonic() - self._loaded_at < self._max_age:
            return self._manifest
        async with self._lock:
            if time.monotonic() - self._loaded_at >= self._max_age:
                started = time.monotonic()
                manifest = await asyncio.to_thread(read_manifest, self.store)
                # Every page asks for its part's files: indexed once per load, not per page.
                by_part: dict[int, list[Batch]] = {}
                for batch in manifest.batches:
                    by_part.setdefault(batch.part, []).append(batch)
                self._manifest, self._by_part = manifest, by_part
                self._newest = {part: max(b.max_id for b in files) for part, files in by_part.items()}
                # Counted from before the read: the manifest is at least as new as that moment.
                self._loaded_at = started
                self.stats.manifests += 1
        return self._manifest

    async def newest_id(self, pair: Pair) -> str | None:
        """The largest archived message id of the pair's part: none of the pair's is larger."""
        await self.manifest()
        return self._newest.get(part_of(bucket_of(*pair)))

    async def _files(self, pair: Pair) -> list[Batch]:
        await self.manifest()
        return self._by_part.get(part_of(bucket_of(*pair)), [])

    async def page(
        self, pair: Pair, *, after: str | None, oldest_first: bool, limit: int
    ) -> tuple[list[PageRow], bool]:
        """The pair's archived messages strictly beyond `after` in the order: at most `limit`, and
        whether more follow."""
        batches = await self._files(pair)
        if not batches:
            return [], False
        found: dict[bytes, PageRow] = {}
        for batch in batches:
            rows = await asyncio.to_thread(self._read_file, batch, pair, after, oldest_first, limit + 1)
            found.update(rows)
        ordered = sorted(found.items(), reverse=not oldest_first)
        return [row for _, row in ordered[:limit]], len(ordered) > limit

    async def find(self, pair: Pair, message_id: str) -> PageRow | None:
        """The pair's archived message with this id (canonical text), None when no file holds it."""
        for batch in await self._files(pair):
            if batch.min_id <= message_id <= batch.max_id:
                found = await asyncio.to_thread(self._find_in_file, batch, pair, message_id)
                if found is not None:
                    return found
        return None

    def _find_in_file(self, batch: Batch, pair: Pair, message_id: str) -> PageRow | None:
        footer, pairs = self._footer(batch)
        if not may_hold_pair(pairs, pair):
            return None
        key = bytes.fromhex(message_id.replace("-", ""))
        groups = [g for g in range(footer.num_row_groups) if _may_hold_id(footer.row_group(g), pair, key)]
        with self.store.open(batch.file) as handle:
            parquet = pq.ParquetFile(handle, metadata=footer)
            for group in groups:
                self.stats.row_groups += 1
                table = parquet.read_row_group(group, columns=PAGE_COLUMNS)
                # The first row beyond the key's predecessor is the key's row, if the group has it.
                before = (int.from_bytes(key, "big") - 1).to_bytes(16, "big")
                for found, row in page_rows(table, pair, cursor=before, oldest_first=True, wanted=1):
                    if found == key:
                        return row
        return None

    def _footer(self, batch: Batch) -> tuple[Any, array[int] | None]:
        """The file's footer and the pair keys it lists."""
        with self._footers_lock:
            cached = self._footers.get(batch.file)
            if cached is not None:
                self._footers.move_to_end(batch.file)
                return cached
        with self.store.open(batch.file) as handle:
            footer = pq.ParquetFile(handle).metadata
        cached = (footer, pairs_of(footer))
        with self._footers_lock:
            self.stats.footers += 1
            self._footers[batch.file] = cached
            if len(self._footers) > _FOOTERS:
                self._footers.popitem(last=False)
        return cached

    def _read_file(
        self, batch: Batch, pair: Pair, after: str | None, oldest_first: bool, wanted: int
    ) -> list[tuple[bytes, PageRow]]:
        footer, pairs = self._footer(batch)
        if not may_hold_pair(pairs, pair):
            return []
        cursor = None if after is None else bytes.fromhex(after.replace("-", ""))
        groups = [
            g
            for g in range(footer.num_row_groups)
            if _may_hold(footer.row_group(g), pair, cursor, oldest_first)
        ]
        if not oldest_first:
            groups.reverse()
        rows: list[tuple[bytes, PageRow]] = []
        if not groups:
            return rows
        with self.store.open(batch.file) as handle:
            parquet = pq.ParquetFile(handle, metadata=footer)
            for group in groups:
                table = parquet.read_row_group(group, columns=PAGE_COLUMNS)
                self.stats.row_groups += 1
                rows += page_rows(
                    table, pair, cursor=cursor, oldest_first=oldest_first, wanted=wanted - len(rows)
                )
                if len(rows) >= wanted:
                    break
        return rows


def _statistics(group: Any, column: int) -> tuple[Any, Any] | None:
    stats = group.column(column).statistics
    if stats is None or not stats.has_min_max:
        return None
    return stats.min, stats.max


# Column positions in server.archive.files.SCHEMA.
_ID, _LOW, _HIGH = 0, 1, 2


def _may_hold_id(group: Any, pair: Pair, key: bytes) -> bool:
    """Whether a row group's statistics admit the pair's message with this id."""
    ids = _statistics(group, _ID)
    return _may_hold_pair(group, pair) and (ids is None or ids[0] <= key <= ids[1])


def _may_hold_pair(group: Any, pair: Pair) -> bool:
    lows = _statistics(group, _LOW)
    if lows is not None and not lows[0] <= pair.low <= lows[1]:
        return False
    highs = _statistics(group, _HIGH)
    # Rows sort by (low, high): the highs' range bounds the pair only when one low fills the group.
    return not (
        lows is not None
        and lows[0] == lows[1]
        and highs is not None
        and not highs[0] <= pair.high <= highs[1]
    )


def _may_hold(group: Any, pair: Pair, cursor: bytes | None, oldest_first: bool) -> bool:
    """Whether a row group's statistics admit rows of the pair beyond the cursor."""
    if not _may_hold_pair(group, pair):
        return False
    ids = _statistics(group, _ID)
    if cursor is not None and ids is not None:
        return bool(ids[1] > cursor) if oldest_first else bool(ids[0] < cursor)
    return True
