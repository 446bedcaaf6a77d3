"""Evaluation: virtual vs reference histology, against single-MRI-marker baselines.

Within the brain mask (the store's mask AND the prediction's mask), per subject
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

Writes ``metrics.json``, PNG figures (slice montage per subject, scatter, ROC)
and ``report.html`` into ``out_dir``.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from mrhscale.errors import MRHError
from mrhscale.stores import write_json

SPATIAL = ("x", "y", "z")
MARKERS = ("FA", "MT ratio", "T2", "MD")


# --------------------------------------------------------------------------- metrics
def similarity(est: np.ndarray, ref: np.ndarray, mask: np.ndarray, data_range: float | None = None,
               ssim: bool = True) -> dict[str, float]:
    """Pearson, Spearman, MAE, PSNR, SSIM of ``est`` vs ``ref`` inside ``mask`` (3D arrays)."""
    from scipy import stats

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
    from skimage.metrics import structural_similarity

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
    from scipy.stats import mannwhitneyu

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
            import xarray as xr

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
    from mrhscale.stages.register import marker_from_file

    path = source.replace("{subject}", sid)
    if transforms is None:  # must already be on the store grid: say so with the shapes
        from mrhscale.io.volumes import open_volume

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
        from mrhscale.io.volumes import open_volume

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
    target: str,
    out_dir: str,
    *,
    label: str | None = None,
    roi: str | None = None,
    subjects: list[str] | None = None,
    quiet: bool = False,
    max_pool: int = 2_000_000,
    seed: int = 0,
    montage_subjects: int = 3,
    storage_options: dict | None = None,
    markers: list[str] | None = None,
    marker_transforms: str | None = None,
) -> dict[str, Any]:
    """Metrics of PRED's virtual stain vs STORE's ``target`` and single markers; writes a report.

    markers: extra markers (store contrast/variable names or NIfTI paths with ``{subject}``),
    compared like the built-in ones; marker_transforms: ``mrhscale register`` output folder
    for marker files still in the subjects' native space.
    """
    from mrhscale.stores import Folder, resolve

    pstore, cstore, ids = _open_inputs(resolve(pred_url), resolve(store_url), target, subjects,
                                       storage_options)
    extra = list(markers or [])
    if marker_transforms is not None and not os.path.isdir(marker_transforms):
        raise MRHError(f"--marker-transforms {marker_transforms}: no such folder "
                       "(give the `mrhscale register` output folder)")
    folder = Folder(out_dir, "mrhscale-evaluation")
    with folder.replace(target=target, pred=pstore.url, store=cstore.url) as work:
        metrics = _evaluate(pstore, cstore, ids, target, work, label=label, roi=roi, quiet=quiet,
                            max_pool=max_pool, seed=seed, montage_subjects=montage_subjects,
                            extra=extra, marker_transforms=marker_transforms, final_dir=folder.path)
    metrics["out_dir"] = folder.path
    metrics["report"] = os.path.join(folder.path, os.path.basename(metrics["report"]))
    return metrics


def _open_inputs(pred_url: str, store_url: str, target: str, subjects, storage_options):
    """The prediction and cohort stores, and the subjects to compare, all cross-checked:
    the prediction is of ``target``, and each subject was predicted from the store's own."""
    from mrhscale.stores import CohortStore, PredictionStore

    pstore = PredictionStore.open(pred_url, storage_options)
    cstore = CohortStore.open(store_url, storage_options)
    pattrs = pstore.attrs
    if str(pattrs.get("target")) != str(target):
        raise MRHError(f"{pstore.name}: holds virtual {pattrs.get('target')} (its model predicts "
                       f"{pattrs.get('target')!r}); --target {target} would compare it with another "
                       f"stain: give --target {pattrs.get('target')}")
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


