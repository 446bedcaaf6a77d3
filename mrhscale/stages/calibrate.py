"""An ensemble's uncertainty calibrated on whole held-out brains (``train
--calibration-subjects``, after training; ``calibrate`` from Python): each brain predicted
in full with the raw (uncalibrated) uncertainty, its voxels' |error| / uncertainty the
conformal scores, one factor per stain and, with ``--calibration-groups``, one per group
(tissue labels of the cohort, or bins of the predicted value). Whole brains see what a new
brain does to the errors everywhere (white matter, lesions), where validation patches are
a sample of it. The bundle's calibration record is replaced (the file rewritten atomically).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from mrhscale.errors import MRHError
from mrhscale.io.bundle import n_members, read_bundle, write_bundle
from mrhscale.log import logger, note
from mrhscale.ops.ood import VARIABLE as OOD_VARIABLE
from mrhscale.parallel.context import Context
from mrhscale.stages.predict_volume import predict_volume
from mrhscale.stores import resolve
from mrhscale.stores.cohort import CohortStore
from mrhscale.stores.legacy import stains_of
from mrhscale.training.config import calibration_groups
from mrhscale.training.ensemble import calibration_record, fit_stain

SAMPLES_PER_BRAIN = 2_000_000  # voxels per brain at most (a fixed random subset beyond)


def calibrate(model: str, subjects: list[str], *, groups: str = "value:4", cohort: str | None = None,
              ctx: Context | None = None) -> dict:
    """Recalibrate the ensemble bundle at ``model`` on the whole brains ``subjects`` of
    ``cohort`` (default: the cohort its patch store was made from); returns the new
    ``uncertainty.calibration`` record, also written into the bundle."""
    model = resolve(model, "model")
    bundle = read_bundle(model)
    if n_members(bundle) < 2:
        raise MRHError(f"{model}: one network has no ensemble spread to calibrate (train with --members K)")
    cal = calibration_on_brains(bundle, subjects, groups, cohort or cohort_of(bundle, model), ctx)
    write_bundle(model, {**bundle, "uncertainty": {**bundle["uncertainty"], "calibration": cal}})
    for t, c in cal["stains"].items():
        note(f"{t}: uncertainty x {c['factor']:.3g} covers 95% of {c['n']} voxels of {', '.join(subjects)}"
             + (f"; per {c['groups']['by']} group x {', '.join(f'{f:.3g}' for f in c['groups']['factor'])}"
                if c.get("groups") else ""), (ctx or Context()).quiet)
    return cal


def calibration_on_brains(bundle: dict, subjects: list[str], groups: str, cohort: str,
                          ctx: Context | None = None) -> dict:
    """The calibration record of ``bundle`` fitted on the brains ``subjects`` of ``cohort``."""
    trained = set((bundle.get("provenance") or {}).get("patch_store", {}).get("subjects") or [])
    trained -= set((bundle.get("provenance") or {}).get("patch_store", {}).get("val_subjects") or [])
    if trained & set(subjects):
        logger.warning(f"mrhscale: calibration subject(s) {', '.join(sorted(trained & set(subjects)))} were "
                       "trained on: their errors are smaller than a new brain's, so intervals will be too narrow")
    fits = calibrate_on_brains(bundle, cohort, list(subjects), calibration_groups(groups, True), _fit, ctx=ctx)
    return {**calibration_record(stains_of(bundle), fits, "subjects"), "subjects": list(subjects),
            "cohort": cohort}


def cohort_of(bundle: dict, model: str) -> str:
    """The cohort store the bundle's patch store was made from (its records say)."""
    source = ((bundle.get("provenance") or {}).get("patch_store") or {}).get("provenance", {}).get("source")
    if not source:
        raise MRHError(f"{model}: its records do not name the cohort store its patches came from; "
                       "give the cohort store (calibrate(..., cohort=STORE))")
    return str(source)


def _fit(virt, unc, ref, groups, labels, ood=None):
    return fit_stain(virt, unc, ref, groups, held_out=True, labels=labels, fitted_on="subjects", ood=ood)


def calibrate_on_brains(bundle: dict, cohort_url: str, subjects: list[str], groups, fit, *,
                        ctx: Context | None = None) -> list[dict]:
    """Per stain of ``bundle`` (an ensemble), ``fit(virt, unc, ref, groups, labels=..., ood=...)``
    over the voxels of ``subjects`` of the cohort store at ``cohort_url`` (``ood``: their
    out-of-distribution score, None for a bundle without one)."""
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
                labels=_labels(brains, t, groups), ood=_ood(brains, t)) for t in stains]


def uncalibrated(bundle: dict) -> dict:
    """The bundle with factor 1 and no groups: predict then writes the raw uncertainty."""
    cal = {"factor": [1.0] * len(stains_of(bundle)), "fitted_on": None, "stains": {}}
    return {**bundle, "uncertainty": {**(bundle.get("uncertainty") or {}), "calibration": cal}}


def brain_samples(model: str, ds, sid: str, stains: list[str], groups, ctx: Context) -> dict:
    """Per stain (virtual, raw uncertainty, reference, tissue labels, out-of-distribution score
    or None for a bundle without one) at the brain's voxels with a reference."""
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
        ood = _xyz(maps[OOD_VARIABLE]).ravel()[ok] if OOD_VARIABLE in maps else None
        out[t] = (*pick, [_xyz(ds[n]).astype(bool).ravel()[ok] for n in names], ood)
    return out


def _xyz(var) -> np.ndarray:
    return np.asarray(var.transpose("x", "y", "z").values)


def _ood(brains: list[dict], t: str) -> np.ndarray | None:
    return None if brains[0][t][4] is None else np.concatenate([b[t][4] for b in brains])


def _labels(brains: list[dict], t: str, groups) -> list | None:
    if groups[0] != "labels":
        return None
    return [np.concatenate([b[t][3][g] for b in brains]) for g in range(len(groups[1]))]
