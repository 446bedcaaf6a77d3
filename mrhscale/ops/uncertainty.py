"""Does a per-voxel uncertainty mean anything? Calibration and its checks, pure numpy.

An ensemble's spread is a standard deviation only up to a factor: members trained on
the same data agree more than their error warrants. ``calibration_factor`` fits that
factor on held-out data (split conformal: the finite-sample quantile
ceil((n+1)(1-alpha))/n of |error| / spread, so mean +- 1.96 x factor x spread covers a
new exchangeable sample with probability >= 1 - alpha); ``group_factors`` fits one per
group (Mondrian: tissue labels, or bins of the predicted value), so each group's
coverage holds, not only the average. The checks (Spearman of uncertainty with absolute error, interval coverage, the
error-retention curve) then say whether it ranks and sizes the errors on a new brain.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

Z95 = 1.959963984540054  # the standard normal's 97.5th percentile
TINY = 1e-12
RETENTION_POINTS = 100  # fractions 0.01 .. 1 of the retention curve


ALPHA = 0.05  # the 95% interval
CONFORMAL = "split conformal: the finite-sample quantile ceil((n+1)(1-alpha))/n of |error| / uncertainty"


def conformal_level(n: int, alpha: float = ALPHA) -> float:
    """The quantile level ceil((n+1)(1-alpha))/n of n calibration scores (> 1: too few
    scores for the guarantee, Vovk et al. 2005 / Romano et al. 2019)."""
    return math.ceil((n + 1) * (1 - alpha) - 1e-9) / n if n else math.inf


def conformal_quantile(scores: np.ndarray, alpha: float = ALPHA) -> float:
    """The k-th smallest score, k = ceil((n+1)(1-alpha)): a new exchangeable score is at most
    it with probability >= 1 - alpha. Fewer than 1/alpha - 1 scores: the largest (no
    finite-sample guarantee; the record says how many there were)."""
    s = np.sort(np.asarray(scores, np.float64).ravel())
    if s.size == 0:
        return math.nan
    k = math.ceil((s.size + 1) * (1 - alpha) - 1e-9)
    return float(s[min(k, s.size) - 1])


def calibration_factor(err: np.ndarray, spread: np.ndarray, coverage: float = 1 - ALPHA) -> float:
    """The factor s such that |err| <= Z95 * s * spread holds for a new sample with
    probability ``coverage`` (the conformal quantile, not a Gaussian fit: a CNN's errors
    are heavier-tailed than normal)."""
    ratio = np.abs(np.asarray(err, np.float64)) / np.maximum(np.asarray(spread, np.float64), TINY)
    if ratio.size == 0:
        return 1.0
    return conformal_quantile(ratio, 1 - coverage) / Z95


def value_edges(pred: np.ndarray, bins: int) -> np.ndarray:
    """The ``bins - 1`` inner edges of equal-count bins of the predicted value."""
    pred = np.asarray(pred, np.float64)
    if bins < 2 or pred.size == 0:
        return np.zeros(0)
    return np.unique(np.quantile(pred, np.arange(1, bins) / bins))


def value_bin(pred, edges) -> np.ndarray:
    """Each value's bin among ``edges`` (0 .. len(edges))."""
    return np.searchsorted(np.asarray(edges, np.float64), np.asarray(pred), side="right")


def group_factors(err, spread, group, n_groups: int, alpha: float = ALPHA) -> dict:
    """One conformal factor per group (``group``: each sample's group 0 .. n_groups-1); a
    group with too few samples for the guarantee (< 1/alpha - 1) takes the global factor."""
    err, spread, group = (np.asarray(a).ravel() for a in (err, spread, group))
    glob = calibration_factor(err, spread, 1 - alpha)
    n = np.bincount(group, minlength=n_groups)[:n_groups]
    small = 1 / alpha - 1
    factor = [calibration_factor(err[group == g], spread[group == g], 1 - alpha) if n[g] >= small else glob
              for g in range(n_groups)]
    return {"factor": [float(f) for f in factor], "n": [int(c) for c in n], "global": float(glob)}


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
            "interval_width_95": float(2 * Z95 * unc.mean()) if n else math.nan,
            "factor_for_95": calibration_factor(err, unc) if n else math.nan,
            "by_value": coverage_by_value(est, err, unc), "retention": retention_curve(err, unc)}


def coverage_by_value(est, err, unc, bins: int = 4) -> list[dict]:
    """95% coverage and interval width in equal-count bins of the predicted value (the groups
    a value-binned calibration holds each of)."""
    est, err, unc = (np.asarray(a, np.float64) for a in (est, err, unc))
    edges = value_edges(est, bins)
    group = value_bin(est, edges)
    bounds = [-math.inf, *edges.tolist(), math.inf]
    return [{"from": bounds[g], "to": bounds[g + 1], "n": int((group == g).sum()),
             "coverage_95": coverage(err[group == g], unc[group == g]),
             "interval_width_95": float(2 * Z95 * unc[group == g].mean()) if (group == g).any() else math.nan}
            for g in range(len(edges) + 1)]


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


def label_group(labels: list[np.ndarray], shape) -> np.ndarray:
    """Each voxel's tissue group: the first of ``labels`` (bool volumes) it lies in, else
    len(labels) (the rest of the brain)."""
    group = np.full(shape, len(labels), np.int64)
    for g in reversed(range(len(labels))):
        group[np.asarray(labels[g], bool)] = g
    return group


