"""Real-server tests of server.dev.embedded_pg and the tests.pgfixtures fixtures (no mocks)."""

from __future__ import annotations

import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from server.dev.embedded_pg import EmbeddedPostgres, EmbeddedPostgresError, start_on_a_free_port
from tests.pgfixtures import PG_SERVER_COUNT, free_port, reachable_temp_dir
from tests.support import tcp_login_error, wait_until_blocking

# Harmless if the root conftest loads it too: pytest registers a plugin module once.
pytest_plugins = ["tests.pgfixtures"]


@pytest.fixture
def pg_dir() -> Iterator[Path]:
    with reachable_temp_dir("dialog-shard-pgtest-") as base:
        yield base


def test_data_survive_a_restart(pg_dir: Path) -> None:
    pg = EmbeddedPostgres(pg_dir / "data", port=free_port(), fsync=False)
    with pg:
        assert pg.is_running()
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE note (id int PRIMARY KEY, body text NOT NULL)")
            conn.execute("INSERT INTO note VALUES (1, 'kept')")
    assert not pg.is_running()

    again = EmbeddedPostgres(pg_dir / "data", port=free_port(), fsync=False)
    with again, psycopg.connect(again.dsn) as conn:
        assert conn.execute("SELECT body FROM note WHERE id = 1").fetchone() == ("kept",)


def test_stop_is_idempotent(pg_dir: Path) -> None:
    pg = EmbeddedPostgres(pg_dir / "data", port=free_port(), fsync=False)
    pg.stop()  # never started, no cluster yet
    pg.start()
    pg.stop()
    pg.stop()
    assert not pg.is_running()


def test_start_twice_reuses_the_running_server(pg_dir: Path) -> None:
    pg = EmbeddedPostgres(pg_dir / "data", port=free_port(), fsync=False)
    with pg:
        pid = pg._postmaster_pid()
        # A fresh object on the same directory, like a process restarted after a crash.
        EmbeddedPostgres(pg_dir / "data", port=pg.port, fsync=False).start()
        assert pg._postmaster_pid() == pid


def test_start_with_other_options_restarts_the_leftover(pg_dir: Path) -> None:
    first = EmbeddedPostgres(pg_dir / "data", port=free_port(), fsync=False)
    first.start()
    second = EmbeddedPostgres(pg_dir / "data", port=free_port(), fsync=False)
    try:
        second.start()
        with psycopg.connect(second.dsn) as conn:
            assert conn.execute("SELECT current_setting('port')::int").fetchone() == (second.port,)
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(first.dsn, connect_timeout=2).close()
    finally:
        second.stop()


