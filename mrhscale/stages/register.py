"""Registration with ANTs: new brains and new histology onto a cohort's grid, subjects in parallel.

MRH-Net left registration to outside tools; mrhscale drives ANTs (the
``antspyx`` wheel, optional extra ``mrhscale[register]``) and never optimises
a transform itself. Three entry points:

- :func:`register_cohort`: every subject of a manifest onto a reference grid
  (a subject of the manifest or a template NIfTI). The transform is estimated
  on one contrast (``fa``, a b0 channel, ``t2`` ...), then applied to every
  contrast (4D files volume by volume, gradient directions rotated by the
  linear part), the mask (nearest neighbour), targets (linear) and labels
  (nearest neighbour). Output: ``OUT/<sid>/*.nii`` (or .nii.gz), ``OUT/<sid>/transforms/``
  and ``OUT/cohort.yaml``, which ``mrhscale ingest`` takes as it is. One Dask
  task per subject.
- :func:`register_histology`: a 3D stain volume onto a subject's MRI with a
  cross-modal metric (Mattes mutual information), to build new targets.
- :func:`to_native` / :func:`to_reference` / :func:`marker_from_file`: map
  volumes with saved transforms (virtual histology back to a subject's own
  space; a new contrast onto the store grid for evaluation).

Geometry: images are read with nibabel (RAS affine) and handed to ITK with
the LPS origin/spacing/direction computed here, so ITK never re-reads NIfTI
headers and outputs keep the reference's affine exactly.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import time
from dataclasses import dataclass

import numpy as np

from mrhscale.errors import MRHError
from mrhscale.stores import Claim, Folder, write_json, write_text
from mrhscale.stores.base import prune_empty, remove, rename_file, swap_in, temporary_folder
from mrhscale.stores.locks import run_token
from mrhscale.stores.urls import inside, resolve

MISSING_EXTRA = 'registration needs the optional extra: pip install "mrhscale[register]"'
TRANSFORMS = ("rigid", "affine", "syn")
_ALIASES = {"affine+syn": "syn", "rigid+affine+syn": "syn", "syn": "syn", "rigid": "rigid",
            "affine": "affine"}
METRICS = ("mattes", "cc", "meansquares")
INITS = ("com", "header")
PRESETS = {
    # ANTs' own defaults (antsRegistration via antspyx): multi-resolution linear stage, then SyN.
    "default": {"aff_iterations": (2100, 1200, 1200, 10), "aff_shrink_factors": (6, 4, 2, 1),
                "aff_smoothing_sigmas": (3, 2, 1, 0), "reg_iterations": (40, 20, 0)},
    # Small grids and tests: fewer iterations, coarsest level 4x.
    "fast": {"aff_iterations": (300, 150, 50), "aff_shrink_factors": (4, 2, 1),
             "aff_smoothing_sigmas": (2, 1, 0), "reg_iterations": (30, 15, 0)},
}
TRANSFORM_DIR = "transforms"
TRANSFORM_JSON = "transform.json"
STAGING = "_staging"
FORMAT = "mrhscale-registration"
LPS = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS (ITK's physical space)


# ---------------------------------------------------------------- ANTs access


def ants_module(threads: int | None = None):
    """Import antspyx lazily; the one place a missing extra turns into a clear message."""
    if threads:
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(int(threads))
    try:
        import ants
    except ImportError:
        raise MRHError(MISSING_EXTRA) from None
    except OSError as e:  # a wheel built for another platform
        raise MRHError(f"{MISSING_EXTRA} (antspyx is installed but cannot load: {e})") from None
    return ants


def _set_seed(ants, seed: int | None) -> None:
    # antspyx passes --random-seed only through this module attribute (set_ants_deterministic
    # also forbids non-"Repro" transform types, which we do not want). ANTs takes seed 0 as
    # "seed from the clock": 0/None give runs that differ; any other value repeats exactly.
    try:
        ants.config._random_seed = None if seed is None else int(seed)
    except AttributeError:  # pragma: no cover - older antspyx
        pass


def canonical_transform(transform: str) -> str:
    t = _ALIASES.get(str(transform).lower())
    if t is None:
        raise MRHError(f"--transform {transform!r}: choose rigid, affine or syn (= affine then SyN)")
    return t


# ---------------------------------------------------------------- geometry


@dataclass
class Grid:
    """A voxel grid: shape (x, y, z) and the NIfTI (RAS) voxel-to-world affine."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    def to_dict(self) -> dict:
        return {"shape": [int(s) for s in self.shape], "affine": np.asarray(self.affine).tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> Grid:
        return cls(tuple(int(s) for s in d["shape"]), np.asarray(d["affine"], dtype=np.float64))

    def same(self, other: Grid, atol: float = 1e-4) -> bool:
        return tuple(self.shape) == tuple(other.shape) and np.allclose(self.affine, other.affine, atol=atol)

    def corners_world(self) -> np.ndarray:
        idx = np.array([[i, j, k] for i in (-0.5, self.shape[0] - 0.5) for j in (-0.5, self.shape[1] - 0.5)
                        for k in (-0.5, self.shape[2] - 0.5)])
        return idx @ self.affine[:3, :3].T + self.affine[:3, 3]


def _polar_rotation(m: np.ndarray) -> np.ndarray:
    """Rotation (orthogonal) part of a 3x3 linear map, by polar decomposition."""
    u, _, vt = np.linalg.svd(np.asarray(m, dtype=np.float64))
    return u @ vt


def _itk_geometry(affine: np.ndarray) -> tuple[tuple, tuple, np.ndarray]:
    """origin, spacing, direction (LPS, as ITK wants them) of a RAS voxel-to-world affine."""
    a = LPS @ np.asarray(affine, dtype=np.float64)[:3, :4]
    lin = a[:, :3]
    spacing = np.linalg.norm(lin, axis=0)
    if np.any(spacing <= 0):
        raise MRHError(f"affine {np.asarray(affine).tolist()}: a voxel axis has zero length")
    direction = lin / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        direction = _polar_rotation(direction)  # ITK needs orthonormal axes; drop a header shear
    return tuple(a[:, 3]), tuple(spacing), direction


def _to_ants(ants, arr: np.ndarray, affine: np.ndarray):
    origin, spacing, direction = _itk_geometry(affine)
    a = np.ascontiguousarray(np.nan_to_num(np.asarray(arr, dtype=np.float32)))
    return ants.from_numpy(a, origin=origin, spacing=spacing, direction=direction)


def _blank(ants, grid: Grid):
    return _to_ants(ants, np.zeros(grid.shape, np.float32), grid.affine)


# ---------------------------------------------------------------- reading volumes


def _grid_of(vol) -> Grid:
    return Grid(tuple(int(s) for s in vol.shape[:3]), np.asarray(vol.affine, dtype=np.float64))


def _n_volumes(vol) -> int:
    shape = vol.shape
    if len(shape) == 5 and shape[3] == 1:
        return int(shape[4])
    return int(shape[3]) if len(shape) == 4 else 1


def _read3(vol, index: int | None = None) -> np.ndarray:
    """One 3D volume (float32, NaN -> 0) of a 3D/4D image; index picks the 4D volume."""
    shape = vol.shape
    if len(shape) == 3 or (len(shape) == 4 and shape[3] == 1 and index in (None, 0)):
        a = np.asarray(vol.proxy, dtype=np.float32).reshape(shape[:3])
    elif len(shape) == 5 and shape[3] == 1:
        a = np.asarray(vol.proxy[:, :, :, 0, index or 0], dtype=np.float32)
    else:
        a = np.asarray(vol.proxy[..., index or 0], dtype=np.float32)
    return np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)


