"""Brain-level risk control, pure numpy: a calibration factor whose guarantee is about a
new **brain**, not a new voxel.

Each calibration brain i gets the smallest factor lambda_i at which at most ``alpha`` of
its voxels fall outside virtual +- 1.96 x lambda x uncertainty (its own risk, a share of
voxels). Brains, unlike the voxels of one brain, can be exchangeable (scanners and sessions
drawn like the new one), so the k-th smallest of the n lambdas, k = ceil((n+1)(1-delta)),
bounds a new brain's lambda with probability >= 1 - delta (split conformal over brains), and
at that factor the new brain has at most ``alpha`` of its voxels outside its interval. This
is the per-image risk that image-to-image risk control (Angelopoulos et al. 2022) bounds
with an upper confidence bound; with brains as the unit the conformal quantile gives it
exactly. It needs n >= ceil(1/delta) - 1 brains.
"""

from __future__ import annotations

import math

import numpy as np

from mrhscale.errors import MRHError
from mrhscale.ops.uncertainty import TINY, Z95, coverage, label_group, value_bin, value_edges

RISK_ALPHA = 0.05  # at most this share of a brain's voxels outside its interval
RISK_DELTA = 0.1  # ... with probability at least 1 - delta over the calibration brains
EDGE = 1e-9  # relative: the boundary voxel stays inside its interval after rounding
RISK = ("brain-level risk control: per calibration brain the smallest factor with at most alpha of its "
        "voxels outside +-1.96 x factor x uncertainty; the factor is the ceil((n+1)(1-delta))-th smallest "
        "over the n brains")


def brains_needed(delta: float) -> int:
    """The fewest calibration brains with which the conformal quantile over brains exists:
    ceil(1/delta) - 1 (9 for delta 0.1)."""
    return max(1, math.ceil(1 / delta - 1e-9) - 1)


def brain_factor(err, unc, alpha: float = RISK_ALPHA, z: float = Z95) -> float:
    """The smallest lambda at which at most ``alpha`` of these voxels (one brain) have
    |err| > z x lambda x unc: the (n - floor(alpha n))-th smallest of |err| / (z unc)."""
    ratio = np.sort(np.abs(np.asarray(err, np.float64)).ravel()
                    / (z * np.maximum(np.asarray(unc, np.float64).ravel(), TINY)))
    if ratio.size == 0:
        return math.nan
    allowed = math.floor(alpha * ratio.size + 1e-9)  # voxels that may miss
    return float(ratio[ratio.size - allowed - 1]) * (1 + EDGE)


def miss_share(err, unc, z: float = Z95) -> float:
    """The share of voxels outside +- z x uncertainty (a brain's risk)."""
    err = np.abs(np.asarray(err, np.float64))
    return float((err > z * np.asarray(unc, np.float64)).mean()) if err.size else math.nan


def risk_quantile(factors, delta: float = RISK_DELTA) -> tuple[float, int]:
    """(the k-th smallest of the brains' factors, k = ceil((n+1)(1-delta))); a new
    exchangeable brain's factor is at most it with probability >= 1 - delta."""
    f = np.sort(np.asarray(factors, np.float64).ravel())
    k = math.ceil((f.size + 1) * (1 - delta) - 1e-9)
    if k > f.size:
        raise MRHError(_too_few(f.size, delta))
    return float(f[k - 1]), k


def check_brains(n: int, delta: float, alpha: float) -> None:
    """The user's choice checked before any work: alpha and delta in (0, 1), enough brains."""
    if not (0 < alpha < 1 and 0 < delta < 1):
        raise MRHError(f"--risk-alpha {alpha:g} / --risk-delta {delta:g}: both must lie strictly between 0 and 1")
    if n < brains_needed(delta):
        raise MRHError(_too_few(n, delta))


def _too_few(n: int, delta: float) -> str:
    return (f"--calibration-mode risk: {n} calibration brain(s); --risk-delta {delta:g} needs at least "
            f"{brains_needed(delta)} (give more --calibration-subjects, or a larger --risk-delta)")


