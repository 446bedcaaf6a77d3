"""Input/target normalisation carried with patch stores and model bundles.

The original divided test inputs by the test data's own maximum, so one brain
scaled differently gave a different answer. Here the statistics are computed
once on the training split and travel with the model, so inference is
reproducible: ``x_norm = (x - offset[c]) / scale[c]`` per channel and
``t_norm = (t - target_offset[k]) / target_scale[k]`` for stain ``k`` (the target
statistics are lists, one entry per stain; one stain is a list of one).

The per-subject modes instead scale every brain by its OWN statistics, inside
its mask, before the network sees it: ``subject-percentile`` maps each contrast's
0.5th..99.5th percentile to 0..1 (robust to a scanner's gain per contrast),
``subject-max`` divides every contrast by the brain's one maximum (the original's
test-time scaling). The statistics of every patch-store subject are stored with
the store (``subject_norm``) and a new brain's are computed at prediction, by the
same function (:func:`subject_stats`), so a training brain gets the same numbers
both times. The record then only names the mode; :meth:`Normalisation.for_subject`
makes the concrete one.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field

import numpy as np

from mrhscale.errors import MRHError

SUBJECT_MODES = ("subject-percentile", "subject-max")
MODES = ("percentile", "global-max", "identity", *SUBJECT_MODES)
PERCENTILES = (0.5, 99.5)  # robust range of a contrast: the global and the per-subject percentile modes
STAT_VOXELS = 1 << 20  # per-subject percentiles from at most about this many grid points (a lattice)


@dataclass
class Normalisation:
    mode: str
    offset: list[float]
    scale: list[float]
    target_offset: list[float] = field(default_factory=lambda: [0.0])
    target_scale: list[float] = field(default_factory=lambda: [1.0])
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.target_offset, self.target_scale = _floats(self.target_offset), _floats(self.target_scale)
        if self.mode not in MODES:
            raise MRHError(f"unknown normalisation mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if len(self.offset) != len(self.scale):
            raise MRHError("normalisation offset and scale have different lengths")
        t_off, t_scale = np.atleast_1d(self.target_offset), np.atleast_1d(self.target_scale)
        if any(not np.isfinite(s) or s <= 0 for s in self.scale) or not (
            np.isfinite(t_scale).all() and (t_scale > 0).all()
        ):
            raise MRHError("normalisation scales must be finite and positive")
        if len(t_off) != len(t_scale) or not len(t_scale):
            raise MRHError("normalisation target offset and scale have different lengths")

    @property
    def n_channels(self) -> int:
        return len(self.scale)

    @property
    def n_stains(self) -> int:
        """How many stains the target statistics are of."""
        return len(self.target_scale)

    def target_arrays(self, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
        """(target offset, target scale), one entry per stain."""
        return np.asarray(self.target_offset, dtype), np.asarray(self.target_scale, dtype)

    def stain(self, k: int) -> Normalisation:
        """This record with the target statistics of stain ``k`` alone."""
        return self.select_stains([k])

    def select_stains(self, idx: list[int]) -> Normalisation:
        """This record with the target statistics of stains ``idx`` (in that order)."""
        off, scale = (a[idx].astype(float).tolist() for a in self.target_arrays(np.float64))
        return Normalisation(self.mode, list(self.offset), list(self.scale), off, scale, dict(self.meta))

    @property
    def per_subject(self) -> bool:
        """True for a per-subject mode not yet made concrete for one subject."""
        return self.mode in SUBJECT_MODES and "subject" not in self.meta

    @classmethod
    def subject_mode(cls, mode: str, n_channels: int, target_offset: float, target_scale: float):
        """A per-subject record: the subject's own scaling, then nothing more."""
        if mode not in SUBJECT_MODES:
            raise MRHError(f"unknown per-subject normalisation {mode!r}; choose one of {', '.join(SUBJECT_MODES)}")
        return cls(mode, [0.0] * n_channels, [1.0] * n_channels, target_offset, target_scale,
                   meta={"percentiles": list(PERCENTILES), "within": "brain mask",
                         "statistics": "per subject (patch store attr subject_norm; at prediction "
                                       "computed from the subject)"})

    def for_subject(self, stats: dict) -> Normalisation:
        """The concrete normalisation of one subject from its :func:`subject_stats`
        (this record unchanged when it is not per subject)."""
        if not self.per_subject:
            return self
        got = stats.get(self.mode)
        if not got or len(got.get("scale", ())) != self.n_channels:
            raise MRHError(f"{self.mode} normalisation: the subject's statistics are missing or have "
                           f"another number of contrasts than the model's {self.n_channels}")
        o_s, s_s = np.asarray(got["offset"], np.float64), np.asarray(got["scale"], np.float64)
        off = o_s + s_s * np.asarray(self.offset, np.float64)
        scale = s_s * np.asarray(self.scale, np.float64)
        return Normalisation(self.mode, off.tolist(), scale.tolist(), self.target_offset, self.target_scale,
                             meta={**self.meta, "subject": got})

    def input_arrays(self, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
        """(offset, 1/scale) as arrays, for a fused ``(x - o) * s`` in hot paths."""
        if self.per_subject:
            raise MRHError(f"{self.mode} normalisation needs the subject's own statistics (for_subject)")
        return np.asarray(self.offset, dtype), (1.0 / np.asarray(self.scale, np.float64)).astype(dtype)

    def apply_inputs(self, x: np.ndarray, channel_axis: int = -1) -> np.ndarray:
        """Normalise inputs whose channel axis is ``channel_axis`` (returns float32)."""
        off, inv = self.input_arrays()
        shape = [1] * x.ndim
        shape[channel_axis] = -1
        return (np.asarray(x, np.float32) - off.reshape(shape)) * inv.reshape(shape)

    def apply_target(self, t, stain_axis: int = 1):
        """Stain units -> the network's; the stains lie along ``stain_axis``."""
        off, scale = self._target_shaped(t, stain_axis)
        return (t - off) / scale

    def invert_target(self, t, stain_axis: int = 1):
        """The network's units -> stain units; the stains lie along ``stain_axis``."""
        off, scale = self._target_shaped(t, stain_axis)
        return t * scale + off

    def _target_shaped(self, t, stain_axis: int):
        off, scale = self.target_arrays(np.float64)
        shape = [1] * t.ndim
        shape[stain_axis] = -1
        if hasattr(t, "new_tensor"):  # torch
            return t.new_tensor(off).reshape(shape), t.new_tensor(scale).reshape(shape)
        return off.reshape(shape), scale.reshape(shape)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["offset"] = [float(v) for v in self.offset]
        d["scale"] = [float(v) for v in self.scale]
        d["target_offset"], d["target_scale"] = list(self.target_offset), list(self.target_scale)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Normalisation:
        try:
            return cls(
                mode=d["mode"],
                offset=list(d["offset"]),
                scale=list(d["scale"]),
                target_offset=_floats(d.get("target_offset", 0.0)),
                target_scale=_floats(d.get("target_scale", 1.0)),
                meta=dict(d.get("meta", {})),
            )
        except (KeyError, TypeError) as e:
            raise MRHError(f"malformed normalisation record: {e}") from None

    @classmethod
    def global_max(cls, n_channels: int, input_max: float, target_max=1.0) -> Normalisation:
        """The original MRH-Net scaling: every input divided by one global maximum
        (``target_max``: one per stain)."""
        t_max = _floats(target_max)
        return cls("global-max", [0.0] * n_channels, [float(input_max)] * n_channels, [0.0] * len(t_max), t_max)


def _floats(v) -> list[float]:
    """One float per stain (a record made before stains were always a list holds a number)."""
    return [float(x) for x in np.atleast_1d(np.asarray(v, np.float64))]


# --------------------------------------------------------------------------- per-subject statistics
def robust_range(values: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(offset, scale) per channel: the PERCENTILES range of ``values`` along ``axis`` (NaN
    ignored); a range that is empty or not finite falls back to a scale of max(|offset|, 1)."""
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN channel
        lo, hi = np.nanpercentile(values, PERCENTILES, axis=axis)
    lo = np.where(np.isfinite(lo), lo, 0.0)
    scale = hi - lo
    bad = ~(np.isfinite(scale) & (scale > 0))
    scale[bad] = np.maximum(np.abs(lo[bad]), 1.0)
    return lo, scale


def lattice_step(shape) -> int:
    """The grid step that leaves at most about STAT_VOXELS points of a volume."""
    n = int(np.prod(shape))
    return max(1, int(np.ceil((n / STAT_VOXELS) ** (1 / 3))))


def subject_stats_graph(mri, mask):
    """Delayed :func:`subject_stats` of dask arrays ``mri`` (x, y, z, contrast) and ``mask``:
    the percentiles from a lattice of the brain, the maximum from every brain voxel."""
    import dask  # here, not at the top: bundles (io.bundle) load without Dask
    import dask.array as da

    k = lattice_step(mri.shape[:3])
    brain = mask.astype(bool)
    top = da.nanmax(da.where(brain[..., None], mri, -np.inf))
    return dask.delayed(stats_from)(mri[::k, ::k, ::k, :], brain[::k, ::k, ::k], top)


def subject_stats(mri, mask) -> dict:
    """One subject's own input statistics inside its brain mask (numpy arrays), computed
    here by the same graph as :func:`subject_stats_graph`."""
    import dask.array as da  # as above

    graph = subject_stats_graph(da.from_array(np.asarray(mri), chunks=(64, 64, 64, -1)),
                                da.from_array(np.asarray(mask), chunks=(64, 64, 64)))
    return graph.compute(scheduler="synchronous")


def graph_statistics(mri, mask, mode: str) -> dict[str, np.ndarray]:
    """The ``offset`` and ``scale`` inputs (float32 [contrast]) an exported per-subject graph
    (``mrhscale export``) takes for one brain: ``mri`` (x, y, z, contrast: the model's
    channels, in its order) and ``mask`` as numpy arrays, by :func:`subject_stats`, so the
    same numbers as predict's."""
    if mode not in SUBJECT_MODES:
        raise MRHError(f"normalisation {mode!r} takes no brain statistics; one of {', '.join(SUBJECT_MODES)} does")
    got = subject_stats(mri, mask)[mode]
    return {k: np.asarray(got[k], np.float32) for k in ("offset", "scale")}


def subject_normalisation(norm: Normalisation, mri, mask, compute=None) -> Normalisation:
    """``norm`` made concrete for one brain, ``mri`` (x, y, z, contrast: the model's channels,
    in its order) and ``mask``, dask or numpy: a per-subject mode takes the brain's own
    statistics inside its mask, as at training. ``compute`` runs the delayed statistics
    (a Runner's, on the cluster; default: here)."""
    if not norm.per_subject:
        return norm
    import dask.array as da  # here, not at the top: bundles (io.bundle) load without Dask

    if not hasattr(mri, "dask"):
        mri, mask = da.from_array(mri, chunks=(64, 64, 64, -1)), da.from_array(mask, chunks=(64, 64, 64))
    graph = subject_stats_graph(mri, mask)
    return norm.for_subject(compute(graph) if compute else graph.compute(scheduler="synchronous"))


def stats_from(lattice: np.ndarray, brain: np.ndarray, top: float) -> dict:
    """{mode: {offset, scale}} for the per-subject modes, from the brain's lattice points."""
    v = np.asarray(lattice, np.float64)[np.asarray(brain, bool)]
    if not len(v):
        raise MRHError("per-subject normalisation: the brain mask is empty")
    lo, scale = robust_range(v, axis=0)
    top = float(top) if np.isfinite(top) and top > 0 else 1.0
    n_c = v.shape[1]
    return {"subject-percentile": {"offset": lo.tolist(), "scale": scale.tolist()},
            "subject-max": {"offset": [0.0] * n_c, "scale": [top] * n_c},
            "voxels": int(len(v))}
