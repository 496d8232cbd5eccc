"""Moving a pair between shards online: under load, across processes, and after a crash at each step."""

from __future__ import annotations

import asyncio
import re
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest

from client.gen.dialog.v1 import admin_service_pb2 as pb
from client.gen.dialog.v1 import admin_service_pb2_grpc, dialog_service_pb2_grpc
from client.gen.dialog.v1 import dialog_service_pb2 as dpb
from server.config import PoolConfig, ServerConfig
from server.dev.embedded_pg import EmbeddedPostgres
from server.errors import DialogMoving, ShardUnavailable
from server.moves.mover import STEP_BOUNDARIES
from server.placement import Placement
from server.routing import Pair, bucket_of, calculate_shard
from server.runtime.app import RunningServer, running_server
from server.storage.ids import MessageIdGenerator, id_time
from server.storage.overrides import delete_override_in, upsert_override_in
from tests.crashing_mover import CRASHED_EXIT, crashing_argv
from tests.faults import start_postgres, start_replica
from tests.pgfixtures import reachable_temp_dir
from tests.processes import child_env, run_async, write_server_config
from tests.support import (
    STATE_AFTER_CRASH,
    Metadata,
    Writer,
    expect_error,
    fresh_database,
    make_config,
    move_rows,
    other_shard,
    read_all,
    replay,
    retry_delay,
    rows_for_pair,
    status_details,
    wait_until,
)


def preload(config: ServerConfig, shard_id: int, pair: tuple[int, int], count: int) -> list[str]:
    """Write `count` messages of the pair straight into a shard table; returns their ids in order."""
    low, high = Pair.of(*pair)
    ids = MessageIdGenerator()
    rows = []
    for i in range(count):
        message_id = ids.next()
        sender, recipient = (low, high) if i % 2 == 0 else (high, low)
        rows.append(
            (message_id, low, high, bucket_of(low, high), sender, recipient, f"old {i}", id_time(message_id))
        )
    shard = config.shards[shard_id]
    with psycopg.connect(shard.dsn) as conn, conn.cursor() as cur:
        cur.executemany(
            f"INSERT INTO {shard.table} (message_id, user_low, user_high, bucket, from_user_id, to_user_id, "
            "text, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            rows,
        )
    return [str(r[0]) for r in rows]


