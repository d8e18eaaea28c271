"""Uncertainty for per-item scores: bootstrap intervals and paired tests.

A metric is a ratio of sums over items, ``transform(sum(num) / sum(den))``. A plain
mean has ``den = 1`` per item; instruction-level IFEval accuracy, perplexity and bits
per byte are genuine ratios. Every statistic here resamples or permutes whole items,
so items stay the unit of analysis.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy.stats import binom

N_RESAMPLES = 2000


def ratio(num: np.ndarray, den: np.ndarray | None = None, transform: Callable | None = None) -> float:
    """Return ``transform(sum(num) / sum(den))``; ``den`` defaults to one per item."""
    num = np.asarray(num, dtype=float)
    den = np.ones_like(num) if den is None else np.asarray(den, dtype=float)
    value = num.sum() / den.sum() if den.sum() else math.nan
    return float(transform(value)) if transform else float(value)


def bootstrap_ci(num, den=None, transform: Callable | None = None, *, n_resamples: int = N_RESAMPLES,
                 seed: int = 0, level: float = 0.95) -> list[float]:
    """Return the percentile bootstrap interval of a ratio metric, resampling items.

    Args:
        num, den: per-item numerator and denominator (``den`` defaults to ones).
        transform: applied to each resampled ratio (e.g. ``np.exp`` for perplexity).
        n_resamples: bootstrap resamples.
        seed: seed of the resampling generator.
        level: coverage of the interval.

    Returns:
        ``[low, high]``; ``[nan, nan]`` for no items.
    """
    num = np.asarray(num, dtype=float)
    den = np.ones_like(num) if den is None else np.asarray(den, dtype=float)
    n = len(num)
    if n == 0:
        return [math.nan, math.nan]
    rng = np.random.default_rng(seed)
    index = rng.integers(0, n, size=(n_resamples, n))
    with np.errstate(invalid="ignore", divide="ignore"):
        values = num[index].sum(axis=1) / den[index].sum(axis=1)
    if transform is not None:
        values = transform(values)
    alpha = (1 - level) / 2
    low, high = np.nanquantile(values, [alpha, 1 - alpha])
    return [float(low), float(high)]


def mcnemar_exact(baseline, treated) -> float:
    """Return the two-sided exact McNemar p-value for paired 0/1 outcomes.

    Only discordant pairs count: ``b`` items right at baseline and wrong when treated,
    ``c`` the reverse. Under the null each discordant pair is a fair coin, so
    ``p = min(1, 2 * P(Binomial(b + c, 1/2) <= min(b, c)))``; no discordant pair gives 1.
    """
    baseline = np.asarray(baseline).astype(bool)
    treated = np.asarray(treated).astype(bool)
    if baseline.shape != treated.shape:
        raise ValueError(f"paired outcomes differ in shape: {baseline.shape} and {treated.shape}")
    b = int(np.sum(baseline & ~treated))
    c = int(np.sum(~baseline & treated))
    if b + c == 0:
        return 1.0
    return float(min(1.0, 2 * binom.cdf(min(b, c), b + c, 0.5)))


def paired_permutation(num_a, num_b, den_a=None, den_b=None, transform: Callable | None = None, *,
                       n_resamples: int = N_RESAMPLES, seed: int = 0) -> float:
    """Return the two-sided p-value of a paired sign-flip permutation test.

    Under the null the two conditions are exchangeable within each item, so each
    resample swaps the ``(num, den)`` pair of A and B in a random subset of items and
    recomputes the difference of the metric. The p-value counts resamples at least as
    extreme as observed, plus one, over resamples plus one; identical samples give 1.
    """
    num_a, num_b = np.asarray(num_a, dtype=float), np.asarray(num_b, dtype=float)
    den_a = np.ones_like(num_a) if den_a is None else np.asarray(den_a, dtype=float)
    den_b = np.ones_like(num_b) if den_b is None else np.asarray(den_b, dtype=float)
    if num_a.shape != num_b.shape:
        raise ValueError(f"paired samples differ in shape: {num_a.shape} and {num_b.shape}")
    if len(num_a) == 0:
        return math.nan

    def metric(num, den):
        with np.errstate(invalid="ignore", divide="ignore"):
            value = num.sum(axis=-1) / den.sum(axis=-1)
        return transform(value) if transform is not None else value

    observed = abs(metric(num_b, den_b) - metric(num_a, den_a))
    rng = np.random.default_rng(seed)
    flip = rng.integers(0, 2, size=(n_resamples, len(num_a))).astype(bool)
    perm_a_num, perm_b_num = np.where(flip, num_b, num_a), np.where(flip, num_a, num_b)
    perm_a_den, perm_b_den = np.where(flip, den_b, den_a), np.where(flip, den_a, den_b)
    diffs = np.abs(metric(perm_b_num, perm_b_den) - metric(perm_a_num, perm_a_den))
    # A relative tolerance keeps float rounding from turning ties into "less extreme".
    tolerance = 1e-12 * max(1.0, float(observed))
    extreme = int(np.sum(diffs >= observed - tolerance))
    return (extreme + 1) / (n_resamples + 1)
