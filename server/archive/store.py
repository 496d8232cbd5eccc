"""Where the archive's files live: a local directory or an S3-compatible bucket, through fsspec.

Every call is blocking (the callers run them in a thread). Objects are written whole and
atomically: a local file is written aside and renamed over its name, an S3 PUT replaces an object
at once. So a reader sees an old manifest or the new one, never a half-written one.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import IO, Any

import grpc

from server.config import ArchiveConfig
from server.errors import ServiceError, unavailable_details


class ArchiveUnavailable(ServiceError):
    """The archive's storage did not answer or refused a request; the call may be retried."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "ARCHIVE_UNAVAILABLE"

    def details(self) -> list[object]:
        return unavailable_details(1.0)


class ArchiveStore:
    """The archive's objects under one root (`/var/lib/dialog-shard/archive`, `s3://bucket/prefix`)."""

    def __init__(self, url: str, *, endpoint_url: str | None = None, region: str | None = None) -> None:
        # Imported here: fsspec (and botocore behind s3fs) take a noticeable share of a process's
        # start, which every dialogctl command and server would pay without an archive.
        import fsspec

        self.url = url.rstrip("/")
        self.is_s3 = self.url.startswith("s3://")
        if self.is_s3:
            client_kwargs: dict[str, Any] = {}
            if endpoint_url:
                client_kwargs["endpoint_url"] = endpoint_url
            if region:
                client_kwargs["region_name"] = region
            # No listing cache: the archiver lists what it wrote a moment ago.
            self._fs = fsspec.filesystem(
                "s3",
                client_kwargs=client_kwargs,
                # A page waits on the archive: an unreachable one must fail it soon, not in minutes.
                config_kwargs={"connect_timeout": 5, "read_timeout": 30, "retries": {"max_attempts": 2}},
                use_listings_cache=False,
                skip_instance_cache=True,
            )
            self._root = self.url.removeprefix("s3://")
        else:
            self._fs = fsspec.filesystem("file")
            self._root = self.url

    def _path(self, name: str) -> str:
        return f"{self._root}/{name}"

    def describe(self, name: str = "") -> str:
        """Where `name` lives, for messages (no credentials are part of it)."""
        return f"{self.url}/{name}" if name else self.url

    def read(self, name: str) -> bytes | None:
        """The object's bytes, or None if there is none by that name."""
        with self._errors(name):
            try:
                data: bytes = self._fs.cat_file(self._path(name))
            except FileNotFoundError:
                return None
            return data

    def write(self, name: str, data: bytes) -> None:
        """Create or replace the object, all at once."""
        with self._errors(name):
            path = self._path(name)
            if self.is_s3:
                self._fs.pipe_file(path, data)
                return
            self._fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            aside = f"{path}.{uuid.uuid4().hex}.tmp"
            with open(aside, "wb") as out:
                out.write(data)
                out.flush()
                # Durable before it is named: a crash must not leave a published name on lost bytes.
                os.fsync(out.fileno())
            self._fs.mv(aside, path)

    def open(self, name: str) -> IO[bytes]:
        """The object for ranged reads (Parquet reads its footer and row groups, not the whole file)."""
        with self._errors(name):
            handle: IO[bytes] = self._fs.open(self._path(name), "rb")
            return handle

    def size(self, name: str) -> int:
        with self._errors(name):
            return int(self._fs.size(self._path(name)))

    def delete(self, name: str) -> None:
        """Remove the object if it exists."""
        with self._errors(name), contextlib.suppress(FileNotFoundError):
            self._fs.rm_file(self._path(name))

    def list(self, prefix: str) -> list[str]:
        """Names of the objects under `prefix` (a folder), at any depth; none when it does not exist."""
        with self._errors(prefix):
            try:
                found = self._fs.find(self._path(prefix))
            except FileNotFoundError:
                return []
        start = len(self._root) + 1
        return sorted(str(path)[start:] for path in found)

    @contextlib.contextmanager
    def _errors(self, name: str) -> Iterator[None]:
        try:
            yield
        except FileNotFoundError:
            raise
        except _storage_errors(self.is_s3) as exc:
            raise ArchiveUnavailable(
                f"the archive at {self.describe(name)} could not be reached: {exc}; "
                "check [archive] url, endpoint_url and the storage's credentials"
            ) from None


def _storage_errors(is_s3: bool) -> tuple[type[Exception], ...]:
    """The errors of an unreachable store: the OS's, and the S3 client's own (botocore is imported
    only by an S3 archive)."""
    if not is_s3:
        return (OSError,)
    from botocore.exceptions import BotoCoreError, ClientError

    return (OSError, BotoCoreError, ClientError)


def configured_store(archive: ArchiveConfig) -> ArchiveStore | None:
    """The store `[archive]` names; None when no archive is configured."""
    if archive.url is None:
        return None
    return ArchiveStore(archive.url, endpoint_url=archive.endpoint_url, region=archive.region)
