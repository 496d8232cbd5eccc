"""Pure placement logic: the seed's hash against Go, its properties, and its spread.

Fast unit tests, no database and no network. The golden vectors come from
`tests/golden/calculate_shard.go`, which carries the design document's
`calculateShard` verbatim; regenerate them with
`go run tests/golden/calculate_shard.go > tests/golden/calculate_shard_vectors.json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import statistics
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.procs import ensure_debian_binary
from server.routing import (
    NUM_BUCKETS,
    Pair,
    ShardRouter,
    ShardSource,
    bucket_of,
    calculate_shard,
    pair_hash,
)
from server.routing.distribution import (
    DistributionSummary,
    chi_square_sf,
    chi_square_uniform,
    coefficient_of_variation,
    max_mean_ratio,
    regularized_gamma_q,
)
from server.routing.inbox import Snapshot, inbox_shard

ROOT = Path(__file__).resolve().parent.parent
GOLDEN_DIR = ROOT / "tests" / "golden"
GOLDEN_GO = GOLDEN_DIR / "calculate_shard.go"
GOLDEN_JSON = GOLDEN_DIR / "calculate_shard_vectors.json"

MAX_INT64 = 2**63 - 1
user_ids = st.integers(min_value=1, max_value=MAX_INT64)
shard_counts = st.integers(min_value=1, max_value=2 * NUM_BUCKETS)
bucket_divisors = [n for n in range(1, NUM_BUCKETS + 1) if NUM_BUCKETS % n == 0]


def _load_vectors() -> list[dict[str, Any]]:
    vectors: list[dict[str, Any]] = json.loads(GOLDEN_JSON.read_text())
    return vectors


# --------------------------------------------------------------------------- golden


# The design document's examples, written out so they survive a bad regeneration.
REFERENCE = [
    (12345, 67890, 4, 0),
    (1, 2, 4, 1),
    (100, 200, 4, 1),
    (7, 42, 16, 5),
    (9223372036854775807, 1, 4, 2),
    (1000000, 999999, 1024, 64),
]


@pytest.mark.parametrize(("a", "b", "num_shards", "shard"), REFERENCE)
def test_reference_values(a: int, b: int, num_shards: int, shard: int) -> None:
    assert calculate_shard(a, b, num_shards) == shard
    assert calculate_shard(b, a, num_shards) == shard


def test_golden_vectors_match_go() -> None:
    vectors = _load_vectors()
    assert len(vectors) > 3000
    mismatches = [
        v
        for v in vectors
        if calculate_shard(v["a"], v["b"], v["num_shards"]) != v["shard"]
        or pair_hash(v["a"], v["b"]) != int(v["hash"])
    ]
    assert mismatches == []


def test_golden_vectors_cover_the_brief() -> None:
    vectors = _load_vectors()
    assert {v["num_shards"] for v in vectors} == {1, 2, 3, 4, 7, 8, 16, 1024, 4096}
    ids = {v["a"] for v in vectors} | {v["b"] for v in vectors}
    for edge in (1, 2, 2**31, 2**32, 2**53, 2**62, MAX_INT64):
        assert edge in ids
    pairs = {(v["a"], v["b"]) for v in vectors}
    assert all((b, a) in pairs for a, b in pairs)
    head = [(v["a"], v["b"], v["num_shards"], v["shard"]) for v in vectors[: len(REFERENCE)]]
    assert head == REFERENCE


@pytest.mark.timeout(600)
def test_golden_file_is_up_to_date() -> None:
    """The design document's Go code itself produces the golden vectors the Python hash is held to.

    Go comes from Debian (golang-go) when missing and the suite runs as root, as in CI, so the bit-for-bit
    check runs on a fresh machine; elsewhere without Go it is skipped with what to install.
    """
    go = ensure_debian_binary("go", "golang-go")
    if go is None:
        pytest.skip("Go toolchain not installed (Debian: apt-get install golang-go)")
    result = subprocess.run(
        [go, "run", str(GOLDEN_GO.relative_to(ROOT))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert result.stdout == GOLDEN_JSON.read_text(), "regenerate calculate_shard_vectors.json"


# ------------------------------------------------------------------------ properties


@given(user_ids, user_ids, shard_counts)
def test_symmetric(a: int, b: int, num_shards: int) -> None:
    assert pair_hash(a, b) == pair_hash(b, a)
    assert calculate_shard(a, b, num_shards) == calculate_shard(b, a, num_shards)
    assert bucket_of(a, b) == bucket_of(b, a)


@given(user_ids, user_ids, shard_counts)
def test_in_range(a: int, b: int, num_shards: int) -> None:
    assert 0 <= calculate_shard(a, b, num_shards) < num_shards
    assert 0 <= bucket_of(a, b) < NUM_BUCKETS
    assert 0 <= pair_hash(a, b) < 2**64


@given(user_ids, user_ids, st.sampled_from(bucket_divisors))
def test_bucket_refines_every_dividing_shard_count(a: int, b: int, num_shards: int) -> None:
    assert bucket_of(a, b) % num_shards == calculate_shard(a, b, num_shards)


@given(user_ids, user_ids)
def test_pair_is_ordered(a: int, b: int) -> None:
    pair = Pair.of(a, b)
    assert pair == Pair.of(b, a)
    assert pair.low == min(a, b)
    assert pair.high == max(a, b)


@pytest.mark.parametrize("num_shards", [0, -1])
def test_non_positive_shard_count_is_refused(num_shards: int) -> None:
    with pytest.raises(ValueError):
        calculate_shard(1, 2, num_shards)
    with pytest.raises(ValueError):
        ShardRouter(num_shards)


@given(user_ids, user_ids, st.sampled_from([1, 2, 4, 7, 16]), st.data())
def test_router_override_then_hash(a: int, b: int, num_shards: int, data: st.DataObject) -> None:
    router = ShardRouter(num_shards)
    pair = Pair.of(a, b)
    hashed = calculate_shard(a, b, num_shards)

    resolution = router.resolve(a, b)
    assert resolution.shard_id == hashed
    assert resolution.source is ShardSource.HASH
    assert resolution.hash_shard_id == hashed
    assert resolution.bucket == bucket_of(a, b)
    assert resolution.pair == pair

    target = data.draw(st.integers(min_value=0, max_value=num_shards - 1), label="override")
    router.set(pair, target)
    for first, second in ((a, b), (b, a)):
        resolution = router.resolve(first, second)
        assert resolution.shard_id == target
        assert resolution.source is ShardSource.OVERRIDE
        assert resolution.hash_shard_id == hashed
        assert resolution.bucket == bucket_of(a, b)
    assert router.override_of(pair) == target

    router.discard(pair)
    resolution = router.resolve(b, a)
    assert resolution.shard_id == hashed
    assert resolution.source is ShardSource.HASH
    assert router.override_of(pair) is None
    router.discard(pair)  # discarding a missing override is harmless
    assert router.override_count == 0


@given(
    st.dictionaries(st.tuples(user_ids, user_ids).map(lambda t: Pair.of(*t)), st.integers(0, 3), max_size=8),
    st.dictionaries(st.tuples(user_ids, user_ids).map(lambda t: Pair.of(*t)), st.integers(0, 3), max_size=8),
)
def test_router_replace_all_replaces(old: dict[Pair, int], new: dict[Pair, int]) -> None:
    router = ShardRouter(4, old)
    assert router.override_count == len(old)
    version = router.version
    router.replace_all(new.items())
    assert router.version > version
    assert router.override_count == len(new)
    for pair, shard in new.items():
        assert router.override_of(pair) == shard
        assert router.resolve(pair.high, pair.low).shard_id == shard
    for pair in old.keys() - new.keys():
        assert router.override_of(pair) is None
        resolution = router.resolve(pair.low, pair.high)
        assert resolution.source is ShardSource.HASH
        assert resolution.shard_id == calculate_shard(pair.low, pair.high, 4)


def test_router_copies_initial_overrides() -> None:
    overrides = {Pair.of(1, 2): 3}
    router = ShardRouter(4, overrides)
    overrides[Pair.of(1, 2)] = 0
    assert router.resolve(2, 1).shard_id == 3


# ---------------------------------------------------------------------- distribution

PAIRS = 100_000


def _random_pairs(seed: int, low: int, high: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    pairs: list[tuple[int, int]] = []
    while len(pairs) < PAIRS:
        a, b = rng.randint(low, high), rng.randint(low, high)
        if a != b:
            pairs.append((a, b))
    return pairs


@pytest.mark.parametrize(
    ("label", "seed", "low", "high"),
    [
        ("ids over 1..2^63-1", 20240601, 1, MAX_INT64),
        ("ids over 1..100000", 20240602, 1, 100_000),
    ],
)
def test_hash_spreads_pairs_evenly(
    label: str, seed: int, low: int, high: int, capsys: pytest.CaptureFixture[str]
) -> None:
    hashes = [pair_hash(a, b) for a, b in _random_pairs(seed, low, high)]
    for num_shards in (4, 16):
        counts = [0] * num_shards
        for value in hashes:
            counts[value % num_shards] += 1
        summary = DistributionSummary.summarize(counts)
        with capsys.disabled():
            print(
                f"\n[distribution] {PAIRS} random pairs, {label}, {num_shards} shards: "
                f"max/mean={summary.max_mean_ratio:.4f} cv={summary.cv:.4f} "
                f"chi2={summary.chi2:.2f} p={summary.p_value:.4f}"
            )
        assert summary.total == PAIRS
        assert summary.p_value > 0.001, summary.describe()
        assert summary.max_mean_ratio < 1.05, summary.describe()


# -------------------------------------------------------------- distribution.py maths


@pytest.mark.parametrize(
    ("statistic", "df", "expected"),
    [(3.84146, 1, 0.05), (11.0705, 5, 0.05), (6.6349, 1, 0.01), (18.307, 10, 0.05), (23.2093, 10, 0.01)],
)
def test_chi_square_sf_critical_values(statistic: float, df: int, expected: float) -> None:
    assert chi_square_sf(statistic, df) == pytest.approx(expected, abs=2e-6)


@pytest.mark.parametrize("df", [1, 2, 3, 15, 1023, 4095])
def test_chi_square_sf_of_zero_is_one(df: int) -> None:
    assert chi_square_sf(0.0, df) == 1.0
    assert chi_square_sf(math.inf, df) == 0.0


X_VALUES = [1e-6, 0.01, 0.5, 1.0, 2.0, 3.84146, 7.5, 20.0, 50.0, 120.0, 700.0]


@pytest.mark.parametrize("x", X_VALUES)
def test_chi_square_sf_low_df_closed_forms(x: float) -> None:
    # df = 1: erfc(sqrt(x/2)); df = 2: exp(-x/2); df = 3: erfc(sqrt(x/2)) + sqrt(2x/pi) exp(-x/2).
    assert chi_square_sf(x, 1) == pytest.approx(math.erfc(math.sqrt(x / 2)), rel=1e-10, abs=1e-12)
    assert chi_square_sf(x, 2) == pytest.approx(math.exp(-x / 2), rel=1e-10, abs=1e-12)
    df3 = math.erfc(math.sqrt(x / 2)) + math.sqrt(2 * x / math.pi) * math.exp(-x / 2)
    assert chi_square_sf(x, 3) == pytest.approx(df3, rel=1e-10, abs=1e-12)


def _even_df_sf(x: float, df: int) -> float:
    """Closed form for even df: exp(-x/2) * sum_{i < df/2} (x/2)^i / i!, summed in log space."""
    half = x / 2
    return math.fsum(math.exp(i * math.log(half) - half - math.lgamma(i + 1)) for i in range(df // 2))


@pytest.mark.parametrize("df", [4, 10, 30, 100, 1022, 4094])
@pytest.mark.parametrize("scale", [0.1, 0.5, 0.9, 1.0, 1.1, 1.5, 3.0])
def test_chi_square_sf_even_df_closed_form(df: int, scale: float) -> None:
    x = df * scale
    assert chi_square_sf(x, df) == pytest.approx(_even_df_sf(x, df), abs=1e-10)


def test_regularized_gamma_q_rejects_bad_arguments() -> None:
    for a, x in ((0.0, 1.0), (-1.0, 1.0), (math.inf, 1.0), (1.0, -0.5), (1.0, math.nan)):
        with pytest.raises(ValueError):
            regularized_gamma_q(a, x)
    with pytest.raises(ValueError):
        chi_square_sf(1.0, 0)


def test_chi_square_uniform_known_values() -> None:
    # mean 20; (100 + 0 + 100) / 20 = 10 on 2 df, whose survival is exp(-5).
    statistic, p_value = chi_square_uniform([10, 20, 30])
    assert statistic == pytest.approx(10.0)
    assert p_value == pytest.approx(math.exp(-5), rel=1e-12)
    assert chi_square_uniform([250, 250, 250, 250]) == (0.0, 1.0)


def test_chi_square_uniform_skewed_is_rejected() -> None:
    statistic, p_value = chi_square_uniform([1000, 0, 0, 0])
    assert statistic == pytest.approx(3000.0)
    assert p_value < 1e-300
    _, p_value = chi_square_uniform([2600, 2500, 2500, 2400])
    assert 0.01 < p_value < 0.1  # statistic 8 on 3 df: p = 0.046
    _, p_value = chi_square_uniform([27000, 25000, 24000, 24000])
    assert p_value < 1e-20


def test_cv_and_max_mean_known_values() -> None:
    counts = [10, 20, 30]
    assert coefficient_of_variation(counts) == pytest.approx(statistics.pstdev(counts) / 20, rel=1e-12)
    assert max_mean_ratio(counts) == pytest.approx(1.5)
    assert coefficient_of_variation([7, 7, 7]) == 0.0
    assert max_mean_ratio([7, 7, 7]) == 1.0


def test_degenerate_counts() -> None:
    assert chi_square_uniform([42]) == (0.0, 1.0)
    assert chi_square_uniform([0, 0, 0]) == (0.0, 1.0)
    assert coefficient_of_variation([0, 0]) == 0.0
    assert max_mean_ratio([0, 0]) == 1.0
    for bad in ([], [1, -1]):
        with pytest.raises(ValueError):
            DistributionSummary.summarize(bad)
        with pytest.raises(ValueError):
            chi_square_uniform(bad)


def test_summary_gathers_every_figure() -> None:
    summary = DistributionSummary.summarize([10, 20, 30])
    assert summary.shards == 3
    assert summary.total == 60
    assert summary.mean == 20.0
    assert summary.maximum == 30
    assert summary.minimum == 10
    assert summary.max_mean_ratio == pytest.approx(1.5)
    assert summary.cv == pytest.approx(coefficient_of_variation([10, 20, 30]))
    assert summary.chi2 == pytest.approx(10.0)
    assert summary.p_value == pytest.approx(math.exp(-5))
    assert "max/mean=1.5000" in summary.describe()
    with pytest.raises(dataclasses.FrozenInstanceError):
        summary.total = 0  # type: ignore[misc]


def test_inbox_shards_and_snapshot_visibility() -> None:
    assert [inbox_shard(u, 4) for u in (1, 2, 3)] == [calculate_shard(u, u, 4) for u in (1, 2, 3)]
    snapshot = Snapshot.parse("10:20:12,15")
    assert [x for x in range(8, 23) if snapshot.sees(x)] == [8, 9, 10, 11, 13, 14, 16, 17, 18, 19]
    assert Snapshot.parse("7:7:").sees(6) and not Snapshot.parse("7:7:").sees(7)
