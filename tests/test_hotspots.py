"""`dialogctl hotspots` finds the heavy pairs; `rebalance` proposes and applies overrides that move them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from server.dev.embedded_pg import EmbeddedPostgres
from server.routing import Pair, calculate_shard
from server.routing.rebalance import PairLoad, Proposal, propose
from tests.processes import write_server_config
from tests.support import (
    Metadata,
    dialogctl,
    fresh_cluster,
    make_config,
    preload_pairs,
    rows_for_pair,
    serving,
)


def test_balanced_shards_need_no_move() -> None:
    loads = {0: 100.0, 1: 105.0, 2: 95.0, 3: 100.0}
    assert propose(loads, [PairLoad(Pair(1, 2), 1, 50.0)]) == []


def test_the_move_that_brings_the_heaviest_shard_nearest_the_mean_wins() -> None:
    loads = {0: 300.0, 1: 100.0, 2: 90.0, 3: 110.0}
    candidates = [
        PairLoad(Pair(1, 2), 0, 200.0),
        PairLoad(Pair(3, 4), 0, 100.0),
        PairLoad(Pair(5, 6), 1, 100.0),
    ]
    # Moving the 200-message pair would only make shard 2 the new heaviest (290 > 210).
    assert propose(loads, candidates) == [Proposal(Pair(3, 4), 0, 2, 100.0)]


def test_moves_stop_at_max_moves() -> None:
    loads = {0: 1000.0, 1: 0.0}
    candidates = [PairLoad(Pair(i, i + 1), 0, 100.0) for i in range(1, 20, 2)]
    assert len(propose(loads, candidates, max_moves=3)) == 3
    assert len(propose(loads, candidates)) == 5, "then 500 / 500"


async def test_hotspots_and_rebalance_apply(
    pg_servers: list[EmbeddedPostgres],
    jwt_secret: str,
    tmp_path: Path,
    new_pair: Callable[[], tuple[int, int]],
    admin_auth: Metadata,
) -> None:
    config = fresh_cluster(pg_servers, jwt_secret, 4)
    heavy = new_pair()
    home = calculate_shard(*heavy, 4)
    medium = new_pair()
    while calculate_shard(*medium, 4) != home:
        medium = new_pair()
    light = [new_pair() for _ in range(8)]
    async with serving(config) as (running, _):
        preload_pairs(config, [heavy], 120)
        preload_pairs(config, [medium], 60)
        preload_pairs(config, light, 3)
        path = write_server_config(tmp_path / "c.toml", config, f"127.0.0.1:{running.port}", jwt_secret)
        spots = (await dialogctl(path, "hotspots", "--json")).json()
        assert [p["pair"] for p in spots["pairs"][:2]] == [list(Pair.of(*heavy)), list(Pair.of(*medium))]
        assert spots["pairs"][0]["shard_id"] == home and spots["pairs"][0]["messages"] == 120
        assert spots["pairs"][0]["recent"] == 120, "written just now"
        assert max(spots["shards"], key=lambda s: s["messages"])["shard_id"] == home
        dry = (await dialogctl(path, "rebalance", "--json")).json()
        first = dry["proposals"][0]
        moved = next(p for p in (heavy, medium) if list(Pair.of(*p)) == first["pair"])
        assert first["source"] == home and dry["applied"] == 0
        assert list(rows_for_pair(config, moved)) == [home], "a dry run changes nothing"
        applied = (await dialogctl(path, "rebalance", "--apply", "--json")).json()
        assert applied["proposals"] == dry["proposals"] and applied["applied"] == len(dry["proposals"])
        rows = rows_for_pair(config, moved)
        assert list(rows) == [first["target"]] and len(rows[first["target"]]) == first["load"]
        after = (await dialogctl(path, "hotspots", "--json")).json()
        assert max(s["messages"] for s in after["shards"]) < max(s["messages"] for s in spots["shards"])


async def test_rebalance_only_uses_the_shards_the_hash_routes_over(
    pg_servers: list[EmbeddedPostgres],
    jwt_secret: str,
    tmp_path: Path,
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    """Shards listed ahead of a reshard are empty; they must not look like the lightest targets."""
    config = fresh_cluster(pg_servers, jwt_secret, 6)
    heavy = new_pair()
    async with serving(make_config([s.dsn for s in config.shards[:4]], jwt_secret)):
        pass  # records the 4-shard layout
    preload_pairs(config, [heavy], 120)
    light = [p for p in (new_pair() for _ in range(200)) if p != heavy]
    # Every routed shard holds a little, so only the unrouted ones are empty.
    preload_pairs(config, [next(p for p in light if calculate_shard(*p, 4) == s) for s in range(4)], 3)
    path = write_server_config(tmp_path / "six.toml", config, "127.0.0.1:1", jwt_secret)
    proposals = (await dialogctl(path, "rebalance", "--json")).json()["proposals"]
    assert proposals, "the heavy pair's shard is far above the mean of the four"
    assert all(p["target"] < 4 for p in proposals), proposals
