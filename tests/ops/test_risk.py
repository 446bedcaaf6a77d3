"""Brain-level risk control: each brain's factor, the conformal quantile over brains on
known factors, the guarantee over many draws of brains, groups, and too few brains."""

import numpy as np
import pytest

from mrhscale.errors import MRHError
from mrhscale.ops.risk import brain_factor, brains_needed, check_brains, fit_risk, risk_quantile
from mrhscale.ops.uncertainty import Z95, calibration_factor


def test_a_brains_factor_is_the_smallest_with_at_most_alpha_outside():
    unc = np.full(100, 1 / Z95)  # then |err| / (1.96 unc) = |err|
    err = np.arange(1, 101, dtype=float)
    lam = brain_factor(err, unc, alpha=0.05)
    assert lam == pytest.approx(95.0)  # 5 voxels (96..100) outside, the 6th would be 95
    assert (err > Z95 * lam * unc + 1e-9).mean() <= 0.05
    assert (err > Z95 * (lam - 1e-6) * unc).mean() > 0.05  # any smaller: too many outside
    assert brain_factor(err, unc, alpha=0.0) == pytest.approx(100.0)


def test_the_quantile_over_brains_is_the_kth_smallest():
    lam = np.random.default_rng(1).permutation(np.arange(1, 21, dtype=float))
    assert risk_quantile(lam, 0.1) == (19.0, 19)  # k = ceil(21 x 0.9) = 19
    assert risk_quantile(np.arange(1, 10.0), 0.1) == (9.0, 9)  # 9 brains: the largest
    assert risk_quantile(np.arange(1, 101.0), 0.2) == (81.0, 81)  # ceil(101 x 0.8) = 81
    assert brains_needed(0.1) == 9 and brains_needed(0.2) == 4 and brains_needed(0.05) == 19


def test_too_few_brains_or_bad_levels_are_refused_in_one_line():
    with pytest.raises(MRHError, match="8 calibration brain.*needs at least 9"):
        risk_quantile(np.arange(8.0), 0.1)
    with pytest.raises(MRHError, match="needs at least 9"):
        check_brains(3, 0.1, 0.05)
    with pytest.raises(MRHError, match="strictly between 0 and 1"):
        check_brains(20, 0.1, 1.5)
    check_brains(9, 0.1, 0.05)


def brains(rng, n, voxels=300):
    """``n`` brains, each with its own error scale (a scanner's shift) over a voxel-wise sd."""
    out = []
    for _ in range(n):
        unc = rng.uniform(0.5, 2.0, voxels)
        scale = rng.lognormal(0.0, 0.5)
        ref = rng.uniform(0, 100, voxels)
        out.append((ref + scale * unc * rng.standard_normal(voxels), unc, ref))
    return out


def test_most_new_brains_keep_their_misses_under_alpha():
    """The guarantee: with 14 brains and delta 0.1 a new brain has at most 5% of its voxels
    outside with probability k/(n+1) = 14/15; a voxel-level factor from the same brains
    (exchangeable voxels, not brains) does not say that about a brain."""
    rng = np.random.default_rng(0)
    ok_risk, ok_voxel = [], []
    for _ in range(1000):
        *cal, new = brains(rng, 15)
        factor = fit_risk(cal, [f"b{i}" for i in range(14)], alpha=0.05, delta=0.1)["factor"]
        err, unc = new[0] - new[2], new[1]
        ok_risk.append((np.abs(err) > Z95 * factor * unc).mean() <= 0.05)
        voxel = calibration_factor(np.concatenate([b[0] - b[2] for b in cal]), np.concatenate([b[1] for b in cal]))
        ok_voxel.append((np.abs(err) > Z95 * voxel * unc).mean() <= 0.05)
    assert np.mean(ok_risk) >= 0.9
    assert np.mean(ok_voxel) < 0.75


def test_the_record_and_its_groups():
    rng = np.random.default_rng(3)
    cal = brains(rng, 10)
    wm = [np.arange(300) < 100 for _ in cal]
    cal = [(v, 3 * u * w + u, r, [w]) for (v, u, r), w in zip(cal, wm, strict=True)]  # wm: unc 4x, errors not
    rec = fit_risk(cal, [f"b{i}" for i in range(10)], ("labels", ["wm"]), alpha=0.05, delta=0.1)
    assert rec["mode"] == "risk" and rec["n_brains"] == 10 and rec["k"] == 10 and rec["delta"] == 0.1
    assert rec["factor"] == pytest.approx(max(rec["brain_factors"].values()))  # ceil(11 x 0.9) = 10 of 10
    assert all(m <= 0.05 for m in rec["brain_miss_share"].values())  # every calibration brain holds
    g = rec["groups"]
    assert g["by"] == "labels" and g["labels"] == ["wm"] and g["n"] == [1000, 2000] and g["guaranteed"] == [True] * 2
    assert g["factor"][0] < g["factor"][1] / 2  # wm's uncertainty is 4x too wide: a smaller factor
    assert len(g["brain_factors"][0]) == 10 and min(g["coverage"]) >= 0.95
    v = fit_risk(cal[:9], [f"b{i}" for i in range(9)], ("value", 3))["groups"]
    assert v["by"] == "value" and len(v["edges"]) == 2 and len(v["factor"]) == 3


def test_a_group_in_too_few_brains_takes_the_global_factor():
    rng = np.random.default_rng(4)
    cal = [(v, u, r, [np.arange(300) < (50 if i < 3 else 0)]) for i, (v, u, r) in enumerate(brains(rng, 9))]
    rec = fit_risk(cal, [f"b{i}" for i in range(9)], ("labels", ["lesion"]))
    g = rec["groups"]
    assert g["n_brains"] == [3, 9] and g["guaranteed"] == [False, True]
    assert g["factor"][0] == rec["factor"] and g["brain_factors"][0][5] is None
