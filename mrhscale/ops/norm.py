"""Input/target normalisation carried with patch stores and model bundles.

The original divided test inputs by the test data's own maximum, so one brain
scaled differently gave a different answer. Here the statistics are computed
once on the training split and travel with the model, so inference is
reproducible: ``x_norm = (x - offset[c]) / scale[c]`` per channel and
``t_norm = (t - target_offset) / target_scale`` for the stain.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from mrhscale.errors import MRHError

MODES = ("percentile", "global-max", "identity")


@dataclass
class Normalisation:
    mode: str
    offset: list[float]
    scale: list[float]
    target_offset: float = 0.0
    target_scale: float = 1.0
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.mode not in MODES:
            raise MRHError(f"unknown normalisation mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if len(self.offset) != len(self.scale):
            raise MRHError("normalisation offset and scale have different lengths")
        if any(not np.isfinite(s) or s <= 0 for s in self.scale) or not (
            np.isfinite(self.target_scale) and self.target_scale > 0
        ):
            raise MRHError("normalisation scales must be finite and positive")

    @property
    def n_channels(self) -> int:
        return len(self.scale)

    def input_arrays(self, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
        """(offset, 1/scale) as arrays, for a fused ``(x - o) * s`` in hot paths."""
        return np.asarray(self.offset, dtype), (1.0 / np.asarray(self.scale, np.float64)).astype(dtype)

    def apply_inputs(self, x: np.ndarray, channel_axis: int = -1) -> np.ndarray:
        """Normalise inputs whose channel axis is ``channel_axis`` (returns float32)."""
        off, inv = self.input_arrays()
        shape = [1] * x.ndim
        shape[channel_axis] = -1
        return (np.asarray(x, np.float32) - off.reshape(shape)) * inv.reshape(shape)

    def apply_target(self, t):
        return (t - self.target_offset) / self.target_scale

    def invert_target(self, t):
        return t * self.target_scale + self.target_offset

    def to_dict(self) -> dict:
        d = asdict(self)
        d["offset"] = [float(v) for v in self.offset]
        d["scale"] = [float(v) for v in self.scale]
        d["target_offset"] = float(self.target_offset)
        d["target_scale"] = float(self.target_scale)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Normalisation:
        try:
            return cls(
                mode=d["mode"],
                offset=list(d["offset"]),
                scale=list(d["scale"]),
                target_offset=float(d.get("target_offset", 0.0)),
                target_scale=float(d.get("target_scale", 1.0)),
                meta=dict(d.get("meta", {})),
            )
        except (KeyError, TypeError) as e:
            raise MRHError(f"malformed normalisation record: {e}") from None

    @classmethod
    def global_max(cls, n_channels: int, input_max: float, target_max: float = 1.0) -> Normalisation:
        """The original MRH-Net scaling: every input divided by one global maximum."""
        return cls("global-max", [0.0] * n_channels, [float(input_max)] * n_channels, 0.0, float(target_max))
