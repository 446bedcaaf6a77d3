"""A new contrast, in a subject's native space, onto the cohort store's grid for evaluation."""

from __future__ import annotations

import os

import numpy as np

from mrhscale.errors import MRHError
from mrhscale.io.volumes import open_volume
from mrhscale.stages.register.geometry import Grid, grid_of, n_volumes, read3, short_list
from mrhscale.stages.register.transforms import map_volume, read_transform_info
from mrhscale.stores import open_subject


def _store_grid(store: str, subject: str) -> Grid:
    ds = open_subject(store, subject)
    shape = tuple(int(ds.sizes[d]) for d in ("x", "y", "z"))
    return Grid(shape, np.asarray(ds.attrs["affine"], dtype=np.float64))


def marker_from_file(
    source: str,
    subject: str,
    *,
    store: str | None = None,
    grid: Grid | tuple | None = None,
    transforms: str | None = None,
    volume: int | None = None,
    interpolator: str = "linear",
) -> np.ndarray:
    """A single-contrast marker for subject ``subject`` on its cohort-store grid (x, y, z), float32.

    source:
      - a contrast of the store: a channel name (``t2``, ``dwi2000_0``) or a variable (``fa``);
      - or a NIfTI path (``{subject}`` is replaced by the id), e.g. a new contrast. Without
        ``transforms`` it must already be on the store grid and is read as it is. With
        ``transforms`` (the ``mrhscale register`` output folder, or OUT/<sid>) the file is taken
        to be in the subject's native space and is mapped onto the store grid (linear).
    volume: index of the volume in a 4D file (required for 4D).
    The store grid comes from ``store`` (attrs affine + x/y/z sizes) or ``grid`` = (shape, affine).
    """

    is_path = any(str(source).lower().endswith(e) for e in (".nii", ".nii.gz", ".hdr", ".img")) \
        or os.sep in str(source)
    if not is_path:
        if store is None:
            raise MRHError(f"marker {source!r}: a contrast name needs the cohort store (store=...)")

        ds = open_subject(store, subject)
        if source in [str(c) for c in ds["contrast"].values]:
            a = ds["mri"].sel(contrast=source).values
        elif source in ds.data_vars and ds[source].dims == ("x", "y", "z"):
            a = ds[source].values
        else:
            names = [str(c) for c in ds["contrast"].values] + [v for v in ds.data_vars if ds[v].dims == ("x", "y", "z")]
            raise MRHError(f"marker {source!r}: not a contrast or variable of subject {subject} "
                           f"(available: {', '.join(short_list(names, 20))})")
        return np.nan_to_num(np.asarray(a, dtype=np.float32))
    path = str(source).replace("{subject}", subject)
    vol = open_volume(path, what=f"marker for subject {subject}")
    n = n_volumes(vol)
    if n > 1 and volume is None:
        raise MRHError(f"marker {path}: a 4D image with {n} volumes; say which (volume=INDEX)")
    if store is not None:
        dst = _store_grid(store, subject)
    elif grid is not None:
        dst = grid if isinstance(grid, Grid) else Grid(tuple(grid[0]), np.asarray(grid[1], float))
    else:
        raise MRHError(f"marker {path}: give the cohort store (or grid) it is compared on")
    src = grid_of(vol)
    if transforms is None:
        if not src.same(dst, atol=1e-3):
            raise MRHError(f"marker {path}: grid {src.shape} differs from subject {subject}'s store grid "
                           f"{dst.shape}; register it first (mrhscale register) or give its transforms")
        return read3(vol, volume if n > 1 else None)
    # transforms given: the file is in the subject's native space (even where the native grid
    # happens to equal the reference grid, its anatomy is not registered yet)
    tdir = transforms
    if os.path.isdir(os.path.join(transforms, subject)):
        tdir = os.path.join(transforms, subject)
    info = read_transform_info(tdir)
    if not Grid.from_dict(info["reference_grid"]).same(dst, atol=1e-3):
        raise MRHError(f"marker {path}: the transforms in {info['dir']} lead to another grid than "
                       f"subject {subject}'s store grid")
    if not Grid.from_dict(info["native_grid"]).same(src, atol=1e-3):
        raise MRHError(f"marker {path}: not on subject {subject}'s native grid recorded in {info['dir']}; "
                       "register it to the subject first")
    return map_volume(path, info, "reference", interpolator, None, volume if n > 1 else None)
