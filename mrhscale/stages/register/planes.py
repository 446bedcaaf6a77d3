"""Where a stack's sections lie in the subject: parallel planes, a small global tilt, one position each.

Grid millimetres (voxel index x voxel size) throughout, the frame synth's sections are cut in
(mrhscale/synth/sections.py): plane i passes through the grid's in-plane centre at ``positions[i]``
along the cut axis, spanned by the tilted in-plane directions u (image columns) and v (rows).
Pure numpy: reslicing a contrast on a plane, and the search that finds the tilt and positions by
how well the sections already registered in 2D match their planes.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

# the tilt search, coarse to fine, once per affine round: the first round's matches were made on
# untilted planes and pull the tilt towards 0; registered again on the found planes, the second
# round's refine it (measured on the clean synthetic stack, true tilt (1.87, -0.71): (1.5, 0) after
# one round, (1.75, -0.5) after two)
PLANE_ROUNDS = ((2.0, 1.0, 0.5), (0.5, 0.25))
SHIFT_STEPS = (1.0, 0.5, 0.25)  # voxels along the axis, per-section position search
MAX_SHIFT_VOXELS = 3.0  # how far a section may move from where the table puts it


@dataclasses.dataclass(frozen=True)
class Planes:
    """The stack's frame: cut axis, tilt (degrees about u and about v) and each section's position."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    axis: int
    tilt_deg: tuple[float, float]
    positions: tuple[float, ...]  # grid mm along the axis, one per section (NaN: not placed)

    @property
    def in_plane(self) -> tuple[int, int]:
        return tuple(a for a in range(3) if a != self.axis)

    def frame(self) -> np.ndarray:
        """Rows u, v, normal (unit vectors in grid mm): the axis frame rotated by the tilt."""
        u, v = (np.eye(3)[a] for a in self.in_plane)
        n = np.eye(3)[self.axis]
        a, b = np.radians(self.tilt_deg)
        rot = _rotation(u, a) @ _rotation(v, b)
        return np.stack([rot @ u, rot @ v, rot @ n])

    def centre(self, i: int) -> np.ndarray:
        c = (np.asarray(self.shape, float) - 1) / 2 * np.asarray(self.spacing)
        c[self.axis] = self.positions[i]
        return c

    def points(self, i: int, u, v) -> np.ndarray:
        """Grid mm of in-plane coordinates (u, v) (mm from the plane's centre) on plane i."""
        f = self.frame()
        return self.centre(i) + np.asarray(u)[..., None] * f[0] + np.asarray(v)[..., None] * f[1]

    def replace(self, **kw) -> Planes:
        return dataclasses.replace(self, **kw)


def _rotation(k, angle) -> np.ndarray:
    """Rodrigues: rotation by ``angle`` (radians) about the unit vector ``k``."""
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * K + (1 - np.cos(angle)) * K @ K


@dataclasses.dataclass(frozen=True)
class PlaneGrid:
    """The 2D grid every section is registered on: rows along v, columns along u, centred, step h mm."""

    rows: int
    cols: int
    step_mm: float

    @classmethod
    def covering(cls, planes: Planes, step_mm: float) -> PlaneGrid:
        """A grid that holds the subject's whole in-plane extent (a little margin for the tilt)."""
        ext = np.asarray(planes.shape) * np.asarray(planes.spacing)
        u, v = planes.in_plane
        return cls(int(np.ceil(ext[v] / step_mm)) + 4, int(np.ceil(ext[u] / step_mm)) + 4, float(step_mm))

    def uv(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows, cols) arrays of u and v (mm) at every grid point."""
        v = (np.arange(self.rows) - (self.rows - 1) / 2) * self.step_mm
        u = (np.arange(self.cols) - (self.cols - 1) / 2) * self.step_mm
        return np.broadcast_to(u[None, :], (self.rows, self.cols)), np.broadcast_to(v[:, None], (self.rows, self.cols))

    def to_pixels(self, uv) -> np.ndarray:
        """(n, 2) col, row of points (n, 2) u, v mm."""
        uv = np.asarray(uv, float)
        return np.stack([uv[:, 0] / self.step_mm + (self.cols - 1) / 2, uv[:, 1] / self.step_mm + (self.rows - 1) / 2], 1)


def reslice(volume, planes: Planes, i: int, grid: PlaneGrid, order: int = 1) -> np.ndarray:
    """``volume`` (X, Y, Z) sampled on plane i over ``grid`` (float32 rows x cols; 0 outside)."""
    u, v = grid.uv()
    index = planes.points(i, u, v) / np.asarray(planes.spacing)
    out = ndimage.map_coordinates(np.asarray(volume, np.float32), index.reshape(-1, 3).T, order=order,
                                  mode="constant", cval=0.0)
    return out.reshape(grid.rows, grid.cols)


def similarity(a: np.ndarray, b: np.ndarray, region: np.ndarray) -> float:
    """|Pearson r| of two images over ``region``: the sign-free match of a stain and a contrast."""
    x, y = a[region].astype(np.float64), b[region].astype(np.float64)
    if x.size < 16 or x.std() == 0 or y.std() == 0:
        return 0.0
    return abs(float(np.corrcoef(x, y)[0, 1]))


def stack_score(volume, planes: Planes, grid: PlaneGrid, sections: dict[int, tuple]) -> float:
    """Mean similarity of the registered sections {i: (image, region)} with their planes' reslices."""
    scores = [similarity(img, reslice(volume, planes, i, grid), region) for i, (img, region) in sections.items()]
    return float(np.mean(scores)) if scores else 0.0