# ---------------------------------------------------------------- contrasts


def contrast_names(plan) -> dict[str, tuple[str, int | None]]:
    """Contrast names a subject offers for driving registration -> (file, volume index).

    Channel names as ingest makes them (``dwi2000_0`` ..., or the manifest's
    ``channels``), group names of 3D groups, ``fa`` and ``mask``.
    """
    out: dict[str, tuple[str, int | None]] = {}
    offset = 0
    for group, vol, n in plan.mri:
        names = plan.channels[offset:offset + n]
        for i, c in enumerate(names):
            out[c] = (vol.path, i if _n_volumes(vol) > 1 else None)
        if n == 1:
            out.setdefault(group, (vol.path, None))
        offset += n
    if plan.fa is not None:
        out["fa"] = (plan.fa.path, None)
    out["mask"] = ("<mask>", None)
    return out


def _contrast_array(plan, name: str) -> np.ndarray:
    from mrhscale.io.volumes import open_volume

    table = contrast_names(plan)
    if name not in table:
        raise MRHError(
            f"subject {plan.spec.id}: --contrast {name!r} does not exist; available: "
            f"{', '.join(_short_list(table))}"
        )
    if name == "mask":
        return plan.mask.astype(np.float32)
    path, index = table[name]
    return _read3(open_volume(path, what=f"subject {plan.spec.id}: {name}"), index)


def _short_list(names, n: int = 12) -> list[str]:
    names = list(names)
    return names if len(names) <= n else [*names[:n], f"... ({len(names)} in all)"]


# ---------------------------------------------------------------- similarity


def _pearson(a: np.ndarray, b: np.ndarray, region: np.ndarray) -> float:
    x, y = a[region].astype(np.float64), b[region].astype(np.float64)
    if x.size < 3 or x.std() == 0 or y.std() == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def _nmi(a: np.ndarray, b: np.ndarray, region: np.ndarray, bins: int = 32) -> float:
    """Normalised mutual information scaled to 0 (independent) .. 1 (one determines the other):
    2 * I(A;B) / (H(A) + H(B))."""
    x, y = a[region].astype(np.float64), b[region].astype(np.float64)
    if x.size < 3 or x.std() == 0 or y.std() == 0:
        return 0.0
    h, _, _ = np.histogram2d(x, y, bins=bins)
    p = h / h.sum()
    px, py = p.sum(1), p.sum(0)

    def ent(q):
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())

    hx, hy, hxy = ent(px), ent(py), ent(p.ravel())
    return 0.0 if hx + hy == 0 else float(2.0 * (hx + hy - hxy) / (hx + hy))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0.5, b > 0.5
    s = a.sum() + b.sum()
    return float(2.0 * (a & b).sum() / s) if s else 0.0


# ---------------------------------------------------------------- gradient directions


def _fsl_flip(affine: np.ndarray) -> np.ndarray:
    """FSL stores b-vectors in a voxel frame whose x is flipped when the affine has det > 0."""
    return np.diag([-1.0, 1.0, 1.0]) if np.linalg.det(np.asarray(affine)[:3, :3]) > 0 else np.eye(3)


def linear_part(transform_file: str) -> np.ndarray:
    """3x3 matrix of an ANTs linear transform file (maps reference LPS points to subject LPS)."""
    ants = ants_module()
    tx = ants.read_transform(transform_file)
    return np.asarray(tx.parameters[:9], dtype=np.float64).reshape(3, 3)


