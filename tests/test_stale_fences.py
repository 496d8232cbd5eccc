"""A routing change that is not a move never leaves a dialog refused (issue 23, item 1).

A finished move leaves its source fenced `moved`. When routing goes back without a
move (the control tables restored from a backup taken before it, or shard_map edited
by hand), that fence used to refuse the pair on the shard routing names, for good.
Here a real server and real `dialogctl backup/restore/verify` processes show that the
restore (or `verify --repair` after a hand edit) lifts it and brings the messages
home: SendMessage succeeds at the first try and GetDialog returns every acknowledged
message exactly once. Each test has a cluster of its own (fresh databases, own server).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import psycopg

from client.gen.dialog.v1 import admin_service_pb2 as pb
from client.gen.dialog.v1 import admin_service_pb2_grpc, dialog_service_pb2_grpc
from client.gen.dialog.v1 import dialog_service_pb2 as dpb
from server.auth import issue_token
from server.config import ServerConfig
from server.dev.embedded_pg import EmbeddedPostgres
from server.routing import Pair, bucket_of, calculate_shard
from tests.processes import Result, write_server_config
from tests.support import Metadata, dialogctl, fresh_cluster, read_all, rows_for_pair, serving, wait_until


@dataclass
class Cluster:
    config: ServerConfig
    ctl_config: Path
    dialog: dialog_service_pb2_grpc.DialogServiceAsyncStub
    admin: admin_service_pb2_grpc.AdminServiceAsyncStub
    admin_auth: Metadata

    async def ctl(self, *args: str) -> Result:
        return await dialogctl(self.ctl_config, *args)

    def auth(self, user: int) -> Metadata:
        return (("authorization", f"Bearer {issue_token(self.config.auth, user_id=user)}"),)

    async def send(self, a: int, b: int, text: str) -> str:
        """SendMessage that must succeed at the first try (no DIALOG_MOVING); returns the id."""
        reply = await self.dialog.SendMessage(
            dpb.SendMessageRequest(
                from_user_id=a, to_user_id=b, text=text, request_id=text.replace(" ", "-")
            ),
            metadata=self.auth(a),
            timeout=10,
        )
        return str(reply.message.message_id)

    async def routed_by(self, a: int, b: int) -> pb.ResolveShardResponse:
        return await self.admin.ResolveShard(
            pb.ResolveShardRequest(user_id_1=a, user_id_2=b), metadata=self.admin_auth
        )


@asynccontextmanager
async def cluster(
    pg_servers: list[EmbeddedPostgres], jwt_secret: str, tmp_path: Path
) -> AsyncIterator[Cluster]:
    config = fresh_cluster(pg_servers, jwt_secret, 4)
    async with serving(config) as (running, channel):
        ctl_config = write_server_config(
            tmp_path / "ctl.toml", config, f"127.0.0.1:{running.port}", jwt_secret
        )
        admin_auth = (("authorization", f"Bearer {issue_token(config.auth, admin=True)}"),)
        yield Cluster(
            config,
            ctl_config,
            dialog_service_pb2_grpc.DialogServiceStub(channel),
            admin_service_pb2_grpc.AdminServiceStub(channel),
            admin_auth,
        )


async def pin_away(c: Cluster, a: int, b: int, away: int, acked: list[str]) -> None:
    """Pin the pair to `away` (its messages move there) and send two more messages."""
    await c.admin.SetShardOverride(
        pb.SetShardOverrideRequest(user_id_1=a, user_id_2=b, shard_id=away), metadata=c.admin_auth
    )
    acked += [await c.send(a, b, f"after the move {i}") for i in range(2)]
    assert set(rows_for_pair(c.config, (a, b))) == {away}


async def check_served_at_home(c: Cluster, a: int, b: int, home: int, acked: list[str]) -> None:
    """The server routes the pair home, takes a message at the first try, and reads each message once."""

    async def routed_home() -> bool:
        return (await c.routed_by(a, b)).source == pb.SHARD_SOURCE_HASH

    await wait_until(routed_home, "the server routes the pair by its hash again", within=20)
    try:
        acked.append(await c.send(a, b, "after the repair"))
    except grpc.aio.AioRpcError as err:
        raise AssertionError(f"SendMessage refused: {err.code().name} {err.details()}") from None
    read = await read_all(c.dialog, a, b, c.auth(a))
    assert len(read) == len(set(read)) and sorted(read) == sorted(acked)
    stored = rows_for_pair(c.config, (a, b))
    assert set(stored) == {home} and len(stored[home]) == len(acked)
    clean = await c.ctl("verify", "--json")
    assert clean.returncode == 0 and clean.json()["stale_fences"] == [], clean.stdout


async def test_restoring_the_control_tables_lifts_the_fence_a_later_move_left(
    pg_servers: list[EmbeddedPostgres],
    jwt_secret: str,
    tmp_path: Path,
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    async with cluster(pg_servers, jwt_secret, tmp_path) as c:
        a, b = new_pair()
        low, high = Pair.of(a, b)
        home = calculate_shard(a, b, 4)
        acked = [await c.send(a, b, f"before the backup {i}") for i in range(3)]
        backup = await c.ctl("backup", "--control", "--out", str(tmp_path / "control"))
        assert backup.returncode == 0, backup.stderr
        await pin_away(c, a, b, (home + 1) % 4, acked)

        restored = await c.ctl("restore", str(tmp_path / "control"), "--control", "--yes", "--json")
        assert restored.returncode == 0, restored.stderr
        (item,) = restored.json()["items"]
        reconciled = item["reconciled"]
        stale = [
            (f["shard_id"], f["bucket"], f["user_low"], f["user_high"]) for f in reconciled["stale_fences"]
        ]
        assert stale == [(home, bucket_of(low, high), low, high)]
        assert (reconciled["copied"], reconciled["deleted"], reconciled["unrepaired_findings"]) == (5, 5, 0)

        await check_served_at_home(c, a, b, home, acked)


async def test_restore_reports_what_it_reconciled_in_text(
    pg_servers: list[EmbeddedPostgres],
    jwt_secret: str,
    tmp_path: Path,
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    async with cluster(pg_servers, jwt_secret, tmp_path) as c:
        a, b = new_pair()
        home = calculate_shard(a, b, 4)
        assert (await c.ctl("backup", "--control", "--out", str(tmp_path / "control"))).returncode == 0
        await pin_away(c, a, b, (home + 2) % 4, [])
        restored = await c.ctl("restore", str(tmp_path / "control"), "--control", "--yes")
        assert restored.returncode == 0, restored.stderr
        assert (
            "reconciled with the restored routing: 1 stale fence row(s) fixed in 1 bucket(s)"
            in restored.stdout
        )
        assert "2 message(s) copied to their shard" in restored.stdout


async def test_verify_repair_after_a_hand_edit_of_the_shard_map_lifts_the_fence(
    pg_servers: list[EmbeddedPostgres],
    jwt_secret: str,
    tmp_path: Path,
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    async with cluster(pg_servers, jwt_secret, tmp_path) as c:
        a, b = new_pair()
        low, high = Pair.of(a, b)
        home, away = calculate_shard(a, b, 4), (calculate_shard(a, b, 4) + 3) % 4
        acked = [await c.send(a, b, f"before the move {i}") for i in range(3)]
        await pin_away(c, a, b, away, acked)
        # By hand, without the NOTIFY a SetShardOverride/DeleteShardOverride would send.
        with psycopg.connect(c.config.control_dsn) as conn:
            conn.execute("DELETE FROM shard_map WHERE user1 = %s AND user2 = %s", (low, high))

        found = await c.ctl("verify", "--json")
        assert found.returncode == 1
        report = json.loads(found.stdout)
        assert [(f["shard_id"], f["user_low"], f["state"]) for f in report["stale_fences"]] == [
            (home, low, "moved")
        ]
        assert [
            (f["kind"], f["shard_id"], f["expected_shard_id"], f["count"]) for f in report["findings"]
        ] == [("misplaced", away, home, 5)]

        repaired = await c.ctl("verify", "--repair", "--json")
        assert repaired.returncode == 0, repaired.stdout
        summary = repaired.json()
        assert summary["clean"] is True and summary["mirrors_reloaded"] >= 1
        assert (summary["fences_repaired"], summary["copied"], summary["deleted"]) == (1, 5, 5)

        await check_served_at_home(c, a, b, home, acked)
