"""Does a per-voxel uncertainty mean anything? Calibration and its checks, pure numpy.

An ensemble's spread is a standard deviation only up to a factor: members trained on
the same data agree more than their error warrants. ``calibration_factor`` fits that
factor on held-out patches so that mean +- 1.96 x factor x spread covers 95% of them;
the checks (Spearman of uncertainty with absolute error, interval coverage, the
error-retention curve) then say whether it ranks and sizes the errors on a new brain.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

Z95 = 1.959963984540054  # the standard normal's 97.5th percentile
TINY = 1e-12
RETENTION_POINTS = 100  # fractions 0.01 .. 1 of the retention curve


def calibration_factor(err: np.ndarray, spread: np.ndarray, coverage: float = 0.95) -> float:
    """The factor s such that |err| <= Z95 * s * spread on ``coverage`` of the samples (a
    quantile, not a Gaussian fit: the errors of a CNN are heavier-tailed than normal)."""
    ratio = np.abs(np.asarray(err, np.float64)) / np.maximum(np.asarray(spread, np.float64), TINY)
    if ratio.size == 0:
        return 1.0
    return float(np.quantile(ratio, coverage) / Z95)


def coverage(err: np.ndarray, unc: np.ndarray, z: float = Z95) -> float:
    """Share of samples whose absolute error lies within z x uncertainty."""
    err = np.abs(np.asarray(err, np.float64))
    return float((err <= z * np.asarray(unc, np.float64)).mean()) if err.size else math.nan


def retention_curve(err: np.ndarray, unc: np.ndarray, points: int = RETENTION_POINTS) -> dict:
    """Mean absolute error of the most confident fraction f of the samples, f = 1/points .. 1,
    with its area (mean over f: lower is better); the same for an oracle that knew the
    errors (the floor) and for random order (the full MAE at every f: the ceiling)."""
    err = np.abs(np.asarray(err, np.float64)).ravel()
    n = err.size
    if n == 0:
        return {"fractions": [], "mae": [], "area": math.nan, "oracle_area": math.nan, "random_area": math.nan}
    fr = np.arange(1, points + 1) / points
    keep = np.maximum(1, np.round(fr * n).astype(int))

    def curve(order):
        csum = np.cumsum(err[order])
        return csum[keep - 1] / keep

    by_unc = curve(np.argsort(np.asarray(unc, np.float64).ravel(), kind="stable"))
    oracle = curve(np.argsort(err, kind="stable"))
    return {"fractions": fr.tolist(), "mae": by_unc.tolist(), "oracle_mae": oracle.tolist(),
            "area": float(by_unc.mean()), "oracle_area": float(oracle.mean()), "random_area": float(err.mean())}


def uncertainty_metrics(est: np.ndarray, ref: np.ndarray, unc: np.ndarray) -> dict:
    """Spearman(uncertainty, |error|), 95% coverage and the retention curve of one set of
    voxels (1-D arrays inside the evaluation mask); ``factor_for_95``: what the uncertainty
    would have to be multiplied by to cover 95% of these voxels (1: calibrated here)."""

    err = np.abs(np.asarray(est, np.float64) - np.asarray(ref, np.float64))
    unc = np.asarray(unc, np.float64)
    n = err.size
    const = n < 2 or np.ptp(unc) == 0 or np.ptp(err) == 0
    return {"n": int(n), "spearman_abs_error": math.nan if const else float(stats.spearmanr(unc, err).statistic),
            "coverage_95": coverage(err, unc), "mean_uncertainty": float(unc.mean()) if n else math.nan,
            "factor_for_95": calibration_factor(err, unc) if n else math.nan,
            "retention": retention_curve(err, unc)}


def calibration_factors(meta: dict, n_stains: int) -> np.ndarray:
    """An ensemble bundle's calibration factor of each stain (1 where none was fitted)."""
    cal = (meta.get("uncertainty") or {}).get("calibration") or {}
    return np.broadcast_to(np.atleast_1d(np.asarray(cal.get("factor", 1.0), np.float64)), (n_stains,)).copy()


def spread_scale(meta: dict, norm) -> np.ndarray | None:
    """Per stain, stain units per unit of an ensemble's spread (the target scale of ``norm``
    times the calibration factor fitted on the validation split at training), or None for
    a single network."""
    if int(meta.get("members", 1)) < 2:
        return None
    scale = norm.target_arrays(np.float64)[1]
    return (scale * calibration_factors(meta, len(scale))).astype(np.float32)
