"""Transforms: estimated with ANTs, saved beside a subject, applied to volumes and gradient directions."""

from __future__ import annotations

import json
import os

import numpy as np

from mrhscale.errors import MRHError
from mrhscale.io.volumes import open_volume, write_volume
from mrhscale.stages.register.ants import (
    LPS,
    PRESETS,
    TRANSFORM_DIR,
    TRANSFORM_JSON,
    ants_module,
    set_seed,
)
from mrhscale.stages.register.geometry import (
    Grid,
    blank,
    grid_of,
    itk_geometry,
    n_volumes,
    polar_rotation,
    read3,
    to_ants,
)
from mrhscale.stores.base import rename_file


def fsl_flip(affine: np.ndarray) -> np.ndarray:
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
    rm = polar_rotation(np.asarray(moving_affine)[:3, :3])
    rf = polar_rotation(np.asarray(fixed_affine)[:3, :3])
    r = polar_rotation(linear)
    chain = (fsl_flip(fixed_affine) @ rf.T @ LPS @ r.T @ LPS @ rm @ fsl_flip(moving_affine))
    out = g @ chain.T
    norm_in = np.linalg.norm(g, axis=1, keepdims=True)
    norm_out = np.linalg.norm(out, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(norm_out > 0, out / norm_out * norm_in, 0.0)
    return out




def transform_dir(path: str) -> str:
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
    d = transform_dir(path)
    with open(os.path.join(d, TRANSFORM_JSON)) as fh:
        info = json.load(fh)
    info["dir"] = d
    return info


def transform_files(info: dict, key: str) -> tuple[list[str], list[bool]]:
    files = [os.path.join(info["dir"], f) for f in info[key]["files"]]
    for f in files:
        if not os.path.exists(f):
            raise MRHError(f"{info['dir']}: transform file {os.path.basename(f)} is missing")
    return files, list(info[key]["invert"])


def apply(ants, arr3: np.ndarray, src: Grid, dst: Grid, files, invert, interpolator: str) -> np.ndarray:
    if not files:  # identity on the same grid
        return np.asarray(arr3, dtype=np.float32)
    moving = to_ants(ants, arr3, src.affine)
    out = ants.apply_transforms(blank(ants, dst), moving, files, interpolator=interpolator,
                                whichtoinvert=invert, defaultvalue=0, singleprecision=True)
    return np.asarray(out.numpy(), dtype=np.float32)


def apply4(ants, arr4: np.ndarray, src: Grid, dst: Grid, files, invert, interpolator: str) -> np.ndarray:
    """Volumes (x, y, z, n) in one call (ANTs' time-series mode): the transforms, a SyN warp
    included, are read once for all volumes instead of once per volume (~3x faster)."""
    if not files:
        return np.asarray(arr4, dtype=np.float32)
    origin, spacing, direction = itk_geometry(src.affine)
    d4 = np.eye(4)
    d4[:3, :3] = direction
    a = np.ascontiguousarray(np.nan_to_num(np.asarray(arr4, dtype=np.float32)))
    moving = ants.from_numpy(a, origin=(*origin, 0.0), spacing=(*spacing, 1.0), direction=d4)
    out = ants.apply_transforms(blank(ants, dst), moving, files, interpolator=interpolator,
                                whichtoinvert=invert, defaultvalue=0, imagetype=3, singleprecision=True)
    return np.asarray(out.numpy(), dtype=np.float32)


BLOCK = 8  # volumes per time-series call: bounds a worker's memory on full-size 4D groups


def map_volume(volume, info: dict, direction: str, interpolator: str, out: str | None,
                volume_index: int | None) -> np.ndarray:

    ref, nat = Grid.from_dict(info["reference_grid"]), Grid.from_dict(info["native_grid"])
    src, dst, key = (ref, nat, "inverse") if direction == "native" else (nat, ref, "forward")
    if isinstance(volume, (str, os.PathLike)):
        vol = open_volume(os.fspath(volume), what="volume")
        if not grid_of(vol).same(src):
            raise MRHError(f"{volume}: grid {vol.shape[:3]} / affine differ from the "
                           f"{'reference' if direction == 'native' else 'native'} grid "
                           f"{src.shape} recorded in {info['dir']}")
        n = n_volumes(vol)
        idx = [volume_index] if volume_index is not None else list(range(n))
        arr = np.stack([read3(vol, i if n > 1 else None) for i in idx], axis=-1)
        arr = arr[..., 0] if (n == 1 or volume_index is not None) else arr
    else:
        arr = np.asarray(getattr(volume, "values", volume), dtype=np.float32)
        if tuple(arr.shape[:3]) != tuple(src.shape):
            raise MRHError(f"volume of shape {arr.shape} does not match the "
                           f"{'reference' if direction == 'native' else 'native'} grid {src.shape} "
                           f"recorded in {info['dir']}")
        if arr.ndim == 4 and volume_index is not None:
            arr = arr[..., volume_index]
    files, invert = transform_files(info, key)
    ants = ants_module()
    if arr.ndim == 3:
        res = apply(ants, arr, src, dst, files, invert, interpolator)
    else:
        res = np.concatenate([apply4(ants, arr[..., i:i + BLOCK], src, dst, files, invert, interpolator)
                              for i in range(0, arr.shape[3], BLOCK)], axis=-1)
    if out:  # on the reference grid: registered (aligned); back on the native grid: scanner
        write_volume(out, res, dst.affine, xform="aligned" if direction == "reference" else "scanner")
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
    return map_volume(volume, read_transform_info(transforms), "native", interpolator, out,
                       volume_index)


def to_reference(volume, transforms: str, *, interpolator: str = "linear", out: str | None = None,
                 volume_index: int | None = None) -> np.ndarray:
    """Map a volume on a subject's native grid onto the reference grid (the forward transform):
    e.g. a contrast acquired after the cohort was registered."""
    return map_volume(volume, read_transform_info(transforms), "reference", interpolator, out,
                       volume_index)



def estimate(ants, fixed, moving, transform: str, workdir: str, *, metric: str, preset: str,
              init: str, seed: int | None, fixed_mask=None, moving_mask=None) -> dict:
    """Run ANTs: a rigid or affine stage, then (syn) SyN from it. Returns file lists relative
    to workdir with ITK's inversion flags."""
    p = PRESETS[preset]
    set_seed(ants, seed)
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


def write_identity(ants, workdir: str) -> dict:
    tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=3)
    ants.write_transform(tx, os.path.join(workdir, "affine.mat"))
    return {"forward": {"files": [], "invert": []}, "inverse": {"files": [], "invert": []},
            "linear": "affine.mat"}
