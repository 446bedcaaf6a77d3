"""The 8 in-plane symmetries of a square patch (quarter turns, and each flipped): training
augmentation (training/augment.py) and test-time augmentation (predict --tta) share them."""

from __future__ import annotations

import torch

N_SYMMETRIES = 8


def dihedral(x: torch.Tensor, k: int, inverse: bool = False) -> torch.Tensor:
    """The k-th symmetry of the last two dims (k % 4 quarter turns, then a flip if k >= 4),
    or its inverse: ``dihedral(dihedral(x, k), k, inverse=True) == x``."""
    r, f = k % 4, k >= 4
    if inverse:
        return torch.rot90(x.flip(-1) if f else x, -r, (-2, -1))
    x = torch.rot90(x, r, (-2, -1))
    return x.flip(-1) if f else x


def symmetric_mean(model, x: torch.Tensor) -> torch.Tensor:
    """Test-time augmentation: the mean of ``model`` over the 8 symmetries of the patches
    ``x[B, C, P, P]``, each output (its last two axes in-plane) turned back before averaging."""
    acc = model(x).float()
    for k in range(1, N_SYMMETRIES):
        acc += dihedral(model(dihedral(x, k).contiguous()).float(), k, inverse=True)  # one layout: no recompile
    return acc / N_SYMMETRIES
