"""`dialogctl messages`, `backup` and `restore` as real subprocesses against the session's server and shards.

The restore test proves a shard comes back complete: messages are sent, shard k is backed up,
its table is dropped, and after `restore` every message is read back through the gRPC API and
the request_id index works again (a retry is still a replay, not a duplicate).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from client import AsyncAdminClient, AsyncDialogClient, ChannelSecurity, Order, ShardSource
from server.cli.pgtools import find_tool, run_tool
from server.config import ServerConfig
from server.routing import calculate_shard
from tests.support import rows_for_pair, token_provider

PLAINTEXT = ChannelSecurity(plaintext=True)
INVALID_ARGUMENT_EXIT = 64 + 3


async def _send(address: str, config: ServerConfig, a: int, b: int, texts: list[str]) -> list[Any]:
    async with AsyncDialogClient.connect(address, PLAINTEXT, token=token_provider(config, a)) as client:
        return [await client.send_message(a, b, t, request_id=f"r-{i}") for i, t in enumerate(texts)]


def _pair_on(shard: int, config: ServerConfig, new_pair: Callable[[], tuple[int, int]]) -> tuple[int, int]:
    while True:
        a, b = new_pair()
        if calculate_shard(a, b, config.num_shards) == shard:
            return a, b


async def test_messages_json_and_table(
    ctl: Callable[..., Any],
    address: str,
    cluster_config: ServerConfig,
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    a, b = new_pair()
    sent = await _send(address, cluster_config, a, b, ["first", "second\nline", "third " * 20])
    shard = calculate_shard(a, b, cluster_config.num_shards)

    listed = await ctl("messages", "--pair", str(a), str(b), "--json", "--page-size", "1", "--all")
    document = listed.json()
    assert [m["message"]["message_id"] for m in document["messages"]] == [s.message.message_id for s in sent]
    assert {(m["shard_id"], m["source"]) for m in document["messages"]} == {(shard, "SHARD_SOURCE_HASH")}
    assert document["next_page_token"] == ""

    first_page = (await ctl("messages", "--pair", str(a), str(b), "--page-size", "2", "--json")).json()
    assert len(first_page["messages"]) == 2
    assert first_page["next_page_token"]

    table = await ctl("messages", "--pair", str(a), str(b))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["SHARD", "MESSAGE_ID", "FROM", "TO", "CREATED", "PLACEMENT", "TEXT"]
    assert len(lines) == 1 + 3 + 1
    assert lines[-1] == "3 messages"
    assert all(sent[i].message.message_id in lines[1 + i] and " hash " in lines[1 + i] for i in range(3))
    assert "second line" in lines[2], "newlines in text are flattened in the table"
    assert lines[3].endswith("…")


async def test_messages_bad_shard_exits_with_the_grpc_code(
    ctl: Callable[..., Any], cluster_config: ServerConfig
) -> None:
    result = await ctl("messages", "--shard", str(cluster_config.num_shards))
    assert result.returncode == INVALID_ARGUMENT_EXIT
    assert result.stderr.startswith("dialogctl: INVALID_ARGUMENT: shard_id: must be a shard id")
    assert len(result.stderr.splitlines()) == 1


async def test_backup_then_restore_brings_a_dropped_shard_back_complete(
    ctl: Callable[..., Any],
    tmp_path: Path,
    address: str,
    cluster_config: ServerConfig,
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    shard = 2
    pairs = [_pair_on(shard, cluster_config, new_pair) for _ in range(3)]
    sent = {p: await _send(address, cluster_config, *p, [f"{p[0]}-{i}" for i in range(4)]) for p in pairs}
    out = tmp_path / "backup"

    # Everything by default: every shard and the control tables, one archive each.
    backup = (await ctl("backup", "--out", str(out), "--json")).json()
    names = [i["name"] for i in backup["items"]]
    assert names == [f"shard-{s.shard_id}" for s in cluster_config.shards] + ["control"]
    item = backup["items"][shard]
    # The shard's message table and the tables named after it (its fences).
    assert (item["name"], item["shard_id"]) == ("shard-2", 2)
    assert item["tables"][0] == "messages_2"
    assert all(t.startswith("messages_2_") for t in item["tables"][1:])
    control = backup["items"][-1]
    assert "shard_map" in control["tables"]
    assert not any(t.startswith("messages_") for t in control["tables"])
    assert item["rows"] >= 12
    assert (out / "shard-2.dump").stat().st_size == item["bytes"] > 0
    assert json.loads((out / "manifest.json").read_text())["items"] == backup["items"]
    # Private: the directory 0700, every file 0600, each archive's sha256 in the manifest.
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()} == {
        **{i["file"]: 0o600 for i in backup["items"]},
        "manifest.json": 0o600,
    }
    assert all(
        i["sha256"] == hashlib.sha256((out / i["file"]).read_bytes()).hexdigest() for i in backup["items"]
    )

    table = cluster_config.shards[shard]
    # Wipe the shard: its tables and the functions named after it (which no table archive holds).
    with psycopg.connect(table.dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE {', '.join(item['tables'])} CASCADE")
        functions = conn.execute(
            "SELECT oid::regprocedure::text FROM pg_proc WHERE proname LIKE %s", (f"{table.table}\\_%",)
        ).fetchall()
        assert functions, "the shard's fence functions exist (restore must bring them back)"
        for (signature,) in functions:
            conn.execute(f"DROP FUNCTION {signature}")
    assert rows_for_pair_safe(cluster_config, pairs[0]) is None

    refused = await ctl("restore", str(out), "--shard", str(shard))
    assert refused.returncode == 2
    assert "pass --yes" in refused.stderr

    restored = (await ctl("restore", str(out), "--shard", str(shard), "--yes", "--json")).json()
    assert [(i["name"], i["rows"]) for i in restored["items"]] == [("shard-2", item["rows"])]

    for (a, b), messages in sent.items():
        async with AsyncDialogClient.connect(
            address, PLAINTEXT, token=token_provider(cluster_config, a)
        ) as client:
            read = [m async for m in client.iter_dialog(a, b, page_size=3, order=Order.OLDEST_FIRST)]
        assert read == [s.message for s in messages]
    # The unique request_id index came back: a retry is a replay, not a second row.
    (a, b), messages = next(iter(sent.items()))
    again = await _send(address, cluster_config, a, b, [messages[0].message.text])
    assert again[0].replayed
    assert again[0].message == messages[0].message
    assert sum(len(r) for r in rows_for_pair(cluster_config, (a, b)).values()) == 4


def rows_for_pair_safe(config: ServerConfig, pair: tuple[int, int]) -> Any:
    """rows_for_pair, or None while a shard's table is missing."""
    try:
        return rows_for_pair(config, pair)
    except psycopg.errors.UndefinedTable:
        return None


