"""Per-shard write batching (server.storage.batching) against a real PostgreSQL, and through the service.

`asyncio.gather` queues every insert before the first batch starts, so what is batched is
deterministic here; the counters say which statements ran. The waits for company are checked
with waits far longer than a statement takes, so which of the two ended a wait is unambiguous.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
import psycopg
import pytest
import pytest_asyncio

from client.gen.dialog.v1 import dialog_service_pb2 as pb
from client.gen.dialog.v1 import dialog_service_pb2_grpc
from server.config import PoolConfig, ServerConfig
from server.dev.embedded_pg import EmbeddedPostgres
from server.errors import DialogMoving
from server.resilience import Shard
from server.resilience.deadline import rpc_deadline
from server.routing import ShardRouter
from server.storage.batching import BatchingMessageStore, CompanyForecast, WriteActivity
from server.storage.fences import FenceState, FenceStore, pair_fence_key, write_guard
from server.storage.ids import MessageIdGenerator, id_time
from server.storage.messages import InsertResult, NewMessage
from server.storage.pools import open_pool
from server.storage.schema import migrate_shard
from tests.support import AWAITING_WRITERS, rows_for_pair, until_one

_router = ShardRouter(4)
_ids = MessageIdGenerator()


@asynccontextmanager
async def _batching_store(dsn: str, **options: Any) -> AsyncIterator[BatchingMessageStore]:
    table = f"batch_{secrets.token_hex(6)}"
    pool = await open_pool("batch-test", dsn, PoolConfig(min_size=1, max_size=4))
    try:
        async with pool.connection() as conn:
            await migrate_shard(conn, table)
        batching = BatchingMessageStore(0, table, Shard.of_pool(0, pool), max_batch=8, **options)
        yield batching
        await batching.drain()
    finally:
        await pool.close()


@pytest_asyncio.fixture
async def store(pg_server: EmbeddedPostgres) -> AsyncIterator[BatchingMessageStore]:
    async with _batching_store(pg_server.dsn) as batching:
        yield batching


#: Longer than any statement here takes: a wait that ends sooner ended because company came.
_LONG_WAIT = 1.0


def _message(pair: tuple[int, int], text: str, request_id: str | None = None, **changes: Any) -> NewMessage:
    where = _router.resolve(*pair)
    message_id = _ids.next()
    fields: dict[str, Any] = {
        "message_id": message_id,
        "pair": where.pair,
        "bucket": where.bucket,
        "from_user_id": pair[0],
        "to_user_id": pair[1],
        "text": text,
        "created_at": id_time(message_id),
        "request_id": request_id,
        **changes,
    }
    return NewMessage(**fields)


async def _stored(store: BatchingMessageStore, results: list[InsertResult]) -> list[tuple[Any, ...]]:
    async with store.pool.connection() as conn:
        cur = await conn.execute(
            f"SELECT message_id, text FROM {store.table} WHERE message_id = ANY(%s) ORDER BY message_id",
            ([r.message.message_id for r in results],),
        )
        rows: list[tuple[Any, ...]] = await cur.fetchall()
        return rows


async def _hold_request_key(blocker: psycopg.AsyncConnection[Any], table: str, message: NewMessage) -> None:
    """An uncommitted row with `message`'s request key: an INSERT of `message` waits for `blocker`'s
    transaction (ON CONFLICT waits for the in-progress duplicate) until it rolls back."""
    await blocker.execute(
        f"INSERT INTO {table} (message_id, user_low, user_high, bucket, from_user_id,"
        " to_user_id, text, created_at, request_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            _ids.next(),
            message.pair.low,
            message.pair.high,
            message.bucket,
            message.from_user_id,
            message.to_user_id,
            "uncommitted",
            message.created_at,
            message.request_id,
        ),
    )


async def test_concurrent_inserts_share_statements_and_every_ack_is_stored_once(
    store: BatchingMessageStore, new_pair: Callable[[], tuple[int, int]]
) -> None:
    messages = [_message(new_pair(), f"message {i}") for i in range(20)]
    results = await asyncio.gather(*(store.insert(m) for m in messages))
    # The first goes alone at once; the 19 queued meanwhile go as 8 + 8 (a full batch starts a
    # second statement) and then the remaining 3 once nothing runs.
    assert (store.stats.single, store.stats.batches, store.stats.batched_messages) == (1, 3, 19)
    assert store.stats.largest == 8
    assert [r.message.message_id for r in results] == [m.message_id for m in messages]
    assert [r.message.text for r in results] == [m.text for m in messages]
    assert not any(r.replayed for r in results)
    rows = await _stored(store, results)
    assert sorted((m.message_id, m.text) for m in messages) == [tuple(r) for r in rows]
    # Alone, an insert goes at once through the single-row statement.
    alone = await store.insert(_message(new_pair(), "alone"))
    assert store.stats.single == 2 and not alone.replayed


async def test_request_id_duplicates_within_and_across_batches_are_replays(
    store: BatchingMessageStore, new_pair: Callable[[], tuple[int, int]]
) -> None:
    pair = new_pair()
    # The first insert of each gather goes alone; the ones queued behind it form the batch.
    _, first, again_same_batch, other = await asyncio.gather(
        store.insert(_message(new_pair(), "goes alone")),
        store.insert(_message(pair, "hello", "req-1")),
        store.insert(_message(pair, "hello", "req-1")),
        store.insert(_message(pair, "other", "req-2")),
    )
    assert store.stats.batches == 1
    assert not first.replayed and again_same_batch.replayed
    assert again_same_batch.message == first.message
    assert not other.replayed
    # In a later batch: the same request replays; a reused request_id with another text returns
    # the stored message (the service answers ALREADY_EXISTS), and a new message is stored.
    _, replay, reused, new = await asyncio.gather(
        store.insert(_message(new_pair(), "goes alone")),
        store.insert(_message(pair, "hello", "req-1")),
        store.insert(_message(pair, "different text", "req-2")),
        store.insert(_message(pair, "new", "req-3")),
    )
    assert store.stats.batches == 2
    assert replay.replayed and replay.message == first.message
    assert reused.replayed and reused.message == other.message and reused.message.text == "other"
    assert not new.replayed
    assert sorted(text for _, text in await _stored(store, [first, other, new])) == ["hello", "new", "other"]


async def test_a_failing_message_fails_alone_and_the_rest_of_its_batch_is_stored(
    store: BatchingMessageStore, new_pair: Callable[[], tuple[int, int]]
) -> None:
    good = [_message(new_pair(), f"good {i}") for i in range(5)]
    bad = _message(new_pair(), "bad", bucket=9999)  # violates the table's CHECK on bucket
    outcomes = await asyncio.gather(
        *(store.insert(m) for m in [*good[:2], bad, *good[2:]]), return_exceptions=True
    )
    assert (store.stats.single, store.stats.batches, store.stats.split) == (1, 1, 1)
    assert isinstance(outcomes[2], psycopg.errors.CheckViolation)
    stored = [o for o in outcomes if isinstance(o, InsertResult)]
    assert [r.message.message_id for r in stored] == [m.message_id for m in good]
    assert len(await _stored(store, stored)) == len(good)


async def test_a_fenced_dialog_in_a_batch_is_moving_and_the_others_are_stored(
    store: BatchingMessageStore, new_pair: Callable[[], tuple[int, int]]
) -> None:
    fenced_pair = new_pair()
    fenced = _message(fenced_pair, "to a moving dialog")
    async with store.pool.connection() as conn:
        await FenceStore(store.table).set(
            conn, [(fenced.bucket, fenced.pair.low, fenced.pair.high)], FenceState.FENCED, move_id=1
        )
    good = [_message(new_pair(), f"good {i}") for i in range(3)]
    outcomes = await asyncio.gather(
        *(store.insert(m) for m in [good[0], fenced, *good[1:]]), return_exceptions=True
    )
    assert (store.stats.batches, store.stats.split) == (1, 1)
    assert isinstance(outcomes[1], DialogMoving)
    stored = [o for o in outcomes if isinstance(o, InsertResult)]
    assert [r.message.message_id for r in stored] == [m.message_id for m in good]
    async with store.pool.connection() as conn:
        cur = await conn.execute(
            f"SELECT count(*) FROM {store.table} WHERE user_low = %s AND user_high = %s",
            (fenced.pair.low, fenced.pair.high),
        )
        assert await cur.fetchone() == (0,)


async def test_a_fence_waits_for_a_batch_in_flight_across_its_commit_then_refuses_the_dialog(
    store: BatchingMessageStore, new_pair: Callable[[], tuple[int, int]]
) -> None:
    # A batch statement that passed the guard before the fence committed (its snapshot could not
    # show it) commits after it: the fence's writer must not return before that commit, or the
    # mover's catch-up copy could miss the row. Here the statement is held after its guard, on the
    # uncommitted duplicate of one message's request key.
    good = [_message(new_pair(), f"good {i}", request_id=f"g{i}") for i in range(2)]
    fenced = _message(new_pair(), "to a dialog fenced while the batch ran", request_id="f")
    assert isinstance(store.pool.conninfo, str)
    async with (
        await psycopg.AsyncConnection.connect(store.pool.conninfo) as blocker,
        await psycopg.AsyncConnection.connect(store.pool.conninfo, autocommit=True) as observer,
    ):
        await _hold_request_key(blocker, store.table, good[0])
        # The first goes alone (nothing runs yet); the others leave together after it.
        lead = _message(new_pair(), "alone")
        inserts = asyncio.gather(*(store.insert(m) for m in [lead, good[0], fenced, good[1]]))
        await until_one(
            observer, "SELECT count(*) FROM pg_locks WHERE locktype = 'transactionid' AND NOT granted"
        )

        async def fence_then_count() -> int:
            async with store.pool.connection() as conn:
                await FenceStore(store.table).set(conn, [pair_fence_key(fenced.pair)], FenceState.FENCED, 1)
                cur = await conn.execute(
                    f"SELECT count(*) FROM {store.table} WHERE message_id = %s", (fenced.message_id,)
                )
                row = await cur.fetchone()
                return int(row[0]) if row else 0

        fence = asyncio.ensure_future(fence_then_count())
        await until_one(observer, AWAITING_WRITERS)
        assert not fence.done() and not inserts.done()
        await blocker.rollback()
        stored = await inserts
        assert await fence == 1, "the fence returned once the batch had committed, not before"
    assert (store.stats.single, store.stats.batches, store.stats.split) == (1, 1, 0)
    assert [r.message.message_id for r in stored] == [m.message_id for m in [lead, good[0], fenced, good[1]]]
    # A statement that starts after the fence committed sees it.
    again = [_message(new_pair(), "after", request_id="a"), _message(fenced.pair, "refused", request_id="r")]
    outcomes = await asyncio.gather(*(store.insert(m) for m in again), return_exceptions=True)
    assert isinstance(outcomes[1], DialogMoving) and isinstance(outcomes[0], InsertResult)


async def test_a_batch_in_a_bucket_with_another_pairs_fence_row_is_stored_in_one_statement(
    store: BatchingMessageStore, new_pair: Callable[[], tuple[int, int]]
) -> None:
    # A pair moved away by an override leaves a fence row in its bucket; the batch's own pairs are
    # open there, so the batch is stored in one statement.
    first = _message(new_pair(), "first")
    others = [_message(new_pair(), f"other {i}") for i in range(3)]
    async with store.pool.connection() as conn:
        await FenceStore(store.table).set(
            conn, [(first.bucket, 10**15, 10**15 + 1)], FenceState.MOVED, move_id=1
        )
    outcomes = await asyncio.gather(*(store.insert(m) for m in [first, *others]))
    assert (store.stats.batches, store.stats.split) == (1, 0)
    assert [r.message.message_id for r in outcomes] == [m.message_id for m in [first, *others]]
    assert all(not r.replayed for r in outcomes)
    assert len(await _stored(store, outcomes)) == 4


async def _per_row_checks(store: BatchingMessageStore, batch: list[NewMessage]) -> int:
    """How many `<table>_fence_check` calls the batch insert's fence guard made for `batch`."""
    # The view also holds calls of the backend's earlier transactions not flushed yet: take the
    # difference, inside one transaction (nothing is flushed before it ends).
    calls = (
        "SELECT coalesce(sum(calls), 0) FROM pg_stat_xact_user_functions"
        f" WHERE funcname = '{store.table}_fence_check'"
    )
    units = "(SELECT * FROM unnest(%s::smallint[], %s::bigint[], %s::bigint[]) AS k(b, lo, hi))"
    async with store.pool.connection() as conn, conn.transaction():
        await conn.execute("SET LOCAL track_functions = 'pl'")
        before = await (await conn.execute(calls)).fetchone()
        await conn.execute(
            f"SELECT {write_guard(store.table, units, many=True)}",
            ([m.bucket for m in batch], [m.pair.low for m in batch], [m.pair.high for m in batch]),
        )
        after = await (await conn.execute(calls)).fetchone()
        assert before is not None and after is not None
        return int(after[0] - before[0])


