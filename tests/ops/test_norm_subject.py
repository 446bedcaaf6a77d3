"""Per-subject normalisation (ops/norm.py): each brain scaled by its own statistics inside its mask."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from mrhscale.errors import MRHError
from mrhscale.ops.norm import (
    PERCENTILES,
    Normalisation,
    lattice_step,
    subject_stats,
    subject_stats_graph,
)


def brain(seed=0, shape=(10, 12, 9), c=4):
    rng = np.random.default_rng(seed)
    mri = rng.gamma(2.0, 50.0, (*shape, c)).astype(np.float32)
    mask = np.zeros(shape, bool)
    mask[2:-2, 2:-2, 1:-1] = True
    mri[~mask] = 1e6  # outside the brain: must not count
    return mri, mask


def normalised(mode, mri, mask):
    rec = Normalisation.subject_mode(mode, mri.shape[-1], 0.0, 1.0)
    off, inv = rec.for_subject(subject_stats(mri, mask)).input_arrays()
    return (mri - off) * inv


def test_percentile_stats_are_the_brains_own_per_contrast():
    mri, mask = brain()
    st = subject_stats(mri, mask)["subject-percentile"]
    lo, hi = np.percentile(mri[mask].astype(np.float64), PERCENTILES, axis=0)
    assert np.allclose(st["offset"], lo) and np.allclose(st["scale"], hi - lo)
    assert subject_stats(mri, mask)["subject-max"]["scale"] == [float(mri[mask].max())] * 4


@pytest.mark.parametrize("mode, gains", [("subject-percentile", [0.5, 1.0, 1.7, 3.0]),
                                         ("subject-max", [2.5] * 4)])
def test_a_scanner_gain_no_longer_changes_the_networks_input(mode, gains):
    mri, mask = brain()
    a = normalised(mode, mri, mask)[mask]
    b = normalised(mode, mri * np.float32(gains), mask)[mask]
    assert np.allclose(a, b, atol=1e-5)
    glob = Normalisation("percentile", [0.0] * 4, [100.0] * 4)  # the global mode does change
    assert not np.allclose(glob.apply_inputs(mri)[mask], glob.apply_inputs(mri * np.float32(gains))[mask])


def test_dask_and_numpy_give_the_same_statistics_on_a_lattice_of_a_large_brain(monkeypatch):
    import mrhscale.ops.norm as norm

    monkeypatch.setattr(norm, "STAT_VOXELS", 200)  # force a lattice step > 1
    mri, mask = brain(1)
    assert lattice_step(mri.shape[:3]) == 2
    got = subject_stats_graph(da.from_array(mri, chunks=(4, 5, 9, -1)), da.from_array(mask, chunks=(4, 5, 9)))
    a, b = got.compute(scheduler="synchronous"), subject_stats(mri, mask)
    assert a == b and b["voxels"] == int(mask[::2, ::2, ::2].sum())
    assert b["subject-max"]["scale"][0] == float(mri[mask].max())  # the max: every brain voxel


def test_records_round_trip_and_refuse_to_be_used_unresolved():
    rec = Normalisation.subject_mode("subject-percentile", 3, 0.0, 80.0)
    back = Normalisation.from_dict(rec.to_dict())
    assert back.per_subject and back.target_scale == [80.0]
    with pytest.raises(MRHError, match="own statistics"):
        back.input_arrays()
    mri, mask = brain(c=3)
    one = back.for_subject(subject_stats(mri, mask))
    assert not one.per_subject and one.for_subject({}) is one
    with pytest.raises(MRHError, match="another number of contrasts"):
        back.for_subject(subject_stats(*brain(c=4)))
    with pytest.raises(MRHError, match="per-subject"):
        Normalisation.subject_mode("percentile", 3, 0.0, 1.0)


def test_bad_brains_are_refused_or_made_safe():
    mri, mask = brain()
    with pytest.raises(MRHError, match="mask is empty"):
        subject_stats(mri, np.zeros_like(mask))
    flat = mri.copy()
    flat[..., 1] = 7.0  # a constant contrast: scale falls back, never 0
    flat[2, 2, 1, 2] = np.nan  # a NaN: ignored
    st = subject_stats(flat, mask)["subject-percentile"]
    assert np.all(np.isfinite(st["scale"])) and min(st["scale"]) > 0