def _evaluate(pstore, cstore, ids, target, out_dir, *, label, roi, quiet, max_pool, seed,
              montage_subjects, extra, marker_transforms, final_dir) -> dict[str, Any]:
    """The evaluation proper, writing its files into ``out_dir`` (which becomes ``final_dir``)."""
    from mrhscale import __version__

    pattrs = pstore.attrs
    variable = pattrs.get("variable") or f"{target}_virtual"
    extra_names = marker_names(extra)
    rng = np.random.default_rng(seed)
    per_subject_pool = max(10_000, int(max_pool) // len(ids))
    notes: list[str] = []
    per_subject: dict[str, Any] = {}
    pool: dict[str, list] = {"ref": [], "lab": []}
    pool_roc: dict[str, list] = {}
    sums: dict[str, dict[str, float]] = {}
    rng_lo, rng_hi = math.inf, -math.inf
    figures: list[tuple[str, str]] = []
    slice_axis = str((pattrs.get("model") or {}).get("patch", {}).get("axis", "y"))
    have_label = False

    iterator = ids
    if not quiet:
        from tqdm.auto import tqdm

        iterator = tqdm(ids, desc="evaluate", unit="subject")
    for k, sid in enumerate(iterator):
        ds = cstore.open_subject(sid)
        if target not in ds.data_vars:
            raise MRHError(
                f"{cstore.name}: subject {sid!r} has no reference {target!r} "
                f"(targets: {', '.join(ds.attrs.get('targets', [])) or 'none'})"
            )
        pds = pstore.open_subject(sid)
        if variable not in pds.data_vars:
            raise MRHError(f"{pstore.name}: subject {sid!r} has no variable {variable!r}")
        virt = pds[variable].transpose(*SPATIAL).values.astype(np.float64)
        ref = ds[target].transpose(*SPATIAL).values.astype(np.float64)
        if virt.shape != ref.shape:
            raise MRHError(f"subject {sid!r}: prediction grid {virt.shape} differs from the store's {ref.shape}")
        mask = ds["mask"].transpose(*SPATIAL).values.astype(bool)
        if "mask" in pds.data_vars:
            mask &= pds["mask"].transpose(*SPATIAL).values.astype(bool)
        finite = np.isfinite(ref) & np.isfinite(virt)
        mask &= finite
        markers, mnotes = single_markers(ds, mask)
        notes += mnotes
        for src, mname in zip(extra, extra_names, strict=True):
            markers[mname] = load_marker(src, ds, sid, ref.shape, marker_transforms)
        lab = load_label(ds, label, sid, ref.shape)
        lo, hi = float(ref[mask].min()) if mask.any() else 0.0, float(ref[mask].max()) if mask.any() else 0.0
        rng_lo, rng_hi = min(rng_lo, lo), max(rng_hi, hi)
        dr = (hi - lo) or 1.0
        scores = {"virtual": virt}
        res = {"virtual": similarity(virt, ref, mask, dr)}
        for name, m in markers.items():
            a, b = linear_fit(m[mask], ref[mask])
            cal = a * m + b
            r = similarity(cal, ref, mask, dr)
            raw = similarity(m, ref, mask, dr, ssim=False)
            r["pearson"], r["spearman"] = raw["pearson"], raw["spearman"]
            vv = similarity(m, virt, mask, ssim=False)  # the marker against the virtual stain
            r["pearson_vs_virtual"], r["spearman_vs_virtual"] = vv["pearson"], vv["spearman"]
            r["calibration"] = {"slope": a, "intercept": b}
            res[name] = r
            scores[name] = m
        # pooled accumulators (exact): n, sum|err|, sum err^2, sum ssim*n, pearson moments
        for name, s in scores.items():
            est = s if name == "virtual" else res[name]["calibration"]["slope"] * s + res[name]["calibration"]["intercept"]
            e, rr = est[mask], ref[mask]
            acc = sums.setdefault(name, dict.fromkeys(
                ("n", "abs", "sq", "ssim", "ssim_n", "sx", "sy", "sxx", "syy", "sxy", "sv", "svv", "sxv"),
                0.0))
            raw = s[mask]
            acc["n"] += e.size
            acc["abs"] += float(np.abs(e - rr).sum())
            acc["sq"] += float(((e - rr) ** 2).sum())
            if math.isfinite(res[name]["ssim"]):
                acc["ssim"] += res[name]["ssim"] * e.size
                acc["ssim_n"] += e.size
            acc["sx"] += float(raw.sum())
            acc["sy"] += float(rr.sum())
            acc["sxx"] += float((raw * raw).sum())
            acc["syy"] += float((rr * rr).sum())
            acc["sxy"] += float((raw * rr).sum())
            vm = virt[mask]
            acc["sv"] += float(vm.sum())
            acc["svv"] += float((vm * vm).sum())
            acc["sxv"] += float((raw * vm).sum())
        # pooled sample for Spearman / ROC
        idx = np.flatnonzero(mask.ravel())
        if idx.size > per_subject_pool:
            idx = np.sort(rng.choice(idx, per_subject_pool, replace=False))
        pool["ref"].append(ref.ravel()[idx].astype(np.float32))
        for name, s in scores.items():
            pool.setdefault(name, []).append(s.ravel()[idx].astype(np.float32))
        if lab is not None:
            have_label = True
            # with a region of interest (e.g. white matter): the label's voxels against the
            # normal voxels of that region, not against every tissue of the brain
            rmask = mask & (load_label(ds, roi, sid, ref.shape, "--roi") | lab) if roi else mask
            ridx = np.flatnonzero(rmask.ravel())
            if ridx.size > per_subject_pool:
                ridx = np.sort(rng.choice(ridx, per_subject_pool, replace=False))
            pool["lab"].append(lab.ravel()[ridx])
            for name, s in scores.items():
                pool_roc.setdefault(name, []).append(s.ravel()[ridx].astype(np.float32))
            res["roc"] = {name: _strip_curve(roc(s[rmask], lab[rmask])) for name, s in scores.items()}
        elif have_label:
            notes.append(f"{sid}: no label; left out of the ROC analysis")
        per_subject[sid] = res
        if k < montage_subjects:
            mri_name, mri_img = _montage_mri(ds)
            path = os.path.join(out_dir, f"montage_{sid}.png")
            _montage(path, sid, slice_axis, mri_name, mri_img, ref, virt, mask, lab, target)
            figures.append((path, f"{sid}: MRI ({mri_name}), reference {target}, virtual, error"))

    pooled = {}
    for name, acc in sums.items():
        n = acc["n"]
        mse = acc["sq"] / n if n else math.nan
        dr = (rng_hi - rng_lo) or 1.0
        cov = acc["sxy"] / n - (acc["sx"] / n) * (acc["sy"] / n)
        vx = acc["sxx"] / n - (acc["sx"] / n) ** 2
        vy = acc["syy"] / n - (acc["sy"] / n) ** 2
        pooled[name] = {
            "n": int(n),
            "pearson": float(cov / math.sqrt(vx * vy)) if vx > 0 and vy > 0 else math.nan,
            "spearman": _spearman(pool[name], pool["ref"]),
            "mae": acc["abs"] / n if n else math.nan,
            "rmse": math.sqrt(mse) if n else math.nan,
            "psnr": math.inf if mse == 0 else float(10 * np.log10(dr**2 / mse)),
            "ssim": acc["ssim"] / acc["ssim_n"] if acc["ssim_n"] else math.nan,
            "data_range": dr,
        }
        if name != "virtual":  # the marker against the virtual stain
            covv = acc["sxv"] / n - (acc["sx"] / n) * (acc["sv"] / n)
            vv = acc["svv"] / n - (acc["sv"] / n) ** 2
            pooled[name]["pearson_vs_virtual"] = (float(covv / math.sqrt(vx * vv))
                                                  if vx > 0 and vv > 0 else math.nan)
            pooled[name]["spearman_vs_virtual"] = _spearman(pool[name], pool["virtual"])
    roc_pooled = None
    if have_label and pool["lab"]:
        labs = np.concatenate(pool["lab"])
        roc_pooled = {}
        for name in sums:
            roc_pooled[name] = roc(np.concatenate(pool_roc[name]), labs)
        pooled["roc"] = {n: _strip_curve(r) for n, r in roc_pooled.items()}
    figures.append((_scatter(os.path.join(out_dir, "scatter.png"), pool, target), "virtual and markers vs reference"))
    vpool = {"ref": pool["virtual"], **{n: v for n, v in pool.items() if n not in ("ref", "lab", "virtual")}}
    if len(vpool) > 1:
        figures.append((_scatter(os.path.join(out_dir, "scatter_vs_virtual.png"), vpool, target,
                                 xlabel=f"virtual {target}"), "markers vs the virtual stain"))
    if roc_pooled:
        figures.append((_roc_plot(os.path.join(out_dir, "roc.png"), roc_pooled, label or "lesion"),
                        "ROC: detecting the label from each score (pooled)"))
    metrics = {
        "target": target,
        "variable": variable,
        "subjects": ids,
        "label": label or ("lesion" if have_label else None),
        "roi": roi,
        "markers": {"builtin": [n for n in MARKERS if n in sums],
                    "extra": dict(zip(extra_names, map(str, extra), strict=True)),
                    "transforms": marker_transforms},
        "pooled": pooled,
        "per_subject": per_subject,
        "notes": sorted(set(notes)),
        "methods": {
            "mask": "store mask AND prediction mask AND finite",
            "markers": "Pearson/Spearman on the raw marker; MAE/PSNR/SSIM after a per-subject "
                       "least-squares linear fit of the marker to the reference",
            "vs_virtual": "pearson_vs_virtual/spearman_vs_virtual: raw marker against the virtual "
                          "stain inside the same mask",
            "psnr_peak": "reference range (max - min) inside the mask",
            "ssim": "skimage 3D SSIM (win 7), volumes zeroed outside the mask, mean over the mask",
            "auc": "Mann-Whitney U / (n_pos n_neg), oriented: max(AUC, 1-AUC), direction noted",
            "pooled_sample": f"Spearman and ROC pooled over up to {per_subject_pool} random voxels "
                             "per subject",
        },
        "provenance": {"stage": "evaluate", "mrhscale": __version__, "pred": pstore.url,
                       "store": cstore.url, "model": pattrs.get("model", {}).get("sha256")},
    }
    if roc_pooled:
        metrics["roc_curves"] = {n: {"fpr": r["fpr"], "tpr": r["tpr"]} for n, r in roc_pooled.items()
                                 if "fpr" in r}
    metrics["figures"] = [os.path.basename(p) for p, _ in figures]
    metrics["figure_captions"] = {os.path.basename(p): c for p, c in figures}
    metrics["out_dir"] = final_dir
    write_json(os.path.join(out_dir, "metrics.json"), _finite(metrics))
    from mrhscale.report.html import write_report

    metrics["report"] = write_report(out_dir, summary_tables(metrics), figures,
                                     f"mrhscale evaluation: virtual {target}")
    return metrics


def _strip_curve(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in ("fpr", "tpr")}


def _spearman(parts: list[np.ndarray], ref_parts: list[np.ndarray]) -> float:
    from scipy import stats

    a, b = np.concatenate(parts), np.concatenate(ref_parts)
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(stats.spearmanr(a, b).statistic)


def summary_tables(m: dict) -> dict:
    """What the HTML report shows: pooled table, per-subject virtual table, AUCs, notes."""
    cols = ("pearson", "spearman", "mae", "psnr", "ssim")
    pooled = {name: {**{c: v.get(c) for c in cols},
                     "pearson vs virtual": v.get("pearson_vs_virtual"),
                     "spearman vs virtual": v.get("spearman_vs_virtual")}
              for name, v in m["pooled"].items() if name != "roc"}
    out = {"Pooled (virtual stain vs single markers)": pooled,
           "Per subject (virtual stain)": {sid: {c: r["virtual"].get(c) for c in cols}
                                           for sid, r in m["per_subject"].items()}}
    if "roc" in m["pooled"]:
        out[f"Detecting '{m['label']}' (pooled)"] = {
            n: {"AUC": r.get("auc"), "direction": r.get("direction"),
                "sensitivity": (r.get("youden") or {}).get("sensitivity"),
                "specificity": (r.get("youden") or {}).get("specificity")}
            for n, r in m["pooled"]["roc"].items()}
    if m["notes"]:
        out["Notes"] = m["notes"]
    return out


# --------------------------------------------------------------------------- figures
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _montage_mri(ds):
    names = _contrast_names(ds)
    name = "t2" if "t2" in names else (names[0] if names else None)
    if name is None:
        return "fa", ds["fa"].transpose(*SPATIAL).values
    return name, ds["mri"].sel(contrast=name).transpose(*SPATIAL).values


def _take(vol, axis: int, k: int):
    return np.take(vol, k, axis=axis)


def _montage(path, sid, slice_axis, mri_name, mri, ref, virt, mask, lab, target):
    plt = _plt()
    ax = SPATIAL.index(slice_axis) if slice_axis in SPATIAL else 1
    counts = mask.sum(axis=tuple(a for a in range(3) if a != ax))
    k = int(np.argmax(counts))
    err = np.where(mask, virt - ref, 0.0)
    vmax = float(np.percentile(ref[mask], 99.5)) if mask.any() else 1.0
    emax = float(np.percentile(np.abs(err[mask]), 99)) if mask.any() else 1.0
    panels = [(f"MRI ({mri_name})", mri, "gray", None, None),
              (f"reference {target}", ref, "magma", 0, vmax),
              (f"virtual {target}", np.where(mask, virt, 0), "magma", 0, vmax),
              ("virtual - reference", err, "RdBu_r", -emax or -1, emax or 1)]
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.6))
    for a, (title, vol, cmap, lo, hi) in zip(axes, panels, strict=True):
        im = a.imshow(_take(vol, ax, k), cmap=cmap, vmin=lo, vmax=hi, origin="lower")
        if lab is not None and title.startswith("reference") and _take(lab, ax, k).any():
            a.contour(_take(lab, ax, k).astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
        a.set_title(title, fontsize=9)
        a.axis("off")
        fig.colorbar(im, ax=a, fraction=0.046)
    fig.suptitle(f"{sid}, slice {slice_axis}={k}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _scatter(path, pool, target, n_max=20000, xlabel=None):
    plt = _plt()
    ref = np.concatenate(pool["ref"]) if pool["ref"] else np.zeros(0)
    names = [n for n in pool if n not in ("ref", "lab")]
    rng = np.random.default_rng(0)
    idx = rng.choice(ref.size, min(ref.size, n_max), replace=False) if ref.size else np.zeros(0, int)
    fig, axes = plt.subplots(1, len(names), figsize=(3.3 * len(names), 3.2), squeeze=False)
    for a, n in zip(axes[0], names, strict=True):
        v = np.concatenate(pool[n])[idx]
        a.scatter(ref[idx], v, s=2, alpha=0.3, lw=0)
        if n == "virtual" and ref.size:
            lim = [float(min(ref.min(), v.min())), float(max(ref.max(), v.max()))]
            a.plot(lim, lim, "k--", lw=0.8)
        a.set_xlabel(xlabel or f"reference {target}")
        a.set_ylabel(n)
        a.set_title(n, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _roc_plot(path, rocs, label):
    plt = _plt()
    fig, a = plt.subplots(figsize=(4.2, 4))
    for n, r in rocs.items():
        if "fpr" in r:
            sign = "" if r["direction"] == "higher" else " (lower)"
            a.plot(r["fpr"], r["tpr"], label=f"{n}{sign}: AUC {r['auc']:.3f}",
                   lw=2 if n == "virtual" else 1)
    a.plot([0, 1], [0, 1], "k:", lw=0.8)
    a.set_xlabel("1 - specificity")
    a.set_ylabel("sensitivity")
    a.set_title(f"detecting {label}", fontsize=10)
    a.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
