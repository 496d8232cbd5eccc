"""Routing changes come from the control tables only: a NOTIFY is a hint to re-read them, never the state."""

from __future__ import annotations

import logging
from collections.abc import Callable

import psycopg
import pytest

from client.gen.dialog.v1 import admin_service_pb2 as pb
from client.gen.dialog.v1 import admin_service_pb2_grpc
from server.config import ServerConfig
from server.dev.embedded_pg import EmbeddedPostgres
from server.routing import Pair, calculate_shard
from server.runtime.app import RunningServer
from server.storage.channel import CHANNEL
from server.storage.overrides import RoutingHints
from tests.support import Metadata, fresh_cluster, serving, wait_until


@pytest.mark.parametrize(
    ("payload", "pairs", "layout"),
    [
        ("set 3 7 1", {Pair(3, 7)}, False),
        ("del 3 7", {Pair(3, 7)}, False),
        ("layout 8 -", set(), True),
        ("layout 4 8", set(), True),
        ("flip 0 1 12,4095", set(), True),
    ],
)
def test_well_formed_hints_name_what_changed(payload: str, pairs: set[Pair], layout: bool) -> None:
    hints = RoutingHints()
    assert hints.add(payload)
    assert (hints.pairs, hints.layout) == (pairs, layout)


@pytest.mark.parametrize(
    "payload",
    [
        "",
        "set",
        "set 3 7",
        "set +3 7 1",
        "set 1_0 20 1",
        "set \u0663 7 1",  # an Arabic-Indic digit: int() would take it
        "set 7 3 1",  # not ordered (low <= high)
        "set 3 99999999999999999999 1",
        "del 3 7 1",
        "layout 4",
        "flip 0 1 a,b",
        "flip 0 1 12,",
        "move 3 7 1",
        "set  3 7 1",
    ],
)
def test_malformed_hints_are_refused_whole(payload: str) -> None:
    hints = RoutingHints()
    assert not hints.add(payload)
    assert not hints


def _notify(config: ServerConfig, *payloads: str) -> None:
    """NOTIFY the shard map's channel as any role that can connect could: no table change."""
    with psycopg.connect(config.control_dsn, autocommit=True) as conn:
        for payload in payloads:
            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))


async def _pin_as_another_server(config: ServerConfig, pair: Pair, shard_id: int) -> None:
    """What another server's override change does: the row and its hint in one transaction."""
    with psycopg.connect(config.control_dsn) as conn:
        conn.execute(
            "INSERT INTO shard_map (user1, user2, shard_id) VALUES (%s, %s, %s)",
            (pair.low, pair.high, shard_id),
        )
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"set {pair.low} {pair.high} {shard_id}"))


async def _resolve(
    stub: admin_service_pb2_grpc.AdminServiceAsyncStub, auth: Metadata, pair: Pair
) -> tuple[int, int]:
    reply = await stub.ResolveShard(
        pb.ResolveShardRequest(user_id_1=pair.low, user_id_2=pair.high), metadata=auth
    )
    return reply.shard_id, reply.source


async def test_forged_and_malformed_notifications_change_no_routing(
    server: RunningServer,
    admin_stub: admin_service_pb2_grpc.AdminServiceAsyncStub,
    admin_auth: Metadata,
    new_pair: Callable[[], tuple[int, int]],
    cluster_config: ServerConfig,
) -> None:
    forged, legit = Pair.of(*new_pair()), Pair.of(*new_pair())
    router = server.placement.router
    layout_before, reloads_before = router.layout, server.placement.reloads
    hashed = calculate_shard(forged.low, forged.high, 4)
    _notify(
        cluster_config,
        "layout 1 -",  # would route every write to shard 0
        f"flip 0 1 {','.join(map(str, range(4096)))[:7000].rstrip(',')}",
        f"set {forged.low} {forged.high} {(hashed + 1) % 4}",
        "garbage",
        "set x y z",
        "flip 1",
        "layout",
    )
    # Hints are handled in order: once the later legitimate change shows, the forged ones were read.
    target = (calculate_shard(legit.low, legit.high, 4) + 2) % 4
    await _pin_as_another_server(cluster_config, legit, target)
    await wait_until(
        lambda: router.override_of(legit) == target, "the legitimate change reached the router", within=15
    )
    assert await _resolve(admin_stub, admin_auth, legit) == (target, pb.SHARD_SOURCE_OVERRIDE)
    assert router.layout == layout_before
    assert await _resolve(admin_stub, admin_auth, forged) == (hashed, pb.SHARD_SOURCE_HASH)
    # Handled as hints on the live connection, not by tearing it down and reloading everything.
    assert server.placement.reloads == reloads_before


async def test_the_listener_survives_a_failure_of_its_own_and_reloads(
    pg_servers: list[EmbeddedPostgres],
    jwt_secret: str,
    new_pair: Callable[[], tuple[int, int]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Not a lost connection but an error applying a hint (here: the layout row is gone) ends in a
    full reload once the tables are sound again, and later changes still apply."""
    caplog.set_level(logging.INFO, logger="server.storage.overrides")
    config = fresh_cluster(pg_servers, jwt_secret, 4)
    async with serving(config) as (running, _):
        placement = running.placement
        reloads = placement.reloads
        with psycopg.connect(config.control_dsn, autocommit=True) as conn:
            (saved,) = conn.execute("SELECT num_shards FROM shard_layout").fetchall()
            with conn.transaction():
                conn.execute("DELETE FROM shard_layout")
                conn.execute("SELECT pg_notify(%s, 'layout 4 -')", (CHANNEL,))
            # The refresh fails (no layout), and so does every reload until the row is back.
            await wait_until(
                lambda: "shard map reload failed; retrying" in caplog.messages, "a reload was tried"
            )
            assert placement.reloads == reloads, "no reload can succeed without a layout"
            assert "shard map listener failed; reconnecting and reloading" in caplog.messages
            conn.execute("INSERT INTO shard_layout (num_shards) VALUES (%s)", saved)
        await wait_until(lambda: placement.reloads > reloads, "the listener reloaded", within=30)
        assert placement.router.layout.num_shards == 4
        pair = Pair.of(*new_pair())
        target = (calculate_shard(pair.low, pair.high, 4) + 1) % 4
        await _pin_as_another_server(config, pair, target)
        await wait_until(lambda: placement.router.override_of(pair) == target, "a later change applied")
