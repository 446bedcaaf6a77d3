"""How often does the calibrated interval hold on a NEW brain? Issue 31's coverage per tissue
over many held-out brains, each on its own scanner, not only the demo's one.

A cohort of N synthetic brains (each on its own scanner; one with the demo's artefact) is
made beside a finished demo (``mrhscale demo --out DEMO``) and predicted once with the demo's
members and the raw (uncalibrated) uncertainty and the out-of-distribution score. Then each
brain in turn is held out and the others calibrate: voxel-level conformal (4 value bins) with
and without the score's widening, and brain-level risk control when at least 9 brains remain.
Printed: per variant and stain, the share of held-out brains whose 95% coverage is within
0.92-0.98 overall and in white matter, grey matter and the lesion, the median coverages, and
(risk) the share of brains with at most 5% of voxels outside.

    python benchmarks/measure_ood_brains.py DEMO OUT [--brains 12]
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from mrhscale.io.bundle import read_bundle, write_bundle
from mrhscale.ops.risk import fit_risk
from mrhscale.ops.uncertainty import (
    TINY,
    Z95,
    fit_calibration,
    fit_ood_power,
    label_group,
    value_bin,
)
from mrhscale.options import SynthVariation
from mrhscale.parallel.context import Context
from mrhscale.stages.calibrate import uncalibrated
from mrhscale.stages.ingest import ingest
from mrhscale.stages.predict import predict
from mrhscale.stores.cohort import CohortStore
from mrhscale.stores.predictions import PredictionStore
from mrhscale.synth.phantom import make_cohort

WINDOW = (0.92, 0.98)
TISSUES = ("all", "wm", "gm", "lesion")


def cohort(out: str, n: int, shape, seed: int) -> tuple[str, list[str]]:
    """N brains after the demo's five (ids s06..), each on its own scanner, s06 with the artefact."""
    ids = [f"s{i:02d}" for i in range(6, 6 + n)]
    files, store = os.path.join(out, "files"), os.path.join(out, "cohort.zarr")
    if not os.path.exists(os.path.join(files, "cohort.yaml")):
        make_cohort(files, n_subjects=5 + n, shape=shape, seed=seed + 1, fmt="nii.gz", quiet=True,
                    variation=SynthVariation(scanner_variation=ids, artefact=[ids[0]]))
    ingest(os.path.join(files, "cohort.yaml"), store, chunks=(32, 16, 32), ctx=Context(quiet=True))
    return store, ids


def brain(store: str, pred: str, sid: str, stains: list[str]) -> dict:
    ds, p = CohortStore.open(store).open_subject(sid), PredictionStore.open(pred).open_subject(sid)
    xyz = ("x", "y", "z")
    get = lambda v: np.asarray(v.transpose(*xyz).values)  # noqa: E731
    mask = get(ds["mask"]).astype(bool)
    wm, les = get(ds["wm"]).astype(bool), (get(ds["lesion"]).astype(bool) if "lesion" in ds else np.zeros_like(mask))
    tissue = {"all": mask, "wm": mask & wm & ~les, "gm": mask & ~wm & ~les, "lesion": mask & les}
    out = {"ood": get(p["ood"])[mask].astype(np.float64), "tissue": {k: v[mask] for k, v in tissue.items()}}
    for t in stains:
        out[t] = tuple(get(x)[mask].astype(np.float64) for x in (p[f"{t}_virtual"], p[f"{t}_uncertainty"], ds[t]))
    return out


def coverages(b: dict, t: str, half: np.ndarray) -> dict:
    err = np.abs(b[t][0] - b[t][2])
    return {k: float((err[m] <= half[m]).mean()) if m.sum() >= 20 else None for k, m in b["tissue"].items()}


def conformal(cal: list[dict], test: dict, t: str, widen: bool, tissue: bool = False) -> dict:
    """Pooled conformal over the calibration brains, 4 value bins (``tissue``: a factor per
    tissue, lesion / white matter / the rest), optionally the score's power."""
    v, u, r = (np.concatenate([b[t][i] for b in cal]) for i in range(3))
    o = np.concatenate([b["ood"] for b in cal])
    groups = ("labels", ["lesion", "wm"]) if tissue else ("value", 4)
    labels = [np.concatenate([b["tissue"][k] for b in cal]) for k in ("lesion", "wm")] if tissue else None
    p = fit_ood_power(v, u, r, o, groups, labels)["power"] if widen else 0.0
    g = fit_calibration(v, u * np.maximum(o, TINY) ** p, r, groups, labels)["groups"]
    group = (label_group([test["tissue"][k] for k in ("lesion", "wm")], test[t][0].shape) if tissue
             else value_bin(test[t][0], np.asarray(g["edges"])))
    each = np.asarray(g["factor"])[group]
    return coverages(test, t, Z95 * each * test[t][1] * np.maximum(test["ood"], TINY) ** p)


def risk(cal: list[dict], names: list[str], test: dict, t: str) -> dict:
    fit = fit_risk([b[t] for b in cal], names, ("none", None))
    return coverages(test, t, Z95 * fit["factor"] * test[t][1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("demo")
    ap.add_argument("out")
    ap.add_argument("--brains", type=int, default=12)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    cfg = json.load(open(os.path.join(a.demo, "summary.json")))["config"]
    store, ids = cohort(a.out, a.brains, tuple(cfg["shape"]), int(cfg["seed"]))
    bundle = read_bundle(os.path.join(a.demo, "run", "model.pt"))
    raw = write_bundle(os.path.join(a.out, "raw.pt"), uncalibrated(bundle))
    pred = os.path.join(a.out, "pred.zarr")
    predict(raw, store, pred, subjects=ids, overwrite=True, ctx=Context(quiet=True))
    stains = list(bundle["stains"])
    brains = {s: brain(store, pred, s, stains) for s in ids}
    rows = {}
    for held in ids:
        rest = [s for s in ids if s != held]
        for t in stains:
            rows.setdefault(("conformal", t), []).append(conformal([brains[s] for s in rest], brains[held], t, False))
            rows.setdefault(("conformal+ood", t), []).append(conformal([brains[s] for s in rest], brains[held], t, True))
            rows.setdefault(("tissue+ood", t), []).append(conformal([brains[s] for s in rest], brains[held], t, True,
                                                                    True))
            if len(rest) >= 9:
                rows.setdefault(("risk", t), []).append(risk([brains[s] for s in rest], rest, brains[held], t))
    report = {}
    for (variant, t), covs in rows.items():
        line = {}
        for k in TISSUES:
            vals = [c[k] for c in covs if c[k] is not None]
            line[k] = {"brains": len(vals), "within": sum(WINDOW[0] <= x <= WINDOW[1] for x in vals),
                       "at_least_0.95": sum(x >= 0.95 for x in vals), "median": float(np.median(vals)),
                       "min": float(min(vals)), "max": float(max(vals))}
        report[f"{variant} {t}"] = line
        print(f"{variant:13s} {t:4s} " + "  ".join(
            f"{k} {v['within']}/{v['brains']} in window, median {v['median']:.3f} [{v['min']:.2f}-{v['max']:.2f}]"
            for k, v in line.items()), flush=True)
    json.dump(report, open(os.path.join(a.out, "results.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
