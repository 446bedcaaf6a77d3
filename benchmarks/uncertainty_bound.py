"""How well COULD any uncertainty built from what predict knows rank the errors of the demo's
held-out brain? An upper bound for issue 31's Spearman target, fitted on that brain itself.

For each single feature and each pair (the ensemble's raw spread, the predicted value of
each stain, the out-of-distribution score, the map's local variation), the mean |error| in
quantile bins of the feature(s) (10, or 10 x 10 for a pair) is learnt on one half of the
brain (slices split along z) and ranks the other half's errors, and the reverse: the
Spearman of that cross-fitted estimate with |error|. It uses the held-out brain's own errors,
which no uncertainty can see, so no honest uncertainty from these features should do better.

    python benchmarks/uncertainty_bound.py DEMO [PRED]
"""

from __future__ import annotations

import itertools
import json
import os
import sys

import numpy as np
from scipy import ndimage, stats

from mrhscale.stores.cohort import CohortStore
from mrhscale.stores.predictions import PredictionStore

BINS = 10


def binned_estimate(feats: list[np.ndarray], err: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Mean |error| of the training voxels in each cell of the features' quantile bins, at every voxel."""
    cells = np.zeros(len(err), np.int64)
    for f in feats:
        edges = np.unique(np.quantile(f[train], np.linspace(0, 1, BINS + 1)[1:-1]))
        cells = cells * (len(edges) + 1) + np.searchsorted(edges, f, side="right")
    n = np.bincount(cells[train], minlength=cells.max() + 1)
    s = np.bincount(cells[train], weights=err[train], minlength=cells.max() + 1)
    mean = np.divide(s, n, out=np.full(len(s), err[train].mean()), where=n > 0)
    return mean[cells]


def bound(feats: list[np.ndarray], err: np.ndarray, half: np.ndarray) -> float:
    est = np.empty_like(err)
    for side in (half, ~half):
        est[~side] = binned_estimate(feats, err, side)[~side]
    return float(stats.spearmanr(est, err).statistic)


def main() -> None:
    demo = sys.argv[1]
    pred = sys.argv[2] if len(sys.argv) > 2 else os.path.join(demo, "pred.zarr")
    sid = json.load(open(os.path.join(demo, "summary.json")))["held_out"]
    ds = CohortStore.open(os.path.join(demo, "cohort.zarr")).open_subject(sid)
    p = PredictionStore.open(pred).open_subject(sid)
    xyz = ("x", "y", "z")
    get = lambda v: np.asarray(v.transpose(*xyz).values, np.float64)  # noqa: E731
    mask = get(ds["mask"]).astype(bool)
    half = (np.indices(mask.shape)[2] < mask.shape[2] // 2)[mask]
    stains = [v[: -len("_virtual")] for v in p.data_vars if v.endswith("_virtual")]
    virt = {t: get(p[f"{t}_virtual"]) for t in stains}
    for t in stains:
        ref = get(ds[t])
        ok = np.isfinite(ref[mask])
        err = np.abs(virt[t] - ref)[mask][ok]
        local = np.sqrt(np.maximum(ndimage.uniform_filter(virt[t] ** 2, 3) - ndimage.uniform_filter(virt[t], 3) ** 2, 0))
        feats = {"uncertainty": get(p[f"{t}_uncertainty"]), "local variation": local,
                 **{f"{s} value": virt[s] for s in stains}, **({"ood": get(p["ood"])} if "ood" in p else {})}
        feats = {k: f[mask][ok] for k, f in feats.items()}
        h = half[ok]
        single = {k: bound([f], err, h) for k, f in feats.items()}
        pairs = {f"{a} x {b}": bound([feats[a], feats[b]], err, h) for a, b in itertools.combinations(feats, 2)}
        best = max(pairs, key=pairs.get)
        now = float(stats.spearmanr(feats["uncertainty"], err).statistic)
        print(f"{t}: the uncertainty as written {now:.3f}; bound by one feature: "
              + ", ".join(f"{k} {v:.3f}" for k, v in single.items()) + f"; best pair: {best} {pairs[best]:.3f}")


if __name__ == "__main__":
    main()
