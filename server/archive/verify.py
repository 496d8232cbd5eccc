"""Checking the archive against its manifest: every listed file is there and holds what the
manifest says (count and checksum), and no file is there that the manifest does not list."""

from __future__ import annotations

from dataclasses import dataclass, field

from server.archive.files import decode, fingerprint
from server.archive.manifest import read_manifest
from server.archive.store import ArchiveStore


@dataclass(frozen=True, slots=True)
class ArchiveFinding:
    """One thing wrong with the archive: `missing`, `mismatch` (a listed file) or `unlisted`."""

    kind: str
    file: str
    detail: str


@dataclass(slots=True)
class ArchiveCheck:
    files: int = 0
    messages: int = 0
    unfinished_batches: int = 0
    findings: list[ArchiveFinding] = field(default_factory=list)


def check_archive(store: ArchiveStore) -> ArchiveCheck:
    """Read every listed file and compare it with the manifest (blocking; reads the whole archive)."""
    manifest = read_manifest(store)
    report = ArchiveCheck(unfinished_batches=len(manifest.unfinished()))
    for batch in manifest.batches:
        report.files += 1
        content = store.read(batch.file)
        if content is None:
            report.findings.append(ArchiveFinding("missing", batch.file, f"{batch.rows} messages listed"))
            continue
        found = fingerprint(decode(content))
        report.messages += found.count
        if found != batch.fingerprint:
            report.findings.append(
                ArchiveFinding(
                    "mismatch",
                    batch.file,
                    f"holds {found.count} messages (checksum {found.checksum}); the manifest lists "
                    f"{batch.rows} (checksum {batch.checksum})",
                )
            )
    listed = {b.file for b in manifest.batches}
    for name in store.list("parts"):
        if name not in listed:
            report.findings.append(
                ArchiveFinding(
                    "unlisted", name, "left by an interrupted run; the next archive run removes it"
                )
            )
    return report
