"""Scanner variation: what changes between scan days, coils and scanners while the brain,
and so every stain and label (the ground truth), stays the same.

A subject made with a ``Scanner`` gets, on top of the cohort's usual per-subject
gain, group gains and noise levels (docs/synthetic.md):

- ``volume_gain``: a gain per MRI volume (receiver and calibration drift, per contrast),
  applied to the magnitude image after the noise, as a receiver gain is;
- ``bias``: a smooth multiplicative field (coil sensitivity) of a few mm wavelength;
- ``noise_scale``: the noise level relative to the cohort's (a lower or higher SNR);
- ``b_scale``: effective b-values relative to the nominal ones the files record
  (gradient calibration);
- ``te_scale``: effective echo times relative to the protocol's (a sequence or
  vendor difference), which shifts every T2-weighted contrast.

All draws come from the subject's own "scanner" random stream: a subject made
without variation is byte-identical to one made before this module existed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# How much each knob varies (documented in docs/synthetic.md, "Scanner variation").
VOLUME_GAIN_SD = 0.08  # log-normal sd of the per-volume gain
GROUP_GAIN_SD = 0.15  # log-normal sd shared by the volumes of one contrast group
BIAS_AMPLITUDE = 0.25  # peak relative amplitude of the coil-sensitivity field
BIAS_WAVELENGTH_MM = 2.5
NOISE_SCALE = (0.6, 1.8)  # uniform range of the noise-level factor
B_SCALE = 0.04  # effective b = nominal x U(1 - B_SCALE, 1 + B_SCALE)
TE_SCALE = 0.08  # effective TE = protocol x U(1 - TE_SCALE, 1 + TE_SCALE)


@dataclass
class Scanner:
    """One subject's scanner; the identity (no variation) by default."""

    volume_gain: dict[str, np.ndarray] = field(default_factory=dict)  # group -> (volumes,)
    bias: np.ndarray | None = None  # (X, Y, Z) float32 around 1
    noise_scale: float = 1.0
    b_scale: float = 1.0
    te_scale: float = 1.0

    def params(self) -> dict:
        """What the manifest's notes record about it (the field itself is not stored)."""
        return {"volume_gain": {g: [round(float(v), 4) for v in a] for g, a in self.volume_gain.items()},
                "bias_range": ([round(float(self.bias.min()), 4), round(float(self.bias.max()), 4)]
                               if self.bias is not None else None),
                "noise_scale": round(self.noise_scale, 4), "b_scale": round(self.b_scale, 4),
                "te_scale": round(self.te_scale, 4)}


def draw_scanner(rng: np.random.Generator, volumes: dict[str, int], smooth_field) -> Scanner:
    """A random scanner for groups of ``volumes`` (group -> number of volumes);
    ``smooth_field(rng, spacing_mm)`` gives one smooth zero-mean field on the subject's grid."""
    gains = {g: np.exp(rng.normal(0.0, GROUP_GAIN_SD) + rng.normal(0.0, VOLUME_GAIN_SD, n)).astype(np.float32)
             for g, n in volumes.items()}
    f = smooth_field(rng, BIAS_WAVELENGTH_MM)
    f = f / max(float(np.abs(f).max()), 1e-6)
    return Scanner(volume_gain=gains, bias=(1.0 + BIAS_AMPLITUDE * f).astype(np.float32),
                   noise_scale=float(rng.uniform(*NOISE_SCALE)),
                   b_scale=float(rng.uniform(1 - B_SCALE, 1 + B_SCALE)),
                   te_scale=float(rng.uniform(1 - TE_SCALE, 1 + TE_SCALE)))