def rotate_bvecs(bvecs, linear: np.ndarray, moving_affine, fixed_affine) -> np.ndarray:
    """Gradient directions of a subject (FSL convention, its voxel frame) -> the reference's.

    ``linear`` is the 3x3 part of the ANTs transform, which maps reference
    points to subject points in LPS world space. A fibre along f in reference
    space lies along R f in the subject (R: rotation of the polar
    decomposition), so the signal measured with gradient g in the subject is
    the one of gradient R^T g in the reference. Scaling and shear do not turn
    gradients; zero vectors (b0) stay zero.
    """
    g = np.asarray(bvecs, dtype=np.float64).reshape(-1, 3)
    rm = _polar_rotation(np.asarray(moving_affine)[:3, :3])
    rf = _polar_rotation(np.asarray(fixed_affine)[:3, :3])
    r = _polar_rotation(linear)
    chain = (_fsl_flip(fixed_affine) @ rf.T @ LPS @ r.T @ LPS @ rm @ _fsl_flip(moving_affine))
    out = g @ chain.T
    norm_in = np.linalg.norm(g, axis=1, keepdims=True)
    norm_out = np.linalg.norm(out, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(norm_out > 0, out / norm_out * norm_in, 0.0)
    return out


# ---------------------------------------------------------------- transforms on disk


def _transform_dir(path: str) -> str:
    """Accept OUT/<sid>, OUT/<sid>/transforms or the transform.json itself."""
    p = os.fspath(path)
    if os.path.isfile(p) and p.endswith(".json"):
        return os.path.dirname(p)
    if os.path.isfile(os.path.join(p, TRANSFORM_JSON)):
        return p
    if os.path.isfile(os.path.join(p, TRANSFORM_DIR, TRANSFORM_JSON)):
        return os.path.join(p, TRANSFORM_DIR)
    raise MRHError(f"{p}: no saved registration here (expected {TRANSFORM_DIR}/{TRANSFORM_JSON} "
                   "written by mrhscale register or register-histology)")


def read_transform_info(path: str) -> dict:
    """The transform record of a registered subject (grids, file lists, metrics, provenance)."""
    d = _transform_dir(path)
    with open(os.path.join(d, TRANSFORM_JSON)) as fh:
        info = json.load(fh)
    info["dir"] = d
    return info


def _files(info: dict, key: str) -> tuple[list[str], list[bool]]:
    files = [os.path.join(info["dir"], f) for f in info[key]["files"]]
    for f in files:
        if not os.path.exists(f):
            raise MRHError(f"{info['dir']}: transform file {os.path.basename(f)} is missing")
    return files, list(info[key]["invert"])


def _apply(ants, arr3: np.ndarray, src: Grid, dst: Grid, files, invert, interpolator: str) -> np.ndarray:
    if not files:  # identity on the same grid
        return np.asarray(arr3, dtype=np.float32)
    moving = _to_ants(ants, arr3, src.affine)
    out = ants.apply_transforms(_blank(ants, dst), moving, files, interpolator=interpolator,
                                whichtoinvert=invert, defaultvalue=0, singleprecision=True)
    return np.asarray(out.numpy(), dtype=np.float32)


def _apply4(ants, arr4: np.ndarray, src: Grid, dst: Grid, files, invert, interpolator: str) -> np.ndarray:
    """Volumes (x, y, z, n) in one call (ANTs' time-series mode): the transforms, a SyN warp
    included, are read once for all volumes instead of once per volume (~3x faster)."""
    if not files:
        return np.asarray(arr4, dtype=np.float32)
    origin, spacing, direction = _itk_geometry(src.affine)
    d4 = np.eye(4)
    d4[:3, :3] = direction
    a = np.ascontiguousarray(np.nan_to_num(np.asarray(arr4, dtype=np.float32)))
    moving = ants.from_numpy(a, origin=(*origin, 0.0), spacing=(*spacing, 1.0), direction=d4)
    out = ants.apply_transforms(_blank(ants, dst), moving, files, interpolator=interpolator,
                                whichtoinvert=invert, defaultvalue=0, imagetype=3, singleprecision=True)
    return np.asarray(out.numpy(), dtype=np.float32)


BLOCK = 8  # volumes per time-series call: bounds a worker's memory on full-size 4D groups


def _map_volume(volume, info: dict, direction: str, interpolator: str, out: str | None,
                volume_index: int | None) -> np.ndarray:
    from mrhscale.io.volumes import open_volume, write_volume

    ref, nat = Grid.from_dict(info["reference_grid"]), Grid.from_dict(info["native_grid"])
    src, dst, key = (ref, nat, "inverse") if direction == "native" else (nat, ref, "forward")
    if isinstance(volume, (str, os.PathLike)):
        vol = open_volume(os.fspath(volume), what="volume")
        if not _grid_of(vol).same(src):
            raise MRHError(f"{volume}: grid {vol.shape[:3]} / affine differ from the "
                           f"{'reference' if direction == 'native' else 'native'} grid "
                           f"{src.shape} recorded in {info['dir']}")
        n = _n_volumes(vol)
        idx = [volume_index] if volume_index is not None else list(range(n))
        arr = np.stack([_read3(vol, i if n > 1 else None) for i in idx], axis=-1)
        arr = arr[..., 0] if (n == 1 or volume_index is not None) else arr
    else:
        arr = np.asarray(getattr(volume, "values", volume), dtype=np.float32)
        if tuple(arr.shape[:3]) != tuple(src.shape):
            raise MRHError(f"volume of shape {arr.shape} does not match the "
                           f"{'reference' if direction == 'native' else 'native'} grid {src.shape} "
                           f"recorded in {info['dir']}")
        if arr.ndim == 4 and volume_index is not None:
            arr = arr[..., volume_index]
    files, invert = _files(info, key)
    ants = ants_module()
    if arr.ndim == 3:
        res = _apply(ants, arr, src, dst, files, invert, interpolator)
    else:
        res = np.concatenate([_apply4(ants, arr[..., i:i + BLOCK], src, dst, files, invert, interpolator)
                              for i in range(0, arr.shape[3], BLOCK)], axis=-1)
    if out:
        write_volume(out, res, dst.affine)
    return res


def transforms_for_subject(manifest_path: str, subject: str) -> str | None:
    """OUT/<sid> of a subject ingested from a registered manifest (OUT/cohort.yaml), else None.

    A cohort store records the manifest it was ingested from (subject attrs ``manifest``), so
    ``transforms_for_subject(ds.attrs["manifest"], sid)`` finds the transforms of ``--to-native``.
    """
    if not manifest_path:
        return None
    d = os.path.join(os.path.dirname(os.path.abspath(os.fspath(manifest_path))), subject)
    return d if os.path.isfile(os.path.join(d, TRANSFORM_DIR, TRANSFORM_JSON)) else None


def to_native(volume, transforms: str, *, interpolator: str = "linear", out: str | None = None,
              volume_index: int | None = None) -> np.ndarray:
    """Map a volume on the reference grid (e.g. a virtual stain of a registered subject) back
    to the subject's own (native) grid with the inverse of its saved registration.

    volume: array (x, y, z[, n]) or xarray DataArray on the reference grid, or a NIfTI path.
    transforms: ``OUT/<sid>`` of ``mrhscale register`` (or its ``transforms/`` folder).
    interpolator: ``linear`` for intensities, ``nearestNeighbor``/``genericLabel`` for labels.
    out: also write a NIfTI with the native affine. Returns float32 on the native grid.
    """
    return _map_volume(volume, read_transform_info(transforms), "native", interpolator, out,
                       volume_index)


def to_reference(volume, transforms: str, *, interpolator: str = "linear", out: str | None = None,
                 volume_index: int | None = None) -> np.ndarray:
    """Map a volume on a subject's native grid onto the reference grid (the forward transform):
    e.g. a contrast acquired after the cohort was registered."""
    return _map_volume(volume, read_transform_info(transforms), "reference", interpolator, out,
                       volume_index)


# ---------------------------------------------------------------- one registration


class _NotConverged(Exception):
    pass


def _estimate(ants, fixed, moving, transform: str, workdir: str, *, metric: str, preset: str,
              init: str, seed: int | None, fixed_mask=None, moving_mask=None) -> dict:
    """Run ANTs: a rigid or affine stage, then (syn) SyN from it. Returns file lists relative
    to workdir with ITK's inversion flags."""
    p = PRESETS[preset]
    _set_seed(ants, seed)
    lin_type = "Rigid" if transform == "rigid" else "Affine"
    initial = "Identity" if init == "header" else None
    # cc (neighbourhood cross-correlation, radius 4) drives the SyN stage only: as a linear-stage
    # metric it is slow and no better, so the linear stage then keeps mutual information
    # (the antsRegistrationSyN recipe).
    lin = ants.registration(
        fixed, moving, lin_type, initial_transform=initial, outprefix=os.path.join(workdir, "lin_"),
        aff_metric="mattes" if metric == "cc" else metric, aff_iterations=p["aff_iterations"],
        aff_shrink_factors=p["aff_shrink_factors"], aff_smoothing_sigmas=p["aff_smoothing_sigmas"],
        mask=fixed_mask, moving_mask=moving_mask,
    )
    affine_file = os.path.join(workdir, "affine.mat")
    rename_file(lin["fwdtransforms"][0], affine_file)
    out = {"forward": {"files": ["affine.mat"], "invert": [False]},
           "inverse": {"files": ["affine.mat"], "invert": [True]}, "linear": "affine.mat"}
    if transform == "syn":
        syn = ants.registration(
            fixed, moving, "SyNOnly", initial_transform=[affine_file],
            outprefix=os.path.join(workdir, "syn_"), syn_metric=metric,
            syn_sampling=4 if metric == "cc" else 32,
            reg_iterations=p["reg_iterations"], mask=fixed_mask, moving_mask=moving_mask,
        )
        warp = [f for f in syn["fwdtransforms"] if f.endswith("Warp.nii.gz")][0]
        inv = [f for f in syn["invtransforms"] if f.endswith("InverseWarp.nii.gz")][0]
        rename_file(warp, os.path.join(workdir, "warp.nii.gz"))
        rename_file(inv, os.path.join(workdir, "inverse_warp.nii.gz"))
        for f in syn["fwdtransforms"]:  # the re-written initial affine: identical to affine.mat
            if os.path.exists(f) and f.endswith(".mat"):
                os.remove(f)
        out["forward"] = {"files": ["warp.nii.gz", "affine.mat"], "invert": [False, False]}
        out["inverse"] = {"files": ["affine.mat", "inverse_warp.nii.gz"], "invert": [True, False]}
    return out


def _write_identity(ants, workdir: str) -> dict:
    tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=3)
    ants.write_transform(tx, os.path.join(workdir, "affine.mat"))
    return {"forward": {"files": [], "invert": []}, "inverse": {"files": [], "invert": []},
            "linear": "affine.mat"}