def relative_factors(groups: dict, factor: float) -> np.ndarray:
    """A stain's group factors over its global factor: what multiplies the globally
    calibrated uncertainty of a voxel of each group."""
    return (np.asarray(groups["factor"], np.float64) / max(float(factor), TINY)).astype(np.float32)


def scale_by_value(pred: np.ndarray, n_t: int, value_groups) -> np.ndarray:
    """An ensemble's uncertainties (``pred[:, n_t:]``, in stain units after the maps
    ``pred[:, :n_t]``) times the relative factor of the bin of each voxel's predicted value;
    ``value_groups``: per stain (inner edges in stain units, relative factors) or None."""
    for k, g in enumerate(value_groups or ()):
        if g is not None:
            pred[:, n_t + k] *= np.asarray(g[1], np.float32)[value_bin(pred[:, k], g[0])]
    return pred


def ood_powers(calibrations: list[dict]) -> np.ndarray | None:
    """Per stain, the power of the out-of-distribution score the uncertainty is multiplied by
    (``fit_ood_power``), or None where every stain's is 0 (or none was fitted)."""
    p = np.asarray([float(c.get("ood_power") or 0.0) for c in calibrations], np.float32)
    return p if p.any() else None


def widened(unc, ood, power):
    """The uncertainty ``unc`` times the out-of-distribution score ``ood`` to ``power`` (the
    calibration's ``ood_power``; unchanged for power 0 or no score)."""
    if ood is None or not power:
        return unc
    return unc * np.maximum(ood, TINY) ** np.asarray(power, np.asarray(unc).dtype)


def widen_by_ood(pred: np.ndarray, n_t: int, power) -> np.ndarray:
    """An ensemble's uncertainties (``pred[:, n_t:2 n_t]``) times the out-of-distribution score
    (``pred[:, 2 n_t]``) to each stain's ``power``, in place."""
    for k, p in enumerate(np.atleast_1d(power)):
        pred[:, n_t + k] = widened(pred[:, n_t + k], pred[:, 2 * n_t], p)
    return pred


def value_groups(calibrations: list[dict]) -> tuple | None:
    """Per stain (inner edges, relative factors) of a calibration by predicted-value bins,
    else None; None for none of them."""
    out = tuple((np.asarray(g["edges"], np.float32), relative_factors(g, c.get("factor", 1.0)))
                if (g := c.get("groups") or {}).get("by") == "value" else None for c in calibrations)
    return out if any(g is not None for g in out) else None


def label_groups(calibrations: list[dict]) -> list:
    """Per stain (label names, relative factors: one per label, then the rest) of a
    calibration by tissue labels, else None."""
    return [(list(g["labels"]), relative_factors(g, c.get("factor", 1.0)))
            if (g := c.get("groups") or {}).get("by") == "labels" else None for c in calibrations]


def fit_calibration(virt, unc, ref, groups: tuple[str, object] = ("none", None), labels=None,
                    alpha: float = ALPHA) -> dict:
    """One stain's conformal calibration from calibration samples (stain units; ``unc`` the
    raw, uncalibrated uncertainty): the global factor, and with ``groups`` ("value", N bins;
    or "labels", names, with ``labels`` their bool arrays over the samples) one per group."""
    virt, unc, ref = (np.asarray(a, np.float64).ravel() for a in (virt, unc, ref))
    err = virt - ref
    factor = calibration_factor(err, unc, 1 - alpha)
    out = {"factor": factor, "n": int(err.size), "alpha": alpha, "method": CONFORMAL,
           "quantile_level": conformal_level(err.size, alpha), "coverage_before": coverage(err, unc),
           "coverage_after": coverage(err, factor * unc), "mean_half_width": float(Z95 * factor * unc.mean())}
    kind, arg = groups
    if kind == "none" or err.size == 0:
        return out
    edges = value_edges(virt, int(arg)) if kind == "value" else None
    group = value_bin(virt, edges) if kind == "value" else label_group([np.ravel(lab) for lab in labels], err.shape)
    n_groups = len(edges) + 1 if kind == "value" else len(arg) + 1
    fit = group_factors(err, unc, group, n_groups, alpha)
    rec = {"by": kind, **({"edges": edges.tolist()} if kind == "value" else {"labels": list(arg)}),
           "factor": fit["factor"], "n": fit["n"]}
    each = np.asarray(fit["factor"])[group]
    rec["coverage"] = [coverage(err[group == g], each[group == g] * unc[group == g]) for g in range(n_groups)]
    return {**out, "groups": rec, "coverage_after": coverage(err, each * unc),
            "mean_half_width": float(Z95 * (each * unc).mean())}


OOD_POWERS = tuple(np.round(np.arange(0, 2.01, 0.25), 2))  # the powers fit_ood_power tries


def fit_ood_power(virt, unc, ref, ood, groups=("none", None), labels=None, alpha: float = ALPHA) -> dict:
    """The power p of the out-of-distribution score that gives the narrowest intervals at
    the calibrated coverage when the uncertainty is ``unc * ood ** p`` (p = 0: the score
    does not help; the group factors are then fitted on the widened uncertainty). Choosing
    one of a few powers on the calibration voxels themselves costs the finite-sample
    guarantee next to nothing at the calibration sets' sizes (a brain: 10^4-10^6 voxels)."""
    unc, ood = np.asarray(unc, np.float64), np.asarray(ood, np.float64)
    widths = {float(p): fit_calibration(virt, widened(unc, ood, p), ref, groups, labels, alpha)["mean_half_width"]
              for p in OOD_POWERS}
    best = min(widths, key=lambda p: (widths[p], p))
    return {"power": best, "widths": {f"{p:g}": w for p, w in widths.items()}}
