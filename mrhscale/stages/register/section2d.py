"""One section onto its plane of the MRI: 2D ANTs registration (mutual information), rigid -> affine ->
SyN, and the maps it gives (the registered image on the plane's grid; slide pixels -> plane mm).

ITK's 2D physical frame here is (v, u) in mm, centred: numpy rows (v) are ITK's first axis. A slide
is centred on its plane before registration ("before": where the table alone puts it).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from scipy import ndimage

from mrhscale.stages.register.ants import set_seed
from mrhscale.stages.register.planes import PlaneGrid

AFFINE = {"aff_iterations": (400, 200, 100), "aff_shrink_factors": (4, 2, 1), "aff_smoothing_sigmas": (2, 1, 0)}
# SyN smoothed in both its update and its total field (sigma in grid steps): a slide's warp is smooth
# over millimetres, and a field free at the grid's scale follows the MRI's noise (measured: pooled
# landmark TRE 78 -> 63 um against total_sigma 0 on the synthetic stack); a few iterations at the
# grid's own step (half an MRI voxel) too: 56.7 -> 53.8 um for ~8% more time (true planes, clean stack)
SYN = {"reg_iterations": (40, 20, 5), "flow_sigma": 3, "total_sigma": 3}


@dataclasses.dataclass
class SlideImage:
    """A section resampled for registration: density and tissue on a centred grid of step_mm."""

    density: np.ndarray
    tissue: np.ndarray
    step_mm: float
    pixel_mm: float  # of the original slide
    slide_shape: tuple[int, int]  # rows, cols of the original slide


def slide_image(density, tissue, pixel_mm: float, step_mm: float) -> SlideImage:
    """Anti-aliased resampling of a slide onto a grid of step_mm with the same centre."""
    rows, cols = density.shape
    out = (max(int(np.ceil(rows * pixel_mm / step_mm)), 2), max(int(np.ceil(cols * pixel_mm / step_mm)), 2))
    f = step_mm / pixel_mm
    index = np.stack(np.meshgrid(*((np.arange(n) - (n - 1) / 2) * f + (m - 1) / 2 for n, m in zip(out, (rows, cols))),
                                 indexing="ij"))
    sigma = 0.4 * f if f > 1 else 0.0
    dens = ndimage.gaussian_filter(np.asarray(density, np.float32), sigma) if sigma else density
    tis = ndimage.gaussian_filter(np.asarray(tissue, np.float32), sigma) if sigma else tissue.astype(np.float32)
    resample = lambda a: ndimage.map_coordinates(a, index, order=1, mode="constant", cval=0.0)  # noqa: E731
    return SlideImage(resample(dens).astype(np.float32), resample(tis) > 0.5, step_mm, pixel_mm, (rows, cols))


def slide_points(slide: SlideImage, cols, rows) -> np.ndarray:
    """(n, 2) ITK (v, u) mm of slide pixel centres (col, row) of the un-mirrored slide."""
    r, c = slide.slide_shape
    return np.stack([(np.asarray(rows, float) - (r - 1) / 2) * slide.pixel_mm,
                     (np.asarray(cols, float) - (c - 1) / 2) * slide.pixel_mm], 1)


def ants_image(ants, array, step_mm: float):
    a = np.ascontiguousarray(np.asarray(array, np.float32))
    return ants.from_numpy(a, origin=tuple(-(n - 1) / 2 * step_mm for n in a.shape), spacing=(step_mm, step_mm))


@dataclasses.dataclass
class SectionFit:
    """A section's registration: ITK transform files (image direction: plane -> slide) and the warped slide."""

    forward: list[str]
    inverse: list[str]
    inverse_flags: list[bool]
    density: np.ndarray  # on the plane grid; NaN where no tissue
    tissue: np.ndarray
    min_jacobian: float | None = None  # of the whole plane -> slide map over the section (> 0: no folding)