def _overlap_fraction(native: Grid, ref: Grid) -> float:
    """Fraction of the subject's field of view (by world bounding box) inside the reference's."""
    a, b = native.corners_world(), ref.corners_world()
    lo, hi = np.maximum(a.min(0), b.min(0)), np.minimum(a.max(0), b.max(0))
    inter = np.prod(np.clip(hi - lo, 0, None))
    vol = np.prod(a.max(0) - a.min(0))
    return float(inter / vol) if vol > 0 else 0.0


def _rel(path: str, base: str) -> str:
    return os.path.relpath(path, base)


def _register_subject(job: dict, fixed_arr: np.ndarray | None = None,
                      ref_mask: np.ndarray | None = None) -> dict:
    """One subject, on a Dask worker: estimate, check, apply to every file, commit atomically.

    Returns {"subject", "status": "ok"|"failed", "message", "metrics", "seconds", "entry"}.
    """
    from mrhscale import __version__
    from mrhscale.io.volumes import open_volume, read_sidecars, write_sidecars, write_volume
    from mrhscale.stages.ingest import plan_subject

    t0 = time.perf_counter()
    spec = job["spec"]
    sid = spec.id
    out_dir = job["out"]
    ants = ants_module(job.get("threads"))
    stage = job["stage"]  # this run's own staging folder for the subject
    remove(stage)
    tdir = os.path.join(stage, TRANSFORM_DIR)
    os.makedirs(tdir)
    result = {"subject": sid, "status": "failed", "message": "", "metrics": {}, "seconds": None}
    try:
        plan = plan_subject(spec)
        native = Grid(plan.shape, plan.affine)
        ref = Grid.from_dict(job["reference_grid"])
        moving_arr = _contrast_array(plan, job["contrast"])
        identity = bool(job.get("identity"))
        metrics: dict = {}
        result["metrics"] = metrics
        if identity:
            tx = _write_identity(ants, tdir)
            metrics.update({"r_before": 1.0, "r_after": 1.0, "nmi_after": 1.0})
        else:
            fixed = _to_ants(ants, fixed_arr, ref.affine)
            moving = _to_ants(ants, moving_arr, native.affine)
            metrics["fov_overlap_header"] = round(_overlap_fraction(native, ref), 4)
            if job["init"] == "header" and metrics["fov_overlap_header"] <= 0:
                raise _NotConverged(
                    "no overlap: the subject's field of view does not meet the reference grid in "
                    "world coordinates (--init header trusts the headers); fix the header or use --init com"
                )
            region = ref_mask if ref_mask is not None else (fixed_arr != 0)
            if not region.any():
                region = np.ones(ref.shape, bool)
            before = np.asarray(ants.resample_image_to_target(moving, fixed, interp_type="linear").numpy())
            metrics["r_before"] = round(_pearson(fixed_arr, before, region), 4)
            metrics["nmi_before"] = round(_nmi(fixed_arr, before, region), 4)
            tx = _estimate(ants, fixed, moving, job["transform"], tdir, metric=job["metric"],
                           preset=job["preset"], init=job["init"], seed=job.get("seed"))
            files = [os.path.join(tdir, f) for f in tx["forward"]["files"]]
            warped = _apply(ants, moving_arr, native, ref, files, tx["forward"]["invert"], "linear")
            metrics["r_after"] = round(_pearson(fixed_arr, warped, region), 4)
            metrics["nmi_after"] = round(_nmi(fixed_arr, warped, region), 4)
        t_est = time.perf_counter()
        fwd_files = [os.path.join(tdir, f) for f in tx["forward"]["files"]]
        fwd_inv = tx["forward"]["invert"]

        def warp(arr, interp="linear"):
            return arr if identity else _apply(ants, arr, native, ref, fwd_files, fwd_inv, interp)

        mask_reg = warp(plan.mask.astype(np.float32), "nearestNeighbor") > 0.5
        if not identity:
            vol_ratio = np.prod(_zooms(ref)) / np.prod(_zooms(native))
            metrics["inside_fraction"] = round(float(mask_reg.sum() * vol_ratio / max(1, plan.mask.sum())), 4)
        if ref_mask is not None:
            metrics["dice_after"] = round(_dice(ref_mask, mask_reg), 4)
            if not identity:
                before_mask = np.asarray(ants.resample_image_to_target(
                    _to_ants(ants, plan.mask.astype(np.float32), native.affine),
                    _blank(ants, ref), interp_type="nearestNeighbor").numpy())
                metrics["dice_before"] = round(_dice(ref_mask, before_mask), 4)
        # convergence: the registered contrast must resemble the reference, and lie on its grid
        crit = job["check"]
        value = metrics.get("r_after" if crit == "r" else "nmi_after", 1.0)
        value = abs(value) if crit == "r" else value
        if not identity:
            if metrics["inside_fraction"] < 0.05:
                raise _NotConverged(f"no overlap: the registered brain lies outside the reference grid "
                                    f"(fraction inside {metrics['inside_fraction']:.3f})")
            if value < job["min_similarity"]:
                name = "|Pearson r|" if crit == "r" else "NMI"
                raise _NotConverged(f"did not converge: final {name} with the reference {value:.3f} "
                                    f"< --min-similarity {job['min_similarity']:g} "
                                    f"(before registration {metrics.get('r_before', float('nan')):.3f})")
        result["metrics"] = metrics

        # apply to every file of the subject
        ext = job.get("ext", ".nii")
        files_out: dict = {"mri": {}}
        lin = linear_part(os.path.join(tdir, tx["linear"]))
        for g in spec.mri:
            vol = open_volume(g.path, what=f"subject {sid}: mri/{g.name}")
            n = _n_volumes(vol)
            path = os.path.join(stage, f"mri_{g.name}{ext}")
            if n == 1:
                arr = warp(_read3(vol))
            else:
                arr = np.empty((*ref.shape, n), np.float32)
                for i in range(0, n, BLOCK):
                    block = np.stack([_read3(vol, k) for k in range(i, min(n, i + BLOCK))], axis=-1)
                    arr[..., i:i + block.shape[3]] = block if identity else \
                        _apply4(ants, block, native, ref, fwd_files, fwd_inv, "linear")
            write_volume(path, arr, ref.affine, dtype=np.float32)
            del arr
            side = read_sidecars(g.path)
            if side is not None:
                bvecs = side[1] if identity else rotate_bvecs(side[1], lin, native.affine, ref.affine)
                write_sidecars(path, side[0], bvecs)
            entry = _rel(path.replace(stage, os.path.join(out_dir, sid)), out_dir)
            files_out["mri"][g.name] = {"path": entry, "channels": g.channels} if g.channels else entry
        write_volume(os.path.join(stage, f"mask{ext}"), mask_reg.astype(np.uint8), ref.affine)
        files_out["mask"] = {"path": f"{sid}/mask{ext}", "inverted": False}
        if plan.fa is not None:
            write_volume(os.path.join(stage, f"fa{ext}"), warp(_read3(plan.fa)), ref.affine,
                         dtype=np.float32)
            files_out["fa"] = f"{sid}/fa{ext}"
        for kind, vols, interp in (("targets", plan.targets, "linear"),
                                   ("labels", plan.labels, "nearestNeighbor")):
            if vols:
                files_out[kind] = {}
            for name, vol in vols.items():
                a = warp(_read3(vol), interp)
                fname = f"{kind[:-1]}_{name}{ext}"
                write_volume(os.path.join(stage, fname), (a > 0.5).astype(np.uint8) if kind == "labels"
                             else a.astype(np.float32), ref.affine)
                files_out[kind][name] = f"{sid}/{fname}"
        entry = {"id": sid, **files_out}
        if "notes" in spec.extra:
            entry["notes"] = spec.extra["notes"]
        seconds = time.perf_counter() - t0
        result["timing"] = {"estimate_s": round(t_est - t0, 3),
                            "apply_write_s": round(seconds - (t_est - t0), 3)}
        info = {
            "format": FORMAT, "format_version": 1, "subject": sid,
            "transform": job["transform"], "contrast": job["contrast"], "metric": job["metric"],
            "preset": job["preset"], "init": job["init"], "identity": identity,
            "reference": job["reference"], "reference_grid": ref.to_dict(),
            "native_grid": native.to_dict(),
            "forward": tx["forward"], "inverse": tx["inverse"], "linear": tx["linear"],
            "directions": "forward: native -> reference (apply with fixed = reference grid); "
                          "inverse: reference -> native. ITK convention: the files map reference "
                          "points to native points.",
            "metrics": metrics, "seconds": round(seconds, 3), "timing": result["timing"],
            "manifest_entry": entry,
            "sources": spec.files(),
            "provenance": {"mrhscale_version": __version__, "antspyx_version": getattr(ants, "__version__", "?"),
                           "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                           "manifest": job.get("manifest"), "seed": job.get("seed"),
                           "preset_parameters": {k: list(v) for k, v in PRESETS[job["preset"]].items()}},
        }
        write_json(os.path.join(tdir, TRANSFORM_JSON), info)
        swap_in(stage, os.path.join(out_dir, sid), token=os.path.basename(os.path.dirname(stage)))
        result.update(status="ok", entry=entry, seconds=seconds)
        return result
    except _NotConverged as e:
        result["message"] = f"subject {sid}: {e}"
    except MRHError as e:
        result["message"] = str(e)
    except Exception as e:  # ITK/ANTs failures: report the subject, let the others finish
        before = result["metrics"].get("r_before")
        result["message"] = (f"subject {sid}: registration failed ({type(e).__name__}: {e})"
                             + (f"; Pearson r with the reference before registration {before:.3f}"
                                if before is not None else ""))
    remove(stage)
    result["seconds"] = time.perf_counter() - t0
    return result