async def test_the_batch_fence_checks_only_the_rows_a_fence_row_can_cover(
    store: BatchingMessageStore, new_pair: Callable[[], tuple[int, int]]
) -> None:
    batch = [_message(new_pair(), f"m{i}") for i in range(4)]
    first = batch[0]
    in_first_bucket = sum(m.bucket == first.bucket for m in batch)
    fences = FenceStore(store.table)

    async def fence(key: tuple[int, int, int], state: FenceState) -> None:
        async with store.pool.connection() as conn:
            await fences.set(conn, [key], state, move_id=1)

    async def drop_fences() -> None:
        async with store.pool.connection() as conn:
            await conn.execute(f"DELETE FROM {store.table}_fences")

    assert await _per_row_checks(store, batch) == 0
    # Other pairs' rows in the batch's buckets (left by overrides that moved them away): no cover.
    for m in batch:
        await fence((m.bucket, 10**15 + m.bucket, 10**15 + m.bucket + 1), FenceState.MOVED)
    assert await _per_row_checks(store, batch) == 0
    # A row of one of the batch's own pairs (here re-opened): that row is checked.
    await fence((first.bucket, first.pair.low, first.pair.high), FenceState.OPEN)
    assert await _per_row_checks(store, batch) == 1
    await drop_fences()
    # A reshard's residue row is checked for the rows of its bucket, whether it covers the pair or not.
    async with store.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT mod(dialog_pair_hash(%s, %s), 16)", (first.pair.low, first.pair.high)
        )
        row = await cur.fetchone()
        assert row is not None
    await fence((first.bucket, -16, (row[0] + 1) % 16), FenceState.FENCED)
    assert await _per_row_checks(store, batch) == in_first_bucket
    await fence((first.bucket, -16, row[0]), FenceState.FENCED)
    with pytest.raises(psycopg.DatabaseError) as refused:
        await _per_row_checks(store, batch)
    assert refused.value.sqlstate == "DSM01"
    # So are a whole-bucket row and the pair's own fence row.
    for covering in ((first.bucket, 0, 0), (first.bucket, first.pair.low, first.pair.high)):
        await drop_fences()
        await fence(covering, FenceState.FENCED)
        with pytest.raises(psycopg.DatabaseError) as refused:
            await _per_row_checks(store, batch)
        assert refused.value.sqlstate == "DSM01"


