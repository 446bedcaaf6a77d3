"""Conformal calibration: the finite-sample quantile on known scores, and one factor per
group (Mondrian) where one global factor covers neither group."""

import math

import numpy as np
import pytest

from mrhscale.ops.uncertainty import (
    Z95,
    calibration_factor,
    conformal_level,
    conformal_quantile,
    coverage,
    fit_calibration,
    label_group,
    relative_factors,
    scale_by_value,
    value_bin,
    value_edges,
)


def test_finite_sample_quantile_is_the_kth_smallest_score():
    scores = np.random.default_rng(0).permutation(np.arange(1, 101, dtype=float))
    assert conformal_quantile(scores, 0.1) == 91.0  # k = ceil(101 * 0.9) = 91
    assert conformal_level(100, 0.1) == pytest.approx(0.91)
    assert conformal_quantile(np.arange(1, 20.0), 0.05) == 19.0  # k = ceil(20 * 0.95) = 19 = n
    assert conformal_level(19, 0.05) == pytest.approx(1.0)
    assert conformal_quantile(np.arange(1, 40.0), 0.05) == 38.0  # ceil(40 * 0.95) = 38
    assert conformal_quantile([3.0, 1.0, 2.0], 0.05) == 3.0  # too few for the guarantee: the largest
    assert conformal_level(3, 0.05) > 1 and math.isnan(conformal_quantile([], 0.05))
    # the factor is that score over 1.96: |err| / spread = 1..100, 90% coverage
    assert calibration_factor(np.arange(1, 101.0), np.ones(100), 0.9) == pytest.approx(91 / Z95)


def test_conformal_factor_covers_new_samples_at_least_1_minus_alpha():
    rng = np.random.default_rng(1)
    conformal, plain = [], []
    for _ in range(400):  # small calibration sets (n = 40), where the plain quantile under-covers
        err, new = np.abs(rng.standard_t(3, 40)), np.abs(rng.standard_t(3, 2000))
        conformal.append(coverage(new, np.full(new.size, calibration_factor(err, np.ones(40)))))
        plain.append(coverage(new, np.full(new.size, np.quantile(err, 0.95) / Z95)))
    # expected coverage k / (n + 1) = 39 / 41 = 0.951, against the plain quantile's ~38 / 41
    assert np.mean(conformal) == pytest.approx(39 / 41, abs=0.005) and np.mean(plain) < np.mean(conformal) - 0.01


def two_tissues(n, seed):
    """Group 0 (white matter, say) four times noisier than group 1; the same raw spread."""
    rng = np.random.default_rng(seed)
    wm = rng.random(n) < 0.4
    err = rng.normal(0, np.where(wm, 4.0, 1.0))
    return err, np.ones(n), wm


def test_one_factor_per_group_holds_each_groups_coverage():
    err, unc, wm = two_tissues(20_000, 2)
    fit = fit_calibration(err, unc, np.zeros_like(err), ("labels", ["wm"]), labels=[wm])
    g = fit["groups"]
    assert g["by"] == "labels" and g["labels"] == ["wm"] and g["n"] == [int(wm.sum()), int((~wm).sum())]
    assert fit["alpha"] == 0.05 and fit["n"] == 20_000 and "ceil((n+1)(1-alpha))/n" in fit["method"]
    test_err, test_unc, test_wm = two_tissues(20_000, 3)
    one = fit["factor"] * test_unc
    # one global factor: right on average, wrong in each tissue
    assert coverage(test_err, one) == pytest.approx(0.95, abs=0.01)
    assert coverage(test_err[test_wm], one[test_wm]) < 0.9 and coverage(test_err[~test_wm], one[~test_wm]) > 0.99
    each = np.asarray(g["factor"])[label_group([test_wm], test_err.shape)] * test_unc
    for inside in (test_wm, ~test_wm):
        assert coverage(test_err[inside], each[inside]) == pytest.approx(0.95, abs=0.01)


def test_value_bins_need_only_the_prediction():
    rng = np.random.default_rng(4)
    virt = rng.uniform(0, 100, 40_000)
    ref = virt + rng.normal(0, 0.5 + virt / 10)  # noisier where the stain is dense
    unc = np.ones_like(virt)
    fit = fit_calibration(virt, unc, ref, ("value", 4))
    g = fit["groups"]
    assert g["by"] == "value" and len(g["edges"]) == 3 and len(g["factor"]) == 4
    assert np.all(np.diff(g["factor"]) > 0) and np.allclose(g["coverage"], 0.95, atol=0.01)
    # at predict time: maps then uncertainties [N, 2T], the global factor already applied
    pred = np.stack([virt, fit["factor"] * unc], 1).astype(np.float32)
    scale_by_value(pred, 1, ((np.asarray(g["edges"]), relative_factors(g, fit["factor"])),))
    bins = value_bin(virt, g["edges"])
    for b in range(4):
        assert coverage((ref - virt)[bins == b], pred[bins == b, 1]) == pytest.approx(0.95, abs=0.015)
    assert len(value_edges(np.ones(10), 4)) == 1  # ties: fewer bins, never empty ones in between


def test_a_group_too_small_for_the_guarantee_takes_the_global_factor():
    err, unc, _ = two_tissues(2000, 5)
    lesion = np.zeros(err.size, bool)
    lesion[:5] = True
    fit = fit_calibration(err, unc, np.zeros_like(err), ("labels", ["lesion"]), labels=[lesion])
    assert fit["groups"]["n"][0] == 5 and fit["groups"]["factor"][0] == pytest.approx(fit["factor"])
