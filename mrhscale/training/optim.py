"""The recipe's parts: loss, initialisation, parameter groups, optimiser, schedule, clipping."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from mrhscale.errors import MRHError
from mrhscale.nn.model import MRHNet, laplace_nll
from mrhscale.training.config import LOSSES, TrainConfig
from mrhscale.training.distributed import all_reduce, dist_on


def loss_function(name: str, half: int = 1, *, global_count: bool = False):
    """``loss(pred[B,T,P,P], target[B,T,P,P]) -> scalar`` (computed in float32).

    NaN where a sample lacks a stain: the sum over stains of each stain's loss over the
    samples that have it, so one stain's loss is what a one-stain network of it
    minimises and a missing stain adds nothing. ``global_count`` (training under DDP):
    a stain's loss is divided by the number of samples that have it in the GLOBAL batch
    (all ranks' counts summed, over the world size, which DDP's gradient average
    divides out again), so a step's gradient is the global batch's whatever the number
    of ranks; a rank's own count would weigh a sample by how many of its rank's patches
    lack the stain. In one process (or without it) the rank's own count.
    """
    if name not in LOSSES:
        raise MRHError(f"--loss {name!r}: choose one of {', '.join(LOSSES)}")
    per_sample = _PER_SAMPLE[name]

    def loss(p, t):
        p = p.float()
        present = ~torch.isnan(t).flatten(2).any(2)  # [B, T]
        each = per_sample(p, torch.where(present[..., None, None], t, p.detach()), half)
        return _stain_sum(each, present, global_count)

    return loss


def scale_loss_function(*, global_count: bool = False):
    """``--aleatoric``: ``loss(mean, log_b, target) -> scalar``, each stain's Laplace negative
    log-likelihood of its scale head (mean over the P x P outputs), summed over the stains
    as ``loss_function`` sums them; ``mean`` comes detached, so it trains the scale head alone."""

    def loss(mean, log_b, t):
        mean, log_b = mean.float(), log_b.float()
        present = ~torch.isnan(t).flatten(2).any(2)
        each = laplace_nll(mean, log_b, torch.where(present[..., None, None], t, mean)).flatten(-2).mean(-1)
        return _stain_sum(each, present, global_count)

    return loss


def _stain_sum(each: torch.Tensor, present: torch.Tensor, global_count: bool) -> torch.Tensor:
    """Per-sample losses [B, T] -> the sum over stains of each stain's mean over the samples
    that have it (see ``loss_function``)."""
    each = torch.where(present, each, torch.zeros_like(each))
    if global_count and dist_on():
        count = all_reduce(present.sum(0)).clamp_min(1).float() / dist.get_world_size()
        return (each.sum(0) / count).sum()
    return (each.sum(0) / present.sum(0).clamp_min(1)).sum()


_PER_SAMPLE = {  # [..., P, P] -> [...]: one sample's loss
    # MATLAB regressionLayer: 0.5 * sum of squared errors over the outputs, mean over the batch.
    "matlab": lambda p, t, h: 0.5 * (p - t).square().flatten(-2).sum(-1),
    "mse": lambda p, t, h: (p - t).square().flatten(-2).mean(-1),
    "centre-mse": lambda p, t, h: (p[..., h, h] - t[..., h, h]).square(),
}


def init_weights(modules, how: str = "glorot") -> None:
    """MATLAB's convolution2dLayer defaults: Glorot-uniform weights, zero biases."""
    if how == "torch":
        for m in modules:
            m.reset_parameters()
        return
    for m in modules:
        nn.init.xavier_uniform_(m.weight)
        nn.init.zeros_(m.bias)


def param_groups(model: MRHNet, lr: float, weight_decay: float, head_lr_factor: float = 1.0,
                 freeze_backbone: bool = False) -> list[dict]:
    """Weights get L2 decay, biases none (MATLAB BiasL2Factor 0); the head may get an lr factor."""
    head = {id(p) for p in model.head_parameters()}
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        is_head = id(p) in head
        if freeze_backbone and not is_head:
            p.requires_grad_(False)
            continue
        groups.setdefault((is_head, name.endswith("bias")), []).append(p)
    out = []
    for (is_head, is_bias), params in sorted(groups.items()):
        factor = head_lr_factor if is_head else 1.0
        out.append({
            "params": params, "lr": lr * factor, "base_lr": lr * factor,
            "weight_decay": 0.0 if is_bias else weight_decay,
            "name": f"{'head' if is_head else 'backbone'}.{'bias' if is_bias else 'weight'}",
        })
    return out


def make_optimizer(cfg: TrainConfig, model: MRHNet) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.lr, cfg.weight_decay, cfg.head_lr_factor, cfg.freeze_backbone)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, foreach=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, foreach=True)


def lr_factor(cfg: TrainConfig, epoch: int) -> float:
    """Learning-rate multiplier of (0-based) ``epoch``: a pure function, so resume is exact."""
    if cfg.schedule == "piecewise":
        return cfg.drop_factor ** (epoch // cfg.drop_period)
    return 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.epochs))


def clip_per_tensor_(params, max_norm: float) -> None:
    """Scale each gradient tensor whose L2 norm exceeds ``max_norm`` down to it.

    MATLAB's GradientThresholdMethod 'l2norm' clips every learnable parameter
    separately (unlike torch's clip_grad_norm_, which uses one global norm).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or max_norm <= 0:
        return
    norms = torch.stack(torch._foreach_norm(grads))
    coef = torch.where(norms > max_norm, max_norm / norms.clamp_min(1e-30), torch.ones_like(norms))
    torch._foreach_mul_(grads, list(coef.unbind()))
