"""An ensemble's uncertainty calibrated on whole held-out brains (``train
--calibration-subjects``): each brain predicted in full with the raw (uncalibrated)
uncertainty, its voxels' |error| / uncertainty the conformal scores, one factor per stain
and, with ``--calibration-groups``, one per group (tissue labels of the cohort, or bins of
the predicted value). Whole brains see what a new brain does to the errors everywhere
(white matter, lesions), where validation patches are a sample of it.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from mrhscale.errors import MRHError
from mrhscale.io.bundle import write_bundle
from mrhscale.parallel.context import Context
from mrhscale.stages.predict_volume import predict_volume
from mrhscale.stores.cohort import CohortStore
from mrhscale.stores.legacy import stains_of

SAMPLES_PER_BRAIN = 2_000_000  # voxels per brain at most (a fixed random subset beyond)


def calibrate_on_brains(bundle: dict, cohort_url: str, subjects: list[str], groups, fit, *,
                        ctx: Context | None = None) -> list[dict]:
    """Per stain of ``bundle`` (an ensemble), ``fit(virt, unc, ref, groups, labels=...)``
    over the voxels of ``subjects`` of the cohort store at ``cohort_url``."""
    ctx = ctx or Context()
    store = CohortStore.open(ctx.location(cohort_url))
    missing = [s for s in subjects if s not in store.subjects()]
    if missing:
        raise MRHError(f"--calibration-subjects: {', '.join(missing)} not in the cohort store {cohort_url}")
    stains = stains_of(bundle)
    with tempfile.TemporaryDirectory(prefix="mrhscale-calibrate-") as tmp:
        raw = write_bundle(os.path.join(tmp, "model.pt"), uncalibrated(bundle))
        brains = [brain_samples(raw, store.open_subject(sid), sid, stains, groups, ctx) for sid in subjects]
    return [fit(*(np.concatenate([b[t][i] for b in brains]) for i in range(3)), groups,
                labels=_labels(brains, t, groups)) for t in stains]


def uncalibrated(bundle: dict) -> dict:
    """The bundle with factor 1 and no groups: predict then writes the raw uncertainty."""
    cal = {"factor": [1.0] * len(stains_of(bundle)), "fitted_on": None, "stains": {}}
    return {**bundle, "uncertainty": {**(bundle.get("uncertainty") or {}), "calibration": cal}}


def brain_samples(model: str, ds, sid: str, stains: list[str], groups, ctx: Context) -> dict:
    """Per stain (virtual, raw uncertainty, reference, tissue labels) at the brain's voxels."""
    maps = predict_volume(model, ds, ctx=ctx)
    mask = _xyz(ds["mask"]).astype(bool)
    names = list(groups[1]) if groups[0] == "labels" else []
    absent = [n for n in names if n not in ds.data_vars]
    if absent:
        raise MRHError(f"--calibration-groups: calibration subject {sid} has no label {', '.join(absent)} "
                       f"(labels: {', '.join(ds.attrs.get('labels') or []) or 'none'})")
    out = {}
    for t in stains:
        if t not in ds.data_vars:
            raise MRHError(f"--calibration-subjects: subject {sid} has no reference {t!r} to calibrate on")
        ref = _xyz(ds[t]).astype(np.float64)
        ok = np.flatnonzero((mask & np.isfinite(ref)).ravel())
        if ok.size > SAMPLES_PER_BRAIN:
            ok = np.sort(np.random.default_rng(0).choice(ok, SAMPLES_PER_BRAIN, replace=False))
        pick = [v.ravel()[ok] for v in (_xyz(maps[f"{t}_virtual"]), _xyz(maps[f"{t}_uncertainty"]), ref)]
        out[t] = (*pick, [_xyz(ds[n]).astype(bool).ravel()[ok] for n in names])
    return out


def _xyz(var) -> np.ndarray:
    return np.asarray(var.transpose("x", "y", "z").values)


def _labels(brains: list[dict], t: str, groups) -> list | None:
    if groups[0] != "labels":
        return None
    return [np.concatenate([b[t][3][g] for b in brains]) for g in range(len(groups[1]))]
