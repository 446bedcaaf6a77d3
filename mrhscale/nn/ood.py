"""The out-of-distribution score on the network's device (``ops.ood`` fits it and says why).

Predict runs it on the same normalised patches the network gets, so the CPU only reads and
writes: one C x C matrix product per voxel, next to the network's ~9 MFLOP.
"""

from __future__ import annotations

import torch
from torch import nn


class InputDistance(nn.Module):
    """``[B, C, P, P]`` normalised patches -> ``[B, 1, P, P]`` the score of each patch's
    in-plane mean (the same at its P x P positions), fp32 whatever the patches are in."""

    def __init__(self, mean, whiten, scale: float):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("whiten", torch.as_tensor(whiten, dtype=torch.float32))
        self.scale = float(scale)

    @classmethod
    def from_record(cls, record: dict) -> InputDistance:
        return cls(record["mean"], record["whiten"], record["scale"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.float().mean((-2, -1))
        d = ((m - self.mean) @ self.whiten).square().mean(1).sqrt() / self.scale
        return d[:, None, None, None].expand(-1, 1, *x.shape[-2:])