def _zooms(grid: Grid) -> np.ndarray:
    return np.linalg.norm(np.asarray(grid.affine)[:3, :3], axis=0)


# ---------------------------------------------------------------- the cohort


def _reference(man, reference: str, contrast: str):
    """(description, grid, fixed array, mask or None, reference subject id or None)."""
    from mrhscale.io.volumes import open_volume
    from mrhscale.stages.ingest import plan_subject

    ids = {s.id: s for s in man.subjects}
    if reference in ids:
        plan = plan_subject(ids[reference])
        arr = _contrast_array(plan, contrast)
        if not np.any(arr):
            raise MRHError(f"--reference {reference}: contrast {contrast!r} is all zero; choose another --contrast")
        return ({"kind": "subject", "subject": reference, "contrast": contrast},
                Grid(plan.shape, plan.affine), arr, plan.mask.copy(), reference)
    if not os.path.exists(reference):
        raise MRHError(f"--reference {reference!r}: neither a subject id of {man.path} "
                       f"(known: {', '.join(_short_list(ids))}) nor an existing NIfTI file")
    vol = open_volume(reference, what="--reference")
    if _n_volumes(vol) > 1:
        raise MRHError(f"--reference {reference}: a 4D image ({vol.shape}); give a 3D template "
                       "of the --contrast used for registration")
    arr = _read3(vol)
    if not np.any(arr) or float(arr.std()) == 0:
        raise MRHError(f"--reference {reference}: the template is empty/constant; nothing to register to")
    return ({"kind": "file", "path": os.path.abspath(reference)}, _grid_of(vol), arr, None, None)


