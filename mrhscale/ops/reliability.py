"""Where does an uncertainty hold? evaluate's figures per tissue, per brain and per level,
pure numpy: exact counts per subject (``tally``) that add up over subjects, so the pooled
figures are exact too.

- **Per group**: the 95% coverage and mean interval width inside each tissue label, and
  "gm", the brain outside ``wm`` and ``lesion`` (where a ``wm`` label exists).
- **Reliability**: the observed coverage of virtual +- z_level x uncertainty (z the normal
  quantile of each nominal level) against the level; on the diagonal a Gaussian-calibrated
  uncertainty, below it an overconfident one.
- **Risk** (brain-level): per subject the share of voxels outside the 95% interval, and the
  share of subjects whose share is at most alpha (what ``--calibration-mode risk`` bounds).
- **Out-of-distribution score** (a prediction's ``ood``): its mean inside each label against
  the rest, how many voxels exceed the training brains' 99th percentile, its Spearman
  correlation with the absolute error.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from mrhscale.ops.risk import RISK_ALPHA

LEVELS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)  # the reliability plot's nominal levels


def z_of(level: float) -> float:
    """The half-width, in standard deviations, of a central normal interval of ``level``."""
    return float(stats.norm.ppf(0.5 + level / 2))


def tissue_groups(regions: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    """The voxels of each group: "all" (the mask), inside each label, and "gm" (the mask
    outside wm and lesion) when a wm label exists and no label is called gm."""
    groups = {"all": mask, **{n: mask & lab for n, lab in regions.items()}}
    if "wm" in regions and "gm" not in regions:
        groups["gm"] = mask & ~regions["wm"] & ~regions.get("lesion", np.zeros_like(mask))
    return groups


def tally(err, unc, groups: dict[str, np.ndarray], levels=LEVELS) -> dict:
    """Per group: voxels, how many lie within z_level x uncertainty at each level, the sum
    of their uncertainties (``groups``: bool arrays over the same voxels as err/unc)."""
    err, unc = np.abs(np.asarray(err, np.float64)), np.asarray(unc, np.float64)
    zs = np.asarray([z_of(q) for q in levels])
    out = {}
    for name, sel in groups.items():
        e, u = err[sel], unc[sel]
        out[name] = {"n": int(e.size), "unc_sum": float(u.sum()),
                     "covered": [int(c) for c in (e[None] <= zs[:, None] * u[None]).sum(axis=1)]}
    return out


def add_tallies(tallies: list[dict]) -> dict:
    """Subjects' tallies added group by group (a group missing from a subject adds nothing)."""
    out: dict[str, dict] = {}
    for t in tallies:
        for name, c in t.items():
            o = out.setdefault(name, {"n": 0, "unc_sum": 0.0, "covered": [0] * len(c["covered"])})
            o["n"] += c["n"]
            o["unc_sum"] += c["unc_sum"]
            o["covered"] = [a + b for a, b in zip(o["covered"], c["covered"], strict=True)]
    return out


def by_group(t: dict, levels=LEVELS) -> dict:
    """A tally as figures: per group voxels, 95% coverage and mean 95% interval width."""
    k = list(levels).index(0.95)
    return {name: {"voxels": c["n"], "coverage_95": c["covered"][k] / c["n"] if c["n"] else math.nan,
                   "interval_width_95": 2 * z_of(0.95) * c["unc_sum"] / c["n"] if c["n"] else math.nan}
            for name, c in t.items()}


def reliability(t: dict, levels=LEVELS) -> dict:
    """The reliability curve of each group of a tally: observed coverage at each level."""
    return {"levels": list(levels),
            "coverage": {name: [x / c["n"] if c["n"] else math.nan for x in c["covered"]] for name, c in t.items()}}


def brain_risk(miss: dict[str, float], alpha: float = RISK_ALPHA) -> dict:
    """Per subject the share of voxels outside the 95% interval, and the share of subjects
    whose share is at most ``alpha``."""
    ok = [m <= alpha for m in miss.values() if math.isfinite(m)]
    return {"alpha": alpha, "miss_share": dict(miss), "subjects": len(ok),
            "share_of_subjects_within": float(np.mean(ok)) if ok else math.nan}


def ood_tally(ood, regions: dict[str, np.ndarray], mask: np.ndarray, q99: float | None) -> dict:
    """One subject's sums of its OOD score inside and outside each label, and how many of
    its voxels exceed the training 99th percentile ``q99``."""
    o = np.asarray(ood, np.float64)
    out = {"n": int(mask.sum()), "sum": float(o[mask].sum()),
           "above_99": int((o[mask] > q99).sum()) if q99 is not None else None, "labels": {}}
    for name, lab in regions.items():
        inside, rest = mask & lab, mask & ~lab
        out["labels"][name] = [float(o[inside].sum()), int(inside.sum()), float(o[rest].sum()), int(rest.sum())]
    return out


def ood_figures(tallies: list[dict], score, abs_err) -> dict:
    """OOD figures from subjects' tallies (exact means, ratios and shares) and a voxel
    sample of the score and |error| (Spearman)."""
    n = sum(t["n"] for t in tallies)
    above = [t["above_99"] for t in tallies]
    labels: dict[str, list] = {}
    for t in tallies:
        for name, s in t["labels"].items():
            labels[name] = [a + b for a, b in zip(labels.get(name, [0.0, 0, 0.0, 0]), s, strict=True)]
    score, abs_err = np.ravel(score), np.ravel(abs_err)
    const = score.size < 2 or np.ptp(score) == 0 or np.ptp(abs_err) == 0
    return {"mean": sum(t["sum"] for t in tallies) / n if n else math.nan,
            "spearman_abs_error": math.nan if const else float(stats.spearmanr(score, abs_err).statistic),
            "share_above_training_99": sum(above) / n if n and None not in above else math.nan,
            "by_label": {name: _ratio(*s) for name, s in labels.items()}}


def _ratio(s_in: float, n_in: int, s_rest: float, n_rest: int) -> dict:
    a = s_in / n_in if n_in else math.nan
    b = s_rest / n_rest if n_rest else math.nan
    return {"voxels": n_in, "mean_inside": a, "mean_rest": b, "ratio": a / b if b and math.isfinite(b) else math.nan}
