"""A field-of-view artefact: a region whose MRI is unlike anything seen in training, while
the brain, every stain and every label stay the same, so that a map's uncertainty has
something to flag (docs/synthetic.md, "Artefact").

Inside an ellipsoid (radii RADIUS_MM x U(0.8, 1.2) per axis) centred on a brain voxel at
least EDGE_MM from the mask's edge, each MRI volume is changed with a smooth weight ``w``
(1 at the core, 0 beyond the rim):

    x' = x * (1 - drop[volume] * w) + ghost[volume] * level[volume] * w

``drop`` (susceptibility signal loss, U(DROP)) and ``ghost`` (a displaced copy of bright
signal, U(GHOST) of the volume's median brain signal) differ per volume, so the contrasts'
relations inside the region (across groups, and across a group's directions and echoes)
match no tissue in training. (A drop per group, as first written, left the region
tissue-like enough that a network mapped it with errors only 1.4x the rest's.) The
region, where ``w >= 0.5`` inside the mask, is the ``artefact`` label. Draws come from the
subject's own "artefact" stream: subjects without it are byte-identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

RADIUS_MM = 0.9
EDGE_MM = 0.5
DROP = (0.2, 0.9)
GHOST = (0.0, 0.5)


@dataclass
class Artefact:
    weight: np.ndarray  # (X, Y, Z) float32 in [0, 1]
    drop: dict[str, np.ndarray]  # per group: (volumes,)
    ghost: dict[str, np.ndarray]  # per group: (volumes,)
    centre_mm: list[float]
    radii_mm: list[float]

    def label(self, mask: np.ndarray) -> np.ndarray:
        return (self.weight >= 0.5) & mask

    def apply(self, vol: np.ndarray, group: str, k: int, level: float) -> None:
        """Volume ``k`` of ``group`` (whose median brain signal is ``level``), in place."""
        w = self.weight
        vol *= 1.0 - np.float32(self.drop[group][k]) * w
        vol += np.float32(self.ghost[group][k] * level) * w

    def params(self) -> dict:
        return {"centre_mm": self.centre_mm, "radii_mm": self.radii_mm,
                "drop": {g: [round(float(x), 4) for x in a] for g, a in self.drop.items()},
                "ghost": {g: [round(float(x), 4) for x in a] for g, a in self.ghost.items()}}


def draw_artefact(rng: np.random.Generator, axes: list[np.ndarray], mask: np.ndarray,
                  volumes: dict[str, int]) -> Artefact:
    """One artefact on the grid of ``axes`` (mm coordinates per axis) within ``mask``."""

    vox = [float(abs(a[1] - a[0])) if len(a) > 1 else 1.0 for a in axes]
    inner = ndimage.distance_transform_edt(mask, sampling=vox) >= EDGE_MM
    cand = np.argwhere(inner if inner.any() else mask)
    c = cand[int(rng.integers(len(cand)))]
    centre = [float(axes[i][c[i]]) for i in range(3)]
    radii = [RADIUS_MM * float(rng.uniform(0.8, 1.2)) for _ in range(3)]
    d2 = sum(((axes[i] - centre[i]) / radii[i]).reshape([-1 if j == i else 1 for j in range(3)]) ** 2
             for i in range(3))
    weight = np.clip(1.5 - np.sqrt(d2), 0.0, 1.0).astype(np.float32)  # 1 inside r/2, 0 beyond 1.5 r
    drop = {g: rng.uniform(*DROP, n).astype(np.float32) for g, n in volumes.items()}
    ghost = {g: rng.uniform(*GHOST, n).astype(np.float32) for g, n in volumes.items()}
    return Artefact(weight, drop, ghost, [round(v, 4) for v in centre], [round(v, 4) for v in radii])
