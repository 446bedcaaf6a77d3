"""mrhscale.ops.patches: the gather kernel against a plain loop, and no Python loop over patches."""

import sys

import numpy as np
import pytest

from mrhscale.errors import MRHError
from mrhscale.ops.patches import AXES, gather_patches


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("backend", ["numpy", "auto"])
def test_gather_patches_kernel(axis, backend):
    rng = np.random.default_rng(0)
    vol = rng.random((9, 8, 10, 6)).astype(np.float32)
    half = 2
    lo = [half if a != AXES.index(axis) else 0 for a in range(3)]
    hi = [s - half if a != AXES.index(axis) else s for a, s in enumerate(vol.shape[:3])]
    cen = np.stack([rng.integers(lo[a], hi[a], 200) for a in range(3)], axis=1)
    got = gather_patches(vol, cen, half, axis, backend=backend)
    np.testing.assert_array_equal(got, _loop_reference(vol, cen, half, axis))
    np.testing.assert_array_equal(gather_patches(vol[..., 0], cen, half, axis, backend=backend),
                                  _loop_reference(vol, cen, half, axis)[:, 0])
    with pytest.raises(MRHError, match="out of bounds"):
        gather_patches(vol, np.array([[0, 0, 0]]), half, axis, backend=backend)


@pytest.mark.parametrize("backend", ["numpy", "auto"])
def test_gather_patches_has_no_python_loop_over_patches(backend):
    """Guard: the Python work of the kernel must not grow with the number of patches."""
    rng = np.random.default_rng(1)
    vol = rng.random((20, 20, 20, 5)).astype(np.float32)
    gather_patches(vol, np.array([[5, 5, 5]]), 1, "y", backend=backend)  # warm up (JIT)

    def count(n):
        cen = rng.integers(1, 19, size=(n, 3))
        events = [0]

        def tracer(frame, event, arg):
            events[0] += 1
            return tracer

        sys.settrace(tracer)
        try:
            gather_patches(vol, cen, 1, "y", backend=backend)
        finally:
            sys.settrace(None)
        return events[0]

    assert count(10) == count(20_000)


def _loop_reference(vol, centres, half, axis):
    s_ax = AXES.index(axis)
    r_ax, c_ax = (a for a in range(3) if a != s_ax)
    out = []
    for cen in centres:
        sel = [slice(int(p), int(p) + 1) for p in cen]
        sel[r_ax] = slice(cen[r_ax] - half, cen[r_ax] + half + 1)
        sel[c_ax] = slice(cen[c_ax] - half, cen[c_ax] + half + 1)
        out.append(np.moveaxis(vol[tuple(sel)].squeeze(axis=s_ax), -1, 0))
    return np.stack(out)
