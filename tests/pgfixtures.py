"""Pytest plugin: real local PostgreSQL servers for the test suite.

Load it with ``pytest_plugins = ["tests.pgfixtures"]`` in the root conftest.  ``pg_servers`` starts
four independent servers (one per shard in the tests) once per session, in parallel, on tmpfs with
fsync off; they are stopped and deleted at session end, with an atexit backstop, and a later session
sweeps away clusters left behind by a session that was SIGKILLed.

PYTEST_DONT_REWRITE: test modules import helpers from here before pytest registers it as a plugin,
which would otherwise warn that the module cannot be assertion-rewritten (nothing here needs it).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from server.dev.embedded_pg import EmbeddedPostgres, EmbeddedPostgresError, free_port, start_on_a_free_port

__all__ = [
    "PG_SERVER_COUNT",
    "free_port",
    "pg_server",
    "pg_servers",
    "pg_test_base_dir",
    "reachable_temp_dir",
]

PG_SERVER_COUNT = 4
_DIR_PREFIX = "dialog-shard-pg-"
_OWNER_FILE = "owner.pid"

_log = logging.getLogger(__name__)


def pg_test_base_dir() -> Path:
    """tmpfs when available: initdb and WAL on a RAM disk are several times faster than on disk."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        return shm
    return Path(tempfile.gettempdir())


@contextlib.contextmanager
def reachable_temp_dir(prefix: str) -> Iterator[Path]:
    """A fresh directory that PostgreSQL's unprivileged user can pass through (pytest's tmp_path,
    private to root, is not); on exit every cluster still running in it is stopped and it is removed."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir=pg_test_base_dir()))
    base.chmod(0o711)  # mkdtemp makes it 0700
    try:
        yield base
    finally:
        # Each database directory holds a PG_VERSION too; a cluster's own one sits beside global/.
        for data_dir in {v.parent for v in base.rglob("PG_VERSION") if (v.parent / "global").is_dir()}:
            with contextlib.suppress(EmbeddedPostgresError, OSError):
                EmbeddedPostgres(data_dir, port=0).stop("immediate")
        shutil.rmtree(base, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_orphans(base: Path) -> None:
    # A SIGKILLed pytest runs neither finalizers nor atexit: its servers would hold RAM on tmpfs forever.
    for stale in base.glob(f"{_DIR_PREFIX}*"):
        try:
            owner = int((stale / _OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not ours, or still being created
        if _pid_alive(owner):
            continue
        for data_dir in stale.iterdir():
            if (data_dir / "PG_VERSION").exists():
                with contextlib.suppress(EmbeddedPostgresError, OSError):
                    EmbeddedPostgres(data_dir, port=0).stop("immediate")
        shutil.rmtree(stale, ignore_errors=True)


def _start_one(base: Path, index: int) -> EmbeddedPostgres:
    return start_on_a_free_port(
        lambda port: EmbeddedPostgres(
            base / f"shard{index}", port=port, fsync=False, log_file=base / f"shard{index}.log"
        )
    )


class _Cluster:
    """The session's servers and their directory; `close()` is safe to call more than once."""

    def __init__(self) -> None:
        base_root = pg_test_base_dir()
        _sweep_orphans(base_root)
        self.base = Path(tempfile.mkdtemp(prefix=_DIR_PREFIX, dir=base_root))
        # mkdtemp makes it 0700; PostgreSQL may run as an unprivileged user who must pass through.
        self.base.chmod(0o711)
        (self.base / _OWNER_FILE).write_text(str(os.getpid()))
        self.servers: list[EmbeddedPostgres] = []
        self._lock = threading.Lock()
        self._closed = False

    def start(self, count: int) -> float:
        began = time.monotonic()
        with ThreadPoolExecutor(max_workers=count) as pool:
            futures = [pool.submit(_start_one, self.base, i) for i in range(count)]
            errors: list[BaseException] = []
            for future in futures:
                try:
                    self.servers.append(future.result())
                except BaseException as exc:
                    errors.append(exc)
        if errors:
            self.close()
            raise errors[0]
        return time.monotonic() - began

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        # Immediate: the data are thrown away, so skip the shutdown checkpoint.
        # Stop every data dir, not just self.servers: a failed start may have left one running.
        data_dirs = [d for d in self.base.iterdir() if (d / "PG_VERSION").exists()]

        known = {server.data_dir: server for server in self.servers}

        def stop(data_dir: Path) -> None:
            with contextlib.suppress(EmbeddedPostgresError, OSError):
                server = known.get(data_dir) or EmbeddedPostgres(data_dir, port=0)
                server.stop("immediate")

        with ThreadPoolExecutor(max_workers=max(1, len(data_dirs))) as pool:
            list(pool.map(stop, data_dirs))
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_servers(request: pytest.FixtureRequest) -> Iterator[list[EmbeddedPostgres]]:
    """Four independent PostgreSQL servers on free ports (fsync off, tmpfs), shared by the session."""
    cluster = _Cluster()
    # Finalizer and atexit both: pytest tears down on Ctrl-C, atexit covers an exit outside pytest's
    # control (e.g. an exception in a plugin hook); close() is idempotent.
    request.addfinalizer(cluster.close)
    atexit.register(cluster.close)
    elapsed = cluster.start(PG_SERVER_COUNT)
    _log.info("started %d PostgreSQL servers in %.2fs under %s", PG_SERVER_COUNT, elapsed, cluster.base)
    yield list(cluster.servers)


@pytest.fixture(scope="session")
def pg_server(pg_servers: list[EmbeddedPostgres]) -> EmbeddedPostgres:
    """The first of `pg_servers`, for tests that need a single database."""
    return pg_servers[0]
