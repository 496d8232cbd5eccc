"""How evenly pairs (or messages) spread over shards: pure statistics, no I/O.

Used by the routing tests to check the seed's hash spreads pairs uniformly, and
meant for an operator CLI that summarises per-shard counts. The project does
not depend on scipy or numpy, so the chi-square survival function is computed
here from the regularized upper incomplete gamma function, with the classic
power series for ``x < a + 1`` and Lentz's continued fraction otherwise
(Numerical Recipes, section 6.2). Results agree with scipy's
``chi2.sf`` to about 1e-12 absolute.

Conventions for degenerate input, chosen so a CLI never crashes on an idle
cluster: a single shard, or counts that are all zero, show no evidence of
imbalance (chi-square statistic 0, p-value 1, coefficient of variation 0,
max/mean ratio 1). An empty sequence or a negative count is a ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "DistributionSummary",
    "chi_square_sf",
    "chi_square_uniform",
    "coefficient_of_variation",
    "max_mean_ratio",
    "regularized_gamma_q",
]

_EPS = 1e-16
_FPMIN = 1e-300
_MAX_ITERATIONS = 1_000_000
_STIRLING_MIN_A = 10.0
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _check_counts(counts: Sequence[int]) -> None:
    if len(counts) == 0:
        raise ValueError("counts must not be empty")
    for count in counts:
        if count < 0:
            raise ValueError(f"counts must be non-negative, got {count}")


def _log_prefactor(a: float, x: float) -> float:
    """``log(x**a * exp(-x) / Gamma(a))``, the factor shared by series and fraction.

    For large ``a`` the naive ``a*log(x) - x - lgamma(a)`` subtracts numbers of
    size ``a`` and loses about ``a * 1e-16`` absolute; Stirling's series for
    ``lgamma`` lets the large terms cancel analytically instead.
    """
    if a < _STIRLING_MIN_A:
        return a * math.log(x) - x - math.lgamma(a)
    t = (x - a) / a
    inv = 1.0 / a
    inv2 = inv * inv
    # lgamma(a) - ((a - 1/2) log a - a + log(2 pi) / 2), Stirling's series.
    stirling = inv * (
        1 / 12
        - inv2 * (1 / 360 - inv2 * (1 / 1260 - inv2 * (1 / 1680 - inv2 * (1 / 1188 - inv2 * 691 / 360360))))
    )
    return a * (math.log1p(t) - t) + 0.5 * math.log(a) - _HALF_LOG_2PI - stirling


def _gamma_p_series(a: float, x: float) -> float:
    """Regularized lower incomplete gamma ``P(a, x)`` by its power series; for ``x < a + 1``."""
    denominator = a
    term = 1.0 / a
    total = term
    for _ in range(_MAX_ITERATIONS):
        denominator += 1.0
        term *= x / denominator
        total += term
        if abs(term) < abs(total) * _EPS:
            return total * math.exp(_log_prefactor(a, x))
    raise ArithmeticError(f"incomplete gamma series did not converge for a={a}, x={x}")


def _gamma_q_continued_fraction(a: float, x: float) -> float:
    """Regularized upper incomplete gamma ``Q(a, x)`` by Lentz's method; for ``x >= a + 1``."""
    b = x + 1.0 - a
    c = 1.0 / _FPMIN
    d = 1.0 / b
    h = d
    for i in range(1, _MAX_ITERATIONS):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        if abs(d) < _FPMIN:
            d = _FPMIN
        c = b + an / c
        if abs(c) < _FPMIN:
            c = _FPMIN
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _EPS:
            return h * math.exp(_log_prefactor(a, x))
    raise ArithmeticError(f"incomplete gamma continued fraction did not converge for a={a}, x={x}")


def regularized_gamma_q(a: float, x: float) -> float:
    """The regularized upper incomplete gamma function ``Q(a, x) = Γ(a, x) / Γ(a)``.

    Args:
        a: Shape, strictly positive.
        x: Lower limit of integration, non-negative (``inf`` gives 0).

    Returns:
        ``Q(a, x)`` in [0, 1], accurate to about 1e-12 absolute.
    """
    if not a > 0 or math.isinf(a):
        raise ValueError(f"a must be positive and finite, got {a}")
    if not x >= 0:
        raise ValueError(f"x must be non-negative, got {x}")
    if x == 0:
        return 1.0
    if math.isinf(x):
        return 0.0
    if x < a + 1.0:
        return max(0.0, 1.0 - _gamma_p_series(a, x))
    return min(1.0, _gamma_q_continued_fraction(a, x))


