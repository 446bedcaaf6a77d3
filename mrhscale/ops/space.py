"""Physical space of a voxel grid: x/y/z coordinates in millimetres from its affine, and the
NIfTI header facts (qform/sform codes, spatial unit) that say what that space is.

Stores keep the full 4x4 affine as an attribute (it is the truth, also for oblique
grids); the coordinates make ``ds.sel(x=..., method="nearest")`` work in mm. For an
axis-aligned affine they are exact scanner positions (RAS+ mm) of voxel centres; for an
oblique one no single number per index is a world position, so they give the distance
along the voxel axis from the first voxel centre and say so in their attributes.
"""

from __future__ import annotations

import numpy as np

AXES = ("x", "y", "z")
WORLD = "xyz"
#: metres per unit of NIfTI's spatial unit codes; "unknown" is read as mm (the usual case)
UNIT_MM = {"meter": 1000.0, "mm": 1.0, "micron": 0.001, "unknown": 1.0}


def is_axis_aligned(affine, rtol: float = 1e-6) -> bool:
    """True when each voxel axis runs along one world axis (a scaled permutation, any signs)."""
    m = np.abs(np.asarray(affine, float)[:3, :3])
    big = m > rtol * max(m.max(), 1e-30)
    return bool((big.sum(axis=0) == 1).all() and (big.sum(axis=1) == 1).all())


def spatial_coords(affine, shape, units: str = "mm") -> dict[str, tuple]:
    """``{"x": ("x", values_mm, attrs), ...}`` for the first three axes of ``shape``."""
    a = np.asarray(affine, float)
    scale = UNIT_MM.get(units, 1.0)
    aligned = is_axis_aligned(a)
    out = {}
    for d, (name, n) in enumerate(zip(AXES, shape[:3])):
        col = a[:3, d]
        idx = np.arange(int(n), dtype=np.float64)
        if aligned:
            k = int(np.argmax(np.abs(col)))
            values = (col[k] * idx + a[k, 3]) * scale
            attrs = {"units": "mm", "long_name": f"scanner {WORLD[k]} (RAS+) of voxel centres",
                     "world_axis": WORLD[k]}
        else:
            values = np.linalg.norm(col) * idx * scale
            attrs = {"units": "mm", "long_name": f"distance along voxel axis {name} from the first voxel centre",
                     "comment": "oblique affine: world positions are attrs['affine'] @ (i, j, k, 1)"}
        out[name] = (name, values, attrs)
    return out


def header_space(header) -> dict:
    """What a source header says about its space: unit and qform/sform (codes and qform
    affine), for outputs to keep. Analyze has none of it: scanner space in mm is assumed."""
    try:
        units = header.get_xyzt_units()[0]
        qform, qcode = header.get_qform(coded=True)
        _, scode = header.get_sform(coded=True)
    except AttributeError:
        return {"space_units": "mm", "qform_code": 0, "sform_code": 1}
    space = {"space_units": units if units in ("meter", "micron") else "mm", "qform_code": int(qcode or 0),
             "sform_code": int(scode or 0)}
    if qform is not None:
        space["qform"] = np.asarray(qform, float).tolist()
    return space


def with_space(ds):
    """``ds`` (an xarray Dataset) with x/y/z coordinates in mm from its ``affine`` attr, if it
    has none yet."""
    if "affine" not in ds.attrs or not set(AXES) <= set(ds.dims) or set(AXES) <= set(ds.coords):
        return ds
    shape = [ds.sizes[a] for a in AXES]
    return ds.assign_coords(spatial_coords(ds.attrs["affine"], shape, ds.attrs.get("space_units", "mm")))
