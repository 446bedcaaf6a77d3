"""MRH-Net: the original MATLAB graph as a plain ``torch.nn.Module``.

Layer names follow the original DAGNetwork (Conv1, Conv2, Conv3, Conv3_1, the
residual blocks, Conv4, Conv5) so imported MATLAB weights map one to one.
No batch norm, no dropout, no input normalisation layer: normalisation lives
in the model bundle, not in the graph.
"""

from __future__ import annotations

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


class MRHNet(nn.Module):
    """MRH-Net on (2h+1)x(2h+1) patches: ``[B, C, P, P] -> [B, P, P]``.

    ``depth`` is the number of residual blocks. The published MATLAB files
    named "5layer", "10layer", "30layer" hold depth 4, 9 and 29 respectively.
    """

    def __init__(self, in_channels: int, depth: int = 5, width: int = 64):
        super().__init__()
        if in_channels < 1 or depth < 0 or width < 1:
            raise ValueError(f"bad MRHNet config: in_channels={in_channels}, depth={depth}, width={width}")
        self.in_channels, self.depth, self.width = int(in_channels), int(depth), int(width)
        self.conv1 = _conv(in_channels, width)
        self.conv2 = _conv(width, width)
        self.conv3 = _conv(width, width)
        self.conv3_1 = _conv(width, width)
        self.blocks = nn.ModuleList(ResidualBlock(width) for _ in range(depth))
        self.conv4 = _conv(width, width)
        self.conv5 = _conv(width, 1)

    @property
    def config(self) -> dict:
        return {"in_channels": self.in_channels, "depth": self.depth, "width": self.width}

    def head_parameters(self):
        """Conv4 and Conv5: the layers transfer learning replaces."""
        return [*self.conv4.parameters(), *self.conv5.parameters()]

    def reset_head(self) -> None:
        self.conv4.reset_parameters()
        self.conv5.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r2 = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        x = self.conv3_1(torch.relu(self.conv3(r2))) + r2
        for block in self.blocks:
            x = block(x)
        x = self.conv5(torch.relu(self.conv4(torch.relu(x))))
        return x[:, 0]


class MRHEnsemble(nn.Module):
    """K MRH-Nets trained from different seeds and data orders, run side by side:
    ``[B, C, P, P] -> [B, K, P, P]``. Their mean is the prediction, their spread the
    uncertainty (a deep ensemble); training keeps each member a plain MRHNet."""

    def __init__(self, members: list[MRHNet]):
        super().__init__()
        if len(members) < 2:
            raise ValueError("an ensemble needs at least 2 members")
        if len({tuple(m.config.items()) for m in members}) != 1:
            raise ValueError("ensemble members must share one architecture")
        self.members = nn.ModuleList(members)
        self.in_channels, self.depth, self.width = members[0].in_channels, members[0].depth, members[0].width

    @property
    def config(self) -> dict:
        return self.members[0].config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members], 1)


class MemberMean(nn.Module):
    """An ensemble as one network: the members' mean ``[B, P, P]`` (what its map is)."""

    def __init__(self, ensemble: MRHEnsemble):
        super().__init__()
        self.ensemble, self.in_channels = ensemble, ensemble.in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ensemble(x).mean(1)


def mean_and_spread(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An ensemble's output ``[B, K, P, P]`` -> (the members' mean ``[B, P, P]``, their spread).

    The spread is the members' standard deviation (ddof 1) pooled over the whole output
    patch, the same at each of its P x P positions: the members' disagreement about the
    patch around a voxel. At one voxel alone it is a noisy estimate from K numbers; pooled
    over the patch it ranks the errors of a held-out brain about twice as well
    (Spearman 0.32-0.38 against 0.19, docs/uncertainty.md).
    """
    y = y.float()
    var = y.var(1, correction=1).mean((-2, -1), keepdim=True)
    return y.mean(1), var.sqrt().expand(-1, *y.shape[-2:])