def chi_square_sf(statistic: float, df: float) -> float:
    """Survival function ``P(X >= statistic)`` of a chi-square variable with ``df`` degrees of freedom.

    Equals ``scipy.stats.chi2.sf(statistic, df)``: ``Q(df / 2, statistic / 2)``.
    """
    if not df > 0:
        raise ValueError(f"df must be positive, got {df}")
    if statistic <= 0:
        return 1.0
    return regularized_gamma_q(df / 2.0, statistic / 2.0)


def chi_square_uniform(counts: Sequence[int]) -> tuple[float, float]:
    """Pearson's chi-square goodness-of-fit test of ``counts`` against the uniform distribution.

    Args:
        counts: Observations per category (e.g. pairs per shard), non-negative.

    Returns:
        ``(statistic, p_value)``: ``sum((c - mean)**2 / mean)`` and the
        chi-square survival function of it with ``len(counts) - 1`` degrees of
        freedom. A small p-value (say below 0.001) means the counts are very
        unlikely under a uniform placement. One category or an all-zero
        sequence gives ``(0.0, 1.0)``.
    """
    _check_counts(counts)
    k = len(counts)
    total = sum(counts)
    if k == 1 or total == 0:
        return 0.0, 1.0
    # sum((c - N/k)^2 / (N/k)) == (k * sum(c^2) - N^2) / N, exact in integers.
    numerator = k * sum(c * c for c in counts) - total * total
    statistic = numerator / total
    return statistic, chi_square_sf(statistic, k - 1)


def coefficient_of_variation(counts: Sequence[int]) -> float:
    """Population standard deviation of ``counts`` divided by their mean (0 when all are zero)."""
    _check_counts(counts)
    k = len(counts)
    total = sum(counts)
    if total == 0:
        return 0.0
    mean = total / k
    # Variance from exact integers: (k * sum(c^2) - N^2) / k^2.
    variance = (k * sum(c * c for c in counts) - total * total) / (k * k)
    return math.sqrt(variance) / mean


def max_mean_ratio(counts: Sequence[int]) -> float:
    """Largest count divided by the mean count: 1.0 is perfectly even (and all-zero counts)."""
    _check_counts(counts)
    total = sum(counts)
    if total == 0:
        return 1.0
    return max(counts) * len(counts) / total


@dataclass(frozen=True, slots=True)
class DistributionSummary:
    """Figures describing how evenly counts spread over shards.

    Build it with :meth:`summarize`; every field is derived from the counts.
    """

    #: Number of categories (shards).
    shards: int
    #: Sum of the counts.
    total: int
    #: Mean count per shard.
    mean: float
    #: Largest count.
    maximum: int
    #: Smallest count.
    minimum: int
    #: ``maximum / mean``; 1.0 is perfectly even.
    max_mean_ratio: float
    #: Coefficient of variation (population standard deviation / mean).
    cv: float
    #: Pearson chi-square statistic against the uniform distribution.
    chi2: float
    #: p-value of ``chi2`` with ``shards - 1`` degrees of freedom.
    p_value: float

    @classmethod
    def summarize(cls, counts: Sequence[int]) -> DistributionSummary:
        """Compute every figure of ``counts`` (non-empty, non-negative)."""
        _check_counts(counts)
        chi2, p_value = chi_square_uniform(counts)
        total = sum(counts)
        return cls(
            shards=len(counts),
            total=total,
            mean=total / len(counts),
            maximum=max(counts),
            minimum=min(counts),
            max_mean_ratio=max_mean_ratio(counts),
            cv=coefficient_of_variation(counts),
            chi2=chi2,
            p_value=p_value,
        )

    def describe(self) -> str:
        """One human-readable line, e.g. for logs and the operator CLI."""
        return (
            f"shards={self.shards} total={self.total} mean={self.mean:.1f} "
            f"min={self.minimum} max={self.maximum} max/mean={self.max_mean_ratio:.4f} "
            f"cv={self.cv:.4f} chi2={self.chi2:.3f} p={self.p_value:.4g}"
        )
