"""A backup set is consistent with respect to moves (issue 23, item 5).

Shards are dumped one after another, so a move between two dumps could leave a set that holds a
message twice or not at all. A backup of more than one item therefore holds the movers' lock for
all its dumps. Here a real server's move of a pair with many messages is held (its mover's
`after_step` hook) right after it copied them to the target, the lock still its own: a backup that
will not wait is refused at once and writes nothing, and a backup of the whole set waits, dumping
nothing, until the move has finished. That set, restored into the wiped cluster (after the pair
was moved again), routes the pair to the move's target and GetDialog returns every acknowledged
message of every pair exactly once, with nothing for the restore to reconcile. A move left
unfinished (its mover failed after the copy) is listed in the set's manifest, and after a restore
the servers' resumer completes it: every message once, on the move's target.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
from collections.abc import Callable
from pathlib import Path

import grpc
import psycopg
import pytest

from client.gen.dialog.v1 import admin_service_pb2 as pb
from client.gen.dialog.v1 import admin_service_pb2_grpc, dialog_service_pb2_grpc
from client.gen.dialog.v1 import dialog_service_pb2 as dpb
from server.auth import issue_token
from server.config import ServerConfig
from server.dev.embedded_pg import EmbeddedPostgres
from server.moves.mover import MOVER_LOCK, Mover
from server.routing import Pair, calculate_shard
from tests.processes import write_server_config
from tests.support import (
    Metadata,
    dialogctl,
    fresh_cluster,
    move_rows,
    preload_pairs,
    read_all,
    rows_for_pair,
    serving,
    wait_until,
)

MOVED_MESSAGES = 400


def _lock_holders(config: ServerConfig) -> list[str]:
    """The application names of the sessions holding the movers' lock."""
    with psycopg.connect(config.control_dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.objid = %s",
            (MOVER_LOCK,),
        ).fetchall()
    return [str(r[0]) for r in rows]


def _backup_connected(config: ServerConfig) -> bool:
    """Whether a `dialogctl backup` has a session on the control database (its lock's)."""
    with psycopg.connect(config.control_dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'dialogctl backup'"
        ).fetchone()
    return bool(row and row[0])


