"""Patch geometry and the gather kernel, pure numpy/numba: used by extraction and inference.

A patch is the (2H+1) x (2H+1) in-plane neighbourhood of a centre voxel, of all
contrasts, in the plane of the two axes other than the slice axis (rows = the first
of them in (x, y, z) order). ``gather_patches`` builds ``[n, C, P, P]`` from a
contrast-last volume with no Python loop over patches (numba when installed, else
numpy ``take`` + transpose, identical results).
"""

from __future__ import annotations

import numpy as np

from mrhscale.errors import MRHError

AXES = ("x", "y", "z")

try:  # optional accelerator: the numpy path below gives identical results
    import numba as NUMBA
except ImportError:  # pragma: no cover - exercised where numba is absent
    NUMBA = None


def plane_axes(axis: str) -> tuple[int, int, int]:
    """(slice axis, row axis, col axis) as indices into (x, y, z)."""
    if axis not in AXES:
        raise MRHError(f"--axis must be one of x, y, z, got {axis!r}")
    s = AXES.index(axis)
    r, c = (a for a in range(3) if a != s)
    return s, r, c


def patch_offsets(shape_xyz, half: int, axis: str) -> np.ndarray:
    """Flat voxel offsets of the P*P patch positions (row-major) in a C-order (x,y,z) grid."""
    _, ra, ca = plane_axes(axis)
    strides = (shape_xyz[1] * shape_xyz[2], shape_xyz[2], 1)
    d = np.arange(-half, half + 1, dtype=np.int64)
    return (d[:, None] * strides[ra] + d[None, :] * strides[ca]).ravel()


def flat_centres(centres: np.ndarray, shape_xyz, half: int, axis: str) -> np.ndarray:
    centres = np.asarray(centres)
    if centres.ndim != 2 or centres.shape[1] != 3:
        raise MRHError(f"centres must be an [n, 3] integer array of (x, y, z), got shape {centres.shape}")
    c = centres.astype(np.int64, copy=False)
    if len(c):
        _, ra, ca = plane_axes(axis)
        lo = np.zeros(3, np.int64)
        hi = np.asarray(shape_xyz, np.int64) - 1
        lo[[ra, ca]] += half
        hi[[ra, ca]] -= half
        if (c < lo).any() or (c > hi).any():
            raise MRHError(
                f"patch out of bounds: centres must lie in {lo.tolist()}..{hi.tolist()} "
                f"for half={half}, axis={axis!r} in a volume of shape {tuple(shape_xyz)}"
            )
    return (c[:, 0] * shape_xyz[1] + c[:, 1]) * shape_xyz[2] + c[:, 2]


if NUMBA is not None:

    @NUMBA.njit(nogil=True, cache=True, boundscheck=False)
    def _gather_nb(v, base, offs, out):  # v [V, C], out [n, C, Q]
        n = base.shape[0]
        q = offs.shape[0]
        c_n = v.shape[1]
        for i in range(n):
            b = base[i]
            for j in range(q):
                src = b + offs[j]
                for c in range(c_n):
                    out[i, c, j] = v[src, c]
        return out

    @NUMBA.njit(nogil=True, parallel=True, cache=True, boundscheck=False)
    def _gather_nb_par(v, base, offs, out):
        n = base.shape[0]
        q = offs.shape[0]
        c_n = v.shape[1]
        for i in NUMBA.prange(n):
            b = base[i]
            for j in range(q):
                src = b + offs[j]
                for c in range(c_n):
                    out[i, c, j] = v[src, c]
        return out


