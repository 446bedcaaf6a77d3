"""--aleatoric: a noise-scale head per stain that learns a known heteroscedastic noise,
never moves the map, combines with the members' spread, and bundles without it still load."""

import numpy as np
import pytest
import torch
from scipy import stats

from mrhscale.io.bundle import (
    ensemble_bundle,
    make_bundle,
    model_from_bundle,
    predictor_from_bundle,
)
from mrhscale.nn.model import MemberMean, MRHEnsemble, MRHNet, mean_and_spread
from mrhscale.ops.norm import Normalisation
from mrhscale.training.optim import init_weights, loss_function, scale_loss_function


def noisy_problem(n=4096, seed=0):
    """Input channel 0 sets the target's noise: sd 0.05 where it is 0, 0.65 where it is 1."""
    g = torch.Generator().manual_seed(seed)
    level = torch.rand(n, 1, 1, 1, generator=g)
    x = torch.cat([level.expand(n, 1, 3, 3), torch.rand(n, 1, 3, 3, generator=g)], 1)
    sd = 0.05 + 0.6 * level
    t = 0.5 * x[:, 1:2] + sd * torch.randn(n, 1, 3, 3, generator=g)
    return x, t, sd


def fit(aleatoric: bool, steps=300, seed=0):
    torch.manual_seed(seed)
    net = MRHNet(2, depth=1, width=16, stains=["nf"], aleatoric=aleatoric)
    init_weights([m for m in net.modules() if isinstance(m, torch.nn.Conv2d)])
    x, t, sd = noisy_problem()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    mse, nll = loss_function("mse"), scale_loss_function()
    history = []
    for step in range(steps):
        i = slice((step * 256) % 4096, (step * 256) % 4096 + 256)
        out = net(x[i], with_scale=True)
        loss = mse(out[:, :1], t[i])
        scale = nll(out[:, :1].detach(), out[:, 1:], t[i]) if aleatoric else 0
        (loss + scale).backward()
        opt.step()
        opt.zero_grad()
        history.append(float(scale.detach()) if aleatoric else 0.0)
    return net, history, (x, t, sd)


def test_scale_head_learns_the_noise_and_its_loss_goes_down():
    net, history, (x, _, sd) = fit(True)
    assert np.mean(history[-30:]) < np.mean(history[:30]) - 0.3
    with torch.no_grad():
        b = net(x, with_scale=True)[:, 1].exp().mean((-2, -1)).numpy()
    sd = sd.ravel().numpy()
    assert stats.spearmanr(b, sd).statistic > 0.9
    # a Laplace fit to Gaussian noise: b = E|e| = sd * sqrt(2 / pi)
    assert np.median(b / (sd * np.sqrt(2 / np.pi))) == pytest.approx(1.0, abs=0.25)


def test_the_likelihood_never_moves_the_map():
    with_head, _, (x, _, _) = fit(True, steps=50)
    without, _, _ = fit(False, steps=50)
    for name, v in without.state_dict().items():
        torch.testing.assert_close(with_head.state_dict()[name], v, rtol=0, atol=1e-6)
    assert with_head(x).shape == (4096, 1, 3, 3)  # forward: the map alone, as every consumer expects
    assert with_head(x, with_scale=True).shape == (4096, 2, 3, 3)


def test_ensemble_adds_mean_aleatoric_variance_to_the_members_variance():
    mu = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1, 1).expand(1, 3, 1, 3, 3)
    log_b = torch.full((1, 3, 1, 3, 3), float(np.log(0.5)))
    mean, sd = mean_and_spread(torch.cat([mu, log_b], 2), 1)
    assert mean.shape == (1, 1, 3, 3) and torch.allclose(mean, torch.full_like(mean, 2.0))
    # members' variance (ddof 1) 1.0, plus a Laplace b = 0.5's variance 2 b^2 = 0.5
    assert torch.allclose(sd, torch.full_like(sd, np.sqrt(1.5)))
    plain_mean, plain_sd = mean_and_spread(mu)
    assert torch.equal(plain_mean, mean) and torch.allclose(plain_sd, torch.ones_like(plain_sd))


def bundle_of(net):
    norm = Normalisation("percentile", [0.0] * net.in_channels, [1.0] * net.in_channels, [0.0], [1.0])
    return make_bundle(net, channels=["a", "b"], norm=norm, patch={"half": 1, "size": 3, "axis": "y"})


def test_bundles_with_and_without_the_head_load():
    torch.manual_seed(0)
    old = bundle_of(MRHNet(2, depth=1, width=8, stains=["nf"]))
    assert "aleatoric" not in old["arch"]  # what every bundle before the head looks like
    net = model_from_bundle(old)
    assert not net.aleatoric and net(torch.zeros(2, 2, 3, 3), with_scale=True).shape == (2, 1, 3, 3)
    ens = predictor_from_bundle(ensemble_bundle([old, old], {}, {}))
    assert ens(torch.zeros(2, 2, 3, 3)).shape == (2, 2, 1, 3, 3)
    new = [bundle_of(MRHNet(2, depth=1, width=8, stains=["nf"], aleatoric=True)) for _ in range(2)]
    assert new[0]["arch"]["aleatoric"] is True
    ens = predictor_from_bundle(ensemble_bundle(new, {}, {}))
    assert isinstance(ens, MRHEnsemble) and ens.aleatoric
    assert ens(torch.zeros(2, 2, 3, 3)).shape == (2, 2, 2, 3, 3)  # [B, K, stains + log-scales, P, P]
    assert MemberMean(ens)(torch.zeros(2, 2, 3, 3)).shape == (2, 1, 3, 3)