def _complete(out_dir: str, sid: str) -> dict | None:
    p = os.path.join(out_dir, sid, TRANSFORM_DIR, TRANSFORM_JSON)
    if not os.path.exists(p):
        return None
    try:
        with open(p) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _write_manifest(out_dir: str, man, params: dict) -> str:
    import yaml

    from mrhscale import __version__

    entries = []
    for s in man.subjects:
        info = _complete(out_dir, s.id)
        if info is not None:
            entries.append(info["manifest_entry"])
    path = os.path.join(out_dir, "cohort.yaml")
    if not entries:
        return path
    doc = {"subjects": entries,
           "registration": {**params, "source_manifest": man.path, "mrhscale_version": __version__}}
    return write_text(path, "# mrhscale register: subjects on one reference grid; paths relative to "
                            "this file\n" + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None))


def _output_folder(out_dir: str, man, specs):
    """The registration folder: ours or new, and never the folder of the files it reads."""
    folder = Folder(out_dir, "mrhscale-registration")
    folder.check()  # the user's folder, a synthetic cohort, a store...: refused untouched
    sources = [man.path] + [f for s in specs for f in s.files().values()]
    inside_out = [f for f in sources if inside(f, folder.path)]
    if inside_out:
        raise MRHError(f"--out {folder.path}: holds the files being registered ({inside_out[0]}); "
                       "write the registration to another folder")
    return folder


def register_cohort(
    manifest,
    reference: str,
    out_dir: str,
    *,
    transform: str = "affine+syn",
    contrast: str = "fa",
    subjects: list[str] | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    client=None,
    metric: str = "mattes",
    init: str = "com",
    preset: str = "default",
    min_similarity: float = 0.4,
    threads: int = 1,
    seed: int | None = 1,
    compress: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
) -> dict:
    """Register the manifest's subjects onto ``reference`` (a subject id of the manifest, or a
    3D template NIfTI of the same contrast) and write them, with a new manifest, under out_dir.

    transform: rigid | affine | syn (= affine+syn: affine stage, then SyN, as the original's
    rigid+affine+LDDMM chain). contrast: what drives the registration (fa, a channel name such as
    dwi2000_0, t2, or mask). A subject whose registered contrast correlates with the reference by
    less than ``min_similarity`` (|Pearson r| over the reference's brain) is reported as not
    converged; the others still finish. Subjects already complete in out_dir with the same
    parameters are skipped. seed: ANTs' sampling seed (same seed, same result; 0/None: from the
    clock). compress: write .nii.gz instead of .nii (.nii is several times faster to write
    and memory-maps in ingest; .nii.gz is smaller).
    Returns {"out", "manifest", "registered", "skipped", "failed", "metrics", "seconds"}.
    """
    from mrhscale.io.manifest import Manifest, load_manifest
    from mrhscale.parallel.cluster import dask_client

    ants_module()  # fail early, before any cluster starts
    man = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    transform = canonical_transform(transform)
    if metric not in METRICS:
        raise MRHError(f"--metric {metric!r}: choose one of {', '.join(METRICS)}")
    if init not in INITS:
        raise MRHError(f"--init {init!r}: choose com (align centres of mass first) or header")
    if preset not in PRESETS:
        raise MRHError(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}")
    specs = man.select(list(dict.fromkeys(subjects)) if subjects else None)
    folder = _output_folder(out_dir, man, specs)
    out_dir = folder.path
    desc, grid, fixed_arr, ref_mask, ref_sid = _reference(man, reference, contrast)
    from mrhscale.stages.ingest import plan_subject

    for spec in specs:  # headers only (and the mask): bad names fail before any work
        if spec.id != ref_sid:
            names = contrast_names(plan_subject(spec))
            if contrast not in names:
                raise MRHError(f"subject {spec.id}: --contrast {contrast!r} does not exist; available: "
                               f"{', '.join(_short_list(names))}")
    params = {"reference": desc, "transform": transform, "contrast": contrast, "metric": metric,
              "init": init, "preset": preset}
    folder.mark()
    todo, skipped = [], []
    for spec in specs:
        info = _complete(out_dir, spec.id)
        if info is not None and not overwrite:
            same = all(info.get(k) == v for k, v in params.items() if k != "reference") \
                and info.get("reference") == desc
            if same:
                skipped.append(spec.id)
                continue
            raise MRHError(f"--out {out_dir}: subject {spec.id} was registered with other parameters "
                           f"({info.get('transform')}, contrast {info.get('contrast')}, reference "
                           f"{info.get('reference')}); use --overwrite or another --out")
        todo.append(spec)
    registered, failed, metrics, seconds, timing = [], {}, {}, {}, {}
    if todo:
        token = run_token()
        jobs = [{"spec": s, "out": out_dir, "stage": os.path.join(out_dir, STAGING, token, s.id),
                 "reference": desc, "reference_grid": grid.to_dict(),
                 "identity": s.id == ref_sid, "threads": threads, "seed": seed,
                 "ext": ".nii.gz" if compress else ".nii",
                 "min_similarity": float(min_similarity), "check": "r", "manifest": man.path, **params}
                for s in todo]
        import contextlib

        claims = [Claim(os.path.join(out_dir, "_locks", f"{s.id}.lock"), f"subject {s.id} of {out_dir}")
                  for s in todo]
        with contextlib.ExitStack() as held, (dask_client(scheduler, workers, quiet=quiet)
                                               if client is None else contextlib.nullcontext(client)) as cl:
            for c in claims:
                held.enter_context(c)
            from distributed import as_completed
            from tqdm.auto import tqdm

            fixed_f = cl.scatter(fixed_arr, broadcast=True)
            mask_f = cl.scatter(ref_mask, broadcast=True) if ref_mask is not None else None
            futures = [cl.submit(_register_subject, j, fixed_f, mask_f, pure=False,
                                 key=f"register-{j['spec'].id}-{os.getpid()}-{time.time_ns()}")
                       for j in jobs]
            owner = {f.key: j["spec"].id for j, f in zip(jobs, futures, strict=True)}
            bar = tqdm(total=len(futures), desc="register", unit="subject", disable=quiet)
            for fut in as_completed(futures):
                try:
                    res = fut.result()
                except Exception as e:  # a worker died: report it, keep the others
                    from mrhscale.parallel.cluster import task_error

                    sid = owner[fut.key]
                    res = {"subject": sid, "status": "failed", "metrics": {}, "seconds": None,
                           "message": str(task_error(e, f"subject {sid}"))}
                sid = res["subject"]
                metrics[sid], seconds[sid] = res["metrics"], res["seconds"]
                if "timing" in res:
                    timing[sid] = res["timing"]
                if res["status"] == "ok":
                    registered.append(sid)
                else:
                    failed[sid] = res["message"]
                bar.update()
                if not quiet:
                    m = res["metrics"]
                    extra = f", dice {m['dice_after']:.3f}" if "dice_after" in m else ""
                    tqdm.write(f"  {sid}: {res['status']}, r {m.get('r_before', float('nan')):.3f} -> "
                               f"{m.get('r_after', float('nan')):.3f}{extra}, {res['seconds'] or 0:.1f} s")
            bar.close()
        remove(os.path.join(out_dir, STAGING, token))
        prune_empty(os.path.join(out_dir, STAGING))
    order = {s.id: i for i, s in enumerate(man.subjects)}
    registered.sort(key=order.get)
    manifest_path = _write_manifest(out_dir, man, params)
    return {"out": out_dir, "manifest": manifest_path if (registered or skipped) else None,
            "registered": registered, "skipped": skipped, "failed": failed, "metrics": metrics,
            "seconds": seconds, "timing": timing}