def gather_patches(vol, centres, half: int = 1, axis: str = "y", *, out=None, threads: int = 1,
                   backend: str = "auto") -> np.ndarray:
    """In-plane patches of a contrast-last volume, as the model takes them.

    vol: ``[X, Y, Z, C]`` array (contrast fastest, as in the cohort store; a
    ``[X, Y, Z]`` volume gives ``[n, P, P]``). centres: ``[n, 3]`` integer
    (x, y, z) voxel indices of patch centres; every patch must lie inside
    ``vol`` (MRHError otherwise). Returns ``[n, C, P, P]`` (P = 2*half+1) of
    ``vol``'s dtype with ``out[i, c, r, k] = vol[..centre_i + (r-half) along
    the row axis + (k-half) along the col axis.., c]``; rows/cols are the two
    non-slice axes in (x, y, z) order (axis="y": rows x, cols z).

    Vectorised: no Python loop over patches. ``backend``: "numba" (one pass,
    used when installed), "numpy" (``take`` then transpose, ~3x slower), or
    "auto". ``threads > 1`` uses numba's parallel loop (keep 1 inside Dask
    workers, which already use every core).
    """
    v = np.asarray(vol)
    scalar = v.ndim == 3
    if scalar:
        v = v[..., None]
    if v.ndim != 4:
        raise MRHError(f"gather_patches: volume must be [X, Y, Z, C] or [X, Y, Z], got shape {v.shape}")
    if half < 0:
        raise MRHError(f"--half must be >= 0, got {half}")
    p = 2 * half + 1
    shape = v.shape[:3]
    n_c = v.shape[3]
    base = flat_centres(centres, shape, half, axis)
    offs = patch_offsets(shape, half, axis)
    if not v.flags.c_contiguous:
        v = np.ascontiguousarray(v)
    flat = v.reshape(-1, n_c)
    n = len(base)
    if out is None:
        out = np.empty((n, n_c, p, p), v.dtype)
    elif out.shape != (n, n_c, p, p) or out.dtype != v.dtype or not out.flags.c_contiguous:
        raise MRHError(f"gather_patches: out must be a C-contiguous {v.dtype} array of shape {(n, n_c, p, p)}")
    useNUMBA = backend == "numba" or (backend == "auto" and NUMBA is not None)
    if backend == "numba" and NUMBA is None:
        raise MRHError("gather_patches: backend='numba' but numba is not installed")
    if useNUMBA and n:
        kern = _gather_nb_par if threads > 1 else _gather_nb
        kern(flat, base, offs, out.reshape(n, n_c, p * p))
    elif n:
        g = np.take(flat, (base[:, None] + offs[None, :]).ravel(), axis=0).reshape(n, p * p, n_c)
        out.reshape(n, n_c, p * p)[...] = g.transpose(0, 2, 1)
    return out[:, 0] if scalar else out


def grid_positions(lo: int, hi: int, size: int, half: int, stride: int) -> np.ndarray:
    """Global in-plane grid positions ``half + k*stride <= size-1-half`` that fall in [lo, hi)."""
    lo = max(lo, half)
    hi = min(hi, size - half)
    if hi <= lo:
        return np.zeros(0, np.int64)
    first = half + (-(-(lo - half) // stride)) * stride
    return np.arange(first, hi, stride, dtype=np.int64)


def select_samples(mri, target, mask, centres, half: int, axis: str, min_label_sum: float,
                   min_label_nonzero: int):
    """Apply the sampling rules to candidate centres of an in-memory block.

    mri [X,Y,Z,C], target [X,Y,Z,T] (T stains), mask [X,Y,Z] (block-local), centres [n,3]
    block-local. Returns (keep_index, inputs [k,C,P,P], labels [k,T,P,P]) for the kept
    candidates. A candidate is kept when ANY stain passes the label rules there; labels
    hold NaN for a stain whose patch has any NaN (a stain the subject lacks, or outside
    its section): that is the loss's mask.
    """
    labels = gather_patches(target, centres, half, axis)
    lab = labels.reshape(len(labels), -1, (2 * half + 1) ** 2)  # [n, T, P*P]
    with np.errstate(invalid="ignore"):
        ok = (lab.sum(axis=2, dtype=np.float64) >= min_label_sum)
    ok &= np.count_nonzero(lab, axis=2) >= min_label_nonzero  # NaN labels: dropped next line
    present = ~np.isnan(lab).any(axis=2)
    ok = (ok & present).any(axis=1)
    c = centres
    ok &= np.asarray(mask)[c[:, 0], c[:, 1], c[:, 2]].astype(bool)
    idx = np.flatnonzero(ok)
    inputs = gather_patches(mri, centres[idx], half, axis)
    finite = ~np.isnan(inputs).any(axis=(1, 2, 3))
    if not finite.all():
        idx, inputs = idx[finite], inputs[finite]
    labels = labels[idx]
    labels[~present[idx]] = np.nan
    return idx, inputs, labels
