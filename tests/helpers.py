"""Small synthetic stores built directly, so each stage's tests stand on their own."""

from __future__ import annotations

import numpy as np
import xarray as xr
import zarr

DEFAULT_AFFINE = [[0.06, 0, 0, 0], [0, 0.06, 0, 0], [0, 0, 0.06, 0], [0, 0, 0, 1]]


def channel_names(n_channels: int) -> list[str]:
    if n_channels == 67:
        return (
            [f"dwi2000_{i}" for i in range(34)]
            + [f"dwi5000_{i}" for i in range(30)]
            + ["t2", "mt_off", "mt_on"]
        )
    return [f"c{i:02d}" for i in range(n_channels)]


def subject_dataset(sid: str, shape=(12, 10, 14), n_channels=5, seed=0, chunks=(8, 8, 8),
                    target_names=("af",)) -> xr.Dataset:
    """A subject whose target is a smooth known function of a few channels."""
    rng = np.random.default_rng(seed)
    x, y, z = shape
    mri = rng.gamma(2.0, 50.0, size=(*shape, n_channels)).astype(np.float32)
    mask = np.zeros(shape, bool)
    mask[1:-1, 1:-1, 1:-1] = True
    data = {
        "mri": (("x", "y", "z", "contrast"), mri),
        "mask": (("x", "y", "z"), mask),
        "fa": (("x", "y", "z"), rng.random(shape).astype(np.float32)),
    }
    for k, name in enumerate(target_names):
        t = np.clip(mri[..., k % n_channels] * 1.2 - 20, 0, 255) * mask
        data[name] = (("x", "y", "z"), t.astype(np.float32))
    names = channel_names(n_channels)
    ds = xr.Dataset(
        data,
        coords={
            "contrast": names,
            "group": ("contrast", [n.rsplit("_", 1)[0] for n in names]),
            "bval": ("contrast", np.full(n_channels, np.nan)),
        },
        attrs={
            "subject": sid,
            "affine": DEFAULT_AFFINE,
            "voxel_size": [0.06, 0.06, 0.06],
            "orientation": ["R", "A", "S"],
            "targets": list(target_names),
            "labels": [],
        },
    )
    cx, cy, cz = chunks
    ds["mri"] = ds["mri"].chunk({"x": cx, "y": cy, "z": cz, "contrast": -1})
    for v in ["mask", "fa", *target_names]:
        ds[v] = ds[v].chunk({"x": cx, "y": cy, "z": cz})
    for v in ds.variables:
        ds[v].encoding.pop("chunks", None)
    return ds


def make_cohort_store(path, n_subjects=3, shape=(12, 10, 14), n_channels=5, seed=0,
                      chunks=(8, 8, 8), target_names=("af",)) -> list[str]:
    """Write a cohort store following mrhscale.store's contract; returns subject ids."""
    ids = [f"s{i + 1:02d}" for i in range(n_subjects)]
    for i, sid in enumerate(ids):
        ds = subject_dataset(sid, shape, n_channels, seed + i, chunks, target_names)
        ds.to_zarr(str(path), group=sid, mode="w", consolidated=False, zarr_format=3)
    zarr.open_group(str(path), mode="a").attrs["subjects"] = ids
    return ids
