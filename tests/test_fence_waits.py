"""The move fence without a lock per insert (server.storage.fences): the fence's writer waits out
the inserts that may have missed it, the fenced path still refuses, and earlier versions stay safe.

An insert "that may have missed the fence" is held open here the way a slow writer would be: a
connection runs the service's own INSERT statement in a transaction (it passes the guard, no
fence yet) and commits only after the fence committed.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from server.config import ServerConfig
from server.errors import DialogMoving, ShardUnavailable
from server.moves.mover import Mover
from server.resilience.db_errors import FENCED_SQLSTATE, shard_errors
from server.routing import Pair, bucket_of, calculate_shard
from server.runtime.app import RunningServer
from server.storage.fences import FenceState, FenceStore, lock_key, pair_fence_key
from server.storage.ids import MessageIdGenerator, id_time
from server.storage.messages import MessageStore, NewMessage, insert_params
from tests.support import (
    AWAITING_WRITERS,
    move_rows,
    other_shard,
    preload_pairs,
    rows_for_pair,
    until_one,
    write_guard_query,
)

_ids = MessageIdGenerator()


def _message(pair: tuple[int, int], text: str) -> NewMessage:
    low, high = Pair.of(*pair)
    message_id = _ids.next()
    return NewMessage(
        message_id, Pair(low, high), bucket_of(low, high), pair[0], pair[1], text, id_time(message_id), None
    )


async def _hold_insert(store: MessageStore, message: NewMessage) -> psycopg.AsyncConnection[Any]:
    """A connection whose open transaction ran the service's INSERT of `message` (commit or roll back)."""
    assert isinstance(store.pool.conninfo, str)
    conn = await psycopg.AsyncConnection.connect(store.pool.conninfo)
    cur = await conn.execute(store.insert_sql, insert_params(message))
    assert await cur.fetchone() is not None, "the insert passed the guard"
    return conn


@dataclass
class _HeldMove:
    """A pair on its hash shard with some history, whose movers leave an insert open after the copy."""

    pair: Pair
    source: int
    target: int
    history: set[str]
    #: The held insert's message, and (once a mover has copied) its open connection.
    late: NewMessage
    held: list[psycopg.AsyncConnection[Any]] = field(default_factory=list)


def _hold_an_insert_after_the_copy(
    server: RunningServer,
    cluster_config: ServerConfig,
    new_pair: Callable[[], tuple[int, int]],
    monkeypatch: pytest.MonkeyPatch,
) -> _HeldMove:
    """Every mover built from now on, once it has copied, leaves an insert of the pair open on its
    source shard, as a writer whose routing still names that shard would."""
    a, b = new_pair()
    move = _HeldMove(
        Pair.of(a, b),
        calculate_shard(a, b, 4),
        other_shard(a, b),
        preload_pairs(cluster_config, [(a, b)], 20),
        _message((a, b), "begun before the fence, committed after it"),
    )

    async def after_step(step: str) -> None:
        if step == "copied" and not move.held:
            move.held.append(await _hold_insert(server.shards.store(move.source), move.late))

    monkeypatch.setattr(Mover, "__init__", functools.partialmethod(Mover.__init__, after_step=after_step))
    return move


