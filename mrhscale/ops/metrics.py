"""Similarity, ROC and pooled accumulators: the numbers of ``mrhscale evaluate``, pure numpy.

The pooled figures follow MONAI's Cumulative pattern: each subject is added to an
accumulator (exact moments for Pearson, MAE, RMSE, PSNR, SSIM; a bounded random
voxel sample for Spearman and ROC), and the accumulator aggregates once at the end.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import stats
from scipy.stats import mannwhitneyu
from skimage.metrics import structural_similarity


def similarity(est: np.ndarray, ref: np.ndarray, mask: np.ndarray, data_range: float | None = None,
               ssim: bool = True) -> dict[str, float]:
    """Pearson, Spearman, MAE, PSNR, SSIM of ``est`` vs ``ref`` inside ``mask`` (3D arrays)."""

    mask = np.asarray(mask, bool)
    e = np.asarray(est, np.float64)[mask]
    r = np.asarray(ref, np.float64)[mask]
    n = int(mask.sum())
    out: dict[str, float] = {"n": n}
    if n < 2:
        return {**out, "pearson": math.nan, "spearman": math.nan, "mae": math.nan,
                "rmse": math.nan, "psnr": math.nan, "ssim": math.nan, "data_range": math.nan}
    if data_range is None:
        data_range = float(r.max() - r.min()) or 1.0
    const = np.ptp(e) == 0 or np.ptp(r) == 0
    out["pearson"] = math.nan if const else float(stats.pearsonr(e, r).statistic)
    out["spearman"] = math.nan if const else float(stats.spearmanr(e, r).statistic)
    err = e - r
    out["mae"] = float(np.abs(err).mean())
    mse = float((err**2).mean())
    out["rmse"] = math.sqrt(mse)
    out["psnr"] = math.inf if mse == 0 else float(10 * np.log10(data_range**2 / mse))
    out["data_range"] = float(data_range)
    out["ssim"] = ssim_in_mask(est, ref, mask, data_range) if ssim else math.nan
    return out


def ssim_in_mask(est, ref, mask, data_range: float) -> float:
    """Mean of skimage's SSIM map over the mask (volumes zeroed outside it)."""

    mask = np.asarray(mask, bool)
    a = np.where(mask, np.asarray(est, np.float64), 0.0)
    b = np.where(mask, np.asarray(ref, np.float64), 0.0)
    small = min(a.shape)
    win = min(7, small if small % 2 else small - 1)
    if win < 3:
        return math.nan
    _, smap = structural_similarity(a, b, data_range=float(data_range), win_size=win, full=True)
    return float(smap[mask].mean())


def linear_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares y ~ a*x + b (a=0 for a constant x)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    vx = x.var()
    if vx == 0 or not np.isfinite(vx):
        return 0.0, float(y.mean()) if y.size else 0.0
    a = float(((x - x.mean()) * (y - y.mean())).mean() / vx)
    return a, float(y.mean() - a * x.mean())