# ---------------------------------------------------------------- histology


def register_histology(
    volume: str,
    subject: str,
    out: str,
    *,
    manifest=None,
    contrast: str = "fa",
    transform: str = "affine+syn",
    metric: str = "mattes",
    init: str = "com",
    preset: str = "default",
    min_similarity: float = 0.1,
    threads: int | None = None,
    seed: int | None = 1,
) -> dict:
    """Register a 3D stain volume onto a subject's MRI (cross-modal: Mattes mutual information)
    and write it, resampled on the subject's grid, to ``out`` (a new training target).

    subject: a subject id of ``manifest`` (its ``contrast`` is the fixed image) or an MRI NIfTI.
    Transforms go to ``<out stem>_transforms/`` so other stains of the same block can follow
    with :func:`to_reference`. Convergence check: normalised mutual information after
    registration >= min_similarity. Returns {"out", "transforms", "metrics", "seconds"}.
    """
    from mrhscale import __version__
    from mrhscale.io.manifest import Manifest, load_manifest
    from mrhscale.io.volumes import open_volume, stem, write_volume
    from mrhscale.stages.ingest import plan_subject

    t0 = time.perf_counter()
    ants = ants_module(threads)
    transform = canonical_transform(transform)
    if metric not in METRICS:
        raise MRHError(f"--metric {metric!r}: choose one of {', '.join(METRICS)}")
    if init not in INITS:
        raise MRHError(f"--init {init!r}: choose com or header")
    stain = open_volume(os.fspath(volume), what="histology")
    if _n_volumes(stain) > 1:
        raise MRHError(f"{volume}: a 4D image {stain.shape}; give one 3D stain volume")
    if manifest is not None:
        man = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
        plan = plan_subject(man.select([subject])[0])
        fixed_arr, grid, region = _contrast_array(plan, contrast), Grid(plan.shape, plan.affine), plan.mask
        ref_desc = {"kind": "subject", "subject": subject, "contrast": contrast, "manifest": man.path}
    elif os.path.exists(subject):
        mri = open_volume(subject, what="--subject")
        fixed_arr, grid = _read3(mri, 0 if _n_volumes(mri) > 1 else None), _grid_of(mri)
        region = fixed_arr != 0
        ref_desc = {"kind": "file", "path": os.path.abspath(subject)}
    else:
        raise MRHError(f"--subject {subject!r}: give --manifest with that subject id, or an MRI NIfTI path")
    if not region.any():
        region = np.ones(grid.shape, bool)
    stain_arr = _read3(stain)
    if not np.any(stain_arr):
        raise MRHError(f"{volume}: the stain volume is all zero")
    native = _grid_of(stain)
    fixed, moving = _to_ants(ants, fixed_arr, grid.affine), _to_ants(ants, stain_arr, native.affine)
    if init == "header" and _overlap_fraction(native, grid) <= 0:
        raise MRHError(f"{volume}: no overlap with the MRI grid in world coordinates (--init header); "
                       "fix the header or use --init com")
    before = np.asarray(ants.resample_image_to_target(moving, fixed, interp_type="linear").numpy())
    out = resolve(out, "--out")
    tdir = stem(out) + "_transforms"
    _check_histology_outputs(out, tdir)
    with temporary_folder(out) as work:
        tx = _estimate(ants, fixed, moving, transform, work, metric=metric, preset=preset, init=init,
                       seed=seed)
        files = [os.path.join(work, f) for f in tx["forward"]["files"]]
        warped = _apply(ants, stain_arr, native, grid, files, tx["forward"]["invert"], "linear")
        metrics = {"nmi_before": round(_nmi(fixed_arr, before, region), 4),
                   "nmi_after": round(_nmi(fixed_arr, warped, region), 4),
                   "r_before": round(_pearson(fixed_arr, before, region), 4),
                   "r_after": round(_pearson(fixed_arr, warped, region), 4)}
        if not np.any(warped[region]):
            raise MRHError(f"{volume}: no overlap: the registered stain lies outside the MRI's brain")
        if metrics["nmi_after"] < min_similarity:
            raise MRHError(f"{volume}: registration did not converge: final NMI with the MRI "
                           f"{metrics['nmi_after']:.3f} < --min-similarity {min_similarity:g} "
                           f"(before {metrics['nmi_before']:.3f})")
        seconds = time.perf_counter() - t0
        info = {"format": FORMAT, "format_version": 1, "subject": subject, "kind": "histology",
                "transform": transform, "contrast": contrast, "metric": metric, "preset": preset,
                "init": init, "identity": False, "reference": ref_desc,
                "reference_grid": grid.to_dict(), "native_grid": native.to_dict(),
                "forward": tx["forward"], "inverse": tx["inverse"], "linear": tx["linear"],
                "metrics": metrics, "seconds": round(seconds, 3), "sources": {"histology": os.path.abspath(volume)},
                "provenance": {"mrhscale_version": __version__,
                               "antspyx_version": getattr(ants, "__version__", "?"),
                               "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                               "seed": seed}}
        write_json(os.path.join(work, TRANSFORM_JSON), info)
        write_volume(out, warped, grid.affine, dtype=np.float32, descrip=HISTOLOGY_DESCRIP)
        swap_in(work, tdir, token=run_token())
    return {"out": out, "transforms": tdir, "metrics": metrics, "seconds": seconds}


HISTOLOGY_DESCRIP = "mrhscale register-histology"


def _check_histology_outputs(out: str, tdir: str) -> None:
    """Overwrite only what an earlier register-histology wrote: never the user's files."""
    from mrhscale.io.volumes import mrhscale_descrip

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


# ---------------------------------------------------------------- markers for evaluation


def _store_grid(store: str, subject: str) -> Grid:
    from mrhscale.stores import open_subject

    ds = open_subject(store, subject)
    shape = tuple(int(ds.sizes[d]) for d in ("x", "y", "z"))
    return Grid(shape, np.asarray(ds.attrs["affine"], dtype=np.float64))


def marker_from_file(
    source: str,
    subject: str,
    *,
    store: str | None = None,
    grid: Grid | tuple | None = None,
    transforms: str | None = None,
    volume: int | None = None,
    interpolator: str = "linear",
) -> np.ndarray:
    """A single-contrast marker for subject ``subject`` on its cohort-store grid (x, y, z), float32.

    source:
      - a contrast of the store: a channel name (``t2``, ``dwi2000_0``) or a variable (``fa``);
      - or a NIfTI path (``{subject}`` is replaced by the id), e.g. a new contrast. Without
        ``transforms`` it must already be on the store grid and is read as it is. With
        ``transforms`` (the ``mrhscale register`` output folder, or OUT/<sid>) the file is taken
        to be in the subject's native space and is mapped onto the store grid (linear).
    volume: index of the volume in a 4D file (required for 4D).
    The store grid comes from ``store`` (attrs affine + x/y/z sizes) or ``grid`` = (shape, affine).
    """
    from mrhscale.io.volumes import open_volume

    is_path = any(str(source).lower().endswith(e) for e in (".nii", ".nii.gz", ".hdr", ".img")) \
        or os.sep in str(source)
    if not is_path:
        if store is None:
            raise MRHError(f"marker {source!r}: a contrast name needs the cohort store (store=...)")
        from mrhscale.stores import open_subject

        ds = open_subject(store, subject)
        if source in [str(c) for c in ds["contrast"].values]:
            a = ds["mri"].sel(contrast=source).values
        elif source in ds.data_vars and ds[source].dims == ("x", "y", "z"):
            a = ds[source].values
        else:
            names = [str(c) for c in ds["contrast"].values] + [v for v in ds.data_vars if ds[v].dims == ("x", "y", "z")]
            raise MRHError(f"marker {source!r}: not a contrast or variable of subject {subject} "
                           f"(available: {', '.join(_short_list(names, 20))})")
        return np.nan_to_num(np.asarray(a, dtype=np.float32))
    path = str(source).replace("{subject}", subject)
    vol = open_volume(path, what=f"marker for subject {subject}")
    n = _n_volumes(vol)
    if n > 1 and volume is None:
        raise MRHError(f"marker {path}: a 4D image with {n} volumes; say which (volume=INDEX)")
    if store is not None:
        dst = _store_grid(store, subject)
    elif grid is not None:
        dst = grid if isinstance(grid, Grid) else Grid(tuple(grid[0]), np.asarray(grid[1], float))
    else:
        raise MRHError(f"marker {path}: give the cohort store (or grid) it is compared on")
    src = _grid_of(vol)
    if transforms is None:
        if not src.same(dst, atol=1e-3):
            raise MRHError(f"marker {path}: grid {src.shape} differs from subject {subject}'s store grid "
                           f"{dst.shape}; register it first (mrhscale register) or give its transforms")
        return _read3(vol, volume if n > 1 else None)
    # transforms given: the file is in the subject's native space (even where the native grid
    # happens to equal the reference grid, its anatomy is not registered yet)
    tdir = transforms
    if os.path.isdir(os.path.join(transforms, subject)):
        tdir = os.path.join(transforms, subject)
    info = read_transform_info(tdir)
    if not Grid.from_dict(info["reference_grid"]).same(dst, atol=1e-3):
        raise MRHError(f"marker {path}: the transforms in {info['dir']} lead to another grid than "
                       f"subject {subject}'s store grid")
    if not Grid.from_dict(info["native_grid"]).same(src, atol=1e-3):
        raise MRHError(f"marker {path}: not on subject {subject}'s native grid recorded in {info['dir']}; "
                       "register it to the subject first")
    return _map_volume(path, info, "reference", interpolator, None, volume if n > 1 else None)