async def test_control_tables_restore_and_the_servers_reload_them(
    ctl: Callable[..., Any],
    tmp_path: Path,
    address: str,
    cluster_config: ServerConfig,
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    out = tmp_path / "control"
    backup = (await ctl("backup", "--control", "--out", str(out), "--json")).json()
    ((name, tables),) = [(i["name"], i["tables"]) for i in backup["items"]]
    assert name == "control"
    assert "shard_map" in tables

    a, b = new_pair()
    target = (calculate_shard(a, b, cluster_config.num_shards) + 1) % cluster_config.num_shards
    async with AsyncAdminClient.connect(
        address, PLAINTEXT, token=token_provider(cluster_config, admin=True)
    ) as admin:
        await admin.set_override(a, b, target)
        assert (await admin.resolve_shard(a, b)).source == ShardSource.OVERRIDE

        restored = (await ctl("restore", str(out), "--control", "--yes", "--json")).json()
        (item,) = restored["items"]
        assert item["rows"] == backup["items"][0]["rows"]
        assert item["mirrors_reloaded"] >= 1

        # The override postdates the backup: once the server has reloaded, the pair is back on its hash.
        deadline = asyncio.get_running_loop().time() + 20
        while (await admin.resolve_shard(a, b)).source != ShardSource.HASH:
            assert asyncio.get_running_loop().time() < deadline, "the server never reloaded the shard map"
            await asyncio.sleep(0.05)


async def test_backup_and_restore_explain_what_is_wrong(ctl: Callable[..., Any], tmp_path: Path) -> None:
    missing_tools = await ctl(
        "backup", "--shard", "0", "--out", str(tmp_path / "b"), "--pg-bindir", "/nonexistent"
    )
    assert missing_tools.returncode == 2
    assert missing_tools.stderr.startswith("dialogctl: pg_dump not found in /nonexistent: install")

    not_a_backup = await ctl("restore", str(tmp_path), "--yes")
    assert not_a_backup.returncode == 2
    assert "not a dialogctl backup directory" in not_a_backup.stderr

    unknown = await ctl("backup", "--shard", "9", "--out", str(tmp_path / "c"))
    assert unknown.returncode == 2
    assert "no shard 9 in the config" in unknown.stderr


def _tampered(original: Path, into: Path, change: Callable[[dict[str, Any], Path], None]) -> Path:
    """A copy of the backup `original` in `into`, its manifest's one item and files changed by `change`."""
    shutil.copytree(original, into)
    manifest = json.loads((into / "manifest.json").read_text())
    (item,) = manifest["items"]
    change(item, into)
    (into / "manifest.json").write_text(json.dumps(manifest))
    return into


def _flip_a_byte(item: dict[str, Any], directory: Path) -> None:
    archive = directory / item["file"]
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))


