"""Normalised inference patches straight from a raw block: the predict data path's kernel.

Every voxel of a block gets its in-plane patch of all bundle channels, normalised
with the bundle's statistics (NaN/inf -> 0) and zero padded at the volume's edges
exactly as training patches were built, gathered batch by batch in one compiled pass
(numba), or, without numba, from the block normalised and padded once (numpy).
"""

from __future__ import annotations

import numpy as np

from mrhscale.ops.patches import NUMBA, gather_patches


def block_patches(norm_block: np.ndarray, s: np.ndarray, r: np.ndarray, q: np.ndarray, half: int):
    """Patches ``[N, C, P, P]`` centred at (s, r + half, q + half) of a normalised block.

    ``norm_block`` is ``[S, R, Q, C]`` (slice axis first, contrast last, already
    padded by ``half`` on the two in-plane axes); ``r, q`` index the UNPADDED
    in-plane positions. The training gather itself (``patches.gather_patches``,
    compiled, one pass): the same geometry by construction and no per-voxel loop.
    """
    centres = np.stack([s, r + half, q + half], axis=1)
    return gather_patches(norm_block, centres, half, "x")


def normalise_block(mri: np.ndarray, order: tuple[int, int, int], offset, inv_scale) -> np.ndarray:
    """``[S, R, Q, C]`` float32 (axes ``order`` of the x, y, z block, contrast last) of
    ``(mri - offset) * inv_scale`` with NaN/inf -> 0: the numpy fallback of the fused
    gather below (a whole-block pass the compiled path does not need)."""
    blk = np.transpose(mri, (*order, 3))
    blk = (blk.astype(np.float32, copy=False) - offset) * inv_scale
    np.copyto(blk, 0.0, where=~np.isfinite(blk))  # NaN/inf -> 0 (two passes, not nan_to_num's four)
    return blk


def edge_values(offset, inv_scale) -> np.ndarray:
    """[C] float32: a raw 0 normalised (NaN/inf -> 0), what a patch gets past the volume's edge."""
    off, inv = np.asarray(offset, np.float32), np.asarray(inv_scale, np.float32)
    return np.nan_to_num((np.float32(0.0) - off) * inv, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)


def _gather_normalised_py(src, s, r, q, half, off, inv, edge, out):
    # src [S, R, Q, C] raw (any strides), out [n, C, P, P]; positions outside R x Q
    # take ``edge`` (raw 0 normalised): the volume's zero padding, never materialised
    n_r, n_q, n_c = src.shape[1], src.shape[2], src.shape[3]
    p = 2 * half + 1
    for i in range(s.shape[0]):
        si = s[i]
        for a in range(p):
            rr = r[i] + a - half
            for b in range(p):
                qq = q[i] + b - half
                if rr >= 0 and rr < n_r and qq >= 0 and qq < n_q:
                    for c in range(n_c):
                        v = (np.float32(src[si, rr, qq, c]) - off[c]) * inv[c]
                        out[i, c, a, b] = v if np.isfinite(v) else np.float32(0.0)
                else:
                    for c in range(n_c):
                        out[i, c, a, b] = edge[c]
    return out


gather_normalised_nb = (NUMBA.njit(nogil=True, cache=True, boundscheck=False)(_gather_normalised_py)
                         if NUMBA is not None else None)


class BlockPatches:
    """Normalised patches of one raw block, gathered batch by batch.

    With numba, each batch is gathered and normalised in one compiled pass
    straight from the raw block (its slice-first view, no copy): the block is
    never normalised or padded as a whole, which was a full extra pass and a
    block-sized allocation per task. Without numba, the block is normalised
    and zero padded once (numpy) and ``block_patches`` gathers from it.
    ``centres`` (s, r, q) index the block's own frame; a patch reaching past
    its in-plane edges gets raw 0 there, normalised like a real voxel (the
    zero padding of the volume, as ``map_overlap(boundary=0)`` gives inside).
    """

    def __init__(self, mri: np.ndarray, order, offset, inv_scale, half: int):
        self.h = half
        self.off = np.asarray(offset, np.float32)
        self.inv = np.asarray(inv_scale, np.float32)
        self.edge = edge_values(self.off, self.inv)
        src = np.transpose(mri, (*order, 3))
        if gather_normalised_nb is not None and src.dtype.kind in "fiub":
            self.src, self.padded = src, None
        else:
            blk = normalise_block(mri, order, offset, inv_scale)
            pad = np.broadcast_to(self.edge, (blk.shape[0], blk.shape[1] + 2 * half,
                                              blk.shape[2] + 2 * half, blk.shape[3])).copy()
            pad[:, half : half + blk.shape[1], half : half + blk.shape[2]] = blk
            self.src, self.padded = None, pad

    @property
    def patch_shape(self) -> tuple[int, int, int]:
        """(C, P, P) of one patch."""
        p = 2 * self.h + 1
        return (len(self.off), p, p)

    def __call__(self, s: np.ndarray, r: np.ndarray, q: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``[n, C, P, P]`` float32 patches at (s, r, q), into ``out`` when given (a C-contiguous
        buffer of that shape: reused batch after batch, it is not page-faulted in again)."""
        if out is None:
            out = np.empty((len(s), *self.patch_shape), np.float32)
        if self.padded is not None:
            out[...] = block_patches(self.padded, s, r, q, self.h)
            return out
        return gather_normalised_nb(self.src, s, r, q, self.h, self.off, self.inv, self.edge, out)


def warm_gather() -> None:
    """Compile (or load from numba's cache) the float32 block gather once per process,
    with the model, instead of inside the first block's task."""
    if gather_normalised_nb is not None:
        z = np.zeros(1, np.float32)
        i = np.zeros(1, np.int64)
        vol = np.zeros((2, 2, 2, 1), np.float32)
        for src in (vol, vol.transpose(1, 0, 2, 3)):  # slice axis x (contiguous) or y/z (a view)
            gather_normalised_nb(src, i, i, i, 0, z, z, z, np.empty((1, 1, 1, 1), np.float32))