async def test_a_backup_set_waits_for_a_move_and_restores_every_message_exactly_once(
    pg_servers: list[EmbeddedPostgres],
    jwt_secret: str,
    tmp_path: Path,
    new_pair: Callable[[], tuple[int, int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    held, release = asyncio.Event(), asyncio.Event()

    async def hold_after_copy(step: str) -> None:
        if step == "copied" and not release.is_set():
            held.set()
            await release.wait()

    # The server builds its movers inside; every one of them gets the hook.
    monkeypatch.setattr(
        Mover, "__init__", functools.partialmethod(Mover.__init__, after_step=hold_after_copy)
    )
    config = fresh_cluster(pg_servers, jwt_secret, 4)
    moved = new_pair()
    home = calculate_shard(*moved, 4)
    away = (home + 1) % 4
    others = [new_pair() for _ in range(8)]

    async with serving(config) as (running, channel):  # the server creates the tables
        expected = {moved: preload_pairs(config, [moved], MOVED_MESSAGES)}
        expected |= {p: preload_pairs(config, [p], 5) for p in others}
        ctl_config = write_server_config(
            tmp_path / "ctl.toml", config, f"127.0.0.1:{running.port}", jwt_secret
        )
        dialog = dialog_service_pb2_grpc.DialogServiceStub(channel)
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        admin_auth: Metadata = (("authorization", f"Bearer {issue_token(config.auth, admin=True)}"),)

        def auth(user: int) -> Metadata:
            return (("authorization", f"Bearer {issue_token(config.auth, user_id=user)}"),)

        async def send(pair: tuple[int, int], text: str) -> str:
            reply = await dialog.SendMessage(
                dpb.SendMessageRequest(
                    from_user_id=pair[0], to_user_id=pair[1], text=text, request_id=text.replace(" ", "-")
                ),
                metadata=auth(pair[0]),
                timeout=10,
            )
            return str(reply.message.message_id)

        async def pin_away() -> None:
            await admin.SetShardOverride(
                pb.SetShardOverrideRequest(user_id_1=moved[0], user_id_2=moved[1], shard_id=away),
                metadata=admin_auth,
                timeout=120,
            )

        move = asyncio.create_task(pin_away())
        await wait_until(held.is_set, "the move has copied the pair and is held there", within=30)
        assert _lock_holders(config) == ["dialog-shard mover"]
        # Acknowledged while the move is under way (the source is not fenced yet): the move's
        # catch-up carries them, and the set must hold them once.
        expected[moved] |= {await send(moved, f"during the move {i}") for i in range(3)}

        # A set backup that will not wait is refused at once, in one line, and writes nothing.
        refused = await dialogctl(
            ctl_config, "backup", "--out", str(tmp_path / "refused"), "--lock-wait", "0"
        )
        assert refused.returncode == 1, refused.stderr
        assert len(refused.stderr.splitlines()) == 1, refused.stderr
        assert "movers' lock is held" in refused.stderr and "nothing was backed up" in refused.stderr
        assert not (tmp_path / "refused").exists()
        # One item is one snapshot of one database: it does not wait for moves.
        single = await dialogctl(
            ctl_config, "backup", "--control", "--out", str(tmp_path / "single"), "--json"
        )
        assert single.returncode == 0, single.stderr
        assert single.json()["movers_lock"] is False
        # A restore waits for moves too (a move between an item's restore and its row count, or
        # a restored unfinished move resumed meanwhile, would change what it checks).
        refused = await dialogctl(
            ctl_config, "restore", str(tmp_path / "single"), "--control", "--yes", "--lock-wait", "0"
        )
        assert refused.returncode == 1, refused.stderr
        assert len(refused.stderr.splitlines()) == 1, refused.stderr
        assert "movers' lock is held" in refused.stderr and "nothing was restored" in refused.stderr

        out = tmp_path / "set"
        backup = asyncio.create_task(
            dialogctl(ctl_config, "backup", "--out", str(out), "--lock-wait", "60", "--json")
        )
        await wait_until(
            lambda: _backup_connected(config), "the backup waits for the movers' lock", within=30
        )
        # It dumps nothing while the move holds the lock.
        assert not backup.done()
        assert not out.exists() or not any(out.iterdir())
        assert _lock_holders(config) == ["dialog-shard mover"]

        release.set()
        await move
        done = await backup
        assert done.returncode == 0, done.stderr
        assert "the backup waits up to 60 s (--lock-wait)" in done.stderr
        manifest = done.json()
        assert (manifest["movers_lock"], manifest["unfinished_moves"]) == (True, [])
        assert json.loads((out / "manifest.json").read_text())["movers_lock"] is True
        assert set(rows_for_pair(config, moved)) == {away}

        # After the backup: the pair goes home again (another move), a message is stored (the
        # restore loses it: it postdates the set), then every message table is wiped.
        await admin.DeleteShardOverride(
            pb.DeleteShardOverrideRequest(user_id_1=moved[0], user_id_2=moved[1]),
            metadata=admin_auth,
            timeout=120,
        )
        await send(moved, "after the backup")
        for shard in config.shards:
            with psycopg.connect(shard.dsn, autocommit=True) as conn:
                conn.execute(f"TRUNCATE {shard.table}")

        restored = await dialogctl(ctl_config, "restore", str(out), "--yes", "--json")
        assert restored.returncode == 0, restored.stderr
        items = restored.json()["items"]
        assert [i["name"] for i in items] == [f"shard-{s}" for s in range(4)] + ["control"]
        reconciled = items[-1]["reconciled"]
        # The set agrees with itself: no message on a shard its routing does not name, no stale fence.
        assert reconciled == {
            "stale_fences": [],
            "fences_repaired": 0,
            "copied": 0,
            "deleted": 0,
            "unrepaired_findings": 0,
        }

        async def routed_away() -> bool:
            where = await admin.ResolveShard(
                pb.ResolveShardRequest(user_id_1=moved[0], user_id_2=moved[1]), metadata=admin_auth
            )
            return where.source == pb.SHARD_SOURCE_OVERRIDE and where.shard_id == away

        await wait_until(routed_away, "the server routes the pair as the restored set says", within=20)
        for (a, b), ids in expected.items():
            read = await read_all(dialog, a, b, auth(a))
            assert len(read) == len(set(read)), f"pair {(a, b)}: a message read twice"
            assert set(read) == ids, f"pair {(a, b)}: {len(ids - set(read))} missing, {set(read) - ids}"
        stored = rows_for_pair(config, moved)
        assert set(stored) == {away} and len(stored[away]) == MOVED_MESSAGES + 3
        assert set(stored) == {away}
        clean = await dialogctl(ctl_config, "verify", "--json")
        assert clean.returncode == 0, clean.stdout
        # The restored pair takes messages at once, on the shard its restored routing names.
        await send(moved, "after the restore")
        assert len(rows_for_pair(config, moved)[away]) == MOVED_MESSAGES + 4


async def test_a_set_with_an_unfinished_move_lists_it_and_the_resumer_completes_it_after_restore(
    pg_servers: list[EmbeddedPostgres],
    jwt_secret: str,
    tmp_path: Path,
    new_pair: Callable[[], tuple[int, int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    failing = True

    async def fail_after_copy(step: str) -> None:
        if step == "copied" and failing:
            raise RuntimeError("the move fails after its copy (a test hook)")

    monkeypatch.setattr(
        Mover, "__init__", functools.partialmethod(Mover.__init__, after_step=fail_after_copy)
    )
    base = fresh_cluster(pg_servers, jwt_secret, 4)
    config = dataclasses.replace(base, resilience=dataclasses.replace(base.resilience, move_resume_after=0.5))
    pair = new_pair()
    away = (calculate_shard(*pair, 4) + 2) % 4
    async with serving(config) as (running, channel):
        ids = preload_pairs(config, [pair], 50)
        ctl_config = write_server_config(
            tmp_path / "ctl.toml", config, f"127.0.0.1:{running.port}", jwt_secret
        )
        dialog = dialog_service_pb2_grpc.DialogServiceStub(channel)
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        admin_auth: Metadata = (("authorization", f"Bearer {issue_token(config.auth, admin=True)}"),)
        with pytest.raises(grpc.aio.AioRpcError):
            await admin.SetShardOverride(
                pb.SetShardOverrideRequest(user_id_1=pair[0], user_id_2=pair[1], shard_id=away),
                metadata=admin_auth,
                timeout=60,
            )
        # The move's record stays unfinished (`copying`), its copy on the target: the resumer
        # keeps retrying it and failing at the same step while the hook is armed.
        assert [state for state, _, _ in move_rows(config, pair)] == ["copying"]

        out = tmp_path / "set"
        done = await dialogctl(ctl_config, "backup", "--out", str(out), "--json")
        assert done.returncode == 0, done.stderr
        manifest = done.json()
        assert manifest["movers_lock"] is True
        low, high = Pair.of(*pair)
        assert [
            (m["state"], m["target_shard"], m["user_low"], m["user_high"])
            for m in manifest["unfinished_moves"]
        ] == [("copying", away, low, high)]
        assert (
            "1 unfinished move(s) in the set"
            in (await dialogctl(ctl_config, "backup", "--out", str(tmp_path / "text"))).stdout
        )

        failing = False
        restored = await dialogctl(ctl_config, "restore", str(out), "--yes", "--json")
        assert restored.returncode == 0, restored.stderr

        async def completed() -> bool:
            return [s for s, _, _ in move_rows(config, pair)] == ["done"]

        await wait_until(completed, "the resumer completes the restored unfinished move", within=30)
        auth: Metadata = (("authorization", f"Bearer {issue_token(config.auth, user_id=pair[0])}"),)
        read = await read_all(dialog, pair[0], pair[1], auth)
        assert len(read) == len(set(read)) and set(read) == ids
        assert set(rows_for_pair(config, pair)) == {away}