async def test_conflicting_request_id_reuse_is_already_exists_for_that_call_only(
    dialog_stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    auth_for: Callable[..., Any],
    cluster_config: ServerConfig,
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    sender, peer = pair = new_pair()
    metadata = auth_for(sender)

    def send(text: str, request_id: str) -> Any:
        request = pb.SendMessageRequest(
            from_user_id=sender, to_user_id=peer, text=text, request_id=request_id
        )
        return dialog_stub.SendMessage(request, metadata=metadata, timeout=10)

    calls = [
        send("first", "shared"),
        send("second", "shared"),
        *(send(f"m{i}", f"own-{i}") for i in range(10)),
    ]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    shared = outcomes[:2]
    winners = [o for o in shared if isinstance(o, pb.SendMessageResponse)]
    losers = [o for o in shared if isinstance(o, grpc.aio.AioRpcError)]
    assert len(winners) == 1 and len(losers) == 1
    assert losers[0].code() == grpc.StatusCode.ALREADY_EXISTS
    assert all(isinstance(o, pb.SendMessageResponse) and not o.replayed for o in outcomes[2:])
    rows = [row for rows in rows_for_pair(cluster_config, pair).values() for row in rows]
    assert sorted(row[3] for row in rows) == sorted([winners[0].message.text, *(f"m{i}" for i in range(10))])


async def test_a_batch_runs_under_its_callers_latest_deadline(
    store: BatchingMessageStore, new_pair: Callable[[], tuple[int, int]], pg_server: EmbeddedPostgres
) -> None:
    # The batch task is started from whichever call ran before it (here the one that went alone,
    # with a short deadline); the statement must still get the time its own callers have.
    held_pair = new_pair()
    held = _message(held_pair, "held", "req-held")
    async with await psycopg.AsyncConnection.connect(pg_server.dsn) as blocker:
        await _hold_request_key(blocker, store.table, held)

        async def insert_within(message: NewMessage, seconds: float) -> InsertResult:
            rpc_deadline.set(time.monotonic() + seconds)
            return await store.insert(message)

        async def release_later() -> None:
            await asyncio.sleep(1.2)  # well past the first caller's deadline
            await blocker.rollback()

        results = await asyncio.gather(
            insert_within(_message(new_pair(), "goes alone, short deadline"), 0.5),
            insert_within(held, 30.0),
            insert_within(_message(new_pair(), "batched with it"), 30.0),
            release_later(),
        )
    assert store.stats.batches == 1
    stored = [r for r in results if isinstance(r, InsertResult)]
    assert len(stored) == 3 and not any(r.replayed for r in stored)
    assert stored[1].message.text == "held"
    assert len(await _stored(store, stored)) == 3


# -- waiting for company ------------------------------------------------------------------------


def test_the_forecast_expects_the_largest_recent_batch_and_probes_for_more() -> None:
    forecast = CompanyForecast(window=2, probe_every=4)
    assert forecast.expected == 1 and not forecast.waits_for_more(1)  # alone: at once
    forecast.batch_left(3, waited_out=False)  # 1 left
    assert forecast.expected == 3
    assert forecast.waits_for_more(2) and not forecast.waits_for_more(3)
    forecast.batch_left(2, waited_out=True)  # 2 left: a short one does not lower the forecast
    assert forecast.expected == 3
    # 3 left: the larger batch is out of the window, and the 4th batch is a probe
    forecast.batch_left(2, waited_out=False)
    assert forecast.expected == 2
    assert forecast.waits_for_more(2) and forecast.waits_for_more(5)  # a probe waits whatever it holds
    forecast.batch_left(5, waited_out=True)  # the probe found more callers
    assert forecast.expected == 5 and not forecast.waits_for_more(5)
    # A whole wait that brought nobody: inserts go at once again.
    forecast.batch_left(1, waited_out=True)
    assert forecast.expected == 1 and not forecast.waits_for_more(1)
    # A lone insert that left without waiting (it found nothing expected) keeps nothing either.
    forecast.batch_left(1, waited_out=False)
    assert forecast.expected == 1


def test_a_lone_insert_probes_for_a_companion_only_while_others_are_in_progress() -> None:
    forecast = CompanyForecast(alone_probe_every=3)
    # A lone caller (nothing else in progress on the server) never waits.
    assert not any(forecast.probe_alone(others_in_progress=False) for _ in range(10))
    assert forecast.expected == 1
    # With others in progress, every third would-be lone insert waits for one companion.
    assert [forecast.probe_alone(others_in_progress=True) for _ in range(3)] == [False, False, True]
    assert forecast.expected == 2 and forecast.waits_for_more(1) and not forecast.waits_for_more(2)
    # Nobody came: back to going alone; a companion came: batches of two are expected.
    forecast.batch_left(1, waited_out=True)
    assert forecast.expected == 1
    assert [forecast.probe_alone(others_in_progress=True) for _ in range(3)] == [False, False, True]
    forecast.batch_left(2, waited_out=False)
    assert forecast.expected == 2


async def _batch_of(store: BatchingMessageStore, new_pair: Callable[[], tuple[int, int]], size: int) -> None:
    """One lone insert and `size` queued behind it: afterwards the shard expects `size`."""
    batches = store.stats.batches
    await asyncio.gather(*(store.insert(_message(new_pair(), f"warm {i}")) for i in range(size + 1)))
    assert store.stats.batches == batches + 1 and store.forecast.expected == size


async def test_after_a_batch_of_three_the_queue_waits_for_three_and_then_goes_at_once(
    pg_server: EmbeddedPostgres, new_pair: Callable[[], tuple[int, int]]
) -> None:
    async with _batching_store(pg_server.dsn, max_wait=60.0) as store:
        await _batch_of(store, new_pair, 3)
        loop = asyncio.get_running_loop()
        started = loop.time()
        first = asyncio.create_task(store.insert(_message(new_pair(), "first")))
        second = asyncio.create_task(store.insert(_message(new_pair(), "second")))
        # Long enough for a statement to run and return: without the wait they would be done.
        done, _ = await asyncio.wait([first, second], timeout=0.5)
        assert not done, "inserts went before the expected company arrived"
        third = await store.insert(_message(new_pair(), "third"))
        results = [await first, await second, third]
        # The third arrival completed the batch: nobody waited out the 60 s.
        assert loop.time() - started < 30
        assert (store.stats.batches, store.stats.largest) == (2, 3)
        assert [r.message.text for r in results] == ["first", "second", "third"]
        assert len(await _stored(store, results)) == 3


async def test_a_short_queue_leaves_after_the_wait_and_a_wait_without_company_ends_waiting(
    pg_server: EmbeddedPostgres, new_pair: Callable[[], tuple[int, int]]
) -> None:
    async with _batching_store(pg_server.dsn, max_wait=_LONG_WAIT) as store:
        await _batch_of(store, new_pair, 3)
        loop = asyncio.get_running_loop()
        started = loop.time()
        two = await asyncio.gather(*(store.insert(_message(new_pair(), f"two {i}")) for i in range(2)))
        # Two of the three expected came: they left together when the wait was over.
        assert loop.time() - started >= _LONG_WAIT
        assert store.stats.batches == 2 and store.stats.batched_messages == 3 + 2
        assert store.forecast.expected == 3
        started = loop.time()
        lone = await store.insert(_message(new_pair(), "nobody came"))
        assert loop.time() - started >= _LONG_WAIT
        assert store.forecast.expected == 1
        # Back to sending at once.
        started = loop.time()
        at_once = await store.insert(_message(new_pair(), "at once"))
        assert loop.time() - started < _LONG_WAIT
        assert len(await _stored(store, [*two, lone, at_once])) == 4


async def test_draining_sends_what_waits_for_company_at_once(
    pg_server: EmbeddedPostgres, new_pair: Callable[[], tuple[int, int]]
) -> None:
    async with _batching_store(pg_server.dsn, max_wait=60.0) as store:
        await _batch_of(store, new_pair, 3)
        waiting = asyncio.create_task(store.insert(_message(new_pair(), "waiting")))
        done, _ = await asyncio.wait([waiting], timeout=0.2)
        assert not done
        await asyncio.wait_for(store.drain(), timeout=10)
        result = await asyncio.wait_for(waiting, timeout=10)
        assert len(await _stored(store, [result])) == 1


async def test_a_caller_that_gives_up_while_queued_is_not_stored_and_the_others_are(
    pg_server: EmbeddedPostgres, new_pair: Callable[[], tuple[int, int]]
) -> None:
    async with _batching_store(pg_server.dsn, max_wait=60.0) as store:
        await _batch_of(store, new_pair, 3)
        gives_up = asyncio.create_task(store.insert(_message(new_pair(), "gives up")))
        stays = asyncio.create_task(store.insert(_message(new_pair(), "stays")))
        done, _ = await asyncio.wait([gives_up, stays], timeout=0.2)
        assert not done  # both queued, waiting for a third
        gives_up.cancel()
        await asyncio.wait([gives_up], timeout=10)
        assert gives_up.cancelled() and not stays.done()
        last = await asyncio.wait_for(store.insert(_message(new_pair(), "completes it")), timeout=10)
        results = [await stays, last]
        # Three arrived, so the batch left; it carried the two whose callers were still there.
        assert store.stats.batches == 2 and store.stats.largest == 3 and store.stats.batched_messages == 3 + 2
        assert len(await _stored(store, results)) == 2
        async with store.pool.connection() as conn:
            cur = await conn.execute(f"SELECT count(*) FROM {store.table} WHERE text = 'gives up'")
            assert await cur.fetchone() == (0,)


async def test_two_callers_of_a_shard_are_paired_while_the_server_has_other_inserts_in_progress(
    pg_server: EmbeddedPostgres, new_pair: Callable[[], tuple[int, int]]
) -> None:
    activity = WriteActivity()
    async with (
        _batching_store(pg_server.dsn, max_wait=60.0, activity=activity) as busy,
        _batching_store(
            pg_server.dsn,
            max_wait=60.0,
            activity=activity,
            forecast=CompanyForecast(alone_probe_every=1),
        ) as quiet,
    ):
        # Alone on the server: the quiet shard's insert goes at once.
        await asyncio.wait_for(quiet.insert(_message(new_pair(), "alone on the server")), timeout=10)
        assert quiet.stats.single == 1 and quiet.forecast.expected == 1
        # Another shard's insert in progress: it waits on an uncommitted row with its request key.
        held = _message(new_pair(), "held", "req-held")
        async with await psycopg.AsyncConnection.connect(pg_server.dsn) as blocker:
            await _hold_request_key(blocker, busy.table, held)
            in_progress = asyncio.create_task(busy.insert(held))
            first = asyncio.create_task(quiet.insert(_message(new_pair(), "first")))
            done, _ = await asyncio.wait([first], timeout=0.3)
            assert not done and activity.in_progress == 2  # waiting for a companion
            second = await asyncio.wait_for(quiet.insert(_message(new_pair(), "second")), timeout=10)
            assert (await first).message.text == "first" and second.message.text == "second"
            assert quiet.stats.batches == 1 and quiet.stats.batched_messages == 2
            assert quiet.forecast.expected == 2
            await blocker.rollback()
        assert not (await asyncio.wait_for(in_progress, timeout=10)).replayed
        assert activity.in_progress == 0


async def test_a_batch_stores_every_field_exactly_as_a_single_insert_would(
    store: BatchingMessageStore, new_pair: Callable[[], tuple[int, int]]
) -> None:
    texts = ['quotes " and \\ backslash', "line\nbreak\ttab", "emoji 🦄 and ünïcödé", '{"json": [1]}', ""]
    messages = [
        _message(new_pair(), text, request_id=None if i % 2 else f"req-{i}") for i, text in enumerate(texts)
    ]
    _alone, *batched = await asyncio.gather(
        *(store.insert(m) for m in [_message(new_pair(), "alone"), *messages])
    )
    assert store.stats.batches == 1 and store.stats.batched_messages == len(messages)
    async with store.pool.connection() as conn:
        cur = await conn.execute(
            f"SELECT message_id, user_low, user_high, bucket, from_user_id, to_user_id, text, created_at,"
            f" request_id FROM {store.table} WHERE message_id = ANY(%s)",
            ([m.message_id for m in messages],),
        )
        rows = {row[0]: row[1:] for row in await cur.fetchall()}
    for message, result in zip(messages, batched, strict=True):
        expected = (
            message.pair.low,
            message.pair.high,
            message.bucket,
            message.from_user_id,
            message.to_user_id,
            message.text,
            message.created_at,
            message.request_id,
        )
        assert rows[message.message_id] == expected
        assert result.message.created_at == message.created_at and result.message.text == message.text


async def test_text_postgresql_cannot_store_fails_its_own_message_only(
    store: BatchingMessageStore, new_pair: Callable[[], tuple[int, int]]
) -> None:
    # The service refuses NUL before storage; here the store alone: the JSON row reaches
    # PostgreSQL escaped, the batch statement fails, and only that message gets an error.
    good = [_message(new_pair(), f"good {i}") for i in range(3)]
    bad = _message(new_pair(), "nul \x00 inside")
    outcomes = await asyncio.gather(
        *(store.insert(m) for m in [good[0], bad, *good[1:]]), return_exceptions=True
    )
    assert (store.stats.batches, store.stats.split) == (1, 1)
    assert isinstance(outcomes[1], psycopg.DataError)
    stored = [o for o in outcomes if isinstance(o, InsertResult)]
    assert [r.message.message_id for r in stored] == [m.message_id for m in good]
    assert len(await _stored(store, stored)) == len(good)
