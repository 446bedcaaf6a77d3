"""Grids and volumes as ITK sees them (LPS), contrasts of a subject, and similarity measures."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mrhscale.errors import MRHError
from mrhscale.io.volumes import open_volume
from mrhscale.stages.register.ants import LPS


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


def polar_rotation(m: np.ndarray) -> np.ndarray:
    """Rotation (orthogonal) part of a 3x3 linear map, by polar decomposition."""
    u, _, vt = np.linalg.svd(np.asarray(m, dtype=np.float64))
    return u @ vt


def itk_geometry(affine: np.ndarray) -> tuple[tuple, tuple, np.ndarray]:
    """origin, spacing, direction (LPS, as ITK wants them) of a RAS voxel-to-world affine."""
    a = LPS @ np.asarray(affine, dtype=np.float64)[:3, :4]
    lin = a[:, :3]
    spacing = np.linalg.norm(lin, axis=0)
    if np.any(spacing <= 0):
        raise MRHError(f"affine {np.asarray(affine).tolist()}: a voxel axis has zero length")
    direction = lin / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        direction = polar_rotation(direction)  # ITK needs orthonormal axes; drop a header shear
    return tuple(a[:, 3]), tuple(spacing), direction


def to_ants(ants, arr: np.ndarray, affine: np.ndarray):
    origin, spacing, direction = itk_geometry(affine)
    a = np.ascontiguousarray(np.nan_to_num(np.asarray(arr, dtype=np.float32)))
    return ants.from_numpy(a, origin=origin, spacing=spacing, direction=direction)


def blank(ants, grid: Grid):
    return to_ants(ants, np.zeros(grid.shape, np.float32), grid.affine)




def grid_of(vol) -> Grid:
    return Grid(tuple(int(s) for s in vol.shape[:3]), np.asarray(vol.affine, dtype=np.float64))


def n_volumes(vol) -> int:
    shape = vol.shape
    if len(shape) == 5 and shape[3] == 1:
        return int(shape[4])
    return int(shape[3]) if len(shape) == 4 else 1


def read3(vol, index: int | None = None) -> np.ndarray:
    """One 3D volume (float32, NaN -> 0) of a 3D/4D image; index picks the 4D volume."""
    shape = vol.shape
    if len(shape) == 3 or (len(shape) == 4 and shape[3] == 1 and index in (None, 0)):
        a = np.asarray(vol.proxy, dtype=np.float32).reshape(shape[:3])
    elif len(shape) == 5 and shape[3] == 1:
        a = np.asarray(vol.proxy[:, :, :, 0, index or 0], dtype=np.float32)
    else:
        a = np.asarray(vol.proxy[..., index or 0], dtype=np.float32)
    return np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)




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
            out[c] = (vol.path, i if n_volumes(vol) > 1 else None)
        if n == 1:
            out.setdefault(group, (vol.path, None))
        offset += n
    if plan.fa is not None:
        out["fa"] = (plan.fa.path, None)
    out["mask"] = ("<mask>", None)
    return out


def contrast_array(plan, name: str) -> np.ndarray:
    table = contrast_names(plan)
    if name not in table:
        raise MRHError(
            f"subject {plan.spec.id}: --contrast {name!r} does not exist; available: "
            f"{', '.join(short_list(table))}"
        )
    if name == "mask":
        return plan.mask.astype(np.float32)
    path, index = table[name]
    return read3(open_volume(path, what=f"subject {plan.spec.id}: {name}"), index)


def short_list(names, n: int = 12) -> list[str]:
    names = list(names)
    return names if len(names) <= n else [*names[:n], f"... ({len(names)} in all)"]




def pearson(a: np.ndarray, b: np.ndarray, region: np.ndarray) -> float:
    x, y = a[region].astype(np.float64), b[region].astype(np.float64)
    if x.size < 3 or x.std() == 0 or y.std() == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def nmi(a: np.ndarray, b: np.ndarray, region: np.ndarray, bins: int = 32) -> float:
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


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0.5, b > 0.5
    s = a.sum() + b.sum()
    return float(2.0 * (a & b).sum() / s) if s else 0.0



def overlap_fraction(native: Grid, ref: Grid) -> float:
    """Fraction of the subject's field of view (by world bounding box) inside the reference's."""
    a, b = native.corners_world(), ref.corners_world()
    lo, hi = np.maximum(a.min(0), b.min(0)), np.minimum(a.max(0), b.max(0))
    inter = np.prod(np.clip(hi - lo, 0, None))
    vol = np.prod(a.max(0) - a.min(0))
    return float(inter / vol) if vol > 0 else 0.0



def zooms(grid: Grid) -> np.ndarray:
    return np.linalg.norm(np.asarray(grid.affine)[:3, :3], axis=0)
