"""A 3D stain volume onto a subject's MRI (mutual information): new training targets."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import time

import numpy as np

from mrhscale import __version__
from mrhscale.errors import MRHError
from mrhscale.io.manifest import Manifest, load_manifest
from mrhscale.io.volumes import mrhscale_descrip, open_volume, stem, write_volume
from mrhscale.options import HISTOLOGY_MIN_SIMILARITY, RegistrationOptions
from mrhscale.results import HistologyResult
from mrhscale.stages.ingest import plan_subject
from mrhscale.stages.register.ants import (
    FORMAT,
    TRANSFORM_JSON,
    ants_module,
    check_options,
)
from mrhscale.stages.register.geometry import (
    Grid,
    contrast_array,
    grid_of,
    n_volumes,
    nmi,
    overlap_fraction,
    pearson,
    read3,
    to_ants,
)
from mrhscale.stages.register.landmarks import landmark_pair, registration_tre
from mrhscale.stages.register.transforms import apply, estimate
from mrhscale.stores import write_json
from mrhscale.stores.base import swap_in, temporary_folder
from mrhscale.stores.locks import run_token
from mrhscale.stores.urls import resolve


def register_histology(
    volume: str,
    subject: str,
    out: str,
    *,
    manifest=None,
    options: RegistrationOptions | None = None,
    min_similarity: float = HISTOLOGY_MIN_SIMILARITY,
    landmarks=None,
) -> HistologyResult:
    """Register a 3D stain volume onto a subject's MRI (cross-modal: Mattes mutual information)
    and write it, resampled on the subject's grid, to ``out`` (a new training target).

    subject: a subject id of ``manifest`` (its ``options.contrast`` is the fixed image) or an MRI
    NIfTI. Transforms go to ``<out stem>_transforms/`` so other stains of the same block can
    follow with :func:`to_reference`. Convergence check: normalised mutual information after
    registration >= min_similarity. ``options.threads``: ITK threads (default: ITK's own).
    landmarks: (stain landmarks, MRI landmarks) files, or one BigWarp CSV: their TRE before and
    after goes in transform.json and the result (docs/landmarks.md).
    """
    options = options or RegistrationOptions()
    t0 = time.perf_counter()
    params = check_options(options)
    pair = landmark_pair(*_as_tuple(landmarks)) if landmarks else None
    ants = ants_module(options.threads)
    transform, contrast, metric, init, preset, seed = (
        params["transform"], options.contrast, options.metric, options.init, options.preset, options.seed)
    stain = open_volume(os.fspath(volume), what="histology")
    if n_volumes(stain) > 1:
        raise MRHError(f"{volume}: a 4D image {stain.shape}; give one 3D stain volume")
    if manifest is not None:
        man = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
        plan = plan_subject(man.select([subject])[0])
        fixed_arr, grid, region = contrast_array(plan, contrast), Grid(plan.shape, plan.affine), plan.mask
        ref_desc = {"kind": "subject", "subject": subject, "contrast": contrast, "manifest": man.path}
    elif os.path.exists(subject):
        mri = open_volume(subject, what="--subject")
        fixed_arr, grid = read3(mri, 0 if n_volumes(mri) > 1 else None), grid_of(mri)
        region = fixed_arr != 0
        ref_desc = {"kind": "file", "path": os.path.abspath(subject)}
    else:
        raise MRHError(f"--subject {subject!r}: give --manifest with that subject id, or an MRI NIfTI path")
    if not region.any():
        region = np.ones(grid.shape, bool)
    stain_arr = read3(stain)
    if not np.any(stain_arr):
        raise MRHError(f"{volume}: the stain volume is all zero")
    native = grid_of(stain)
    fixed, moving = to_ants(ants, fixed_arr, grid.affine), to_ants(ants, stain_arr, native.affine)
    if init == "header" and overlap_fraction(native, grid) <= 0:
        raise MRHError(f"{volume}: no overlap with the MRI grid in world coordinates (--init header); "
                       "fix the header or use --init com")
    before = np.asarray(ants.resample_image_to_target(moving, fixed, interp_type="linear").numpy())
    out = resolve(out, "--out")
    tdir = stem(out) + "_transforms"
    _check_histology_outputs(out, tdir)
    with temporary_folder(out) as work:
        tx = estimate(ants, fixed, moving, transform, work, metric=metric, preset=preset, init=init,
                       seed=seed)
        files = [os.path.join(work, f) for f in tx["forward"]["files"]]
        warped = apply(ants, stain_arr, native, grid, files, tx["forward"]["invert"], "linear")
        metrics = {"nmi_before": round(nmi(fixed_arr, before, region), 4),
                   "nmi_after": round(nmi(fixed_arr, warped, region), 4),
                   "r_before": round(pearson(fixed_arr, before, region), 4),
                   "r_after": round(pearson(fixed_arr, warped, region), 4)}
        if not np.any(warped[region]):
            raise MRHError(f"{volume}: no overlap: the registered stain lies outside the MRI's brain")
        if metrics["nmi_after"] < min_similarity:
            raise MRHError(f"{volume}: registration did not converge: final NMI with the MRI "
                           f"{metrics['nmi_after']:.3f} < --min-similarity {min_similarity:g} "
                           f"(before {metrics['nmi_before']:.3f})")
        tre = registration_tre(pair, tx, work) if pair else None
        seconds = time.perf_counter() - t0
        info = {"format": FORMAT, "format_version": 1, "subject": subject, "kind": "histology",
                "transform": transform, "contrast": contrast, "metric": metric, "preset": preset,
                "init": init, "identity": False, "reference": ref_desc,
                "reference_grid": grid.to_dict(), "native_grid": native.to_dict(),
                "forward": tx["forward"], "inverse": tx["inverse"], "linear": tx["linear"],
                "metrics": metrics, "landmarks": tre, "seconds": round(seconds, 3),
                "sources": {"histology": os.path.abspath(volume)},
                "provenance": {"mrhscale_version": __version__,
                               "antspyx_version": getattr(ants, "__version__", "?"),
                               "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                               "seed": seed}}
        write_json(os.path.join(work, TRANSFORM_JSON), info)
        write_volume(out, warped, grid.affine, dtype=np.float32, descrip=HISTOLOGY_DESCRIP,
                     xform="template" if ref_desc["kind"] == "file" else "aligned")
        swap_in(work, tdir, token=run_token())
    return HistologyResult(out=out, transforms=tdir, metrics=metrics, seconds=seconds, landmarks=tre)


def _as_tuple(landmarks) -> tuple:
    """A (moving, fixed) pair of files, or one BigWarp file, as landmark_pair's arguments."""
    return (landmarks,) if isinstance(landmarks, (str, os.PathLike)) else tuple(landmarks)


HISTOLOGY_DESCRIP = "mrhscale register-histology"


def _check_histology_outputs(out: str, tdir: str) -> None:
    """Overwrite only what an earlier register-histology wrote: never the user's files."""
    if os.path.exists(out):
        if mrhscale_descrip(out) is None:
            raise MRHError(f"--out {out}: exists and was not written by mrhscale; choose another --out")
    if os.path.exists(tdir):
        info = {}
        with contextlib.suppress(OSError, ValueError):
            with open(os.path.join(tdir, TRANSFORM_JSON)) as fh:
                info = json.load(fh)
        if info.get("format") != FORMAT:
            raise MRHError(f"--out {out}: {tdir} exists and holds no mrhscale registration; "
                           "move it away or choose another --out")
