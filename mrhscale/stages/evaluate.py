"""Evaluation: virtual vs reference histology, against single-MRI-marker baselines.

Every stain of the prediction store (or those named) is scored against the cohort
store's reference of it, in one call. Within the brain mask (the store's mask AND the prediction's mask), per subject
and pooled over subjects:

- Pearson r, Spearman r, MAE, PSNR, SSIM of the virtual stain vs the reference.
  PSNR uses the reference's range inside the mask as the peak (reported as
  ``data_range``); SSIM is skimage's 3D SSIM (7-voxel window, smaller on tiny
  grids) on volumes zeroed outside the mask, averaged over the mask voxels.
- The same for each single MRI marker as a baseline: FA (``fa``), MT ratio
  ``(mt_off - mt_on) / mt_off``, T2 (contrast ``t2``) and mean diffusivity from
  the dwi2000 group (``MD = -ln(mean(DWI) / mean(b0)) / b``). Markers are in
  other units than the stain, so Pearson/Spearman are reported on the raw
  marker (the sign says the direction) and MAE/PSNR/SSIM on the marker after
  its best linear fit to the reference per subject (least squares in the mask):
  an optimistic baseline, in the marker's favour.
- With a lesion/condition label (the store's ``lesion`` variable by default, any
  bool variable by name, or a NIfTI path containing ``{subject}``): ROC curve and
  AUC of detecting the label from each score. AUC is the Mann-Whitney
  probability that a labelled voxel scores higher than an unlabelled one; a
  score that DROPS in the lesion is flipped and reported as ``max(AUC, 1-AUC)``
  with ``direction: "lower"``. Sensitivity/specificity at Youden's optimum too.
- Extra markers (``markers=``): any contrast or variable of the store (``t2``,
  ``dwi2000_0``, ``fa``) or a NIfTI path with ``{subject}`` (a new contrast, on
  the store grid or mapped there with ``marker_transforms``, the
  ``mrhscale register`` output) are treated exactly like the built-in ones.
  Every marker also gets its correlation with the virtual stain
  (``pearson_vs_virtual``, ``spearman_vs_virtual``): how a contrast relates to
  the virtual as well as to the real stain.

Pooled Pearson/MAE/PSNR/SSIM are exact (voxel-weighted over subjects); pooled
Spearman and ROC use a uniform random sample of at most ``max_pool / n_subjects``
(at least 10,000) voxels per subject: exact for small brains, bounded memory
for large cohorts.

With a per-voxel uncertainty in the prediction (an ensemble's ``<stain>_uncertainty``),
per subject and pooled (``uncertainty``): its Spearman correlation with the absolute
error, the coverage of the virtual stain +- 1.96 x uncertainty (the calibrated 95%
interval), the error-retention curve (MAE of the most confident fraction of voxels)
with its area beside an oracle's and random order's, and its mean inside each label
of the subject (``lesion``, ``artefact``, ...) against the rest of the brain. Per tissue
group (each label, and ``gm``: the brain outside wm and lesion) the 95% coverage and
interval width, the reliability curve (coverage against nominal level, ``reliability.png``)
and each brain's risk (its share of voxels outside the 95% interval), exact over subjects
(``ops/reliability.py``). With an out-of-distribution score (the prediction's ``ood``): its
mean inside each label against the rest, its share above the training 99th percentile, its
Spearman correlation with the absolute error.

Writes into ``out_dir``: ``<stain>/metrics.json`` and ``<stain>/*.png`` for each stain
(slice montage per subject, scatter, ROC, and for an uncertainty its slice beside the
error's and the retention curves), ``metrics.json`` (the stains, the subjects and each
stain's pooled headline) and one ``report.html`` with every stain's tables and figures.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import numpy as np
import xarray as xr

from mrhscale import __version__
from mrhscale.errors import MRHError
from mrhscale.io.volumes import open_volume
from mrhscale.log import progress
from mrhscale.ops.metrics import PooledMoments, linear_fit, roc, similarity, spearman
from mrhscale.ops.reliability import (
    add_tallies,
    brain_risk,
    by_group,
    ood_figures,
    ood_tally,
    reliability,
    tally,
    tissue_groups,
)
from mrhscale.ops.uncertainty import Z95, coverage, uncertainty_metrics
from mrhscale.options import EvaluateOptions
from mrhscale.parallel.context import Context
from mrhscale.report import figures
from mrhscale.report.html import write_report
from mrhscale.report.tables import evaluation_tables
from mrhscale.results import EvaluationResult, StainEvaluation
from mrhscale.stages.register import marker_from_file
from mrhscale.stores import CohortStore, Folder, PredictionStore, resolve, write_json
from mrhscale.stores.legacy import calibration_of, stains_of

SPATIAL = ("x", "y", "z")
MARKERS = ("FA", "MT ratio", "T2", "MD")


# --------------------------------------------------------------------------- markers
def _contrast_names(ds) -> list[str]:
    return [str(c) for c in ds["contrast"].values] if "contrast" in ds.coords else []


def single_markers(ds, mask: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], list[str]]:
    """FA, MT ratio, T2 and MD volumes from a subject Dataset; notes for those skipped."""
    out: dict[str, np.ndarray] = {}
    notes: list[str] = []
    names = _contrast_names(ds)
    sid = ds.attrs.get("subject", "?")

    def chan(n):
        return ds["mri"].sel(contrast=n).transpose(*SPATIAL).values.astype(np.float64)

    if "fa" in ds.data_vars:
        out["FA"] = ds["fa"].transpose(*SPATIAL).values.astype(np.float64)
    else:
        notes.append(f"{sid}: FA skipped (no fa variable)")
    if "mt_on" in names and "mt_off" in names:
        on, off = chan("mt_on"), chan("mt_off")
        out["MT ratio"] = np.divide(off - on, off, out=np.zeros_like(off), where=off > 0)
    else:
        notes.append(f"{sid}: MT ratio skipped (needs contrasts mt_on and mt_off)")
    if "t2" in names:
        out["T2"] = chan("t2")
    else:
        notes.append(f"{sid}: T2 skipped (no contrast named t2)")
    md, note = mean_diffusivity(ds, mask)
    if md is not None:
        out["MD"] = md
    else:
        notes.append(f"{sid}: MD skipped ({note})")
    for v in out.values():
        np.nan_to_num(v, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    return out, notes


def mean_diffusivity(ds, mask=None) -> tuple[np.ndarray | None, str]:
    """MD from the dwi2000 group: b0 = bval ~ 0 (or names with b0), else the brightest volumes."""
    names = _contrast_names(ds)
    if not names:
        return None, "no contrast coordinate"
    groups = ([str(g) for g in ds["group"].values] if "group" in ds.coords
              else [n.rsplit("_", 1)[0] for n in names])
    idx = [i for i, (n, g) in enumerate(zip(names, groups, strict=True)) if g == "dwi2000" or n.startswith("dwi2000")]
    if len(idx) < 2:
        return None, "no dwi2000 group with at least 2 volumes"
    bval = (np.asarray(ds["bval"].values, np.float64)[idx] if "bval" in ds.coords
            else np.full(len(idx), np.nan))
    named_b0 = np.array(["b0" in names[i].lower() for i in idx])
    if np.isfinite(bval).all():
        b0 = bval < 50
        how = "bval"
    elif named_b0.any():
        b0 = named_b0
        how = "names"
    else:  # unknown b-values: b0 images are much brighter than diffusion-weighted ones
        mri = ds["mri"].isel(contrast=idx)
        if mask is not None:
            m = xr.DataArray(np.asarray(mask, bool), dims=SPATIAL)
            means = np.asarray(mri.where(m).mean(SPATIAL).values, np.float64)
        else:
            means = np.asarray(mri.mean(SPATIAL).values, np.float64)
        b0 = means > 1.5 * np.median(means)
        how = "brightness"
    if not b0.any() or b0.all():
        return None, f"cannot tell b0 from diffusion-weighted volumes in dwi2000 (by {how})"
    dw = ~b0
    b = float(np.nanmedian(bval[dw])) if np.isfinite(bval[dw]).any() else 2000.0
    if not b > 0:
        b = 2000.0
    sel_b0 = [names[idx[k]] for k in np.nonzero(b0)[0]]
    sel_dw = [names[idx[k]] for k in np.nonzero(dw)[0]]
    mb0 = ds["mri"].sel(contrast=sel_b0).mean("contrast").transpose(*SPATIAL).values.astype(np.float64)
    mdw = ds["mri"].sel(contrast=sel_dw).mean("contrast").transpose(*SPATIAL).values.astype(np.float64)
    ratio = np.divide(mdw, mb0, out=np.ones_like(mb0), where=mb0 > 0)
    md = -np.log(np.clip(ratio, 1e-6, None)) / b
    return md, ""


_IMAGE_EXT = (".nii.gz", ".nii", ".hdr", ".img")


def _is_path(source: str) -> bool:
    s = str(source)
    return "{subject}" in s or os.sep in s or s.lower().endswith(_IMAGE_EXT)


def marker_names(sources: list[str] | None) -> list[str]:
    """Display names of extra markers: the store name as given, a file's base name without
    extension and ``{subject}``; made unique against the built-in markers and each other."""
    out: list[str] = []
    for i, src in enumerate(sources or []):
        name = str(src)
        if _is_path(name):
            base = os.path.basename(name)
            for ext in _IMAGE_EXT:
                if base.lower().endswith(ext):
                    base = base[: -len(ext)]
                    break
            name = base.replace("{subject}", "").strip("_-. ") or f"marker{i + 1}"
        cand, k = name, 2
        while cand in out or cand in MARKERS or cand == "virtual":
            cand, k = f"{name}#{k}", k + 1
        out.append(cand)
    return out


def load_marker(source: str, ds, sid: str, shape, transforms: str | None = None) -> np.ndarray:
    """An extra marker on subject ``sid``'s store grid (float64, NaN -> 0).

    A store contrast/variable is read from the open Dataset (honours storage options);
    a file goes through ``mrhscale.stages.register.marker_from_file`` (antspyx only with transforms).
    """
    source = str(source)
    if not _is_path(source):
        names = _contrast_names(ds)
        if source in names:
            a = ds["mri"].sel(contrast=source).transpose(*SPATIAL).values
        elif source in ds.data_vars and set(ds[source].dims) == set(SPATIAL):
            a = ds[source].transpose(*SPATIAL).values
        else:
            vars3 = [str(v) for v in ds.data_vars if set(ds[v].dims) == set(SPATIAL)]
            avail = names + vars3
            more = f", ... ({len(avail)} in all)" if len(avail) > 20 else ""
            raise MRHError(f"--marker {source}: not a contrast or variable of subject {sid} "
                           f"(available: {', '.join(avail[:20])}{more}) and not an image path")
        return np.nan_to_num(np.asarray(a, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    path = source.replace("{subject}", sid)
    if transforms is None:  # must already be on the store grid: say so with the shapes
        vol = open_volume(path, what=f"--marker for subject {sid}")
        vshape = tuple(vol.shape[:3]) if len(vol.shape) == 3 or (
            len(vol.shape) >= 4 and all(n == 1 for n in vol.shape[3:])) else tuple(vol.shape)
        if vshape != tuple(shape):
            raise MRHError(f"--marker {path}: grid {vshape} differs from subject {sid}'s store grid "
                           f"{tuple(shape)}; register it first (mrhscale register) or give "
                           "--marker-transforms")
    a = marker_from_file(source, sid, grid=(tuple(shape), np.asarray(ds.attrs["affine"], float)),
                         transforms=transforms)
    if tuple(a.shape) != tuple(shape):
        raise MRHError(f"--marker {path}: grid {a.shape} differs from subject {sid}'s store grid {tuple(shape)}")
    return np.nan_to_num(np.asarray(a, np.float64), nan=0.0, posinf=0.0, neginf=0.0)


# --------------------------------------------------------------------------- labels
def load_label(ds, label: str | None, sid: str, shape, what: str = "--label") -> np.ndarray | None:
    if label is None:
        return ds["lesion"].transpose(*SPATIAL).values.astype(bool) if "lesion" in ds.data_vars else None
    if label in ds.data_vars:
        return ds[label].transpose(*SPATIAL).values.astype(bool)
    low = label.lower()
    if "{subject}" in label or low.endswith((".nii", ".nii.gz", ".hdr", ".img")):
        vol = open_volume(label.replace("{subject}", sid), what=f"{what} for {sid}")
        arr = np.asarray(vol.proxy)
        if arr.ndim == 4 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if tuple(arr.shape) != tuple(shape):
            raise MRHError(f"{what} {vol.path}: grid {arr.shape} differs from subject {sid}'s {tuple(shape)}")
        return arr > 0
    raise MRHError(
        f"{what} {label}: not a variable of subject {sid} (has {', '.join(map(str, ds.data_vars))}) "
        "and not an image path; give a label variable name or a NIfTI path with {subject}"
    )


# --------------------------------------------------------------------------- main entry
def _finite(v):
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    return v


def evaluate(
    pred_url: str,
    store_url: str,
    out_dir: str,
    *,
    stains: list[str] | None = None,
    label: str | None = None,
    roi: str | None = None,
    subjects: list[str] | None = None,
    markers: list[str] | None = None,
    marker_transforms: str | None = None,
    options: EvaluateOptions | None = None,
    ctx: Context | None = None,
) -> EvaluationResult:
    """Metrics of PRED's virtual stains vs STORE's references and single markers; writes a report.

    stains: the stains scored (default: every stain of the prediction). markers: extra markers (store contrast/variable names or NIfTI paths with ``{subject}``),
    compared like the built-in ones; marker_transforms: ``mrhscale register`` output folder
    for marker files still in the subjects' native space. options: the pooled sample and
    montages (:class:`mrhscale.options.EvaluateOptions`); ctx: the stores' storage options, quiet.
    """
    ctx, options = ctx or Context(), options or EvaluateOptions()
    pstore, cstore, ids = _open_inputs(resolve(pred_url), resolve(store_url), subjects, ctx)
    stains = _stains(pstore, stains)
    if marker_transforms is not None and not os.path.isdir(marker_transforms):
        raise MRHError(f"--marker-transforms {marker_transforms}: no such folder "
                       "(give the `mrhscale register` output folder)")
    folder = Folder(out_dir, "mrhscale-evaluation")
    with folder.replace(stains=stains, pred=pstore.url, store=cstore.url) as work:
        by_stain = {}
        for stain in stains:
            ev = _Evaluation(pstore, cstore, stain, os.path.join(work, stain), label=label, roi=roi,
                             extra=list(markers or []), marker_transforms=marker_transforms, options=options,
                             n_subjects=len(ids))
            by_stain[stain] = StainEvaluation(**_evaluate(ev, ids, options.montage_subjects, ctx,
                                                          final_dir=os.path.join(folder.path, stain)))
        report = os.path.join(folder.path, os.path.basename(_write_summary(work, by_stain, ids)))
    for ev in by_stain.values():
        ev.report = report  # one report of every stain
    return EvaluationResult(stains=stains, subjects=ids, by_stain=by_stain, out_dir=folder.path, report=report)


def _stains(pstore, wanted: list[str] | None) -> list[str]:
    """The stains scored: ``wanted`` (each one the prediction holds), else all of them."""
    have = stains_of(pstore.attrs)
    wanted = list(dict.fromkeys(wanted or have))
    bad = [t for t in wanted if t not in have]
    if bad:
        raise MRHError(f"{pstore.name}: holds virtual {', '.join(have)}, not {', '.join(bad)}; "
                       f"give --stain {' or '.join(have)} (or none: every stain)")
    return wanted


def _write_summary(out_dir: str, by_stain: dict, ids: list[str]) -> str:
    """``metrics.json`` (each stain's pooled headline, its files) and ``report.html``."""
    doc = {"stains": list(by_stain), "subjects": ids,
           "by_stain": {t: {"metrics": f"{t}/metrics.json", "virtual": m.pooled.get("virtual"),
                            "uncertainty": (m.uncertainty or {}).get("pooled"),
                            "ood": (m.ood or {}).get("pooled")} for t, m in by_stain.items()}}
    write_json(os.path.join(out_dir, "metrics.json"), _finite(doc))
    tables = {f"{t}: {k}": v for t, m in by_stain.items() for k, v in evaluation_tables(m.to_dict()).items()}
    figs = [(os.path.join(out_dir, t, f), f"{t}: {c}") for t, m in by_stain.items()
            for f, c in m.figure_captions.items()]
    return write_report(out_dir, tables, figs, f"mrhscale evaluation: virtual {', '.join(by_stain)}")


def _open_inputs(pred_url: str, store_url: str, subjects, ctx: Context):
    """The prediction and cohort stores, and the subjects to compare, all cross-checked:
    each subject was predicted from the store's own."""
    pstore = PredictionStore.open(ctx.location(pred_url))
    cstore = CohortStore.open(ctx.location(store_url))
    pred_ids, store_ids = pstore.subjects(), cstore.subjects()
    ids = list(dict.fromkeys(subjects)) if subjects else [s for s in pred_ids if s in store_ids]
    bad = [s for s in ids if s not in pred_ids or s not in store_ids]
    if bad:
        raise MRHError(f"subject(s) {', '.join(bad)} missing from the prediction store {pstore.name} "
                       f"(has {', '.join(pred_ids) or 'none'}) or the cohort store {cstore.name}")
    if not ids:
        raise MRHError(f"{pstore.name}: no predicted subject that is also in {cstore.name}")
    for sid in ids:
        source = (pstore.subject_attrs(sid).get("made_by") or {}).get("source")
        if source is not None and source != cstore.identity(sid)["fingerprint"]:
            raise MRHError(f"{pstore.name}: subject {sid} was predicted from another input than "
                           f"{cstore.name}'s {sid}; evaluate it against the store it was predicted from")
    return pstore, cstore, ids


def _evaluate(ev: _Evaluation, ids: list[str], montage_subjects: int, ctx: Context, *,
              final_dir: str) -> dict[str, Any]:
    """The evaluation proper: every subject, then the pooled figures and files (written into
    ``ev.out_dir``, which becomes ``final_dir``)."""
    for k, sid in enumerate(progress(ids, desc="evaluate", unit="subject", quiet=ctx.quiet)):
        ev.add_subject(sid, montage=k < montage_subjects)
    return ev.finish(ids, final_dir)


class _Subject:
    """One subject's volumes on the store grid, inside the evaluation mask."""

    def __init__(self, sid, ds, virt, ref, mask, markers, label, unc=None, ood=None):
        self.sid, self.ds, self.virt, self.ref, self.mask = sid, ds, virt, ref, mask
        self.markers, self.label, self.unc, self.ood = markers, label, unc, ood

    @functools.cached_property
    def regions(self) -> dict[str, np.ndarray]:
        """The subject's labels (lesion, artefact, ...) as bool volumes (read once)."""
        names = list(self.ds.attrs.get("labels") or [])
        return {n: self.ds[n].transpose(*SPATIAL).values.astype(bool) for n in names if n in self.ds.data_vars}


class _Evaluation:
    """Accumulates subjects (per-subject metrics, pooled moments, a voxel sample for
    Spearman and ROC, montages), then aggregates once (MONAI's Cumulative pattern)."""

    def __init__(self, pstore, cstore, target, out_dir, *, label, roi, extra, marker_transforms,
                 options: EvaluateOptions, n_subjects: int):
        self.pstore, self.cstore, self.target, self.out_dir = pstore, cstore, target, out_dir
        os.makedirs(out_dir, exist_ok=True)  # this stain's folder inside the evaluation's (being built)
        self.label, self.roi, self.extra, self.transforms = label, roi, extra, marker_transforms
        self.extra_names = marker_names(extra)
        self.variable = f"{target}_virtual"
        self.unc_variable = f"{target}_uncertainty" if pstore.attrs.get("uncertainty") else None  # an ensemble's
        self.unc_curves: dict[str, dict] = {}
        self.unc_pooled: dict | None = None
        self.unc_tallies: list[dict] = []  # per subject: exact counts per tissue group and level
        self.miss: dict[str, float] = {}  # per subject: share of voxels outside the 95% interval
        self.ood = {"tallies": [], "score": [], "abs_err": [], "quantiles": None}
        self.ood_rng = np.random.default_rng(options.seed + 1)
        self.slice_axis = str((pstore.attrs.get("model") or {}).get("patch", {}).get("axis", "y"))
        self.rng = np.random.default_rng(options.seed)
        self.per_subject_pool = max(10_000, int(options.max_pool) // n_subjects)
        self.notes: list[str] = []
        self.per_subject: dict[str, Any] = {}
        self.pool: dict[str, list] = {"ref": [], "lab": []}
        self.pool_roc: dict[str, list] = {}
        self.moments: dict[str, PooledMoments] = {}
        self.ref_range = [math.inf, -math.inf]
        self.figures: list[tuple[str, str]] = []
        self.have_label = False

    def add_subject(self, sid: str, montage: bool) -> None:
        d = self._load(sid)
        res, scores = self._metrics(d)
        self._pool(d, res, scores)
        if d.unc is not None:
            res["uncertainty"] = self._uncertainty(d)
        if d.ood is not None:
            res["ood"] = self._ood(d)
        if d.label is not None:
            self.have_label = True
            res["roc"] = self._roc(d, scores)
        elif self.have_label:
            self.notes.append(f"{sid}: no label; left out of the ROC analysis")
        self.per_subject[sid] = res
        if montage:
            self._montage(d)

    def _load(self, sid: str) -> _Subject:
        ds = self.cstore.open_subject(sid)
        if self.target not in ds.data_vars:
            raise MRHError(f"{self.cstore.name}: subject {sid!r} has no reference {self.target!r} "
                           f"(targets: {', '.join(ds.attrs.get('targets', [])) or 'none'})")
        pds = self.pstore.open_subject(sid)
        if self.variable not in pds.data_vars:
            raise MRHError(f"{self.pstore.name}: subject {sid!r} has no variable {self.variable!r}")
        virt = pds[self.variable].transpose(*SPATIAL).values.astype(np.float64)
        ref = ds[self.target].transpose(*SPATIAL).values.astype(np.float64)
        if virt.shape != ref.shape:
            raise MRHError(f"subject {sid!r}: prediction grid {virt.shape} differs from the store's {ref.shape}")
        mask = ds["mask"].transpose(*SPATIAL).values.astype(bool)
        if "mask" in pds.data_vars:
            mask &= pds["mask"].transpose(*SPATIAL).values.astype(bool)
        mask &= np.isfinite(ref) & np.isfinite(virt)
        unc = None
        if self.unc_variable and self.unc_variable in pds.data_vars:
            unc = pds[self.unc_variable].transpose(*SPATIAL).values.astype(np.float64)
            mask &= np.isfinite(unc)
        ood = pds["ood"].transpose(*SPATIAL).values.astype(np.float64) if "ood" in pds.data_vars else None
        if ood is not None:
            mask &= np.isfinite(ood)
            self.ood["quantiles"] = dict(pds["ood"].attrs.get("training_quantiles") or {}) or None
        markers, notes = single_markers(ds, mask)
        self.notes += notes
        for src, name in zip(self.extra, self.extra_names, strict=True):
            markers[name] = load_marker(src, ds, sid, ref.shape, self.transforms)
        return _Subject(sid, ds, virt, ref, mask, markers, load_label(ds, self.label, sid, ref.shape), unc, ood)

    def _metrics(self, d: _Subject):
        """Per-subject similarity of the virtual stain and of each marker (fitted linearly)."""
        lo = float(d.ref[d.mask].min()) if d.mask.any() else 0.0
        hi = float(d.ref[d.mask].max()) if d.mask.any() else 0.0
        self.ref_range = [min(self.ref_range[0], lo), max(self.ref_range[1], hi)]
        dr = (hi - lo) or 1.0
        scores = {"virtual": d.virt}
        res = {"virtual": similarity(d.virt, d.ref, d.mask, dr)}
        for name, m in d.markers.items():
            a, b = linear_fit(m[d.mask], d.ref[d.mask])
            r = similarity(a * m + b, d.ref, d.mask, dr)
            raw = similarity(m, d.ref, d.mask, dr, ssim=False)
            r["pearson"], r["spearman"] = raw["pearson"], raw["spearman"]
            vv = similarity(m, d.virt, d.mask, ssim=False)  # the marker against the virtual stain
            r["pearson_vs_virtual"], r["spearman_vs_virtual"] = vv["pearson"], vv["spearman"]
            r["calibration"] = {"slope": a, "intercept": b}
            res[name], scores[name] = r, m
        return res, scores

    def _pool(self, d: _Subject, res: dict, scores: dict) -> None:
        """Exact pooled moments, and a random voxel sample for Spearman."""
        for name, s in scores.items():
            cal = res[name].get("calibration")
            est = s if cal is None else cal["slope"] * s + cal["intercept"]
            self.moments.setdefault(name, PooledMoments()).update(
                est[d.mask], d.ref[d.mask], s[d.mask], d.virt[d.mask], res[name]["ssim"])
        idx = self._sample(d.mask)
        self.pool["ref"].append(d.ref.ravel()[idx].astype(np.float32))
        for name, s in scores.items():
            self.pool.setdefault(name, []).append(s.ravel()[idx].astype(np.float32))
        if d.unc is not None:
            self.pool.setdefault("uncertainty", []).append(d.unc.ravel()[idx].astype(np.float32))

    def _uncertainty(self, d: _Subject) -> dict:
        """How the subject's uncertainty relates to its error, and its mean in each label."""
        m = d.mask
        out = uncertainty_metrics(d.virt[m], d.ref[m], d.unc[m])
        self.unc_curves[d.sid] = out["retention"]
        out["retention"] = _strip_retention(out["retention"])
        out["by_label"] = {}
        for name, lab in d.regions.items():
            inside, rest = m & lab, m & ~lab
            if inside.any() and rest.any():
                a, b = float(d.unc[inside].mean()), float(d.unc[rest].mean())
                out["by_label"][name] = {"voxels": int(inside.sum()), "mean_inside": a, "mean_rest": b,
                                         "ratio": a / b if b > 0 else math.nan,
                                         "coverage_95_inside": coverage(d.virt[inside] - d.ref[inside], d.unc[inside]),
                                         "interval_width_95_inside": 2 * Z95 * a}
        if d.regions:  # the brain outside every label (the rest: grey matter in a wm/lesion labelling)
            rest = m & ~np.any(list(d.regions.values()), axis=0)
            out["outside_labels"] = {"voxels": int(rest.sum()),
                                     "coverage_95": coverage(d.virt[rest] - d.ref[rest], d.unc[rest])}
        t = tally(d.virt[m] - d.ref[m], d.unc[m], {g: s[m] for g, s in tissue_groups(d.regions, m).items()})
        self.unc_tallies.append(t)
        out["by_group"] = by_group(t)
        self.miss[d.sid] = 1 - out["by_group"]["all"]["coverage_95"]
        return out

    def _ood(self, d: _Subject) -> dict:
        """The subject's OOD score: its mean in each label against the rest, the share above
        the training 99th percentile, its Spearman with |error|; kept for the pooled figures."""
        m, q = d.mask, (self.ood["quantiles"] or {}).get("99")
        t = ood_tally(d.ood, d.regions, m, None if q is None else float(q))
        err = np.abs(d.virt - d.ref)
        self.ood["tallies"].append(t)
        idx = np.flatnonzero(m.ravel())
        if idx.size > self.per_subject_pool:
            idx = np.sort(self.ood_rng.choice(idx, self.per_subject_pool, replace=False))
        self.ood["score"].append(d.ood.ravel()[idx])
        self.ood["abs_err"].append(err.ravel()[idx])
        return ood_figures([t], d.ood[m], err[m])

    def _sample(self, mask: np.ndarray) -> np.ndarray:
        idx = np.flatnonzero(mask.ravel())
        if idx.size > self.per_subject_pool:
            idx = np.sort(self.rng.choice(idx, self.per_subject_pool, replace=False))
        return idx

    def _roc(self, d: _Subject, scores: dict) -> dict:
        """Per-subject ROC of the label; with a region of interest (e.g. white matter), the
        label's voxels against the normal voxels of that region, not every tissue."""
        rmask = d.mask & (load_label(d.ds, self.roi, d.sid, d.ref.shape, "--roi") | d.label) if self.roi \
            else d.mask
        ridx = self._sample(rmask)
        self.pool["lab"].append(d.label.ravel()[ridx])
        for name, s in scores.items():
            self.pool_roc.setdefault(name, []).append(s.ravel()[ridx].astype(np.float32))
        return {name: _strip_curve(roc(s[rmask], d.label[rmask])) for name, s in scores.items()}

    def _montage(self, d: _Subject) -> None:
        mri_name, mri_img = _montage_mri(d.ds)
        path = os.path.join(self.out_dir, f"montage_{d.sid}.png")
        figures.montage(path, d.sid, self.slice_axis, mri_name, mri_img, d.ref, d.virt, d.mask, d.label,
                        self.target)
        self.figures.append((path, f"{d.sid}: MRI ({mri_name}), reference {self.target}, virtual, error"))
        if d.unc is not None:
            path = os.path.join(self.out_dir, f"uncertainty_{d.sid}.png")
            figures.uncertainty_montage(path, d.sid, self.slice_axis, d.virt, d.ref, d.unc, d.mask, d.regions,
                                        self.target)
            self.figures.append((path, f"{d.sid}: virtual {self.target}, its absolute error and its 95% "
                                       "half-width (1.96 x uncertainty), on one colour scale"))

    def pooled(self) -> tuple[dict, dict | None]:
        dr = (self.ref_range[1] - self.ref_range[0]) or 1.0
        out = {}
        if self.pool.get("uncertainty"):
            est, ref, unc = (np.concatenate(self.pool[k]) for k in ("virtual", "ref", "uncertainty"))
            self.unc_pooled = uncertainty_metrics(est, ref, unc)
            counts = add_tallies(self.unc_tallies)
            self.unc_pooled.update(by_group=by_group(counts), reliability=reliability(counts),
                                   risk=brain_risk(self.miss))
            self.unc_curves["pooled"] = self.unc_pooled["retention"]
            self.unc_pooled["retention"] = _strip_retention(self.unc_pooled["retention"])
        for name, mom in self.moments.items():
            out[name] = mom.aggregate(dr, with_virtual=name != "virtual")
            out[name]["spearman"] = spearman(self.pool[name], self.pool["ref"])
            if name != "virtual":
                out[name]["spearman_vs_virtual"] = spearman(self.pool[name], self.pool["virtual"])
        roc_pooled = None
        if self.have_label and self.pool["lab"]:
            labs = np.concatenate(self.pool["lab"])
            roc_pooled = {name: roc(np.concatenate(self.pool_roc[name]), labs) for name in self.moments}
            out["roc"] = {n: _strip_curve(r) for n, r in roc_pooled.items()}
        return out, roc_pooled

    def calibration(self) -> dict:
        """The bundle's calibration (fitted on its validation split) as predict recorded it."""
        model = self.pstore.attrs.get("model") or {}
        return calibration_of(model, stains_of(self.pstore.attrs)).get(self.target, {})

    def pooled_figures(self, roc_pooled) -> None:
        pool, target, out = self.pool, self.target, self.out_dir
        self.figures.append((figures.scatter(os.path.join(out, "scatter.png"), pool, target),
                             "virtual and markers vs reference"))
        vpool = {"ref": pool["virtual"], **{n: v for n, v in pool.items() if n not in ("ref", "lab", "virtual")}}
        if len(vpool) > 1:
            self.figures.append((figures.scatter(os.path.join(out, "scatter_vs_virtual.png"), vpool, target,
                                                 xlabel=f"virtual {target}"), "markers vs the virtual stain"))
        if self.unc_pooled is not None:
            self.figures.append((figures.reliability_plot(os.path.join(out, "reliability.png"),
                                                          self.unc_pooled["reliability"], target),
                                 "reliability: observed coverage of virtual +- z x uncertainty against the "
                                 "nominal level, per tissue (pooled; below the dashed diagonal: overconfident)"))
        if self.unc_curves:
            self.figures.append((figures.retention_plot(os.path.join(out, "retention.png"), self.unc_curves,
                                                        target),
                                 "error retention: MAE of the most confident fraction of voxels (lower is "
                                 "better; dashed: an oracle that knew the errors)"))
        if roc_pooled:
            self.figures.append((figures.roc_plot(os.path.join(out, "roc.png"), roc_pooled,
                                                  self.label or "lesion"),
                                 "ROC: detecting the label from each score (pooled)"))

    def finish(self, ids: list[str], final_dir: str) -> dict[str, Any]:
        pooled, roc_pooled = self.pooled()
        self.pooled_figures(roc_pooled)
        metrics = self.document(ids, pooled)
        if roc_pooled:
            metrics["roc_curves"] = {n: {"fpr": r["fpr"], "tpr": r["tpr"]} for n, r in roc_pooled.items()
                                     if "fpr" in r}
        if self.unc_pooled is not None:
            metrics["uncertainty"] = {"variable": self.unc_variable, "pooled": self.unc_pooled,
                                      "calibration": self.calibration(), "retention_curves": self.unc_curves}
        if self.ood["tallies"]:
            metrics["ood"] = {"variable": "ood", "training_quantiles": self.ood["quantiles"],
                              "pooled": ood_figures(self.ood["tallies"], np.concatenate(self.ood["score"]),
                                                    np.concatenate(self.ood["abs_err"]))}
        metrics["figures"] = [os.path.basename(p) for p, _ in self.figures]
        metrics["figure_captions"] = {os.path.basename(p): c for p, c in self.figures}
        metrics["out_dir"] = final_dir
        write_json(os.path.join(self.out_dir, "metrics.json"), _finite(metrics))
        return metrics

    def document(self, ids: list[str], pooled: dict) -> dict:
        return {
            "target": self.target, "variable": self.variable, "subjects": ids,
            "label": self.label or ("lesion" if self.have_label else None), "roi": self.roi,
            "markers": {"builtin": [n for n in MARKERS if n in self.moments],
                        "extra": dict(zip(self.extra_names, map(str, self.extra), strict=True)),
                        "transforms": self.transforms},
            "pooled": pooled, "per_subject": self.per_subject, "notes": sorted(set(self.notes)),
            "methods": METHODS | {"pooled_sample": f"Spearman and ROC pooled over up to "
                                                   f"{self.per_subject_pool} random voxels per subject"},
            "provenance": {"stage": "evaluate", "mrhscale": __version__, "pred": self.pstore.url,
                           "store": self.cstore.url, "model": self.pstore.attrs.get("model", {}).get("sha256")},
        }


METHODS = {
    "mask": "store mask AND prediction mask AND finite",
    "markers": "Pearson/Spearman on the raw marker; MAE/PSNR/SSIM after a per-subject "
               "least-squares linear fit of the marker to the reference",
    "vs_virtual": "pearson_vs_virtual/spearman_vs_virtual: raw marker against the virtual "
                  "stain inside the same mask",
    "psnr_peak": "reference range (max - min) inside the mask",
    "ssim": "skimage 3D SSIM (win 7), volumes zeroed outside the mask, mean over the mask",
    "auc": "Mann-Whitney U / (n_pos n_neg), oriented: max(AUC, 1-AUC), direction noted",
    "uncertainty": "Spearman of uncertainty with |virtual - reference|; coverage_95: share of voxels with "
                   "|error| <= 1.96 x uncertainty; retention: MAE of the most confident fraction f of the "
                   "voxels, f = 0.01 .. 1, area = its mean (oracle: ordered by the error itself; random: the "
                   "MAE); factor_for_95: the factor the uncertainty would need to cover 95% of these voxels; "
                   "by_label: mean uncertainty inside each label against the rest of the mask; by_group: 95% "
                   "coverage and mean interval width inside each label and gm (the mask outside wm and lesion), "
                   "exact over subjects; reliability: coverage of virtual +- z x uncertainty, z the normal "
                   "quantile of each nominal level; risk: each subject's share of voxels outside the 95% "
                   "interval and the share of subjects with at most alpha = 0.05",
    "ood": "the prediction's out-of-distribution score: mean inside each label against the rest of the mask, "
           "share of voxels above its training 99th percentile (the variable's attrs), Spearman with "
           "|virtual - reference|",
}


def _strip_retention(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in ("fractions", "mae", "oracle_mae")}


def _strip_curve(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in ("fpr", "tpr")}


def _montage_mri(ds):
    names = _contrast_names(ds)
    name = "t2" if "t2" in names else (names[0] if names else None)
    if name is None:
        return "fa", ds["fa"].transpose(*SPATIAL).values
    return name, ds["mri"].sel(contrast=name).transpose(*SPATIAL).values
