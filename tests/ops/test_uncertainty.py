"""ops.uncertainty: the calibration factor, interval coverage and error-retention curve
on errors of a known distribution."""

import math

import numpy as np
import pytest

from mrhscale.ops.uncertainty import (
    calibration_factor,
    coverage,
    retention_curve,
    uncertainty_metrics,
)


def gaussian_errors(n=200_000, seed=0):
    rng = np.random.default_rng(seed)
    sigma = rng.uniform(0.5, 5.0, n)  # heteroscedastic: each sample has its own true sd
    return rng.normal(0, sigma), sigma


def test_factor_recovers_an_underdispersed_spread():
    err, sigma = gaussian_errors()
    factor = calibration_factor(err, sigma / 3)  # members agree 3x more than their error warrants
    assert factor == pytest.approx(3.0, rel=0.02)
    assert coverage(err, sigma / 3) < 0.5
    assert coverage(err, factor * sigma / 3) == pytest.approx(0.95, abs=0.002)
    assert coverage(err, sigma) == pytest.approx(0.95, abs=0.003)  # the true sd is already calibrated


def test_retention_curve_orders_by_confidence():
    err, sigma = gaussian_errors()
    good = retention_curve(err, sigma)
    blind = retention_curve(err, np.random.default_rng(1).random(err.size))
    mae = float(np.abs(err).mean())
    assert good["random_area"] == pytest.approx(mae) and good["mae"][-1] == pytest.approx(mae)
    assert good["oracle_area"] < good["area"] < blind["area"] and blind["area"] == pytest.approx(mae, rel=0.02)
    assert np.all(np.diff(good["oracle_mae"]) >= -1e-12)  # the oracle's curve only rises
    assert good["fractions"][0] == 0.01 and len(good["mae"]) == 100
    assert good["mae"][0] < 0.5 * mae  # the most confident 1% err far less


def test_metrics_of_an_informative_and_an_empty_uncertainty():
    err, sigma = gaussian_errors(20_000)
    ref = np.zeros_like(err)
    m = uncertainty_metrics(err, ref, sigma)
    assert m["spearman_abs_error"] > 0.3 and m["coverage_95"] == pytest.approx(0.95, abs=0.01)
    assert m["factor_for_95"] == pytest.approx(1.0, abs=0.03)  # the true sd: calibrated already
    assert uncertainty_metrics(err, ref, sigma / 2)["factor_for_95"] == pytest.approx(2.0, rel=0.03)
    const = uncertainty_metrics(err, ref, np.ones_like(err))
    assert math.isnan(const["spearman_abs_error"])
    empty = uncertainty_metrics(np.zeros(0), np.zeros(0), np.zeros(0))
    assert empty["n"] == 0 and math.isnan(empty["coverage_95"]) and math.isnan(empty["retention"]["area"])
    assert calibration_factor(np.zeros(0), np.zeros(0)) == 1.0
    assert np.isfinite(calibration_factor(np.ones(10), np.zeros(10)))  # zero spread: no division error
