"""Training-time augmentation: cheap, vectorised per batch, reproducible from the seed.

A step's draws are made for its whole GLOBAL batch from a generator seeded by (run
seed, epoch, step), and each rank takes the rows of its slice: a sample is augmented
the same way whatever the number of processes or loaders, and a resumed run augments
every batch exactly as the uninterrupted one did. Inputs are the normalised patches ``x[B, C, P, P]`` and targets ``t[B, P, P]``:

- ``gain``: per patch and contrast, x *= exp(N(0, 0.1)) (a scanner's per-contrast gain);
- ``offset``: per patch and contrast, x += N(0, 0.05) (normalised units);
- ``bias``: per patch, x *= 1 + a u + b v over the patch's in-plane coordinates u, v in
  [-1, 1], a, b ~ U(-0.1, 0.1) (a coil-sensitivity gradient across the patch);
- ``noise``: x += N(0, 0.03) per value;
- ``flip``: one of the 8 in-plane flips/90-degree rotations per patch, the SAME one
  applied to its target (the network is patch-wise, so the stain rotates with the MRI).

Only training batches are augmented; validation, prediction and evaluation are not.
"""

from __future__ import annotations

import torch

from mrhscale.errors import MRHError
from mrhscale.ops.symmetry import dihedral

AUGMENTATIONS = ("gain", "offset", "bias", "noise", "flip")
STRENGTH = {"gain": 0.1, "offset": 0.05, "bias": 0.1, "noise": 0.03}


def parse(spec: str | None) -> tuple[str, ...]:
    """``"gain,flip"`` -> ("gain", "flip") in canonical order; ``"all"``; "" or None: none."""
    if not spec:
        return ()
    names = AUGMENTATIONS if spec.strip() == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in AUGMENTATIONS]
    if bad:
        raise MRHError(f"--augment {spec}: unknown {', '.join(bad)}; choose from {', '.join(AUGMENTATIONS)} "
                       "(comma-separated) or all")
    return tuple(a for a in AUGMENTATIONS if a in names)


class Augment:
    """The run's augmentation: ``kinds`` (see ``parse``) drawn from (seed, epoch, step) for
    the global batch of ``world`` ranks' equal batches; rank ``rank`` takes its slice."""

    def __init__(self, kinds: tuple[str, ...], seed: int, rank: int = 0, world: int = 1):
        self.kinds, self.seed, self.rank, self.world = tuple(kinds), int(seed), int(rank), int(world)

    def __bool__(self) -> bool:
        return bool(self.kinds)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, epoch: int, step: int):
        g = torch.Generator().manual_seed(hash((self.seed, epoch, step, 0)) & (2**63 - 1))
        B, C, P, _ = x.shape
        rows = slice(self.rank * B, (self.rank + 1) * B)  # this rank's slice of the global batch

        def draw(*shape, uniform=False):  # ``shape`` per sample of the global batch: this rank's rows
            shape = (B * self.world, *shape)
            v = torch.rand(shape, generator=g) * 2 - 1 if uniform else torch.randn(shape, generator=g)
            return v[rows].to(x.device)

        if "gain" in self.kinds:
            x = x * torch.exp(STRENGTH["gain"] * draw(C, 1, 1))
        if "offset" in self.kinds:
            x = x + STRENGTH["offset"] * draw(C, 1, 1)
        if "bias" in self.kinds:
            u = torch.linspace(-1, 1, P, device=x.device)
            a, b = STRENGTH["bias"] * draw(1, 1, 1, uniform=True), STRENGTH["bias"] * draw(1, 1, 1, uniform=True)
            x = x * (1 + a * u.view(1, 1, P, 1) + b * u.view(1, 1, 1, P))
        if "noise" in self.kinds:
            x = x + STRENGTH["noise"] * draw(C, P, P)
        if "flip" in self.kinds:
            x, t = self._flip(x, t, torch.randint(0, 8, (B * self.world,), generator=g)[rows].to(x.device))
        return x, t

    @staticmethod
    def _flip(x, t, k):
        x, t = x.clone(), t.clone()
        for i in range(1, 8):
            sel = k == i
            if bool(sel.any()):
                x[sel], t[sel] = dihedral(x[sel], i), dihedral(t[sel], i)
        return x, t