def find_tilt(volume, planes: Planes, grid: PlaneGrid, sections: dict[int, tuple], limit_deg: float,
              steps=PLANE_ROUNDS[0]) -> Planes:
    """The global tilt (within +-limit_deg about u and v) whose reslices best match the sections:
    a coarse-to-fine grid search around the current tilt."""
    best = planes
    best_score = stack_score(volume, best, grid, sections)
    for step in steps:
        centre = best.tilt_deg
        for da in (-step, 0.0, step):
            for db in (-step, 0.0, step):
                tilt = (float(np.clip(centre[0] + da, -limit_deg, limit_deg)),
                        float(np.clip(centre[1] + db, -limit_deg, limit_deg)))
                if tilt == best.tilt_deg:
                    continue
                trial = best.replace(tilt_deg=tilt)
                score = stack_score(volume, trial, grid, sections)
                if score > best_score:
                    best, best_score = trial, score
    return best


def find_positions(volume, planes: Planes, grid: PlaneGrid, sections: dict[int, tuple],
                   nominal: np.ndarray) -> Planes:
    """The table's positions corrected by one robust line (offset + spacing) through each section's own
    best position (within MAX_SHIFT_VOXELS of the table's): a section's own match moves it by a
    fraction of a voxel at random (measured on the synthetic stack, whose table is exact: +-0.75
    voxel), so only what the whole stack agrees on is taken; one bad section does not jump."""
    voxel = planes.spacing[planes.axis]
    found = np.asarray(planes.positions, float).copy()
    for i, (img, region) in sections.items():
        found[i] = _best_position(volume, planes, grid, i, img, region, nominal[i], voxel)
    return planes.replace(positions=tuple(_line(nominal, found, sorted(sections), voxel)))


def _best_position(volume, planes, grid, i, img, region, nominal, voxel) -> float:
    pos = float(planes.positions[i])
    score = similarity(img, reslice(volume, planes, i, grid), region)
    for step in SHIFT_STEPS:
        for d in (-step, step):
            trial = pos + d * voxel
            if abs(trial - nominal) > MAX_SHIFT_VOXELS * voxel:
                continue
            p = planes.replace(positions=_with(planes.positions, i, trial))
            s = similarity(img, reslice(volume, p, i, grid), region)
            if s > score:
                pos, score = trial, s
    return pos


def _with(values, i: int, value: float) -> tuple:
    out = list(values)
    out[i] = value
    return tuple(out)


def _line(nominal, found, placed: list[int], voxel: float) -> np.ndarray:
    """offset + slope x nominal for every section, fitted to (nominal, found) of the placed ones by
    least squares on the inliers (within a voxel of the previous fit; three rounds)."""
    x, y = np.asarray(nominal, float)[placed], np.asarray(found, float)[placed]
    keep = np.ones(len(x), bool)
    slope, offset = 1.0, 0.0
    for _ in range(3):
        if keep.sum() < 2 or np.ptp(x[keep]) == 0:
            break
        slope, offset = np.polyfit(x[keep], y[keep], 1)
        keep = np.abs(y - (offset + slope * x)) <= voxel
    return offset + slope * np.asarray(nominal, float)
