"""`dialogctl migrate` as a subprocess against real PostgreSQL: creates what is missing, then is a no-op."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

from server.config import ServerConfig
from server.dev.embedded_pg import EmbeddedPostgres
from tests.pgfixtures import free_port
from tests.processes import write_server_config
from tests.support import dialogctl, make_config


async def migrate(config_path: Path, *args: str) -> tuple[int, dict[str, dict[str, Any]], str]:
    result = await dialogctl(config_path, "migrate", *args)
    if "--json" not in args:
        return result.returncode, {}, result.stdout + result.stderr
    targets = {t["name"]: t for t in json.loads(result.stdout)["targets"]}
    return result.returncode, targets, result.stderr


def _config(tmp_path: Path, config: ServerConfig, jwt_secret: str) -> Path:
    return write_server_config(tmp_path / "dialog-shard.toml", config, "127.0.0.1:1", jwt_secret)


async def test_migrate_creates_the_schema_once(
    tmp_path: Path, pg_server: EmbeddedPostgres, jwt_secret: str
) -> None:
    database = f"migrate_{secrets.token_hex(4)}"
    pg_server.create_database(database)
    dsn = pg_server.dsn_for(database)
    path = _config(tmp_path, make_config([dsn, dsn], jwt_secret), jwt_secret)

    code, first, _ = await migrate(path, "--json")
    assert code == 0
    assert (
        first["shard-0"]["status"] == first["shard-1"]["status"] == first["control"]["status"] == "migrated"
    )
    assert {
        "messages_0",
        "messages_0_bucket_idx",
        "messages_0_dialog_idx",
        "messages_0_pkey",
        "messages_0_request_idx",
    } <= set(first["shard-0"]["created"])
    assert not any("messages_1" in name for name in first["shard-0"]["created"])
    assert "messages_1" in first["shard-1"]["created"]
    assert "shard_map" in first["control"]["created"]

    code, second, _ = await migrate(path, "--json")
    assert code == 0
    assert {(t["status"], tuple(t["created"])) for t in second.values()} == {("up to date", ())}

    code, _, table = await migrate(path)
    assert code == 0
    lines = table.splitlines()
    assert lines[0].split() == ["TARGET", "LOCATION", "STATUS", "CREATED"]
    assert [line.split()[0] for line in lines[1:]] == ["shard-0", "shard-1", "control"]
    assert all("up to date" in line for line in lines[1:])


async def test_migrate_reports_an_unreachable_shard_and_migrates_the_rest(
    tmp_path: Path, pg_server: EmbeddedPostgres, jwt_secret: str
) -> None:
    database = f"migrate_{secrets.token_hex(4)}"
    pg_server.create_database(database)
    good = pg_server.dsn_for(database)
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    path = _config(tmp_path, make_config([good, dead], jwt_secret), jwt_secret)

    code, targets, stderr = await migrate(path, "--json")
    assert code == 1
    assert targets["shard-0"]["status"] == "migrated"
    assert targets["shard-1"]["status"] == "failed"
    assert targets["shard-1"]["error"] == "Connection refused"
    assert targets["control"]["status"] == "migrated"
    assert stderr.startswith("dialogctl: migration failed for shard-1 (127.0.0.1:")
    assert len(stderr.splitlines()) == 1
