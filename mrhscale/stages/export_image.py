"""export-image: one volume of a cohort or prediction store as an OME-Zarr image for viewers.

Why: napari, Neuroglancer and other OME-NGFF viewers open OME-Zarr directly (also
over HTTP), not our xarray stores. Written with ome-zarr-py as NGFF 0.5 (Zarr v3):

- axes ``z, y, x`` (type space, unit millimeter), the volume's own voxel axes in
  C order: ``image[k, j, i] = volume[i, j, k]``;
- level l halves every axis of level l-1 longer than one voxel (an odd last voxel is
  dropped): the block mean for maps; the block majority for masks, which stay 0/1
  (a mean would blur a label, a stride would alias it);
- each level's ``scale`` = voxel size x its factor and ``translation`` = the affine's
  origin + its block centre's offset, so every level lies where level 0 does. Voxel
  size = the affine's column norms (mm); rotations and flips cannot be said in NGFF
  0.5 and are dropped (the affine is kept in ``mrhscale.affine``, and
  ``exact_affine`` is false);
- booleans are written as uint8 (Neuroglancer has no bool), maps as float32.

Steps: validate (store, subject, variable, contrast) -> plan (pyramid, transforms) ->
run and commit (built aside and swapped in by ``mrhscale.stores.omezarr``).
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np

from mrhscale._optional import load
from mrhscale.errors import MRHError
from mrhscale.options import ImageOptions
from mrhscale.parallel.context import Context
from mrhscale.results import ExportImageResult
from mrhscale.stores import (
    CohortStore,
    PredictionStore,
    inspect,
    is_local,
    local_path,
    mask_url,
    omezarr,
    resolve,
)
from mrhscale.stores.cohort import short
from mrhscale.stores.omezarr import own_attrs
from mrhscale.stores.urls import join

SPATIAL = ("x", "y", "z")
AXES = [{"name": a, "type": "space", "unit": "millimeter"} for a in ("z", "y", "x")]
CHUNK = 64  # chunk edge (voxels): viewers fetch 64^3 blocks well; even, so blocks halve whole


def export_image(store, subject: str, var: str, out, *, contrast: str | None = None, levels: int = ImageOptions.levels,
                 overwrite: bool = False, refresh: bool = False, ctx: Context | None = None) -> ExportImageResult:
    """Write ``var`` (its ``contrast`` for ``mri``) of ``subject`` in ``store`` to ``out`` as an
    OME-Zarr image of ``levels`` resolutions (fewer when the volume cannot halve further).

    An image made from the same source subject, variable and options is reused; one
    made from anything else is refused unless ``overwrite`` (``refresh``: replace it only
    when stale, as ``predict --ome-zarr`` does); a folder mrhscale did not make, always.
    ``ctx``: the storage options of ``store`` and ``out`` (the pyramid is computed on local threads).
    """
    ctx = ctx or Context()
    t0 = time.perf_counter()
    _ome_zarr("export-image")
    if int(levels) < 1:
        raise MRHError(f"--levels must be >= 1, got {levels}")
    source = open_source(store, ctx)
    attrs, vol = select(source, subject, var, contrast)
    geo = Geometry.from_attrs(attrs, f"subject {subject!r}")
    labels = vol.dtype == bool
    pyr, factors = pyramid(vol.astype(np.uint8 if labels else np.float32), int(levels), labels)
    made_by = _made_by(source, subject, var, contrast, attrs, len(pyr), labels)
    name = " ".join([subject, var, *([contrast] if contrast else [])])
    transforms = geo.transforms(factors)
    with omezarr.build(ctx.location(out, "--out"), made_by, _record(source, subject, geo), overwrite=overwrite,
                       refresh=refresh) as b:
        if b is not None:
            write(b.group(), pyr, transforms, name, labels)
    return ExportImageResult(
        out=resolve(out, "--out"), subject=subject, variable=var, contrast=contrast,
        shapes=[list(map(int, a.shape)) for a in pyr], scales=[t[0]["scale"] for t in transforms],
        reused=b is None, exact_affine=geo.exact, seconds=time.perf_counter() - t0)


def _ome_zarr(what: str):
    """ome-zarr-py, or the one-line error naming the extra that brings it."""
    return load("ome_zarr", what)


# --------------------------------------------------------------------------- validate
def open_source(store, ctx: Context):
    """The cohort or prediction store at ``store`` (MRHError naming what is there otherwise)."""
    loc = ctx.location(store, "STORE")
    found = inspect(loc)
    kinds = {CohortStore.FORMAT: CohortStore, PredictionStore.FORMAT: PredictionStore}
    if found.format not in kinds:
        raise MRHError(f"STORE {loc.masked}: {found.description}"
                       + ("" if found.absent else ", not a cohort or prediction store"))
    return kinds[found.format](loc)


def select(source, subject: str, var: str, contrast: str | None):
    """(the subject's attrs, its lazy ``var`` volume with axes (z, y, x)) in ``source``, a cohort
    or prediction store."""
    attrs = source.subject_attrs(subject)  # MRHError naming the complete subjects
    ds = source.open_subject(subject)
    if var not in ds.data_vars:
        raise MRHError(f"--var {var}: subject {subject!r} of {source.name} has no such variable "
                       f"(it has: {', '.join(map(str, ds.data_vars))})")
    arr = _one_contrast(ds[var], var, contrast)
    if arr.ndim != 3 or set(arr.dims) != set(SPATIAL):
        raise MRHError(f"--var {var}: dims {tuple(arr.dims)}, expected a 3-D (x, y, z) volume")
    data = arr.transpose(*SPATIAL[::-1]).data
    return attrs, data if isinstance(data, da.Array) else da.from_array(data)


def _one_contrast(arr, var: str, contrast: str | None):
    if "contrast" not in arr.dims:
        if contrast is not None:
            raise MRHError(f"--contrast {contrast}: --var {var} has no contrast axis (only mri has)")
        return arr
    names = [str(c) for c in arr["contrast"].values]
    if contrast is None:
        raise MRHError(f"--var {var} holds {len(names)} contrasts: pass --contrast (one of {short(names)})")
    if contrast not in names:
        raise MRHError(f"--contrast {contrast}: not a contrast of --var {var} (they are: {short(names)})")
    return arr.isel(contrast=names.index(contrast))


def _made_by(source, subject: str, var: str, contrast, attrs: dict, n_levels: int, labels: bool) -> dict:
    """What the image is of: the source subject's fingerprint (model checksum for a prediction)."""
    rec = {"stage": "export-image", "source": attrs.get("fingerprint") or f"{source.url}#{subject}",
           "subject": subject, "var": var, "contrast": contrast, "levels": n_levels,
           "downsample": "majority" if labels else "mean", "ngff": "0.5"}
    if source.FORMAT == "mrhscale-predictions":
        model = (attrs.get("lineage") or {}).get("model") or source.attrs.get("model") or {}
        rec["model_sha256"] = model.get("sha256")
    return rec


def _record(source, subject: str, geo: Geometry) -> dict:
    """Where the image came from and how its axes map (kept beside ``made_by``, not compared)."""
    return {"source": {"store": mask_url(source.url), "kind": source.FORMAT, "subject": subject},
            "affine": geo.affine, "exact_affine": geo.exact,
            "axes": "image[k, j, i] = volume[i, j, k]; world = origin + voxel size * index, "
                    "the affine's rotations and flips dropped"}


# --------------------------------------------------------------------------- plan
@dataclass
class Geometry:
    """Voxel size and origin (mm, axes x y z) of a subject's affine, as NGFF can say them."""

    voxel: np.ndarray
    origin: np.ndarray
    exact: bool  # False: the affine rotates or flips axes, which NGFF 0.5 cannot hold
    affine: list

    @classmethod
    def from_attrs(cls, attrs: dict, where: str) -> Geometry:
        a = attrs.get("affine")
        A = np.asarray(a if a is not None else np.diag([*(attrs.get("voxel_size") or [1, 1, 1]), 1]), float)
        if A.shape != (4, 4) or not np.all(np.isfinite(A)):
            raise MRHError(f"{where}: affine is not a finite 4x4 matrix")
        lin = A[:3, :3]
        vox = np.linalg.norm(lin, axis=0)  # each voxel axis's length in mm
        if np.any(vox <= 0):
            raise MRHError(f"{where}: affine has a zero-length voxel axis")
        exact = bool(np.allclose(lin, np.diag(vox), rtol=0, atol=1e-6 * vox.max()))
        return cls(vox, A[:3, 3].copy(), exact, A.tolist())

    def transforms(self, factors: list[tuple[int, ...]]) -> list[list[dict]]:
        """Per level (factors in axes z, y, x): its NGFF scale and translation, axes z, y, x."""
        vox, origin = self.voxel[::-1], self.origin[::-1]
        out = []
        for f in factors:
            f = np.asarray(f, float)
            out.append([{"type": "scale", "scale": [float(v) for v in vox * f]},
                        {"type": "translation", "translation": [float(v) for v in origin + vox * (f - 1) / 2]}])
        return out


def pyramid(vol, levels: int, labels: bool):
    """Levels (dask, axes z, y, x) and each one's downsampling factor per axis."""
    out, factors = [_chunked(vol)], [(1, 1, 1)]
    for _ in range(1, levels):
        step = tuple(2 if s >= 2 else 1 for s in out[-1].shape)
        if step == (1, 1, 1):
            break
        out.append(_chunked(_halve(out[-1], step, labels)))
        factors.append(tuple(f * s for f, s in zip(factors[-1], step)))
    return out, factors


def _chunked(arr):
    return arr.rechunk(tuple(min(CHUNK, int(s)) for s in arr.shape))


def _halve(arr, step: tuple[int, ...], labels: bool):
    """Mean (maps) or majority (masks) of each block of ``step`` voxels, chunk by chunk."""
    arr = arr[tuple(slice(0, s - s % k) for s, k in zip(arr.shape, step))]
    arr = arr.rechunk(tuple(CHUNK if k == 2 else -1 for k in step))  # even chunks: blocks never split
    chunks = tuple(tuple(c // k for c in cs) for cs, k in zip(arr.chunks, step))
    dtype = np.uint8 if labels else np.float32
    return arr.map_blocks(_block_reduce, step=step, labels=labels, chunks=chunks, dtype=dtype,
                          meta=np.empty((0, 0, 0), dtype))


def _block_reduce(block: np.ndarray, step: tuple[int, ...], labels: bool) -> np.ndarray:
    shape = [n for s, k in zip(block.shape, step) for n in (s // k, k)]
    m = block.reshape(shape).mean(axis=(1, 3, 5), dtype=np.float32)
    return (m >= 0.5).astype(np.uint8) if labels else m


# --------------------------------------------------------------------------- run
def write(group, pyr: list, transforms: list[list[dict]], name: str, labels: bool) -> None:
    """The pyramid and its NGFF metadata into ``group`` with ome-zarr-py, in one pass over the
    source (the display window is computed with the writes), on local threads."""
    how = {"method": "block majority (masks)" if labels else "block mean", "factor": 2, "by": "mrhscale"}
    with warnings.catch_warnings():  # its Scaler, and coordinate_transformations: the one argument
        warnings.simplefilter("ignore", DeprecationWarning)  # that takes translations, are deprecated
        from ome_zarr.format import FormatV05  # the optional ome extra (checked by _ome_zarr first)
        from ome_zarr.writer import add_metadata, write_multiscale

        delayed = write_multiscale(pyr, group, fmt=FormatV05(), axes=[dict(a) for a in AXES],
                                   coordinate_transformations=transforms, name=name, compute=False,
                                   metadata=how)
    _, lo, hi = dask.compute(delayed, pyr[0].min(), pyr[0].max(), scheduler="threads")
    lo, hi = (0.0, 1.0) if labels else (float(lo), float(hi) if hi > lo else float(lo) + 1.0)
    add_metadata(group, {"omero": omero(name, lo, hi)}, fmt=FormatV05())


def omero(name: str, lo: float, hi: float) -> dict:
    """Display hints (napari reads the window as contrast limits)."""
    window = {"min": lo, "max": hi, "start": lo, "end": hi}
    return {"name": name, "rdefs": {"model": "greyscale"},
            "channels": [{"label": name, "color": "FFFFFF", "active": True, "coefficient": 1.0,
                          "family": "linear", "inverted": False, "window": window}]}


# --------------------------------------------------------------------------- predict --ome-zarr
def image_paths(out_dir, ids: list[str], ctx: Context, suffix: str = "") -> dict[str, str]:
    """``DIR/<subject><suffix>.ome.zarr`` for each subject, checked before any prediction: a place
    holding anything mrhscale did not make is refused then, not after the work."""
    _ome_zarr("predict --ome-zarr")
    base = resolve(out_dir, "--ome-zarr")
    if is_local(base) and os.path.exists(local_path(base)) and not os.path.isdir(local_path(base)):
        raise MRHError(f"--ome-zarr {base}: is a file, not a folder")
    paths = {sid: join(base, f"{sid}{suffix}.ome.zarr") for sid in ids}
    for p in paths.values():
        own_attrs(ctx.location(p, "--ome-zarr"), what="--ome-zarr")
    return paths


def export_predictions(pred_url, paths: dict[str, str], variable: str, ctx: Context) -> list[str]:
    """Each subject's virtual stain as ``paths[subject]``, rewritten only when it does not
    already hold this prediction (as the --nifti files); the images written."""
    written = []
    for sid, path in paths.items():
        r = export_image(pred_url, sid, variable, path, refresh=True, ctx=ctx)
        if not r.reused:
            written.append(r.out)
    return written