@asynccontextmanager
async def server_process(
    tmp_path: Path, config: ServerConfig, jwt_secret: str, crash_at: str | None = None
) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    """A `dialog-server` process on the same shards and control database; yields its address.

    With `crash_at`, its movers die at that step (tests/crashing_mover.py).
    """
    path = write_server_config(
        tmp_path / f"server-{time.monotonic_ns()}.toml", config, "127.0.0.1:0", jwt_secret
    )
    program = (
        [str(Path(sys.executable).parent / "dialog-server")]
        if crash_at is None
        else crashing_argv(crash_at, "dialog-server")
    )
    proc = await asyncio.create_subprocess_exec(
        *program,
        "--config",
        str(path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=child_env(),
    )
    assert proc.stdout is not None
    output = []
    try:
        async with asyncio.timeout(30):
            while line := (await proc.stdout.readline()).decode():
                output.append(line)
                if match := re.search(r"serving on port (\d+)", line):
                    break
            else:
                pytest.fail("server process did not start:\n" + "".join(output))
        drain = asyncio.create_task(proc.stdout.read())  # keep its pipe from filling up
        yield f"127.0.0.1:{match.group(1)}", proc
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()
        if "drain" in locals():
            await drain


async def test_move_under_load_loses_and_duplicates_nothing(
    tmp_path: Path,
    cluster_config: ServerConfig,
    jwt_secret: str,
    dialog_stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    admin_stub: admin_service_pb2_grpc.AdminServiceAsyncStub,
    admin_auth: Metadata,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    """Writers to the moving pair (through two server processes) and to other pairs keep going."""
    a, b = new_pair()
    source, target = calculate_shard(a, b, 4), other_shard(a, b)
    history = preload(cluster_config, source, (a, b), 2500)
    async with (
        server_process(tmp_path, cluster_config, jwt_secret) as (address, _),
        grpc.aio.insecure_channel(address) as channel,
    ):
        remote = dialog_service_pb2_grpc.DialogServiceStub(channel)
        others = [new_pair() for _ in range(2)]
        writers = [
            Writer(dialog_stub, a, b, auth_for(a)),
            Writer(remote, b, a, auth_for(b)),  # routes by the other process's mirror
            *(Writer(dialog_stub, x, y, auth_for(x)) for x, y in others),
        ]
        stop = asyncio.Event()
        tasks = [asyncio.create_task(w.run(stop)) for w in writers]
        await wait_until(lambda: all(len(w.acked) >= 10 for w in writers), "the writers are going")
        await admin_stub.SetShardOverride(
            pb.SetShardOverrideRequest(user_id_1=a, user_id_2=b, shard_id=target),
            metadata=admin_auth,
            timeout=60,
        )
        during = [len(w.acked) for w in writers]
        await wait_until(
            lambda: all(len(w.acked) >= n + 10 for w, n in zip(writers, during, strict=True)),
            "the writers wrote after the move",
        )
        stop.set()
        await asyncio.gather(*tasks)
        remote_read = await read_all(remote, b, a, auth_for(b))

    for w in writers:
        assert w.other_errors == [], w.other_errors
    assert all(w.moving_retries == 0 for w in writers[2:]), "other pairs never pause"
    # The pause is bounded: well under the writer's 100 retries.
    assert max(w.longest_pause for w in writers[:2]) < 10
    moved_acked = writers[0].acked + writers[1].acked
    read_back = await read_all(dialog_stub, a, b, auth_for(a))
    assert read_back == remote_read, "both processes read the same dialog"
    assert len(read_back) == len(set(read_back)), "no duplicates"
    assert read_back == sorted(read_back), "in message id (time) order"
    assert set(read_back) == set(history) | set(moved_acked), "every acknowledged message, nothing else"
    for w in writers[:2]:
        positions = [read_back.index(i) for i in w.acked]
        assert positions == sorted(positions), "each writer's messages in the order they were acknowledged"
    rows = rows_for_pair(cluster_config, (a, b))
    assert list(rows) == [target] and len(rows[target]) == len(history) + len(moved_acked)
    for (x, y), w in zip(others, writers[2:], strict=True):
        assert await read_all(dialog_stub, x, y, auth_for(x)) == w.acked


async def route_stale(server: Any, config: ServerConfig, pair: Pair) -> None:
    """Make this process route `pair` by the hash again, in memory only, as if it had not seen the
    flip yet, once the move's own NOTIFY has been applied (else it could arrive later and undo this).

    Notifications reach the listener in commit order: once a marker committed after the move is
    applied, the move's is too. The marker pins an unused pair, and is removed again afterwards."""
    marker = Pair.of(*(secrets.randbelow(2**62) + 1 for _ in range(2)))
    async with await psycopg.AsyncConnection.connect(config.control_dsn, autocommit=True) as conn:
        await upsert_override_in(conn, marker, 0)
        router = server.placement.router
        await wait_until(lambda: router.override_of(marker) == 0, "the marker notification was applied")
        await delete_override_in(conn, marker)
    router.discard(pair)


async def test_stale_process_gets_a_retryable_error_not_the_old_shard(
    server: RunningServer,
    cluster_config: ServerConfig,
    dialog_stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    """A writer or reader whose routing still names the source is refused there once the pair moved."""
    a, b = new_pair()
    source, target = calculate_shard(a, b, 4), other_shard(a, b)
    preload(cluster_config, source, (a, b), 3)
    mover = server.placement.mover(server.shards)
    pair = Pair.of(a, b)
    await mover.move_pair(pair, target)
    await route_stale(server, cluster_config, pair)
    try:
        err = await expect_error(
            dialog_stub.SendMessage(
                dpb.SendMessageRequest(from_user_id=a, to_user_id=b, text="stale"), metadata=auth_for(a)
            ),
            grpc.StatusCode.UNAVAILABLE,
        )
        info, _ = status_details(err)
        assert info is not None and info.reason == "DIALOG_MOVING"
        assert retry_delay(err) == DialogMoving.RETRY_AFTER_SECONDS
        err = await expect_error(
            dialog_stub.GetDialog(dpb.GetDialogRequest(user_id=a, peer_user_id=b), metadata=auth_for(a)),
            grpc.StatusCode.UNAVAILABLE,
        )
        assert status_details(err)[0].reason == "DIALOG_MOVING"  # type: ignore[union-attr]
    finally:
        server.placement.router.set(pair, target)
    assert list(rows_for_pair(cluster_config, (a, b))) == [target]


async def test_a_call_to_a_moving_dialog_waits_for_the_flip_instead_of_failing(
    server: RunningServer,
    cluster_config: ServerConfig,
    dialog_stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    """The server holds the refused call until its routing changes, then serves it from the new shard."""
    a, b = new_pair()
    source, target = calculate_shard(a, b, 4), other_shard(a, b)
    history = preload(cluster_config, source, (a, b), 3)
    pair = Pair.of(a, b)
    await server.placement.mover(server.shards).move_pair(pair, target)
    await route_stale(server, cluster_config, pair)
    waits = server.placement.moving_waits
    send = asyncio.ensure_future(
        dialog_stub.SendMessage(
            dpb.SendMessageRequest(from_user_id=a, to_user_id=b, text="held"),
            metadata=auth_for(a),
            timeout=20,
        )
    )
    read = asyncio.ensure_future(
        dialog_stub.GetDialog(
            dpb.GetDialogRequest(
                user_id=b, peer_user_id=a, page_size=3, order=dpb.MESSAGE_ORDER_OLDEST_FIRST
            ),
            metadata=auth_for(b),
            timeout=20,
        )
    )
    try:
        await wait_until(lambda: server.placement.moving_waits >= waits + 2, "both calls were refused")
        assert not send.done() and not read.done(), "refused, but waiting rather than failing"
    finally:
        server.placement.router.set(pair, target)  # the flip's NOTIFY arrives
    sent, page = await send, await read
    assert [m.message_id for m in page.messages] == history
    assert [str(r[0]) for r in rows_for_pair(cluster_config, (a, b))[target]] == [
        *history,
        sent.message.message_id,
    ]


async def test_a_call_waiting_out_a_move_wakes_on_the_routing_change_itself() -> None:
    """No polling: the change of routing wakes the waiting call (a waiter would otherwise run
    every few ms), and it calls the shard the new routing names."""
    placement = Placement("postgresql://unused", 4, PoolConfig(), moving_wait=60.0)
    where = placement.resolve(1, 2)
    moved_to = (where.shard_id + 1) % 4
    called: list[int] = []

    async def call(shard_id: int) -> int:
        called.append(shard_id)
        if shard_id == where.shard_id:
            raise DialogMoving(shard_id)
        return shard_id

    waiting = asyncio.ensure_future(placement.through_moves(where, call))
    for _ in range(100):
        await asyncio.sleep(0)
    assert called == [where.shard_id] and not waiting.done()
    placement.router.set(where.pair, moved_to)
    await asyncio.sleep(0)  # one turn of the loop: the woken call runs
    assert waiting.done() and waiting.result() == moved_to
    assert called == [where.shard_id, moved_to]


async def test_a_call_waiting_out_a_move_gives_up_with_dialog_moving_after_moving_wait() -> None:
    placement = Placement("postgresql://unused", 4, PoolConfig(), moving_wait=0.05)
    where = placement.resolve(1, 2)
    called: list[int] = []

    async def call(shard_id: int) -> int:
        called.append(shard_id)
        raise DialogMoving(shard_id)

    with pytest.raises(DialogMoving):
        await asyncio.wait_for(placement.through_moves(where, call), 5)
    # A change that does not move the pair away wakes the call, which finds it still moving.
    waiting = asyncio.ensure_future(placement.through_moves(where, call))
    await asyncio.sleep(0)
    placement.router.set(Pair.of(3, 4), 0)
    with pytest.raises(DialogMoving):
        await asyncio.wait_for(waiting, 5)
    assert called == [where.shard_id] * 3
    assert placement.moving_waits == 2


@pytest.mark.parametrize("step", STEP_BOUNDARIES)
async def test_move_crashed_at_each_step_completes_on_rerun(
    step: str,
    tmp_path: Path,
    cluster_config: ServerConfig,
    jwt_secret: str,
    dialog_stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    admin_stub: admin_service_pb2_grpc.AdminServiceAsyncStub,
    admin_auth: Metadata,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    a, b = new_pair()
    source, target = calculate_shard(a, b, 4), other_shard(a, b)
    history = preload(cluster_config, source, (a, b), 1500)
    async with server_process(tmp_path, cluster_config, jwt_secret, crash_at=step) as (address, proc):
        async with grpc.aio.insecure_channel(address) as channel:
            doomed = admin_service_pb2_grpc.AdminServiceStub(channel)
            await expect_error(
                doomed.SetShardOverride(
                    pb.SetShardOverrideRequest(user_id_1=a, user_id_2=b, shard_id=target), metadata=admin_auth
                ),
                grpc.StatusCode.UNAVAILABLE,
            )
        assert await proc.wait() == CRASHED_EXIT, "the mover process died at the step"
    assert move_rows(cluster_config, (a, b)) == [(STATE_AFTER_CRASH[step], source, target)]
    # The same request again (here through another server) completes the move.
    reply = await admin_stub.SetShardOverride(
        pb.SetShardOverrideRequest(user_id_1=a, user_id_2=b, shard_id=target), metadata=admin_auth, timeout=60
    )
    assert reply.override.shard_id == target
    assert move_rows(cluster_config, (a, b)) == [("done", source, target)]
    rows = rows_for_pair(cluster_config, (a, b))
    assert list(rows) == [target] and [str(r[0]) for r in rows[target]] == history
    sent = await dialog_stub.SendMessage(
        dpb.SendMessageRequest(from_user_id=b, to_user_id=a, text="after"), metadata=auth_for(b)
    )
    assert await read_all(dialog_stub, a, b, auth_for(a)) == [*history, sent.message.message_id]


async def test_dialogctl_moves_lists_and_resumes_a_crashed_move(
    tmp_path: Path,
    cluster_config: ServerConfig,
    jwt_secret: str,
    dialog_stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    auth_for: Callable[..., Metadata],
    admin_auth: Metadata,
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    a, b = new_pair()
    source, target = calculate_shard(a, b, 4), other_shard(a, b)
    history = preload(cluster_config, source, (a, b), 10)
    async with server_process(tmp_path, cluster_config, jwt_secret, crash_at="fenced") as (
        address,
        proc,
    ):
        async with grpc.aio.insecure_channel(address) as channel:
            await expect_error(
                admin_service_pb2_grpc.AdminServiceStub(channel).SetShardOverride(
                    pb.SetShardOverrideRequest(user_id_1=a, user_id_2=b, shard_id=target), metadata=admin_auth
                ),
                grpc.StatusCode.UNAVAILABLE,
            )
        assert await proc.wait() == CRASHED_EXIT
    # Fenced: writes of the pair are paused with the retryable error until the move completes.
    err = await expect_error(
        dialog_stub.SendMessage(
            dpb.SendMessageRequest(from_user_id=a, to_user_id=b, text="paused"), metadata=auth_for(a)
        ),
        grpc.StatusCode.UNAVAILABLE,
    )
    assert status_details(err)[0].reason == "DIALOG_MOVING"  # type: ignore[union-attr]
    config = write_server_config(tmp_path / "ctl.toml", cluster_config, "127.0.0.1:1", jwt_secret)
    ctl = Path(sys.executable).parent / "dialogctl"
    listed = (await run_async(ctl, "--config", str(config), "moves", "--json")).json()
    mine = [m for m in listed["moves"] if m["pair"] == list(Pair.of(a, b))]
    assert [(m["state"], m["source_shard"], m["target_shard"]) for m in mine] == [("fenced", source, target)]
    resumed = (await run_async(ctl, "--config", str(config), "moves", "--resume", "--json")).json()
    assert mine[0]["move_id"] in resumed["resumed"]
    assert move_rows(cluster_config, (a, b)) == [("done", source, target)]
    rows = rows_for_pair(cluster_config, (a, b))
    assert list(rows) == [target] and [str(r[0]) for r in rows[target]] == history
    sent = None
    for _ in range(100):  # the session server applies the flip's NOTIFY within moments
        try:
            sent = await dialog_stub.SendMessage(
                dpb.SendMessageRequest(from_user_id=b, to_user_id=a, text="after"), metadata=auth_for(b)
            )
            break
        except grpc.aio.AioRpcError as exc:
            assert status_details(exc)[0].reason == "DIALOG_MOVING"  # type: ignore[union-attr]
            await asyncio.sleep(retry_delay(exc))
    assert sent is not None
    assert await read_all(dialog_stub, a, b, auth_for(a)) == [*history, sent.message.message_id]


async def test_move_waits_for_the_targets_replica_before_flipping(
    pg_servers: list[EmbeddedPostgres], jwt_secret: str, new_pair: Callable[[], tuple[int, int]]
) -> None:
    """Readers may be sent to a replica of the new shard right after the flip: it must hold the copy."""
    database = fresh_database(pg_servers[0], "replica_move")
    with reachable_temp_dir("dialog-shard-move-replica-") as base:
        primary = start_postgres(base, "primary")
        replica = start_replica(primary, base, "replica")
        config = make_config(
            [database, primary.dsn],
            jwt_secret,
            shards=[
                {"id": 0, "dsn": database, "table": "messages_0"},
                {"id": 1, "dsn": primary.dsn, "table": "messages_1", "replica_dsns": [replica.dsn]},
            ],
        )
        a, b = new_pair()
        while calculate_shard(a, b, 2) != 0:
            a, b = new_pair()
        pair = Pair.of(a, b)
        async with running_server(config) as running:
            history = preload(config, 0, (a, b), 50)
            mover = running.placement.mover(running.shards, replica_wait_seconds=1.0)
            replay(replica, "pause")
            with pytest.raises(ShardUnavailable, match="has not replayed the copy"):
                await mover.move_pair(pair, 1)
            assert list(rows_for_pair(config, (a, b))) == [0, 1], "not flipped: the source keeps its rows"
            assert running.placement.resolve(a, b).shard_id == 0
            replay(replica, "resume")
            await mover.move_pair(pair, 1)
            assert list(rows_for_pair(config, (a, b))) == [1]
            with psycopg.connect(replica.dsn) as conn:
                on_replica = conn.execute(
                    "SELECT count(*) FROM messages_1 WHERE user_low = %s AND user_high = %s", tuple(pair)
                ).fetchone()
            assert on_replica == (len(history),), "the replica showed the copy when routing flipped"
