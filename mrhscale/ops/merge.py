"""The merger: a block's network outputs of patches -> its voxel values, in numpy.

As MONAI's mergers (``inferers/merger.py``): ``BlockMerger.centres`` says where the
network runs, ``aggregate`` lays its outputs onto the block and ``finalize`` gives the
block's interior, 0 outside the brain mask. ``centre`` takes each voxel's own patch's
centre output (as the original MRH_recon); ``mean`` averages every overlapping PxP
output that covers a voxel (P*P vectorised scatters, not a loop per voxel). Outputs are
first turned into stain units by ``to_stain_units`` (an ensemble's members' mean and
pooled spread are computed before, on the network's device: ``nn.model.mean_and_spread``).
"""

from __future__ import annotations

import numpy as np

from mrhscale.ops.uncertainty import scale_by_value, widen_by_ood
from mrhscale.options import PredictOptions


def to_stain_units(pred: np.ndarray, t_offset, t_scale, spread_scale=None, value_groups=None,
                   ood_power=None) -> np.ndarray:
    """Network units -> raw stain units, in place, along ``pred``'s axis 1: the T stains
    (``t_offset``/``t_scale`` one per stain), then an ensemble's T spreads times
    ``spread_scale`` (per stain: the target scale times the calibration factor) and, with
    ``value_groups``, the factor of each voxel's bin of predicted value over the global one
    (``ops.uncertainty.scale_by_value``), and with ``ood_power`` the out-of-distribution score
    (the value after them, itself unscaled) to that power (``ops.uncertainty.widen_by_ood``)."""
    t_offset, t_scale = np.atleast_1d(t_offset), np.atleast_1d(t_scale)
    n_t = len(t_scale)
    ax = (slice(None), *([None] * (pred.ndim - 2)))  # the per-stain factors along pred's axis 1
    pred[:, :n_t] = pred[:, :n_t] * t_scale[ax] + t_offset[ax]
    if spread_scale is not None:
        pred[:, n_t:2 * n_t] *= np.atleast_1d(spread_scale)[ax]
        scale_by_value(pred, n_t, value_groups)
        if ood_power is not None:
            widen_by_ood(pred, n_t, ood_power)
    return pred


def overlap_mean(pred: np.ndarray, centres, shape, h: int) -> np.ndarray:
    """Every output [N, V, P, P] laid at its centre (s, r, q) and averaged where they
    overlap: [S, R, Q, V] float64 on a frame of ``shape`` (0 where no output reaches)."""
    s, r, q = centres
    acc = np.zeros((*shape, pred.shape[1]), np.float64)
    cnt = np.zeros(shape, np.float64)
    for i in range(2 * h + 1):
        for j in range(2 * h + 1):
            rr, qq = r + i - h, q + j - h
            ok = (rr >= 0) & (rr < shape[1]) & (qq >= 0) & (qq < shape[2])
            acc[s[ok], rr[ok], qq[ok]] += pred[ok, :, i, j]
            cnt[s[ok], rr[ok], qq[ok]] += 1
    return np.divide(acc, cnt[..., None], out=np.zeros_like(acc), where=cnt[..., None] > 0)


class BlockMerger:
    """Voxel values [S, R - 2 halo, Q - 2 halo, V] float32 of a block whose brain ``mask`` is
    [S, R, Q] (slice axis first, ``halo`` voxels of in-plane context on each side).

    The candidate centres are the interior's brain voxels (``centre``), or those of the
    interior plus an ``half`` ring (``mean``: every output covering an interior voxel),
    clipped to the block.
    """

    def __init__(self, mask: np.ndarray, halo: int, half: int, aggregate: str = PredictOptions.aggregate, values: int = 1):
        self.mask, self.halo, self.half, self.mean = mask, halo, half, aggregate == "mean"
        S, R, Q = mask.shape
        self.out = np.zeros((S, R - 2 * halo, Q - 2 * halo, values), np.float32)
        self.lo = max(0, halo - (half if self.mean else 0))  # the candidates' frame: lo .. R - lo
        self.frame = mask[:, self.lo : R - self.lo, self.lo : Q - self.lo]
        self.local = np.nonzero(self.frame) if self.out.size else (np.zeros(0, int),) * 3

    def centres(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Where the network runs: (s, r, q) in the block's own frame."""
        s, r, q = self.local
        return s, r + self.lo, q + self.lo

    def aggregate(self, pred: np.ndarray) -> None:
        """Lay the outputs at ``centres()``: [N, V] (``centre``) or [N, V, P, P] (``mean``)."""
        s, r, q = self.local
        if not self.mean:
            self.out[s, r, q] = pred  # centre: lo == halo, the frame is the interior
            return
        k, (_, ri, qi, _) = self.halo - self.lo, self.out.shape
        self.out[:] = overlap_mean(pred, self.local, self.frame.shape, self.half)[:, k : k + ri, k : k + qi]

    def finalize(self) -> np.ndarray:
        """The interior's values, 0 outside the mask."""
        d, (_, R, Q) = self.halo, self.mask.shape
        self.out *= self.mask[:, d : R - d, d : Q - d, None]
        return self.out
