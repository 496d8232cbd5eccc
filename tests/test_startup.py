"""Startup fails fast with a message an operator can act on; config errors say what to fix."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from server.config import LONGEST_TABLE_SUFFIX, MAX_TABLE_NAME_CHARS, ConfigError, config_from_mapping
from server.dev.embedded_pg import EmbeddedPostgres, EmbeddedPostgresError
from server.errors import StartupError
from server.runtime.app import running_server
from server.runtime.eventloop import EventLoopError
from server.runtime.supervisor import ListenError
from server.storage.pools import DatabaseStartupError
from server.storage.schema import migrate_shard
from tests.pgfixtures import free_port
from tests.processes import child_env
from tests.support import fresh_database, make_config


async def test_unreachable_shard_names_the_shard_and_the_reason(
    pg_servers: list[EmbeddedPostgres], jwt_secret: str
) -> None:
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/dialog"
    config = make_config(
        [pg_servers[0].dsn, pg_servers[1].dsn, dead, pg_servers[3].dsn],
        jwt_secret,
        resilience={"require_all_shards": True},
    )
    started = time.monotonic()
    with pytest.raises(DatabaseStartupError) as caught:
        async with running_server(config):
            pytest.fail("server must not start")
    message = str(caught.value)
    assert message.startswith("shard-2 (127.0.0.1:") and "/dialog): " in message
    assert "refused" in message.lower()
    assert time.monotonic() - started < 10


def test_dialog_server_exits_2_with_one_line_error(tmp_path: Path, jwt_secret: str) -> None:
    config = tmp_path / "bad.toml"
    port = free_port()
    config.write_text(
        f'[auth]\njwt_secret = "{jwt_secret}"\n[[shards]]\nid = 0\ndsn = "postgresql://u:pw@127.0.0.1:{port}/db"\n'
    )
    result = subprocess.run(
        [str(Path(sys.executable).parent / "dialog-server"), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert f"shard-0 (127.0.0.1:{port}/db)" in result.stderr
    assert "pw" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"auth": {"jwt_secret": "k" * 32}}, "no shards configured"),
        ({"shards": [{"id": 0, "dsn": "postgresql://h/db"}]}, "no JWT key"),
        ({"auth": {"jwt_secret": "k" * 32}, "shards": [{"id": 1, "dsn": "postgresql://h/db"}]}, "0..0"),
        (
            {
                "auth": {"jwt_secret": "k" * 32},
                "shards": [{"id": 0, "dsn": "postgresql://h/db", "table": "x;drop"}],
            },
            "table name",
        ),
        (
            {
                "auth": {"jwt_secret": "k" * 32},
                "shards": [
                    {"id": 0, "dsn": "postgresql://h/db"},
                    {"id": 1, "dsn": "postgresql://h/db", "table": "messages_0"},
                ],
            },
            "reuses table",
        ),
        (
            {
                "auth": {"jwt_secret": "k" * 32},
                "shards": [{"id": 0, "dsn": "postgresql://h/db"}],
                "pool": {"size": 3},
            },
            "unknown keys",
        ),
        (
            {
                "auth": {"jwt_secret": "k" * 32},
                "shards": [{"id": 0, "dsn": "postgresql://h/db"}],
                "max_connection_age_seconds": -1,
            },
            "max_connection_age_seconds must be 0",
        ),
    ],
)
def test_config_errors_say_what_to_fix(data: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        config_from_mapping(data, {}, base_dir=Path.cwd())


def test_environment_gives_the_seed_layout_from_one_dsn() -> None:
    config = config_from_mapping(
        {}, {"DIALOG_SHARD_DSNS": "postgresql://h/db", "DIALOG_JWT_SECRET": "k" * 32}, base_dir=Path.cwd()
    )
    assert [(s.shard_id, s.table) for s in config.shards] == [(i, f"messages_{i}") for i in range(4)]
    assert config.control_dsn == "postgresql://h/db"


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"shutdown_grace_seconds": "soon"}, "invalid configuration value"),
        ({"pool": {"min_size": "x"}}, "invalid configuration value"),
        ({"auth": "not a table"}, "invalid configuration value"),
        ({"pool": {"max_write_batch_wait_ms": -1}}, "max_write_batch_wait_ms must be between 0 and 1000"),
        ({"pool": {"max_write_batch_wait_ms": 5000}}, "max_write_batch_wait_ms must be between 0 and 1000"),
    ],
)
def test_values_of_the_wrong_type_are_config_errors(data: dict[str, Any], fragment: str) -> None:
    base = {"auth": {"jwt_secret": "k" * 32}, "shards": [{"id": 0, "dsn": "postgresql://h/db"}]}
    with pytest.raises(ConfigError, match=fragment):
        config_from_mapping({**base, **data}, {}, base_dir=Path.cwd())


@pytest.mark.parametrize(
    ("resilience", "shard", "fragment"),
    [
        ({"retries": 3}, {}, r"unknown keys in \[resilience\]: retries"),
        ({"probe_timeout": 0}, {}, "durations must be positive"),
        ({"failure_threshold": 0}, {}, "at least 1"),
        ({"retry_backoff": 2.0}, {}, "retry_backoff must be"),
        ({"replica_max_lag": -1}, {}, "replica_max_lag"),
        ({"open_seconds": "soon"}, {}, "invalid configuration value"),
        ({}, {"replica_dsns": "postgresql://r/db"}, "replica_dsns must be a list"),
        ({}, {"replica_dsns": ["host='unterminated"]}, "replica DSN is not a valid"),
    ],
)
def test_resilience_config_errors_say_what_to_fix(
    resilience: dict[str, Any], shard: dict[str, Any], fragment: str
) -> None:
    data = {
        "auth": {"jwt_secret": "k" * 32},
        "shards": [{"id": 0, "dsn": "postgresql://h/db", **shard}],
        "resilience": resilience,
    }
    with pytest.raises(ConfigError, match=fragment):
        config_from_mapping(data, {}, base_dir=Path.cwd())


def test_resilience_config_is_read() -> None:
    config = config_from_mapping(
        {
            "auth": {"jwt_secret": "k" * 32},
            "shards": [{"id": 0, "dsn": "postgresql://h/db", "replica_dsns": ["postgresql://r/db"]}],
            "resilience": {"require_all_shards": "true", "replica_reads": True, "open_seconds": 0.5},
        },
        {},
        base_dir=Path.cwd(),
    )
    assert config.resilience.require_all_shards and config.resilience.replica_reads
    assert config.resilience.open_seconds == 0.5 and config.resilience.failure_threshold == 5
    assert config.shards[0].replica_dsns == ("postgresql://r/db",)


@pytest.mark.parametrize(
    ("data", "env", "pinned"),
    [
        ({}, {}, False),
        ({"pin_workers": True}, {}, True),
        ({"pin_workers": True}, {"DIALOG_PIN_WORKERS": "0"}, False),
        ({}, {"DIALOG_PIN_WORKERS": "1"}, True),
    ],
)
def test_pin_workers_comes_from_the_file_and_the_environment_wins(
    data: dict[str, Any], env: dict[str, str], pinned: bool
) -> None:
    base = {"auth": {"jwt_secret": "k" * 32}, "shards": [{"id": 0, "dsn": "postgresql://h/db"}]}
    assert config_from_mapping({**base, **data}, env, base_dir=Path.cwd()).pin_workers is pinned


def test_every_reason_not_to_start_is_a_startup_error() -> None:
    """`dialog-server` catches StartupError once; each startup failure must derive from it."""
    for error in (ConfigError, DatabaseStartupError, EmbeddedPostgresError, EventLoopError, ListenError):
        assert issubclass(error, StartupError), error


DIALOG_SERVER = Path(sys.executable).parent / "dialog-server"
_SHARD = [{"id": 0, "dsn": "postgresql://h/db"}]


def _refused_to_start(config: Path | None, env: dict[str, str]) -> str:
    """Run dialog-server, which must exit 2 with a one-line reason before touching a database."""
    result = subprocess.run(
        [str(DIALOG_SERVER), *(["--config", str(config)] if config else [])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=child_env(**env),
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


@pytest.mark.parametrize("source", ["environment", "file", "inline"])
def test_weak_jwt_secrets_are_refused_from_every_source(tmp_path: Path, source: str) -> None:
    weak = "changeme"
    (tmp_path / "secret").write_text(weak + "\n")
    auth = {"file": 'jwt_secret_file = "secret"', "inline": f'jwt_secret = "{weak}"', "environment": ""}
    config = tmp_path / "server.toml"
    config.write_text(f'[auth]\n{auth[source]}\n[[shards]]\nid = 0\ndsn = "postgresql://h/db"\n')
    env = {"DIALOG_JWT_SECRET": weak} if source == "environment" else {}
    named = {
        "environment": "DIALOG_JWT_SECRET",
        "file": f"the file {tmp_path / 'secret'}",
        "inline": "[auth] jwt_secret",
    }
    stderr = _refused_to_start(config, env)
    assert f"the JWT secret from {named[source]} is shorter than 32 bytes (8)" in stderr
    assert weak not in stderr.replace("shorter", "")  # the secret itself is never echoed
    # The loader says the same, and 32 bytes are enough.
    data: dict[str, Any] = {"shards": _SHARD, "auth": {}}
    if source == "inline":
        data["auth"] = {"jwt_secret": weak}
    elif source == "file":
        data["auth"] = {"jwt_secret_file": str(tmp_path / "secret")}
    with pytest.raises(ConfigError, match="shorter than 32 bytes"):
        config_from_mapping(data, env, base_dir=tmp_path)
    assert config_from_mapping({"shards": _SHARD}, {"DIALOG_JWT_SECRET": "k" * 32}, base_dir=tmp_path)


def test_public_keys_without_issuer_and_audience_do_not_start(tmp_path: Path) -> None:
    (tmp_path / "jwks.json").write_text('{"keys": []}')
    config = tmp_path / "server.toml"
    config.write_text(
        'page_token_secret = "p"\n[auth]\nalgorithms = ["ES256"]\njwks_file = "jwks.json"\n'
        '[[shards]]\nid = 0\ndsn = "postgresql://h/db"\n'
    )
    assert "jwks_file needs issuer and audience" in _refused_to_start(config, {})
    assert "jwks_file needs audience" in _refused_to_start(config, {"DIALOG_JWT_ISSUER": "https://i.test"})


@pytest.mark.parametrize(
    ("auth", "fragment"),
    [
        ({"leeway_seconds": 301}, r"leeway_seconds must be in 0\.\.300"),
        ({"leeway_seconds": -1}, r"leeway_seconds must be in 0\.\.300"),
        ({"max_token_lifetime_seconds": -1}, "max_token_lifetime_seconds must be a number of seconds >= 0"),
        ({"max_admin_token_lifetime_seconds": "inf"}, "max_admin_token_lifetime_seconds must be"),
        ({"revocations_file": "revoked.json"}, r"unknown keys in \[auth\]: revocations_file"),
    ],
)
def test_token_checks_cannot_be_loosened_by_mistake(auth: dict[str, Any], fragment: str) -> None:
    data = {"auth": {"jwt_secret": "k" * 32, **auth}, "shards": _SHARD}
    with pytest.raises(ConfigError, match=fragment):
        config_from_mapping(data, {}, base_dir=Path.cwd())


def test_token_lifetimes_leeway_and_revocation_file_are_read(tmp_path: Path) -> None:
    auth = {
        "jwt_secret": "k" * 32,
        "leeway_seconds": 300,
        "max_token_lifetime_seconds": 600,
        "max_admin_token_lifetime_seconds": 0,
        "revocation_file": "revoked.json",
    }
    config = config_from_mapping({"auth": auth, "shards": _SHARD}, {}, base_dir=tmp_path).auth
    assert (config.leeway_seconds, config.max_lifetime(False), config.max_lifetime(True)) == (300, 600, 0)
    assert config.revocation_file == tmp_path / "revoked.json"
    default = config_from_mapping({"auth": {"jwt_secret": "k" * 32}, "shards": _SHARD}, {}, base_dir=tmp_path)
    assert (default.auth.max_lifetime(False), default.auth.max_lifetime(True)) == (86400, 3600)
    assert default.auth.revocation_file is None


@pytest.mark.parametrize(
    ("table", "fragment"),
    [
        ("messages_0\n", "must be lowercase ASCII letters"),  # `$` would have let the newline through
        ("Messages", "must be lowercase ASCII letters"),
        ("0messages", "not starting with a digit"),
        ("m\u00e9ssages", "must be lowercase ASCII letters"),
        ("m" * (MAX_TABLE_NAME_CHARS + 1), f"45 characters, longer than {MAX_TABLE_NAME_CHARS}"),
    ],
)
def test_table_names_are_checked_whole_and_leave_room_for_derived_names(table: str, fragment: str) -> None:
    data = {
        "auth": {"jwt_secret": "k" * 32},
        "shards": [{"id": 0, "dsn": "postgresql://h/db", "table": table}],
    }
    with pytest.raises(ConfigError, match=fragment):
        config_from_mapping(data, {}, base_dir=Path.cwd())


async def _derived_names(dsn: str, table: str) -> set[str]:
    """Names of the relations, constraints and functions `migrate_shard` created for `table`."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await migrate_shard(conn, table)
        rows = await conn.execute(
            "SELECT relname FROM pg_class WHERE relname LIKE %(p)s UNION ALL "
            "SELECT conname FROM pg_constraint WHERE conname LIKE %(p)s UNION ALL "
            "SELECT proname FROM pg_proc WHERE proname LIKE %(p)s",
            {"p": table[:30] + "%"},
        )
        return {str(name) for (name,) in await rows.fetchall()}


async def test_the_longest_table_name_keeps_every_derived_name_whole(pg_server: EmbeddedPostgres) -> None:
    dsn = fresh_database(pg_server, "tables")
    longest = f"t{uuid.uuid4().hex}".ljust(MAX_TABLE_NAME_CHARS, "x")
    config_from_mapping(
        {"auth": {"jwt_secret": "k" * 32}, "shards": [{"id": 0, "dsn": dsn, "table": longest}]},
        {},
        base_dir=Path.cwd(),
    )
    names = await _derived_names(dsn, longest)
    assert all(name.startswith(longest) for name in names), names  # nothing cut by PostgreSQL
    assert {longest + s for s in (LONGEST_TABLE_SUFFIX, "_writable_batch", "_pkey", "_fences_pkey")} <= names
    # One character more and PostgreSQL would cut the longest derived name: the limit is exact.
    longer = longest[:-1] + "yy"
    assert longer + LONGEST_TABLE_SUFFIX not in await _derived_names(dsn, longer)