def register(ants, fixed: np.ndarray, slide: SlideImage, grid: PlaneGrid, workdir: str, *, nonlinear: bool,
             seed: int | None, initial: str | None = None, rotate_deg: float = 0.0) -> SectionFit:
    """Affine (mutual information, centres of mass first) then, when ``nonlinear``, smooth SyN."""
    set_seed(ants, seed)
    fix = ants_image(ants, fixed, grid.step_mm)
    mov = ants_image(ants, slide.density, slide.step_mm)
    init = initial or (_rotation_init(ants, fix, mov, rotate_deg, workdir) if rotate_deg else None)
    params = {"aff_metric": "mattes", "syn_metric": "mattes", **AFFINE, **(SYN if nonlinear else {})}
    reg = ants.registration(fix, mov, "SyNRA" if nonlinear else "Affine", initial_transform=init,
                            outprefix=os.path.join(workdir, "r_"), **params)
    inverse = list(reg["invtransforms"])
    if not all(os.path.exists(f) for f in [*reg["fwdtransforms"], *inverse]):  # ITK failed without raising
        raise RuntimeError("ANTs wrote no transform")
    flags = [f.endswith(".mat") for f in inverse]
    fit = SectionFit(list(reg["fwdtransforms"]), inverse, flags, *warp_slide(ants, fix, slide, reg["fwdtransforms"]))
    fit.min_jacobian = min_jacobian(ants, fix, reg["fwdtransforms"], fit.tissue)
    return fit


def min_jacobian(ants, fix, transforms: list[str], region) -> float | None:
    """Smallest Jacobian determinant of the plane -> slide map over ``region``: the affine's times the
    warp's (ITK's, on the plane grid). Negative would be a fold."""
    affine = [f for f in transforms if f.endswith(".mat")]
    det = 1.0
    if affine:
        det = float(np.linalg.det(ants.read_transform(affine[-1]).parameters[:4].reshape(2, 2)))
    warp = [f for f in transforms if f.endswith("Warp.nii.gz")]
    if warp and region.any():
        jac = ants.create_jacobian_determinant_image(fix, warp[0], do_log=False).numpy()
        return float(jac[region].min() * det)
    return det


def _rotation_init(ants, fix, mov, degrees: float, workdir: str) -> str:
    """An initial transform: the slide turned by ``degrees`` about its centre, centres of mass matched."""
    a = np.radians(degrees)
    tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=2,
                                    matrix=np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]),
                                    center=(0.0, 0.0),
                                    translation=np.asarray(_centre_of_mass(mov)) - np.asarray(_centre_of_mass(fix)))
    path = os.path.join(workdir, "init.mat")
    ants.write_transform(tx, path)
    return path


def _centre_of_mass(img) -> tuple[float, float]:
    a = img.numpy()
    c = ndimage.center_of_mass(np.maximum(a, 0))
    return tuple(o + s * x for o, s, x in zip(img.origin, img.spacing, c))


def warp_slide(ants, fix, slide: SlideImage, transforms: list[str]):
    """The slide's density (NaN off tissue) and tissue mask on the plane grid."""
    mov = ants_image(ants, slide.density, slide.step_mm)
    tis = ants_image(ants, slide.tissue.astype(np.float32), slide.step_mm)
    dens = ants.apply_transforms(fix, mov, transforms, interpolator="linear").numpy()
    tissue = ants.apply_transforms(fix, tis, transforms, interpolator="linear").numpy() > 0.5
    return np.where(tissue, dens, np.nan).astype(np.float32), tissue


def centred(slide: SlideImage, grid: PlaneGrid) -> tuple[np.ndarray, np.ndarray]:
    """The slide centred on the plane grid, unregistered: the "before" picture."""
    v = (np.arange(grid.rows) - (grid.rows - 1) / 2) * grid.step_mm / slide.step_mm + (slide.density.shape[0] - 1) / 2
    u = (np.arange(grid.cols) - (grid.cols - 1) / 2) * grid.step_mm / slide.step_mm + (slide.density.shape[1] - 1) / 2
    index = np.stack(np.meshgrid(v, u, indexing="ij"))
    tissue = ndimage.map_coordinates(slide.tissue.astype(np.float32), index, order=1, cval=0.0) > 0.5
    dens = ndimage.map_coordinates(slide.density, index, order=1, cval=0.0)
    return np.where(tissue, dens, np.nan).astype(np.float32), tissue


def to_plane(ants, fit: SectionFit | None, points_vu: np.ndarray) -> np.ndarray:
    """(n, 2) slide points (v, u mm) mapped onto the plane (v, u mm): the inverse of the image chain
    (ANTs maps points opposite to images). fit None: unregistered (centred)."""
    if fit is None or not len(points_vu):
        return np.asarray(points_vu, float)
    import pandas as pd

    df = pd.DataFrame(np.asarray(points_vu, float), columns=["x", "y"])
    return ants.apply_transforms_to_points(2, df, fit.inverse, whichtoinvert=fit.inverse_flags).to_numpy()
