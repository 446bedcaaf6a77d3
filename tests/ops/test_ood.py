"""The out-of-distribution score: what it is fitted on, what it flags, numpy and torch alike."""

import numpy as np
import pytest
import torch

from mrhscale.nn.ood import InputDistance
from mrhscale.ops.ood import fit_input_distance, input_distance
from mrhscale.ops.uncertainty import fit_ood_power


def correlated(n, rng):
    """Two contrasts that move together (one tissue property), and a third of its own."""
    a = rng.normal(0, 1, n)
    return np.stack([a, a + 0.1 * rng.normal(0, 1, n), rng.normal(0, 1, n)], 1)


def test_training_median_is_one_and_quantiles_rise():
    rng = np.random.default_rng(0)
    rec = fit_input_distance(correlated(5000, rng))
    d = input_distance(correlated(5000, rng), rec)
    assert np.median(d) == pytest.approx(1.0, abs=0.05)  # a new sample of the same kind: typical
    q = [rec["training_quantiles"][k] for k in ("50", "90", "99", "99.9")]
    assert q[0] == pytest.approx(1.0) and q == sorted(q) and rec["n"] == 5000


def test_broken_relations_between_contrasts_are_flagged_though_each_value_is_typical():
    rng = np.random.default_rng(1)
    rec = fit_input_distance(correlated(5000, rng))
    odd = np.array([[1.0, -1.0, 0.0]])  # each contrast one sd from its mean, their relation never seen
    plain = np.array([[1.0, 1.0, 0.0]])
    assert input_distance(odd, rec)[0] > 5 * input_distance(plain, rec)[0]
    assert input_distance(odd, rec)[0] > rec["training_quantiles"]["99.9"]


def test_too_few_patches_for_a_fit_is_refused():
    with pytest.raises(ValueError, match="more patches than contrasts"):
        fit_input_distance(np.zeros((3, 3)))


def test_the_torch_module_scores_each_patch_by_its_in_plane_mean_as_numpy_does():
    rng = np.random.default_rng(2)
    rec = fit_input_distance(correlated(2000, rng))
    x = torch.from_numpy(rng.normal(0, 1.5, (7, 3, 3, 3)).astype(np.float32))
    got = InputDistance.from_record(rec)(x)
    assert got.shape == (7, 1, 3, 3) and got.dtype == torch.float32
    assert torch.equal(got[..., 0, 0], got[..., 2, 1])  # the patch's score at every position
    want = input_distance(x.double().mean((-2, -1)).numpy(), rec)
    np.testing.assert_allclose(got[:, 0, 1, 1].numpy(), want, rtol=1e-5)


def test_the_power_follows_how_the_errors_grow_with_the_score():
    rng = np.random.default_rng(3)
    n = 20000
    ood = np.exp(rng.normal(0, 0.5, n))
    unc = np.exp(rng.normal(0, 0.3, n))
    ref = rng.normal(0, 1, n)
    grows = ref + rng.normal(0, 1, n) * unc * ood  # errors scale with spread x score
    flat = ref + rng.normal(0, 1, n) * unc  # the score says nothing about them
    assert 0.5 <= fit_ood_power(grows, unc, ref, ood)["power"] <= 1.25  # 1 made them; the narrowest is near
    assert fit_ood_power(flat, unc, ref, ood)["power"] == 0.0
    widths = fit_ood_power(grows, unc, ref, ood)["widths"]
    assert widths["1"] < widths["0"]  # the widened interval is the narrower one at 95%
