"""MRH-Net graph facts (parameter counts of the published files) and the optimisation pieces."""

import pytest
import torch

from mrhscale.nn.model import MRHNet
from mrhscale.training import TrainConfig
from mrhscale.training.optim import (
    clip_per_tensor_,
    loss_function,
    lr_factor,
    make_optimizer,
    param_groups,
)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("depth,expected", [(4, 482_369), (9, 851_649)])
def test_parameter_count_matches_published_files(depth, expected):
    # "5layer" file: 4 residual blocks, 482,369 parameters; "10layer": 9 blocks, 851,649.
    assert n_params(MRHNet(67, depth)) == expected


def test_parameter_count_depth_30_matches_original_graph():
    # conv1 (67->64) + conv2, conv3, conv3_1 + 2 convs per block + conv4 + conv5 (64->1), 3x3, biased.
    c1 = 67 * 9 * 64 + 64
    c = 64 * 9 * 64 + 64
    c5 = 64 * 9 + 1
    assert n_params(MRHNet(67, 30)) == c1 + 3 * c + 30 * 2 * c + c + c5 == 2_402_625


@pytest.mark.parametrize("p", [3, 5])
def test_shapes_patch_in_patch_out(p):
    m = MRHNet(7, depth=2)
    y = m(torch.randn(4, 7, p, p))
    assert y.shape == (4, 1, p, p)  # one stain: a stain axis of 1
    assert MRHNet(7, depth=1, stains=["nf", "mbp"])(torch.randn(4, 7, p, p)).shape == (4, 2, p, p)


def test_matlab_loss_is_half_sum_of_squares_batch_mean():
    p, t = torch.randn(8, 1, 3, 3), torch.randn(8, 1, 3, 3)
    se = (p - t) ** 2
    assert torch.allclose(loss_function("matlab")(p, t), 0.5 * se.sum() / 8)
    assert torch.allclose(loss_function("mse")(p, t), se.mean())
    assert torch.allclose(loss_function("centre-mse", 1)(p, t), se[:, 0, 1, 1].mean())
    # the scale the paper's lr/clip were tuned for: 4.5x the element mean for 3x3 outputs
    assert torch.allclose(loss_function("matlab")(p, t), 4.5 * loss_function("mse")(p, t))


def test_clip_applies_to_each_tensor_separately():
    a = torch.nn.Parameter(torch.zeros(10))
    b = torch.nn.Parameter(torch.zeros(3))
    a.grad = torch.full((10,), 1.0)  # norm sqrt(10) > 0.01: scaled to 0.01
    b.grad = torch.tensor([0.001, 0.0, 0.0])  # norm 0.001 < 0.01: untouched
    clip_per_tensor_([a, b], 0.01)
    assert torch.linalg.vector_norm(a.grad).item() == pytest.approx(0.01, rel=1e-5)
    assert torch.allclose(a.grad, torch.full((10,), 0.01 / 10**0.5))
    assert torch.equal(b.grad, torch.tensor([0.001, 0.0, 0.0]))


def test_weight_decay_on_weights_not_biases_and_head_lr_factor():
    m = MRHNet(4, depth=1)
    groups = {g["name"]: g for g in param_groups(m, 1e-4, 1e-4, head_lr_factor=10.0)}
    assert groups["backbone.bias"]["weight_decay"] == 0 and groups["head.bias"]["weight_decay"] == 0
    assert groups["backbone.weight"]["weight_decay"] == 1e-4
    assert groups["head.weight"]["lr"] == pytest.approx(1e-3)
    assert groups["backbone.weight"]["lr"] == pytest.approx(1e-4)
    n = sum(len(g["params"]) for g in groups.values())
    assert n == len(list(m.parameters()))
    # frozen backbone: only the head is optimised
    m2 = MRHNet(4, depth=1)
    frozen = param_groups(m2, 1e-4, 1e-4, 10.0, freeze_backbone=True)
    assert {g["name"] for g in frozen} == {"head.weight", "head.bias"}
    assert not m2.conv1.weight.requires_grad and m2.heads[0].conv5.weight.requires_grad


def test_paper_recipe_defaults():
    cfg = TrainConfig()
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.clip, cfg.batch_size,
            cfg.loss, cfg.schedule) == ("sgd", 0.1, 0.9, 1e-4, 0.01, 128, "matlab", "piecewise")
    assert [lr_factor(cfg, e) for e in (0, 9, 10, 19, 20)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    cos = TrainConfig(schedule="cosine", epochs=10)
    assert lr_factor(cos, 0) == 1 and lr_factor(cos, 5) == pytest.approx(0.5)
    opt = make_optimizer(cfg, MRHNet(3, depth=1))
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