def test_port_in_use_fails_with_port_and_log(pg_dir: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        pg = EmbeddedPostgres(pg_dir / "data", port=port, fsync=False)
        with pytest.raises(EmbeddedPostgresError) as info:
            pg.start(timeout=15)
    message = str(info.value)
    assert str(port) in message
    assert "already in use" in message  # from the server log tail
    assert not pg.is_running()


def test_a_port_taken_before_the_start_is_retried_on_a_fresh_one(pg_dir: Path) -> None:
    """What the fixtures and `make bench` start servers with: a port taken in between costs a retry."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        ports: list[int] = []

        def make(port: int) -> EmbeddedPostgres:
            ports.append(port)
            # The first attempt gets the taken port, as if someone had bound it since it was picked.
            return EmbeddedPostgres(pg_dir / "data", port=taken if len(ports) == 1 else port, fsync=False)

        pg = start_on_a_free_port(make, timeout=15)
        try:
            assert len(ports) == 2 and pg.port != taken
            with psycopg.connect(pg.dsn) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
        finally:
            pg.stop()


def test_a_start_failing_otherwise_is_not_retried(pg_dir: Path) -> None:
    (pg_dir / "data").write_text("not a directory")  # initdb cannot use it
    attempts: list[int] = []

    def make(port: int) -> EmbeddedPostgres:
        attempts.append(port)
        return EmbeddedPostgres(pg_dir / "data", port=port, fsync=False)

    with pytest.raises(EmbeddedPostgresError):
        start_on_a_free_port(make, timeout=15)
    assert len(attempts) == 1


def test_dsn_for_connects_to_a_created_database(pg_server: EmbeddedPostgres) -> None:
    pg_server.create_database("extra_db")
    pg_server.create_database("extra_db")  # idempotent
    with psycopg.connect(pg_server.dsn_for("extra_db")) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("extra_db",)


def test_pg_servers_fixture_gives_four_live_servers(pg_servers: list[EmbeddedPostgres]) -> None:
    assert len(pg_servers) == PG_SERVER_COUNT
    assert len({server.port for server in pg_servers}) == PG_SERVER_COUNT
    assert len({server.data_dir for server in pg_servers}) == PG_SERVER_COUNT
    for server in pg_servers:
        with psycopg.connect(server.dsn) as conn:
            row = conn.execute("SELECT current_database(), current_setting('fsync')").fetchone()
            assert row == ("dialog", "off")


def test_tcp_logins_need_the_generated_password(pg_server: EmbeddedPostgres) -> None:
    """The fixtures' servers take the same path as `make run`'s: scram over TCP, a private password file."""
    st = pg_server.password_file.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == pg_server.data_dir.stat().st_uid  # PostgreSQL's user (pg_basebackup reads it)
    password = pg_server.password()
    assert len(password) >= 32
    assert password not in pg_server.dsn  # the DSN names the file, never the password
    assert "passfile=" in pg_server.dsn

    assert "no password supplied" in (tcp_login_error(pg_server.port) or "")
    assert "password authentication failed" in (tcp_login_error(pg_server.port, "not-the-password") or "")
    assert tcp_login_error(pg_server.port, password) is None
    with psycopg.connect(pg_server.dsn) as conn:
        row = conn.execute("SELECT auth_method FROM pg_hba_file_rules WHERE type = 'host'").fetchall()
        assert {method for (method,) in row} == {"scram-sha-256"}
        assert conn.execute(
            "SELECT rolpassword LIKE 'SCRAM-SHA-256$%' FROM pg_authid WHERE rolname = 'postgres'"
        ).fetchone() == (True,)


_LEGACY_HBA = "local all all trust\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n"


def test_a_cluster_created_with_trust_is_upgraded_on_its_next_start(
    pg_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pg = EmbeddedPostgres(pg_dir / "data", port=free_port(), fsync=False)
    with pg:
        assert "rewriting it" not in caplog.text  # a fresh cluster gets our pg_hba.conf silently
        # Make it what older versions left behind: trust everywhere, no password, no password file.
        with psycopg.connect(host=str(pg.data_dir), port=pg.port, user="postgres", autocommit=True) as conn:
            conn.execute("ALTER ROLE postgres PASSWORD NULL")
            (pg.data_dir / "pg_hba.conf").write_text(_LEGACY_HBA)
            conn.execute("SELECT pg_reload_conf()")
        pg.password_file.unlink()
        wait_until_blocking(lambda: tcp_login_error(pg.port) is None, "the legacy cluster trusts TCP")

        # Restarted by a new version while still running (the server is reused and reloaded) ...
        EmbeddedPostgres(pg_dir / "data", port=pg.port, fsync=False).start()
        assert "rewriting it: TCP connections now need the password" in caplog.text
        wait_until_blocking(
            lambda: "no password supplied" in (tcp_login_error(pg.port) or ""),
            "TCP logins without the password are refused",
        )
        assert tcp_login_error(pg.port, pg.password()) is None
        assert stat.S_IMODE(pg.password_file.stat().st_mode) == 0o600

    # ... and from cold: a legacy pg_hba.conf is replaced before the server reads it.
    (pg.data_dir / "pg_hba.conf").write_text(_LEGACY_HBA)
    with pg:
        assert "no password supplied" in (tcp_login_error(pg.port) or "")
        assert tcp_login_error(pg.port, pg.password()) is None


def test_a_password_file_others_can_read_is_refused(pg_dir: Path) -> None:
    pg = EmbeddedPostgres(pg_dir / "data", port=free_port(), fsync=False)
    pg.start()
    pg.stop()
    pg.password_file.chmod(0o644)
    with pytest.raises(EmbeddedPostgresError, match=r"readable only by its owner .*chmod 600 "):
        pg.start()
    assert not pg.is_running()
