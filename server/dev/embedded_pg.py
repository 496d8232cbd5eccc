"""Run a private, local PostgreSQL cluster for development (`dialog-server --dev`) and for tests.

`EmbeddedPostgres` owns one data directory: `start()` runs initdb the first time, starts the server on
a TCP port (plus a unix socket inside the data directory) and creates the application database;
`stop()` shuts it down again.  Data survive between runs, which is what `make run` promises.

Connections over TCP need a password (scram-sha-256, from any address): a random one is generated
into `pgpass` inside the data directory (mode 0600, libpq's password-file format) on first start,
and the DSNs this class hands out name that file (`?passfile=...`), so no password ever appears in
a DSN, a config file or a log line. The unix socket lives in the data directory itself (0700, like
every PostgreSQL data directory), which only its owner and root can enter; it stays `trust` and is
how `start()` sets the superuser's password. `pg_hba.conf` is rewritten on every start, so a cluster
created by an older version with `--auth=trust` is upgraded on its next start. The cluster is still
meant for a developer's machine or a test run, not for production.

Binaries come from, in order: `$DIALOG_PG_BINDIR`, `pg_config --bindir`, the directory of `initdb` on
PATH (symlinks resolved) and finally the bundled build of the optional `pgserver` package
(`pip install 'dialog-shard[embedded]'`).

PostgreSQL refuses to run as root.  As root, every PostgreSQL program runs through
`runuser -u USER --`, where USER is the owner of an existing cluster, else `postgres`, else a system
user `dialogshard` created on demand.  The data directory is handed to that user, but its parent
directories are only checked, never chmod-ed: a data directory under a private home directory is
reported as an error instead of silently opening up that home.

A server still running on the data directory (our process crashed or was SIGKILLed) is reused when
its `postmaster.opts` shows it was started with exactly the command line we would use (same binary,
port, address and settings); otherwise it is stopped and started again, so the requested settings
always apply.  Whoever calls `stop()` stops it, whoever started it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import pwd
import secrets
import shlex
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg.conninfo import make_conninfo

from server.errors import StartupError

__all__ = ["FALLBACK_USER", "EmbeddedPostgres", "EmbeddedPostgresError", "find_pg_bindir"]

_log = logging.getLogger(__name__)

FALLBACK_USER = "dialogshard"
"""System user created to run PostgreSQL as root when there is no `postgres` user."""

SUPERUSER = "postgres"
PASSWORD_FILE = "pgpass"
"""The superuser's password in libpq's password-file format, inside the data directory (mode 0600)."""
_HBA = """\
# Written by dialog-shard (server/dev/embedded_pg.py) on every start: edits are overwritten.
# The unix socket sits in the data directory (0700): only its owner and root can reach it.
local   all           all                 trust
local   replication   all                 trust
# Over TCP, from any address, only with the password of the pgpass file (scram-sha-256).
host    all           all     all         scram-sha-256
host    replication   all     all         scram-sha-256
"""
_REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")
_STOP_MODES = ("smart", "fast", "immediate")
_LOG_TAIL_LINES = 25
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107

_INSTALL_HINT = (
    "No PostgreSQL server binaries (initdb, pg_ctl, postgres) were found. Install one of:\n"
    "  pip install 'dialog-shard[embedded]'    # bundled PostgreSQL from the pgserver package\n"
    "  apt-get install postgresql              # Debian/Ubuntu, binaries in /usr/lib/postgresql/<ver>/bin\n"
    "or set DIALOG_PG_BINDIR to a directory that contains initdb, pg_ctl and postgres."
)

# Creating the fallback user is a check-then-act on /etc/passwd; fixtures start clusters in threads.
_user_lock = threading.Lock()


class EmbeddedPostgresError(StartupError, RuntimeError):
    """The local PostgreSQL cluster could not be set up, started or stopped."""


def _has_binaries(directory: Path) -> bool:
    return all(os.access(directory / name, os.X_OK) for name in _REQUIRED_BINARIES)


def _pgserver_bindir() -> Path | None:
    # find_spec does not import pgserver: importing it has side effects (runtime dirs, lock files).
    try:
        spec = importlib.util.find_spec("pgserver")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def pg_config_bindir() -> Path | None:
    """The directory `pg_config --bindir` names, if a pg_config on PATH answers."""
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        if out:
            return Path(out)
    return None


def find_pg_bindir() -> Path:
    """Return the directory holding initdb, pg_ctl and postgres, or raise with installation advice."""
    override = os.environ.get("DIALOG_PG_BINDIR")
    if override:
        directory = Path(override).expanduser()
        if not _has_binaries(directory):
            raise EmbeddedPostgresError(
                f"DIALOG_PG_BINDIR={override!r} does not contain executable {', '.join(_REQUIRED_BINARIES)}"
            )
        return directory.resolve()

    configured = pg_config_bindir()
    # pg_config may come from libpq-dev without a server next to it; only trust it if the server is there.
    if configured is not None and _has_binaries(configured):
        return configured.resolve()

    initdb = shutil.which("initdb")
    if initdb is not None:
        # /usr/local/bin/initdb is often a symlink into the real bindir, where pg_ctl finds postgres.
        directory = Path(initdb).resolve().parent
        if _has_binaries(directory):
            return directory

    bundled = _pgserver_bindir()
    if bundled is not None and _has_binaries(bundled):
        return bundled.resolve()

    raise EmbeddedPostgresError(_INSTALL_HINT)


def _ensure_service_user() -> pwd.struct_passwd:
    with _user_lock:
        for name in ("postgres", FALLBACK_USER):
            with contextlib.suppress(KeyError):
                return pwd.getpwnam(name)
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        proc = subprocess.run(
            [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", FALLBACK_USER],
            capture_output=True,
            text=True,
            check=False,
        )
        try:
            # Another process may have won the race (useradd then fails with "already exists").
            return pwd.getpwnam(FALLBACK_USER)
        except KeyError:
            raise EmbeddedPostgresError(
                f"PostgreSQL cannot run as root and creating the system user {FALLBACK_USER!r} failed "
                f"(exit {proc.returncode}): {proc.stderr.strip()}"
            ) from None


def _can_traverse(path: Path, user: pwd.struct_passwd, groups: set[int]) -> bool:
    st = path.stat()
    if st.st_uid == user.pw_uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid in groups:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _pid_is_live_postgres(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    proc = Path("/proc") / str(pid)
    if not proc.is_dir():
        return True  # no procfs: trust kill(), as pg_ctl itself does
    try:
        # After a reboot a stale postmaster.pid can name an unrelated process; a zombie is dead too.
        comm = (proc / "comm").read_text().strip()
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return comm in ("postgres", "postmaster") and state != "Z"


class EmbeddedPostgres:
    """One local PostgreSQL cluster in `data_dir`, reachable over TCP at `host:port`.

    `fsync=False` is test mode: initdb skips its syncs and the server runs with fsync, synchronous
    commit and full page writes off, so a crash of the machine may lose or corrupt the data.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int,
        host: str = "127.0.0.1",
        database: str = "dialog",
        fsync: bool = True,
        settings: Mapping[str, str] | None = None,
        log_file: Path | None = None,
        bin_dir: Path | None = None,
    ) -> None:
        self.data_dir: Path = Path(data_dir).absolute()
        self.port: int = port
        self.host: str = host
        self.database: str = database
        self.fsync: bool = fsync
        self.settings: dict[str, str] = dict(settings or {})
        self.log_file: Path = Path(log_file).absolute() if log_file else self.data_dir / "server.log"
        self.bin_dir: Path = Path(bin_dir).resolve() if bin_dir is not None else find_pg_bindir()
        self._run_as: pwd.struct_passwd | None = None

    def __repr__(self) -> str:
        return f"EmbeddedPostgres(data_dir={str(self.data_dir)!r}, host={self.host!r}, port={self.port})"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- connection strings -------------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        return self.dsn_for(self.database)

    def dsn_for(self, database: str) -> str:
        """A TCP DSN of `database` that reads the password from `password_file` (libpq's `passfile`)."""
        return (
            f"postgresql://{SUPERUSER}@{self._connect_host()}:{self.port}/{quote(database, safe='')}"
            f"?passfile={quote(str(self.password_file), safe='/')}"
        )

    @property
    def password_file(self) -> Path:
        return self.data_dir / PASSWORD_FILE

    def password(self) -> str:
        """The superuser's password (from `password_file`), checking the file is private first."""
        path = self.password_file
        try:
            st = path.lstat()
        except FileNotFoundError:
            raise EmbeddedPostgresError(f"{path} is missing: start the cluster once to create it") from None
        if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077:
            raise EmbeddedPostgresError(
                f"{path} must be a regular file readable only by its owner "
                f"(it is {stat.filemode(st.st_mode)}): chmod 600 {shlex.quote(str(path))}"
            )
        line = path.read_text().strip()
        _, _, password = line.rpartition(":")
        if not password or line.count(":") != 4:
            raise EmbeddedPostgresError(f"{path} is not a password file written by dialog-shard; delete it")
        return password

    def _connect_host(self) -> str:
        first = self.host.split(",")[0].strip()
        # Wildcard listen addresses cannot be connected to; loopback on the same family reaches them.
        if first in ("", "*", "0.0.0.0"):
            return "127.0.0.1"
        if first == "::":
            return "[::1]"
        return f"[{first}]" if ":" in first else first

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """initdb if needed, start (or reuse, see the module docstring), wait until ready, create the DB."""
        self._check_socket_path()
        self._run_as = self._resolve_run_as()
        self._check_reachable()
        fresh = self._initdb(timeout)
        hba_changed = self._write_hba(warn=not fresh)
        self._ensure_password_file()
        if self.is_running() and not self._running_with_our_options():
            _log.warning("a PostgreSQL started with other options runs on %s; restarting it", self.data_dir)
            self.stop("fast")
        if self.is_running():
            _log.info("reusing PostgreSQL already running on %s (port %d)", self.data_dir, self.port)
        else:
            hba_changed = False  # a fresh start reads the new pg_hba.conf anyway
            self._pg_ctl_start(timeout)
        self._set_password(reload=hba_changed)
        self.create_database(self.database)

    def stop(self, mode: str = "fast", timeout: float = 60.0) -> None:
        """Stop the server and wait for it to exit; a no-op when it is not running."""
        if mode not in _STOP_MODES:
            raise ValueError(f"stop mode must be one of {_STOP_MODES}, not {mode!r}")
        if not self.is_running():
            return
        if self._run_as is None:
            self._run_as = self._resolve_run_as()
        rc, out = self._run(
            [
                str(self.bin_dir / "pg_ctl"),
                "stop",
                "-D",
                str(self.data_dir),
                "-m",
                mode,
                "-w",
                "-t",
                str(max(1, math.ceil(timeout))),
            ],
            timeout=timeout + 15,
            new_session=True,
        )
        # pg_ctl fails when the server exited between our check and its signal: that is a success.
        if rc != 0 and self.is_running():
            raise EmbeddedPostgresError(
                f"pg_ctl stop -m {mode} failed for {self.data_dir} (exit {rc}): {out.strip()}"
                f"{self._log_tail_message(0)}"
            )

    def is_running(self) -> bool:
        return self._postmaster_pid() is not None

    def create_database(self, name: str) -> None:
        """Create database `name` unless it exists; safe to call concurrently."""
        with psycopg.connect(self.dsn_for("postgres"), autocommit=True, connect_timeout=10) as conn:
            for attempt in range(20):
                if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                    return
                try:
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                    return
                except (pg_errors.DuplicateDatabase, pg_errors.UniqueViolation):
                    return  # created concurrently
                except pg_errors.ObjectInUse:
                    # CREATE DATABASE copies template1 and fails while another session is copying it.
                    time.sleep(0.05 * (attempt + 1))
            raise EmbeddedPostgresError(f"could not create database {name!r}: template1 stayed busy")

    # -- internals ----------------------------------------------------------------------------------

    def _resolve_run_as(self) -> pwd.struct_passwd | None:
        if os.geteuid() != 0:
            return None
        # An existing cluster must be run by the user that owns it (PostgreSQL checks).
        if (self.data_dir / "PG_VERSION").exists():
            owner = self.data_dir.stat().st_uid
            if owner != 0:
                try:
                    return pwd.getpwuid(owner)
                except KeyError:
                    raise EmbeddedPostgresError(
                        f"{self.data_dir} is owned by uid {owner}, which has no user entry"
                    ) from None
        return _ensure_service_user()

    def _give_to_pg_user(self, path: Path) -> None:
        if self._run_as is not None:
            os.chown(path, self._run_as.pw_uid, self._run_as.pw_gid)

    def _write_hba(self, *, warn: bool) -> bool:
        """Our pg_hba.conf (TCP needs the password); True when the file said something else before."""
        hba = self.data_dir / "pg_hba.conf"
        with contextlib.suppress(FileNotFoundError):
            if hba.read_text() == _HBA:
                return False
        if warn:
            _log.warning(
                "%s allowed other authentication (clusters of older versions trusted every local "
                "connection); rewriting it: TCP connections now need the password in %s",
                hba,
                self.password_file,
            )
        hba.write_text(_HBA)
        hba.chmod(0o600)
        self._give_to_pg_user(hba)
        return True

    def _ensure_password_file(self) -> None:
        """A random superuser password in `password_file` (0600, owned by PostgreSQL's user), once."""
        path = self.password_file
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            self.password()  # checks its mode and format
            return
        with os.fdopen(fd, "w") as handle:
            # token_urlsafe has no ':' or '\\', the two characters the file format escapes.
            handle.write(f"*:*:*:{SUPERUSER}:{secrets.token_urlsafe(32)}\n")
        # PostgreSQL's user must read it too: pg_basebackup copies the whole data directory.
        self._give_to_pg_user(path)

    def _socket_conninfo(self) -> str:
        return make_conninfo(host=str(self.data_dir), port=self.port, user=SUPERUSER, dbname="postgres")

    def _set_password(self, *, reload: bool) -> None:
        """Give the superuser the password of `password_file`, over the unix socket (a primary only)."""
        password = self.password()
        try:
            with psycopg.connect(self._socket_conninfo(), autocommit=True, connect_timeout=10) as conn:
                if reload:
                    conn.execute("SELECT pg_reload_conf()")
                row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
                if row is not None and row[0]:
                    return  # a standby: the role and its password come from the primary
                conn.execute("SET password_encryption = 'scram-sha-256'")
                conn.execute(
                    sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                        sql.Identifier(SUPERUSER), sql.Literal(password)
                    )
                )
        except psycopg.OperationalError as exc:
            raise EmbeddedPostgresError(
                f"cannot set the superuser's password over the unix socket in {self.data_dir}: {exc}"
            ) from exc

    def _check_reachable(self) -> None:
        user = self._run_as
        if user is None:
            return
        groups = set(os.getgrouplist(user.pw_name, user.pw_gid))
        needed: list[tuple[Path, str]] = []
        for what, target in (
            ("data directory", self.data_dir),
            ("log file", self.log_file),
            ("PostgreSQL binaries", self.bin_dir / "postgres"),
        ):
            for base in {target.parent, target.resolve().parent}:
                needed.extend((parent, what) for parent in (base, *base.parents))
        seen: set[Path] = set()
        for directory, what in needed:
            if directory in seen or not directory.exists():
                continue  # directories we create ourselves are traversable
            seen.add(directory)
            if not _can_traverse(directory, user, groups):
                mode = stat.filemode(directory.stat().st_mode)
                raise EmbeddedPostgresError(
                    f"PostgreSQL runs as user {user.pw_name!r} (it refuses to run as root), but that user "
                    f"cannot enter {directory} ({mode}), which it needs for the {what}. "
                    f"Choose a location outside it (e.g. under /var/tmp or /srv) or grant access "
                    f"yourself (chmod o+x {shlex.quote(str(directory))})."
                )

    def _check_socket_path(self) -> None:
        socket = self.data_dir / f".s.PGSQL.{self.port}"
        if len(os.fsencode(socket)) > _MAX_SOCKET_PATH:
            raise EmbeddedPostgresError(
                f"data directory path too long for its unix socket ({socket}); "
                f"use a path shorter than {_MAX_SOCKET_PATH - 16} bytes"
            )

    def _as_pg_user(self, argv: list[str]) -> list[str]:
        if self._run_as is None:
            return argv
        runuser = shutil.which("runuser") or "/usr/sbin/runuser"
        return [runuser, "-u", self._run_as.pw_name, "--", *argv]

    def _run(self, argv: list[str], *, timeout: float, new_session: bool) -> tuple[int, str]:
        # Output goes to a file, not a pipe: a postmaster inheriting the pipe would keep it open and
        # make reading to EOF hang.  cwd "/" because the unprivileged user may not enter our cwd.
        with tempfile.TemporaryFile("w+") as out:
            try:
                proc = subprocess.run(
                    self._as_pg_user(argv),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    text=True,
                    cwd="/",
                    timeout=timeout,
                    start_new_session=new_session,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                out.seek(0)
                return -1, f"timed out after {timeout:.0f}s: {shlex.join(argv)}\n{out.read()}"
            except FileNotFoundError as exc:
                raise EmbeddedPostgresError(f"cannot execute {exc.filename}: {exc}") from exc
            out.seek(0)
            return proc.returncode, out.read()

    def _initdb(self, timeout: float) -> bool:
        """initdb unless the cluster exists; whether it ran."""
        if (self.data_dir / "PG_VERSION").exists():
            return False
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self._run_as is not None:
            os.chown(self.data_dir, self._run_as.pw_uid, self._run_as.pw_gid)
        argv = [
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            SUPERUSER,
            # Rewritten by _write_hba before the first start; nothing can connect before then.
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
        ]
        if not self.fsync:
            argv.append("--no-sync")
        # Foreground process group on purpose: Ctrl-C should abort a half-done initdb with us.
        rc, out = self._run(argv, timeout=max(timeout, 60.0), new_session=False)
        if rc != 0:
            raise EmbeddedPostgresError(f"initdb failed for {self.data_dir} (exit {rc}):\n{out.strip()}")
        return True

    def _server_args(self) -> list[str]:
        args = ["-c", f"listen_addresses={self.host}", "-p", str(self.port), "-k", str(self.data_dir)]
        if not self.fsync:
            args += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        for name, value in self.settings.items():
            args += ["-c", f"{name}={value}"]
        return args

    def _running_with_our_options(self) -> bool:
        try:
            recorded = shlex.split((self.data_dir / "postmaster.opts").read_text())
        except (OSError, ValueError):
            return False
        if not recorded:
            return False
        same_binary = Path(recorded[0]).resolve() == (self.bin_dir / "postgres").resolve()
        return same_binary and recorded[1:] == ["-D", str(self.data_dir), *self._server_args()]

    def _postmaster_pid(self) -> int | None:
        try:
            first_line = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            # Negative in single-user mode, which locks the directory just the same.
            pid = abs(int(first_line))
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return None
        if pid == 0 or not _pid_is_live_postgres(pid):
            return None
        return pid

    def _pg_ctl_start(self, timeout: float) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_file.touch()
        if self._run_as is not None:
            os.chown(self.log_file, self._run_as.pw_uid, self._run_as.pw_gid)
        log_offset = self.log_file.stat().st_size
        argv = [
            str(self.bin_dir / "pg_ctl"),
            "start",
            "-D",
            str(self.data_dir),
            "-w",
            "-t",
            str(max(1, math.ceil(timeout))),
            "-l",
            str(self.log_file),
            # pg_ctl pastes -o into a /bin/sh command line: quote for the shell.
            "-o",
            shlex.join(self._server_args()),
        ]
        # Own session: a Ctrl-C in the terminal must reach only our process, which then stops
        # PostgreSQL in order instead of PostgreSQL dying under live connections.
        rc, out = self._run(argv, timeout=timeout + 15, new_session=True)
        if rc == 0:
            return
        if self.is_running():
            # pg_ctl gave up waiting, but the postmaster lives on: do not leave it behind.
            with contextlib.suppress(EmbeddedPostgresError):
                self.stop("immediate")
        raise EmbeddedPostgresError(
            f"PostgreSQL failed to start on {self.host}:{self.port} with data in {self.data_dir} "
            f"(pg_ctl exit {rc}): {out.strip()}{self._log_tail_message(log_offset)}"
        )

    def _log_tail_message(self, offset: int) -> str:
        try:
            with self.log_file.open("rb") as fh:
                fh.seek(offset)
                text = fh.read().decode(errors="replace")
        except OSError:
            return ""
        lines = text.strip().splitlines()[-_LOG_TAIL_LINES:]
        if not lines:
            return ""
        return f"\n--- last lines of {self.log_file} ---\n" + "\n".join(lines)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_on_a_free_port(
    make: Callable[[int], EmbeddedPostgres], *, attempts: int = 3, timeout: float = 30.0
) -> EmbeddedPostgres:
    """`make(port)` started on a port free a moment ago, retried on a fresh port if it was taken since.

    A free port is only free until someone binds it: another process, or an outgoing connection of
    this one (its ephemeral ports come from the same range), may take it before PostgreSQL starts.
    """
    for attempt in range(attempts):
        server = make(free_port())
        try:
            server.start(timeout=timeout)
            return server
        except EmbeddedPostgresError as exc:
            if "already in use" not in str(exc) or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable: the last attempt returns or raises")