async def test_a_move_waits_for_an_insert_begun_before_its_fence_and_copies_its_row(
    server: RunningServer,
    cluster_config: ServerConfig,
    new_pair: Callable[[], tuple[int, int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    m = _hold_an_insert_after_the_copy(server, cluster_config, new_pair, monkeypatch)
    move = asyncio.ensure_future(server.placement.mover(server.shards).move_pair(m.pair, m.target))
    try:
        async with await psycopg.AsyncConnection.connect(
            cluster_config.shards[m.source].dsn, autocommit=True
        ) as observer:
            await until_one(observer, AWAITING_WRITERS)
        assert not move.done(), "the fence waits while the insert is open"
        assert move_rows(cluster_config, m.pair) == [("copying", m.source, m.target)]
        await m.held[0].commit()
        result = await move
    finally:
        for conn in m.held:
            await conn.close()
    assert result.shard_id == m.target
    rows = rows_for_pair(cluster_config, m.pair)
    assert list(rows) == [m.target], "nothing is left behind on the source"
    assert {str(r[0]) for r in rows[m.target]} == m.history | {str(m.late.message_id)}, (
        "the late row was copied"
    )


async def test_a_move_whose_fence_outwaits_its_bound_stops_and_reopens_the_source(
    server: RunningServer,
    cluster_config: ServerConfig,
    new_pair: Callable[[], tuple[int, int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    m = _hold_an_insert_after_the_copy(server, cluster_config, new_pair, monkeypatch)
    try:
        mover = server.placement.mover(server.shards, writers_wait_seconds=0.3)
        with pytest.raises(ShardUnavailable, match=r"still run after 0\.3 s") as stopped:
            await mover.move_pair(m.pair, m.target)
        assert stopped.value.shard_id == m.source
        assert move_rows(cluster_config, m.pair) == [("copying", m.source, m.target)]
        # Re-opened: the pair's inserts pass the guard on the source again.
        store = server.shards.store(m.source)
        async with store.pool.connection() as conn:
            cur = await conn.execute(write_guard_query(store.table), pair_fence_key(m.pair))
            assert await cur.fetchone() == (True,)
        await m.held[0].commit()
    finally:
        for conn in m.held:
            await conn.close()
    await server.placement.mover(server.shards).move_pair(m.pair, m.target)
    rows = rows_for_pair(cluster_config, m.pair)
    assert list(rows) == [m.target]
    assert {str(r[0]) for r in rows[m.target]} == m.history | {str(m.late.message_id)}


async def test_a_fence_refuses_inserts_after_its_commit_with_dialog_moving_and_moved_refuses_reads(
    server: RunningServer, new_pair: Callable[[], tuple[int, int]]
) -> None:
    pair = Pair.of(*new_pair())
    store = server.shards.store(calculate_shard(*pair, 4))
    fences = FenceStore(store.table)
    key = pair_fence_key(pair)
    # Another pair of the same bucket (its rows stay open) and the pair's own history.
    neighbour = next(
        Pair.of(pair.low, high)
        for high in range(pair.high + 1, pair.high + 100_000)
        if bucket_of(pair.low, high) == key[0]
    )
    await store.insert(_message(pair, "before"))
    try:
        async with store.pool.connection() as conn:
            await fences.set(conn, [key], FenceState.FENCED, None)
            with pytest.raises(psycopg.Error) as refused:
                await conn.execute(store.insert_sql, insert_params(_message(pair, "refused")))
        assert refused.value.sqlstate == FENCED_SQLSTATE
        assert refused.value.diag.message_primary == (
            f"the dialog of users {pair.low} and {pair.high} is moving to another shard"
        )
        with pytest.raises(DialogMoving):
            await store.insert(_message(pair, "refused"))
        assert (await store.insert(_message(neighbour, "a neighbour writes on"))).replayed is False
        page, _ = await store.page(pair, after=None, oldest_first=True, limit=10, max_bytes=10_000)
        assert [row[3] for row in page] == ["before"], "a fenced pair is still read where it is"
        async with store.pool.connection() as conn:
            await fences.set(conn, [key], FenceState.MOVED, None)
        with pytest.raises(DialogMoving):
            await store.page(pair, after=None, oldest_first=True, limit=10, max_bytes=10_000)
    finally:
        async with store.pool.connection() as conn:
            await fences.open(conn, [key])
    assert (await store.insert(_message(pair, "open again"))).replayed is False


async def test_the_fence_wait_works_for_a_role_without_superuser(
    server: RunningServer, cluster_config: ServerConfig, new_pair: Callable[[], tuple[int, int]]
) -> None:
    """pg_locks shows every backend's locks to any role: a mover need not be a superuser."""
    pair = Pair.of(*new_pair())
    shard = cluster_config.shards[calculate_shard(*pair, 4)]
    store = server.shards.store(shard.shard_id)
    role, password = f"fence_mover_{secrets.token_hex(4)}", secrets.token_hex(16)
    with psycopg.connect(shard.dsn, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN NOSUPERUSER PASSWORD '{password}'")
        admin.execute(
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON {shard.table}, {shard.table}_fences TO {role}"
        )
    held = await _hold_insert(store, _message(pair, "held by another role's backend"))
    try:
        dsn = make_conninfo(shard.dsn, user=role, password=password, passfile="")
        async with (
            await psycopg.AsyncConnection.connect(dsn, autocommit=True) as mover,
            await psycopg.AsyncConnection.connect(shard.dsn, autocommit=True) as observer,
        ):
            fence = asyncio.ensure_future(
                FenceStore(shard.table).set(mover, [pair_fence_key(pair)], FenceState.FENCED, None)
            )
            await until_one(observer, AWAITING_WRITERS)
            assert not fence.done()
            await held.commit()
            await fence
            await FenceStore(shard.table).open(mover, [pair_fence_key(pair)])
    finally:
        await held.close()
        with psycopg.connect(shard.dsn, autocommit=True) as admin:
            admin.execute(f"DROP OWNED BY {role}")
            admin.execute(f"DROP ROLE {role}")


async def test_an_earlier_movers_fence_row_is_refused_and_an_earlier_servers_insert_is_waited_for(
    server: RunningServer, cluster_config: ServerConfig, new_pair: Callable[[], tuple[int, int]]
) -> None:
    """Rolling upgrades: a fence row written without the wait (as earlier movers did) is refused;
    an earlier server's check (`<table>_writable`, the bucket's shared lock) is still kept, and
    this version's fence writer takes the exclusive lock it waits for."""
    pair = Pair.of(*new_pair())
    shard = cluster_config.shards[calculate_shard(*pair, 4)]
    key = pair_fence_key(pair)
    with (
        psycopg.connect(shard.dsn, autocommit=True) as conn,
        pytest.raises(psycopg.errors.CheckViolation, match=f"{shard.table}_fences_wait"),
    ):
        conn.execute(
            f"INSERT INTO {shard.table}_fences (bucket, user_low, user_high, state, move_id)"
            " VALUES (%s, %s, %s, 'fenced', 1)",
            key,
        )
    async with (
        await psycopg.AsyncConnection.connect(shard.dsn) as earlier,
        await psycopg.AsyncConnection.connect(shard.dsn, autocommit=True) as mover,
    ):
        cur = await earlier.execute(f"SELECT {shard.table}_writable(%s, %s, %s)", key)
        assert await cur.fetchone() == (True,)
        fence = asyncio.ensure_future(FenceStore(shard.table).set(mover, [key], FenceState.FENCED, None))
        await until_one(
            earlier,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            f" AND classid = {lock_key(shard.table) & 0xFFFFFFFF}::oid AND objid = {key[0]}::oid",
        )
        assert not fence.done()
        await earlier.commit()
        await fence
        with pytest.raises(psycopg.Error) as refused:
            await earlier.execute(f"SELECT {shard.table}_writable(%s, %s, %s)", key)
        assert refused.value.sqlstate == FENCED_SQLSTATE
        await earlier.rollback()
        await FenceStore(shard.table).open(mover, [key])


async def test_a_fence_change_outwaiting_its_bound_is_unavailable_and_stays_committed(
    server: RunningServer, new_pair: Callable[[], tuple[int, int]]
) -> None:
    pair = Pair.of(*new_pair())
    store = server.shards.store(calculate_shard(*pair, 4))
    held = await _hold_insert(store, _message(new_pair(), "another pair's insert, left open"))
    fences = FenceStore(store.table)
    try:
        async with store.pool.connection() as conn:
            with pytest.raises(ShardUnavailable, match=r"still run after 0\.2 s \(left open\?\)"):
                async with shard_errors(store.shard_id):
                    await fences.set(conn, [pair_fence_key(pair)], FenceState.FENCED, None, wait_seconds=0.2)
            assert [r.state for r in await fences.rows(conn) if r.key == pair_fence_key(pair)] == ["fenced"]
            await fences.open(conn, [pair_fence_key(pair)])
    finally:
        await held.rollback()
        await held.close()
