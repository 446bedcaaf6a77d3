"""Prediction from Python, for notebooks: one brain in memory or in files, its maps back.

``predict_volume(model, data)`` runs the graph ``mrhscale predict`` runs
(``subject_prediction``: the same patches, normalisation, batches and aggregation), on
the context's client or scheduler, else the active client, else in this process, and
returns an ``xr.Dataset`` of ``<stain>_virtual`` maps (one per stain of the model, an
ensemble's ``<stain>_uncertainty`` beside each) with x/y/z coordinates in mm. ``data`` may be

- an xarray Dataset shaped like a cohort subject (``mri`` (x, y, z, contrast) and
  ``mask``; e.g. ``mrhscale.open_subject(store, "s01")``), or
- one subject of a manifest as a mapping: ``{"mri": {"dwi": "dwi.nii.gz", ...},
  "mask": "mask.nii.gz"}`` or, flat, ``{"dwi": ..., "t2MTONOFF": ..., "mask": ...}``,
  whose values are paths or nibabel images; files are read exactly as ``ingest`` reads
  them (channel names, NaN/inf zeroed).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import xarray as xr

from mrhscale.errors import MRHError
from mrhscale.io.manifest import parse_subject
from mrhscale.io.volumes import image_volume
from mrhscale.ops.space import with_space
from mrhscale.options import PredictOptions
from mrhscale.parallel.context import Context
from mrhscale.parallel.runner import active_client
from mrhscale.stages.ingest import plan_subject, subject_dataset
from mrhscale.stages.predict_graph import subject_prediction
from mrhscale.stages.predict_plan import PredictPlan, brain_voxels, checked_device

SUBJECT_KEYS = ("mask", "fa", "targets", "labels")


def predict_volume(model, data, *, options: PredictOptions | None = None, ctx: Context | None = None):
    """The maps of one brain as an ``xr.Dataset`` of (x, y, z) maps, 0 outside the mask:
    ``<stain>_virtual`` of each stain (an ensemble's: the members' mean) and an ensemble's
    ``<stain>_uncertainty``; see the module docstring. ``options``: as ``mrhscale predict`` (batch,
    aggregation, TTA, numerics: docs/precision.md; the mode used in ``attrs["numerics"]``);
    ``ctx``: its client or scheduler (default: the active client, else this process)."""
    ctx, options = ctx or Context(), options or PredictOptions()
    plan = PredictPlan(os.fspath(model), options, checked_device(ctx))
    ds = with_space(data if isinstance(data, xr.Dataset) else subject_from_files(data))
    _check_subject(ds)
    if ctx.client is None and ctx.scheduler is None and ctx.dask_workers is None and active_client() is None:
        ctx = ctx.but(scheduler="synchronous")  # no cluster around: this process, torch's own threads
    with ctx.runner() as runner:
        plan.use_threads(runner, ctx)
        plan.plan_numerics(runner, brain_voxels([ds]))
        plan.prepare_workers(runner)
        graph = subject_prediction(ds, plan.meta, plan.spec, aggregate=plan.aggregate, tta=plan.tta,
                                   norm=plan.normalisation(ds, runner))
        (values,) = runner.compute([graph], "predict_volume", quiet=True)
    return _volume(plan, ds, values)


def _volume(plan: PredictPlan, ds, values):
    """The map(s) of ``values`` (x, y, z[, V]) on the subject's grid, with their attrs."""
    attrs = {"target": plan.target, "kind": "virtual histology", "units": "raw stain units",
             "model_sha256": plan.model_rec["sha256"], "aggregate": plan.aggregate, "numerics": plan.accel.label}
    attrs.update({k: ds.attrs[k] for k in ("affine", "voxel_size", "voxel_size_units", "subject") if k in ds.attrs})
    coords = {k: ds.coords[k] for k in ("x", "y", "z") if k in ds.coords}
    n_t = len(plan.stains)
    maps = {v: (("x", "y", "z"), values[..., k], plan.map_attrs(k, attrs)) for k, v in enumerate(plan.virtuals)}
    maps.update({v: (("x", "y", "z"), values[..., n_t + k], plan.uncertainty_attrs(k))
                 for k, v in enumerate(plan.uncertainties)})
    if plan.ood:
        maps[plan.ood] = (("x", "y", "z"), values[..., -1], plan.ood_attrs())
    return xr.Dataset(maps, coords=coords)


def subject_from_files(data: Mapping, subject: str = "subject"):
    """One subject's files (paths or nibabel images) as the lazy Dataset ``ingest`` would store."""
    if not isinstance(data, Mapping):
        raise MRHError(f"data: expected an xarray Dataset or a mapping of images, got {type(data).__name__}")
    raw = dict(data) if "mri" in data else {
        "mri": {k: v for k, v in data.items() if k not in SUBJECT_KEYS},
        **{k: data[k] for k in SUBJECT_KEYS if k in data}}
    raw.setdefault("id", subject)
    images: dict = {}
    raw = _placeholders(raw, images)
    spec = parse_subject(raw, os.getcwd(), "data")
    opened = {role: image_volume(img, f"data: {role} (nibabel image)") for role, img in images.items()}
    ds, _ = subject_dataset(plan_subject(spec, opened))
    return ds


def _placeholders(raw: dict, images: dict) -> dict:
    """``raw`` with every nibabel image replaced by a placeholder path (collected by role)."""
    out = dict(raw)
    for key in ("mri", "targets", "labels"):
        if isinstance(raw.get(key), Mapping):
            out[key] = {name: _placeholder(v, f"{key}/{name}", images) for name, v in raw[key].items()}
    for key in ("mask", "fa"):
        if key in raw:
            out[key] = _placeholder(raw[key], key, images)
    return out


def _placeholder(v, role: str, images: dict):
    if isinstance(v, (str, os.PathLike)):
        return os.fspath(v)
    if isinstance(v, Mapping) and "path" in v:
        return {**v, "path": _placeholder(v["path"], role, images)}
    images[role] = v
    return f"/<{role} image>"


def _check_subject(ds) -> None:
    missing = [v for v in ("mri", "mask") if v not in ds]
    if missing:
        raise MRHError(f"data: the Dataset has no {' or '.join(missing)}; expected a cohort subject "
                       "(mri (x, y, z, contrast) and mask), e.g. mrhscale.open_subject(store, id)")
    if not bool(ds["mask"].any()):
        raise MRHError("data: empty mask, no brain voxel to predict")