def _outside(item: dict[str, Any], directory: Path) -> None:
    shutil.copy(directory / item["file"], directory.parent / f"outside-{directory.name}.dump")
    item["file"] = f"../outside-{directory.name}.dump"


def _absolute(item: dict[str, Any], directory: Path) -> None:
    item["file"] = str((directory / item["file"]).absolute())


def _symlink_out(item: dict[str, Any], directory: Path) -> None:
    target = directory.parent / f"elsewhere-{directory.name}.dump"
    shutil.copy(directory / item["file"], target)
    (directory / "link.dump").symlink_to(target)
    item["file"] = "link.dump"


def _table_the_archive_lacks(item: dict[str, Any], directory: Path) -> None:
    item["tables"].append(f"{item['tables'][0]}_extra")


def _table_of_another_item(item: dict[str, Any], directory: Path) -> None:
    item["tables"].append("shard_map")


TAMPERINGS = {
    "changed-byte": (_flip_a_byte, "does not match its checksum"),
    "dotdot-path": (_outside, "outside the backup directory"),
    "absolute-path": (_absolute, "outside the backup directory"),
    "symlink-out": (_symlink_out, "leads out of the backup directory"),
    "missing-table": (_table_the_archive_lacks, "the archive does not hold table messages_1_extra"),
    "foreign-table": (_table_of_another_item, "lists shard_map, not tables of shard-1"),
}


@pytest.mark.parametrize("tampering", list(TAMPERINGS))
async def test_restore_refuses_a_tampered_backup_before_changing_anything(
    ctl: Callable[..., Any],
    tmp_path: Path,
    address: str,
    cluster_config: ServerConfig,
    new_pair: Callable[[], tuple[int, int]],
    tampering: str,
) -> None:
    change, reason = TAMPERINGS[tampering]
    (await ctl("backup", "--shard", "1", "--out", str(tmp_path / "good"), "--json")).json()
    bad = _tampered(tmp_path / "good", tmp_path / "bad", change)
    # Stored after the backup: a restore that went ahead would remove it.
    pair = _pair_on(1, cluster_config, new_pair)
    await _send(address, cluster_config, *pair, ["after the backup"])

    refused = await ctl("restore", str(bad), "--shard", "1", "--yes")
    assert refused.returncode == 1, refused.stdout
    assert refused.stderr.startswith(f"dialogctl: refusing to restore from {bad}: "), refused.stderr
    assert reason in refused.stderr
    assert refused.stderr.rstrip().endswith("nothing was changed")
    assert [r[3] for r in rows_for_pair(cluster_config, pair)[1]] == ["after the backup"]


async def test_restore_refuses_an_old_manifest_without_checksums(
    ctl: Callable[..., Any], tmp_path: Path
) -> None:
    (await ctl("backup", "--shard", "0", "--out", str(tmp_path / "b"), "--json")).json()
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    manifest["format"] = 1
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(manifest))
    refused = await ctl("restore", str(tmp_path / "b"), "--yes")
    assert refused.returncode == 1
    assert "manifest has no checksums" in refused.stderr


async def test_restore_leaves_out_objects_the_manifest_does_not_list(
    ctl: Callable[..., Any], tmp_path: Path, cluster_config: ServerConfig
) -> None:
    out = tmp_path / "backup"
    (item,) = (await ctl("backup", "--shard", "3", "--out", str(out), "--json")).json()["items"]
    shard = cluster_config.shards[3]
    # An archive with one table more than its manifest lists, its checksum updated to match.
    with psycopg.connect(shard.dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS intruder")
        conn.execute("CREATE TABLE intruder (note text)")
        conn.execute("INSERT INTO intruder VALUES ('smuggled')")
    archive = out / item["file"]
    archive.unlink()
    tables = [f"--table={t}" for t in [*item["tables"], "intruder"]]
    run_tool(
        find_tool("pg_dump"),
        ["--format=custom", "--no-owner", f"--file={archive}", *tables],
        shard.dsn,
        "dump",
    )
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["items"][0]["sha256"] = hashlib.sha256(archive.read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest))
    with psycopg.connect(shard.dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE intruder")

    restored = await ctl("restore", str(out), "--shard", "3", "--yes", "--json")
    (result,) = restored.json()["items"]
    assert result["rows"] == item["rows"]
    assert result["left_out"] == ["TABLE intruder", "TABLE DATA intruder"]
    assert (
        "not restoring what the manifest does not list: TABLE intruder, TABLE DATA intruder"
        in restored.stderr
    )
    with psycopg.connect(shard.dsn) as conn:
        assert conn.execute("SELECT to_regclass('intruder')").fetchone() == (None,)
        assert conn.execute("SELECT to_regclass(%s)", (shard.table,)).fetchone() == (shard.table,)
