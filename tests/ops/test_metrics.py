"""mrhscale.ops.metrics: similarity and ROC on constructed cases with known answers."""

import itertools
import math

import numpy as np
import pytest

from mrhscale.ops.metrics import roc, similarity


def test_similarity_known_answers():
    rng = np.random.default_rng(0)
    ref = rng.random((10, 9, 11)) * 200
    mask = np.zeros(ref.shape, bool)
    mask[2:8, 2:7, 2:9] = True
    same = similarity(ref, ref, mask)
    assert same["pearson"] == pytest.approx(1) and same["spearman"] == pytest.approx(1)
    assert same["mae"] == 0 and same["psnr"] == math.inf and same["ssim"] == pytest.approx(1)
    shifted = similarity(ref + 3.0, ref, mask, data_range=200.0)
    assert shifted["mae"] == pytest.approx(3.0) and shifted["pearson"] == pytest.approx(1)
    assert shifted["psnr"] == pytest.approx(20 * np.log10(200 / 3.0))
    assert shifted["ssim"] < 1
    neg = similarity(-ref, ref, mask)
    assert neg["pearson"] == pytest.approx(-1) and neg["spearman"] == pytest.approx(-1)
    mono = similarity(np.exp(ref / 50), ref, mask)  # monotone, nonlinear: Spearman 1, Pearson < 1
    assert mono["spearman"] == pytest.approx(1) and mono["pearson"] < 0.99
    # values outside the mask do not count
    wild = ref.copy()
    wild[~mask] = 1e6
    assert similarity(wild, ref, mask)["mae"] == 0


def test_roc_auc_matches_pair_count_and_orientation():
    rng = np.random.default_rng(1)
    s = rng.standard_normal(60)
    y = rng.random(60) < 0.3
    s[y] += 0.8
    s[:5] = s[5]  # ties
    pairs = [(a > b) + 0.5 * (a == b) for a, b in itertools.product(s[y], s[~y])]
    r = roc(s, y)
    assert r["auc_raw"] == pytest.approx(np.mean(pairs)) and r["direction"] == "higher"
    flipped = roc(-s, y)
    assert flipped["direction"] == "lower" and flipped["auc"] == pytest.approx(r["auc"])
    assert flipped["auc_raw"] == pytest.approx(1 - r["auc"])
    perfect = roc(np.r_[np.zeros(10), np.ones(5)], np.r_[np.zeros(10, bool), np.ones(5, bool)])
    assert perfect["auc"] == 1 and perfect["youden"]["sensitivity"] == 1
    assert perfect["youden"]["specificity"] == 1
    assert perfect["fpr"][0] == 0 and perfect["tpr"][-1] == 1
    assert roc(np.ones(8), np.r_[np.zeros(4, bool), np.ones(4, bool)])["auc"] == 0.5
    assert math.isnan(roc(s, np.zeros(60, bool))["auc"])
