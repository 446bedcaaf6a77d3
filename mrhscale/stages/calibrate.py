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
from mrhscale.ops.risk import RISK_ALPHA, RISK_DELTA, check_brains, fit_risk
from mrhscale.ops.uncertainty import widened
from mrhscale.options import CALIBRATION_MODES
from mrhscale.parallel.context import Context
from mrhscale.stages.predict_volume import predict_volume
from mrhscale.stores import resolve
from mrhscale.stores.cohort import CohortStore
from mrhscale.stores.legacy import stains_of
from mrhscale.training.config import calibration_groups
from mrhscale.training.ensemble import calibration_record, fit_stain

SAMPLES_PER_BRAIN = 2_000_000  # voxels per brain at most (a fixed random subset beyond)


def calibrate(model: str, subjects: list[str], *, groups: str = "value:4", cohort: str | None = None,
              ctx: Context | None = None, mode: str = "conformal", risk_alpha: float = RISK_ALPHA,
              risk_delta: float = RISK_DELTA) -> dict:
    """Recalibrate the ensemble bundle at ``model`` on the whole brains ``subjects`` of
    ``cohort`` (default: the cohort its patch store was made from); returns the new
    ``uncertainty.calibration`` record, also written into the bundle. ``mode="risk"``:
    brain-level risk control (``ops/risk.py``: at most ``risk_alpha`` of a new brain's voxels
    outside, with probability >= 1 - ``risk_delta``; needs >= ceil(1/delta) - 1 brains)."""
    check_mode(mode, len(subjects), risk_alpha, risk_delta)
    model = resolve(model, "model")
    bundle = read_bundle(model)
    if n_members(bundle) < 2:
        raise MRHError(f"{model}: one network has no ensemble spread to calibrate (train with --members K)")
    cal = calibration_on_brains(bundle, subjects, groups, cohort or cohort_of(bundle, model), ctx,
                                risk=(risk_alpha, risk_delta) if mode == "risk" else None)
    write_bundle(model, {**bundle, "uncertainty": {**bundle["uncertainty"], "calibration": cal}})
    for t, c in cal["stains"].items():
        note(f"{t}: uncertainty x {c['factor']:.3g} " + _promise(c, subjects)
             + (f"; per {c['groups']['by']} group x {', '.join(f'{f:.3g}' for f in c['groups']['factor'])}"
                if c.get("groups") else ""), (ctx or Context()).quiet)
    return cal


def _promise(c: dict, subjects: list[str]) -> str:
    if c.get("mode") != "risk":
        return f"covers 95% of {c['n']} voxels of {', '.join(subjects)}"
    return (f"keeps at most {c['alpha']:.3g} of a new brain's voxels outside with probability >= "
            f"{1 - c['delta']:.3g} ({c['n_brains']} calibration brains)")


def check_mode(mode: str, n_subjects: int, risk_alpha: float, risk_delta: float) -> None:
    """The calibration mode asked for, checked before any prediction (or training)."""
    if mode not in CALIBRATION_MODES:
        raise MRHError(f"--calibration-mode {mode!r}: choose one of {', '.join(CALIBRATION_MODES)}")
    if mode == "risk":
        check_brains(n_subjects, risk_delta, risk_alpha)


def calibration_on_brains(bundle: dict, subjects: list[str], groups: str, cohort: str,
                          ctx: Context | None = None, risk: tuple[float, float] | None = None) -> dict:
    """The calibration record of ``bundle`` fitted on the brains ``subjects`` of ``cohort``
    (``risk``: (alpha, delta) of brain-level risk control, else voxel-level conformal)."""
    trained = set((bundle.get("provenance") or {}).get("patch_store", {}).get("subjects") or [])
    trained -= set((bundle.get("provenance") or {}).get("patch_store", {}).get("val_subjects") or [])
    if trained & set(subjects):
        logger.warning(f"mrhscale: calibration subject(s) {', '.join(sorted(trained & set(subjects)))} were "
                       "trained on: their errors are smaller than a new brain's, so intervals will be too narrow")
    spec = calibration_groups(groups, True)
    if risk is None:
        fits = calibrate_on_brains(bundle, cohort, list(subjects), spec, _fit, ctx=ctx)
    else:
        brains = predict_brains(bundle, cohort, list(subjects), spec, ctx)
        fits = [risk_stain([b[t] for b in brains], list(subjects), spec, *risk) for t in stains_of(bundle)]
    return {**calibration_record(stains_of(bundle), fits, "subjects"), "subjects": list(subjects),
            "cohort": cohort, "mode": "conformal" if risk is None else "risk"}


def risk_stain(brains: list[tuple], subjects: list[str], groups, alpha: float, delta: float) -> dict:
    """One stain's risk-controlled fit: the conformal fit's summary (r, Spearman, before) of
    the pooled voxels, its factor and groups replaced by ``ops.risk.fit_risk``'s on the
    uncertainty widened by the out-of-distribution score as that fit chose."""
    pooled = [np.concatenate([b[i] for b in brains]) for i in range(3)]
    ood = None if brains[0][4] is None else np.concatenate([b[4] for b in brains])
    base = fit_stain(*pooled, ("none", None), held_out=True, fitted_on="subjects", ood=ood)
    power = base.get("ood_power")  # the widening the conformal fit chose, then risk on top
    wide = [(b[0], widened(b[1], b[4], power), b[2], b[3]) for b in brains]
    return {**{k: v for k, v in base.items() if k not in ("quantile_level", "method")},
            **fit_risk(wide, subjects, groups, alpha, delta)}


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
    brains = predict_brains(bundle, cohort_url, subjects, groups, ctx)
    return [fit(*(np.concatenate([b[t][i] for b in brains]) for i in range(3)), groups,
                labels=_labels(brains, t, groups), ood=_ood(brains, t)) for t in stains_of(bundle)]


def predict_brains(bundle: dict, cohort_url: str, subjects: list[str], groups, ctx: Context | None = None) -> list:
    """Each brain of ``subjects``, predicted with the raw uncertainty: per stain (virtual,
    raw uncertainty, reference, [labels of ``groups``], score or None) at its voxels."""
    ctx = ctx or Context()
    store = CohortStore.open(ctx.location(cohort_url))
    missing = [s for s in subjects if s not in store.subjects()]
    if missing:
        raise MRHError(f"--calibration-subjects: {', '.join(missing)} not in the cohort store {cohort_url}")
    stains = stains_of(bundle)
    with tempfile.TemporaryDirectory(prefix="mrhscale-calibrate-") as tmp:
        raw = write_bundle(os.path.join(tmp, "model.pt"), uncalibrated(bundle))
        return [brain_samples(raw, store.open_subject(sid), sid, stains, groups, ctx) for sid in subjects]


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
