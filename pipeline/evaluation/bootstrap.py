"""Paired bootstrap intervals: how far a metric measured on a few hundred test images could move by chance.

Every resample draws the same test images (with replacement) for every method, so a difference between two
methods is measured on the same images each time (paired): the interval of the DIFFERENCE is what says whether
one method beats another, not whether their separate intervals overlap. Percentile intervals over ``samples``
resamples from a seeded generator: the same errors and seed give the same intervals, on any machine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from geopak_model.report import ACC_KM

# metric name -> (function of a (resamples, n) block of errors along axis 1, "lower" or "higher" is better)
METRICS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], str]] = {
    "median_km": (lambda e: np.median(e, axis=1), "lower"),
    "mean_km": (lambda e: e.mean(axis=1), "lower"),
    "p90_km": (lambda e: np.percentile(e, 90, axis=1), "lower"),
    **{f"acc_{k}km": ((lambda k: lambda e: (e <= k).mean(axis=1))(k), "higher") for k in ACC_KM},
}
SAMPLES = 2000
SEED = 0
LEVEL = 0.95


@dataclass
class Bootstrap:
    """Resampled metric values: ``values[method][metric]`` is an array of ``samples`` values."""

    values: dict[str, dict[str, np.ndarray]]
    samples: int
    seed: int
    level: float = LEVEL

    def interval(self, method: str, metric: str) -> tuple[float, float]:
        return _percentiles(self.values[method][metric], self.level)

    def difference(self, method: str, other: str, metric: str) -> tuple[float, float]:
        """Interval of (``method`` − ``other``) on the same resamples."""
        return _percentiles(self.values[method][metric] - self.values[other][metric], self.level)


def _percentiles(x: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.percentile(x, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def paired_bootstrap(errors: dict[str, np.ndarray], samples: int = SAMPLES, seed: int = SEED,
                     block: int = 250) -> Bootstrap:
    """Every ``METRICS`` value of every method's per-image ``errors`` (km, same images in the same order) on
    ``samples`` paired resamples; resample indices are drawn ``block`` resamples at a time (bounded memory)."""
    n = len(next(iter(errors.values())))
    if any(len(e) != n for e in errors.values()):
        raise ValueError("paired bootstrap needs every method's errors on the same images")
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, list[np.ndarray]]] = {m: {k: [] for k in METRICS} for m in errors}
    for start in range(0, samples, block):
        idx = rng.integers(0, n, size=(min(block, samples - start), n))
        for m, err in errors.items():
            drawn = np.asarray(err, dtype=float)[idx]
            for k, (fn, _) in METRICS.items():
                out[m][k].append(fn(drawn))
    return Bootstrap({m: {k: np.concatenate(v) for k, v in d.items()} for m, d in out.items()}, samples, seed)


def verdict(low: float, high: float, better: str) -> str:
    """What a difference's interval (method − other) says: "better" / "worse" when it excludes zero, else
    "not distinguishable"."""
    if better == "lower":
        low, high = -high, -low
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "not distinguishable"
