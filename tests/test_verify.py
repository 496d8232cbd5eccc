"""`dialogctl verify` finds messages on the wrong shard and duplicated ones, names them, and repairs them."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from server.config import ServerConfig
from server.dev.embedded_pg import EmbeddedPostgres
from server.routing import Pair, bucket_of, calculate_shard
from server.storage.ids import MessageIdGenerator, id_time
from tests.processes import run_async, write_server_config
from tests.support import make_config

DIALOGCTL = Path(sys.executable).parent / "dialogctl"


@pytest.fixture(scope="module")
def verify_config(pg_servers: list[EmbeddedPostgres], jwt_secret: str) -> ServerConfig:
    """Four shards on the four servers, in databases of their own (nothing else writes there)."""
    for server in pg_servers:
        server.create_database("verify")
    return make_config([s.dsn_for("verify") for s in pg_servers], jwt_secret)


def plant(
    config: ServerConfig, shard_id: int, pair: tuple[int, int], message_id: uuid.UUID, text: str
) -> None:
    low, high = Pair.of(*pair)
    shard = config.shards[shard_id]
    with psycopg.connect(shard.dsn) as conn:
        conn.execute(
            f"INSERT INTO {shard.table} (message_id, user_low, user_high, bucket, from_user_id, to_user_id, "
            "text, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            (message_id, low, high, bucket_of(low, high), low, high, text, id_time(message_id)),
        )


def ids_on(config: ServerConfig, shard_id: int, pair: tuple[int, int]) -> list[str]:
    shard = config.shards[shard_id]
    with psycopg.connect(shard.dsn) as conn:
        rows = conn.execute(
            f"SELECT message_id FROM {shard.table} WHERE user_low = %s AND user_high = %s "
            "ORDER BY message_id",
            tuple(Pair.of(*pair)),
        ).fetchall()
    return [str(r[0]) for r in rows]


async def test_verify_reports_and_repairs_a_misplaced_and_a_duplicated_message(
    verify_config: ServerConfig, tmp_path: Path, jwt_secret: str, new_pair: Callable[[], tuple[int, int]]
) -> None:
    config = write_server_config(tmp_path / "verify.toml", verify_config, "127.0.0.1:1", jwt_secret)
    first = await run_async(DIALOGCTL, "--config", str(config), "verify", "--json")
    assert first.json()["clean"] is True, "an empty cluster is clean (and the schema gets created)"
    ids = MessageIdGenerator()
    pair = new_pair()
    home = calculate_shard(*pair, 4)
    wrong, other_wrong = (home + 1) % 4, (home + 2) % 4
    good, stray, copied = ids.next(), ids.next(), ids.next()
    plant(verify_config, home, pair, good, "at home")
    plant(verify_config, wrong, pair, stray, "only on a wrong shard")
    plant(verify_config, home, pair, copied, "twice")
    plant(verify_config, other_wrong, pair, copied, "twice")

    found = await run_async(DIALOGCTL, "--config", str(config), "verify", "--json")
    assert found.returncode == 1, found.stderr
    report = json.loads(found.stdout)
    assert report["clean"] is False and report["messages"] == 4
    findings = {
        (f["kind"], f["shard_id"], f["expected_shard_id"]): f["message_ids"] for f in report["findings"]
    }
    assert findings == {
        ("misplaced", wrong, home): [str(stray)],
        ("duplicate", other_wrong, home): [str(copied)],
    }

    text = await run_async(DIALOGCTL, "--config", str(config), "verify")
    assert text.returncode == 1 and str(stray) in text.stdout and "misplaced" in text.stdout

    repaired = await run_async(DIALOGCTL, "--config", str(config), "verify", "--repair", "--json")
    assert repaired.json()["clean"] is True
    assert (repaired.json()["copied"], repaired.json()["deleted"]) == (1, 2)
    assert ids_on(verify_config, home, pair) == sorted([str(good), str(stray), str(copied)])
    assert ids_on(verify_config, wrong, pair) == [] and ids_on(verify_config, other_wrong, pair) == []
    again = await run_async(DIALOGCTL, "--config", str(config), "verify", "--json")
    assert again.json()["clean"] is True and again.json()["findings"] == []


async def test_verify_leaves_conflicting_copies_to_a_person(
    verify_config: ServerConfig, tmp_path: Path, jwt_secret: str, new_pair: Callable[[], tuple[int, int]]
) -> None:
    config = write_server_config(tmp_path / "verify.toml", verify_config, "127.0.0.1:1", jwt_secret)
    pair = new_pair()
    home = calculate_shard(*pair, 4)
    message_id = MessageIdGenerator().next()
    plant(verify_config, home, pair, message_id, "one text")
    plant(verify_config, (home + 3) % 4, pair, message_id, "another text")
    result = await run_async(DIALOGCTL, "--config", str(config), "verify", "--repair", "--json")
    assert result.returncode == 1
    kinds = [(f["kind"], f["message_ids"]) for f in json.loads(result.stdout)["findings"]]
    assert kinds == [("conflict", [str(message_id)])]
    assert ids_on(verify_config, (home + 3) % 4, pair) == [str(message_id)], "not deleted"
    with psycopg.connect(verify_config.shards[(home + 3) % 4].dsn) as conn:
        conn.execute(
            f"DELETE FROM {verify_config.shards[(home + 3) % 4].table} WHERE message_id = %s", (message_id,)
        )