def fit_risk(brains: list[tuple], names: list[str], groups: tuple[str, object] = ("none", None),
             alpha: float = RISK_ALPHA, delta: float = RISK_DELTA) -> dict:
    """One stain's risk-controlled calibration from per-brain samples ``brains`` (virtual,
    raw uncertainty, reference[, labels: bool arrays of ``groups``' labels]) named ``names``:
    the factor, each brain's lambda, and with ``groups`` one factor per group, each the
    quantile over the brains that have that group."""
    check_brains(len(brains), delta, alpha)
    err = [np.asarray(b[0], np.float64).ravel() - np.asarray(b[2], np.float64).ravel() for b in brains]
    unc = [np.asarray(b[1], np.float64).ravel() for b in brains]
    lam = [brain_factor(e, u, alpha) for e, u in zip(err, unc, strict=True)]
    factor, k = risk_quantile(lam, delta)
    e_all, u_all = np.concatenate(err), np.concatenate(unc)
    out = {"factor": factor, "n": int(e_all.size), "mode": "risk", "alpha": alpha, "delta": delta,
           "method": RISK, "n_brains": len(brains), "k": k, "quantile_level": k / len(brains),
           "brain_factors": dict(zip(names, lam, strict=True)),
           "brain_miss_share": {s: miss_share(e, factor * u) for s, e, u in zip(names, err, unc, strict=True)},
           "coverage_before": coverage(e_all, u_all), "coverage_after": coverage(e_all, factor * u_all)}
    if groups[0] == "none":
        return out
    group, rec = brain_groups(brains, groups)
    rec = {**rec, **group_risk(err, unc, group, rec["n_groups"], factor, alpha, delta)}
    each = [np.asarray(rec["factor"])[g] for g in group]
    rec["coverage"] = [coverage(np.concatenate([e[g == j] for e, g in zip(err, group, strict=True)]),
                                np.concatenate([(f * u)[g == j] for f, u, g in zip(each, unc, group, strict=True)]))
                       for j in range(rec.pop("n_groups"))]
    after = np.concatenate([f * u for f, u in zip(each, unc, strict=True)])
    return {**out, "groups": rec, "coverage_after": coverage(e_all, after)}


def brain_groups(brains: list[tuple], groups: tuple[str, object]) -> tuple[list[np.ndarray], dict]:
    """Each brain's voxels' group, a bin of the predicted value (edges from all the brains'
    voxels) or the first tissue label a voxel lies in (else the rest), and the group
    record's head (``by``, ``edges`` or ``labels``, ``n_groups``)."""
    kind, arg = groups
    if kind == "value":
        edges = value_edges(np.concatenate([np.ravel(b[0]) for b in brains]), int(arg))
        return ([value_bin(np.ravel(b[0]), edges) for b in brains],
                {"by": "value", "edges": edges.tolist(), "n_groups": len(edges) + 1})
    return ([label_group([np.ravel(lab) for lab in b[3]], np.ravel(b[0]).shape) for b in brains],
            {"by": "labels", "labels": list(arg), "n_groups": len(arg) + 1})


def group_risk(err, unc, group, n_groups: int, factor: float, alpha: float, delta: float) -> dict:
    """Per group, the quantile over brains of each brain's lambda inside that group; a group
    present in fewer brains than delta needs takes the global ``factor`` (not guaranteed)."""
    lam = [[brain_factor(e[g == j], u[g == j], alpha) if (g == j).any() else None
            for e, u, g in zip(err, unc, group, strict=True)] for j in range(n_groups)]
    have = [sum(x is not None for x in per) for per in lam]
    ok = [h >= brains_needed(delta) for h in have]
    fac = [risk_quantile([x for x in per if x is not None], delta)[0] if g else factor
           for per, g in zip(lam, ok, strict=True)]
    return {"factor": fac, "n": [int(sum((g == j).sum() for g in group)) for j in range(n_groups)],
            "n_brains": have, "guaranteed": ok, "brain_factors": lam}
