"""The archive's manifest: the one list of the files readers may use, and each batch's state.

`manifest.json` at the archive's root is replaced whole (atomically) by the archive run holding
the movers' lock, the only writer. A batch is listed once its file was read back and matched the
shard's rows (`verified`: readers use it; its rows may still be on the shard too, and a page shows
each message once) and is `done` once those rows are deleted from the shard. A file not listed is
the leftover of a crashed run: no reader opens it, and the next run removes it.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Collection
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from server.archive.files import PARTS, Fingerprint

if TYPE_CHECKING:
    from server.archive.store import ArchiveStore

NAME = "manifest.json"
_FORMAT = 1


class BatchState(enum.StrEnum):
    VERIFIED = "verified"
    DONE = "done"


@dataclass(frozen=True, slots=True)
class Batch:
    """One archive file: a batch of one shard's messages of one part."""

    batch_id: str
    #: The shard its messages came from (the smallest of them for files merged into one).
    shard_id: int
    part: int
    file: str
    rows: int
    #: The summed row checksum (server.archive.files.row_checksum), as a decimal string in JSON.
    checksum: int
    bytes: int
    #: The smallest and largest message id in the file (canonical text).
    min_id: str
    max_id: str
    state: BatchState
    created_at: str

    @property
    def fingerprint(self) -> Fingerprint:
        return Fingerprint(self.rows, self.checksum)


@dataclass(frozen=True, slots=True)
class Manifest:
    batches: tuple[Batch, ...] = field(default=())
    #: Bumped by every change, so a reader tells a new manifest from the one it has.
    version: int = 0

    def with_batch(self, batch: Batch) -> Manifest:
        kept = tuple(b for b in self.batches if b.batch_id != batch.batch_id)
        return Manifest((*kept, batch), self.version + 1)

    def replacing(self, batch_ids: Collection[str], batch: Batch | None) -> Manifest:
        """The manifest with these batches' files replaced by one (a rewrite or a merge), or
        dropped (None)."""
        kept = tuple(b for b in self.batches if b.batch_id not in batch_ids)
        return Manifest(kept if batch is None else (*kept, batch), self.version + 1)

    def with_state(self, batch_id: str, state: BatchState) -> Manifest:
        return Manifest(
            tuple(replace(b, state=state) if b.batch_id == batch_id else b for b in self.batches),
            self.version + 1,
        )

    def unfinished(self) -> list[Batch]:
        return [b for b in self.batches if b.state != BatchState.DONE]

    def totals(self) -> dict[str, int]:
        return {
            "files": len(self.batches),
            "messages": sum(b.rows for b in self.batches),
            "bytes": sum(b.bytes for b in self.batches),
        }

    def to_json(self) -> bytes:
        batches = [asdict(b) | {"checksum": str(b.checksum)} for b in self.batches]
        doc = {"format": _FORMAT, "parts": PARTS, "version": self.version, "batches": batches}
        return (json.dumps(doc, indent=1) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        doc: dict[str, Any] = json.loads(data)
        if doc.get("format") != _FORMAT or doc.get("parts") != PARTS:
            raise ValueError(
                f"the archive's manifest has format {doc.get('format')} with {doc.get('parts')} parts; "
                f"this version reads format {_FORMAT} with {PARTS} parts"
            )
        batches = tuple(
            Batch(**(b | {"checksum": int(b["checksum"]), "state": BatchState(b["state"])}))
            for b in doc["batches"]
        )
        return cls(batches, int(doc["version"]))


def read_manifest(store: ArchiveStore) -> Manifest:
    """The store's manifest; an empty one where none was written yet (blocking I/O)."""
    data = store.read(NAME)
    return Manifest() if data is None else Manifest.from_json(data)