def roc(scores: np.ndarray, labels: np.ndarray, max_points: int = 512) -> dict[str, Any]:
    """ROC of detecting ``labels`` (bool) from ``scores``: AUC (oriented), curve, Youden point."""

    s = np.asarray(scores, np.float64).ravel()
    y = np.asarray(labels, bool).ravel()
    ok = np.isfinite(s)
    s, y = s[ok], y[ok]
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return {"auc": math.nan, "auc_raw": math.nan, "direction": None, "n_pos": n1, "n_neg": n0,
                "note": "label has only one class inside the mask"}
    u = mannwhitneyu(s[y], s[~y], alternative="two-sided").statistic
    auc_raw = float(u / (n1 * n0))
    direction = "higher" if auc_raw >= 0.5 else "lower"
    so = s if direction == "higher" else -s
    order = np.argsort(-so, kind="mergesort")
    ss, yy = so[order], y[order]
    tp = np.cumsum(yy)
    fp = np.cumsum(~yy)
    last = np.r_[np.nonzero(np.diff(ss))[0], len(ss) - 1]  # last index of each threshold
    tpr = np.r_[0.0, tp[last] / n1]
    fpr = np.r_[0.0, fp[last] / n0]
    thr = np.r_[np.inf, ss[last]]
    j = int(np.argmax(tpr - fpr))
    if len(fpr) > max_points:  # keep the curve's shape, drop redundant points
        keep = np.unique(np.r_[0, np.linspace(0, len(fpr) - 1, max_points).astype(int), j, len(fpr) - 1])
        fpr_c, tpr_c = fpr[keep], tpr[keep]
    else:
        fpr_c, tpr_c = fpr, tpr
    thr_j = float(thr[j]) if direction == "higher" else float(-thr[j])
    return {
        "auc": max(auc_raw, 1 - auc_raw), "auc_raw": auc_raw, "direction": direction,
        "n_pos": n1, "n_neg": n0,
        "youden": {"sensitivity": float(tpr[j]), "specificity": float(1 - fpr[j]), "threshold": thr_j},
        "fpr": fpr_c.tolist(), "tpr": tpr_c.tolist(),
    }




def spearman(parts: list[np.ndarray], ref_parts: list[np.ndarray]) -> float:
    a, b = np.concatenate(parts), np.concatenate(ref_parts)
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(stats.spearmanr(a, b).statistic)


class PooledMoments:
    """Exact pooled similarity of an estimate to the reference over many subjects.

    ``update`` adds one subject's masked voxels: the estimate (for MAE/RMSE/PSNR),
    the raw score (for Pearson, which is scale-free), the virtual stain (for the
    score's Pearson with it) and the subject's SSIM weighted by its voxel count.
    """

    KEYS = ("n", "abs", "sq", "ssim", "ssim_n", "sx", "sy", "sxx", "syy", "sxy", "sv", "svv", "sxv")

    def __init__(self):
        self.acc = dict.fromkeys(self.KEYS, 0.0)

    def update(self, est, ref, raw, virt, ssim: float) -> None:
        a = self.acc
        a["n"] += est.size
        a["abs"] += float(np.abs(est - ref).sum())
        a["sq"] += float(((est - ref) ** 2).sum())
        if math.isfinite(ssim):
            a["ssim"] += ssim * est.size
            a["ssim_n"] += est.size
        for k, x, y in (("sx", raw, None), ("sy", ref, None), ("sxx", raw, raw), ("syy", ref, ref),
                        ("sxy", raw, ref), ("sv", virt, None), ("svv", virt, virt), ("sxv", raw, virt)):
            a[k] += float(x.sum() if y is None else (x * y).sum())

    def aggregate(self, data_range: float, with_virtual: bool) -> dict[str, float]:
        a, n = self.acc, self.acc["n"]
        mse = a["sq"] / n if n else math.nan
        vx = a["sxx"] / n - (a["sx"] / n) ** 2 if n else 0.0
        out = {"n": int(n), "pearson": _corr(a, "sx", "sy", "sxx", "syy", "sxy"),
               "mae": a["abs"] / n if n else math.nan, "rmse": math.sqrt(mse) if n else math.nan,
               "psnr": math.inf if mse == 0 else float(10 * np.log10(data_range**2 / mse)),
               "ssim": a["ssim"] / a["ssim_n"] if a["ssim_n"] else math.nan, "data_range": data_range}
        if with_virtual:
            out["pearson_vs_virtual"] = _corr(a, "sx", "sv", "sxx", "svv", "sxv") if vx > 0 else math.nan
        return out


def _corr(a: dict, sx: str, sy: str, sxx: str, syy: str, sxy: str) -> float:
    n = a["n"]
    if not n:
        return math.nan
    cov = a[sxy] / n - (a[sx] / n) * (a[sy] / n)
    vx, vy = a[sxx] / n - (a[sx] / n) ** 2, a[syy] / n - (a[sy] / n) ** 2
    return float(cov / math.sqrt(vx * vy)) if vx > 0 and vy > 0 else math.nan
