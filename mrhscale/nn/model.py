"""MRH-Net: the original MATLAB graph as a plain ``torch.nn.Module``.

Layer names follow the original DAGNetwork (Conv1, Conv2, Conv3, Conv3_1, the
residual blocks, Conv4, Conv5: one ``heads[k]`` of Conv4/Conv5 per stain) so imported
MATLAB weights map one to one.
No batch norm, no dropout, no input normalisation layer: normalisation lives
in the model bundle, not in the graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _conv(cin: int, cout: int) -> nn.Conv2d:
    # 3x3 'same' zero padding, as MATLAB's convolution2dLayer(3, n, 'Padding', 'same').
    return nn.Conv2d(cin, cout, kernel_size=3, padding=1)


class ResidualBlock(nn.Module):
    """ReLU_a -> conv_a -> ReLU_b -> conv_b, plus the ReLU_a output (the original's skip)."""

    def __init__(self, width: int):
        super().__init__()
        self.conv_a = _conv(width, width)
        self.conv_b = _conv(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(x)
        return self.conv_b(torch.relu(self.conv_a(a))) + a


class StainHead(nn.Module):
    """Conv4 -> ReLU -> Conv5: the layers the original replaced to learn a new stain."""

    def __init__(self, width: int):
        super().__init__()
        self.conv4 = _conv(width, width)
        self.conv5 = _conv(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv5(torch.relu(self.conv4(x)))


class MRHNet(nn.Module):
    """MRH-Net on (2h+1)x(2h+1) patches: ``[B, C, P, P] -> [B, T, P, P]``, T stains.

    ``depth`` is the number of residual blocks. The published MATLAB files
    named "5layer", "10layer", "30layer" hold depth 4, 9 and 29 respectively.

    ``stains``: the stains share the backbone, each with its own Conv4/Conv5 head
    (``heads[k]``; several are the original's transfer learning run side by side), the
    output in ``stains`` order. One stain is the original graph, its head ``heads[0]``
    (older bundles and MATLAB files name it ``conv4``/``conv5``: ``stores/legacy.py``).

    ``aleatoric``: a second Conv4/Conv5 per stain (``scales[k]``) for the log of the voxel's
    noise scale (a Laplace b), on the backbone's features DETACHED: its likelihood trains
    that head alone, so the map is what it would be without it. ``forward(x)`` is the map
    either way; ``forward(x, with_scale=True)`` appends the T log-scales ``[B, 2T, P, P]``.
    """

    def __init__(self, in_channels: int, depth: int = 5, width: int = 64, stains: Sequence[str] = ("stain",),
                 aleatoric: bool = False):
        super().__init__()
        if in_channels < 1 or depth < 0 or width < 1 or not stains:
            raise ValueError(f"bad MRHNet config: in_channels={in_channels}, depth={depth}, width={width}, "
                             f"stains={stains!r}")
        self.in_channels, self.depth, self.width = int(in_channels), int(depth), int(width)
        self.stains = [str(s) for s in stains]
        self.conv1 = _conv(in_channels, width)
        self.conv2 = _conv(width, width)
        self.conv3 = _conv(width, width)
        self.conv3_1 = _conv(width, width)
        self.blocks = nn.ModuleList(ResidualBlock(width) for _ in range(depth))
        self.heads = nn.ModuleList(StainHead(width) for _ in self.stains)
        self.aleatoric = bool(aleatoric)
        if self.aleatoric:
            with torch.random.fork_rng(devices=[]):  # the map's layers draw what they would without it
                self.scales = nn.ModuleList(StainHead(width) for _ in self.stains)

    @property
    def config(self) -> dict:
        return {"in_channels": self.in_channels, "depth": self.depth, "width": self.width,
                "stains": list(self.stains), **({"aleatoric": True} if self.aleatoric else {})}

    @property
    def n_stains(self) -> int:
        return len(self.stains)

    def head_modules(self) -> list[nn.Conv2d]:
        """Every head's Conv4 and Conv5."""
        return [c for h in self.heads for c in (h.conv4, h.conv5)]

    def stain_heads(self) -> list[tuple[nn.Conv2d, nn.Conv2d]]:
        """Each stain's (Conv4, Conv5), in the network's stain order."""
        m = self.head_modules()
        return [(m[i], m[i + 1]) for i in range(0, len(m), 2)]

    def head_parameters(self):
        """Conv4 and Conv5 (of every stain): the layers transfer learning replaces."""
        return [p for m in self.head_modules() for p in m.parameters()]

    def reset_head(self) -> None:
        for m in self.head_modules():
            m.reset_parameters()

    def backbone(self, x: torch.Tensor) -> torch.Tensor:
        r2 = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        x = self.conv3_1(torch.relu(self.conv3(r2))) + r2
        for block in self.blocks:
            x = block(x)
        return torch.relu(x)

    def forward(self, x: torch.Tensor, with_scale: bool = False) -> torch.Tensor:
        x = self.backbone(x)
        mean = torch.cat([h(x) for h in self.heads], 1)
        if not (with_scale and self.aleatoric):
            return mean
        f = x.detach()  # the likelihood trains the scale head, never the map
        return torch.cat([mean, *(s(f) for s in self.scales)], 1)


def with_stains(base: MRHNet, base_stains: list[str], stains: list[str], kept: list[str]) -> MRHNet:
    """A network of ``stains`` on ``base``'s backbone (of ``base_stains``), with the heads of
    the stains in ``kept`` copied from it and the others as built (to be initialised)."""
    m = MRHNet(base.in_channels, base.depth, base.width, stains=stains)
    m.load_state_dict({k: v for k, v in base.state_dict().items() if not k.startswith("heads.")}, strict=False)
    old = dict(zip(base_stains, base.stain_heads(), strict=True))
    for t, head in zip(stains, m.stain_heads(), strict=True):
        if t in kept:
            for dst, src in zip(head, old[t], strict=True):
                dst.load_state_dict(src.state_dict())
    return m


class StainOutput(nn.Module):
    """One stain of a network (or of an ensemble's mean): ``[B, P, P]``."""

    def __init__(self, model: nn.Module, k: int):
        super().__init__()
        self.model, self.k, self.in_channels = model, int(k), model.in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[:, self.k]


class MRHEnsemble(nn.Module):
    """K MRH-Nets trained from different seeds and data orders, run side by side:
    ``[B, C, P, P] -> [B, K, T, P, P]``. Their mean is the prediction, their spread the
    uncertainty (a deep ensemble); training keeps each member a plain MRHNet."""

    def __init__(self, members: list[MRHNet]):
        super().__init__()
        if len(members) < 2:
            raise ValueError("an ensemble needs at least 2 members")
        if any(m.config != members[0].config for m in members):
            raise ValueError("ensemble members must share one architecture")
        self.members = nn.ModuleList(members)
        self.in_channels, self.depth, self.width = members[0].in_channels, members[0].depth, members[0].width
        self.stains, self.n_stains = members[0].stains, members[0].n_stains

    @property
    def config(self) -> dict:
        return self.members[0].config

    @property
    def aleatoric(self) -> bool:
        return self.members[0].aleatoric

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, K, V, P, P]``: V = the T stains, then (aleatoric members) their T log-scales."""
        return torch.stack([m(x, with_scale=True) for m in self.members], 1)


class MemberMean(nn.Module):
    """An ensemble as one network: the members' mean ``[B, T, P, P]`` (what its map is)."""

    def __init__(self, ensemble: MRHEnsemble):
        super().__init__()
        self.ensemble, self.in_channels = ensemble, ensemble.in_channels
        self.stains, self.n_stains = ensemble.stains, ensemble.n_stains

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ensemble(x)[:, :, : self.n_stains].mean(1)


def mean_and_spread(y: torch.Tensor, n_stains: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """An ensemble's output ``[B, K, V, P, P]`` -> (the members' mean ``[B, T, P, P]``, its
    standard deviation): V = T stains, or 2T with the members' log noise scales after them.

    The epistemic part is the members' variance (ddof 1) pooled over the whole output
    patch, the same at each of its P x P positions: the members' disagreement about the
    patch around a voxel. At one voxel alone it is a noisy estimate from K numbers; pooled
    over the patch it ranks the errors of a held-out brain about twice as well
    (Spearman 0.32-0.38 against 0.19, docs/uncertainty.md). With log-scales, the members'
    mean aleatoric variance (a Laplace b's: 2 b^2) is added at each voxel.
    """
    y = y.float()
    n_t = y.shape[2] if n_stains is None else int(n_stains)
    mu = y[:, :, :n_t]
    mean = mu.mean(1)
    var = mu.var(1, correction=1).mean((-2, -1), keepdim=True).expand_as(mean)
    if y.shape[2] > n_t:
        var = var + aleatoric_variance(y[:, :, n_t:]).mean(1)
    return mean, var.sqrt()


LOG_SCALE_RANGE = (-9.0, 6.0)  # a log noise scale kept finite (normalised stain units)


def aleatoric_variance(log_b: torch.Tensor) -> torch.Tensor:
    """The variance 2 b^2 of a Laplace of log-scale ``log_b``."""
    return 2.0 * torch.exp(2.0 * log_b.clamp(*LOG_SCALE_RANGE))


def laplace_nll(mean: torch.Tensor, log_b: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per element: log(2b) + |target - mean| / b, the Laplace negative log-likelihood."""
    log_b = log_b.clamp(*LOG_SCALE_RANGE)
    return log_b + (target - mean).abs() * torch.exp(-log_b) + 0.6931471805599453
