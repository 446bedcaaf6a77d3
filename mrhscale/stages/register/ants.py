"""ANTs (the optional ``antspyx`` extra): access, seeding, and the names of transforms, metrics and presets."""

from __future__ import annotations

import os

import numpy as np

from mrhscale._optional import get_ants
from mrhscale.errors import MRHError
from mrhscale.options import (
    REGISTRATION_INITS,
    REGISTRATION_METRICS,
    REGISTRATION_TRANSFORMS,
    RegistrationOptions,
)

MISSING_EXTRA = 'registration needs the optional extra: pip install "mrhscale[register]" (antspyx)'
TRANSFORMS = ("rigid", "affine", "syn")  # what each of REGISTRATION_TRANSFORMS (and aliases) is run as
ALIASES = {"affine+syn": "syn", "rigid+affine+syn": "syn", "syn": "syn", "rigid": "rigid",
            "affine": "affine"}
METRICS = REGISTRATION_METRICS
INITS = REGISTRATION_INITS
PRESETS = {
    # ANTs' own defaults (antsRegistration via antspyx): multi-resolution linear stage, then SyN.
    "default": {"aff_iterations": (2100, 1200, 1200, 10), "aff_shrink_factors": (6, 4, 2, 1),
                "aff_smoothing_sigmas": (3, 2, 1, 0), "reg_iterations": (40, 20, 0)},
    # Small grids and tests: fewer iterations, coarsest level 4x.
    "fast": {"aff_iterations": (300, 150, 50), "aff_shrink_factors": (4, 2, 1),
             "aff_smoothing_sigmas": (2, 1, 0), "reg_iterations": (30, 15, 0)},
}
TRANSFORM_DIR = "transforms"
TRANSFORM_JSON = "transform.json"
STAGING = "_staging"
FORMAT = "mrhscale-registration"
LPS = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS (ITK's physical space)




def ants_module(threads: int | None = None):
    """Import antspyx lazily; the one place a missing extra turns into a clear message."""
    if threads:
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(int(threads))
    return get_ants()


def set_seed(ants, seed: int | None) -> None:
    # antspyx passes --random-seed only through this module attribute (set_ants_deterministic
    # also forbids non-"Repro" transform types, which we do not want). ANTs takes seed 0 as
    # "seed from the clock": 0/None give runs that differ; any other value repeats exactly.
    try:
        ants.config._random_seed = None if seed is None else int(seed)
    except AttributeError:  # pragma: no cover - older antspyx
        pass


def canonical_transform(transform: str) -> str:
    t = ALIASES.get(str(transform).lower())
    if t is None:
        raise MRHError(f"--transform {transform!r}: choose {', '.join(REGISTRATION_TRANSFORMS)} "
                       "(syn = affine then SyN)")
    return t


def check_options(o: RegistrationOptions) -> dict:
    """The options' values checked; what a registration records of them (and reuse compares)."""
    transform = canonical_transform(o.transform)
    if o.metric not in REGISTRATION_METRICS:
        raise MRHError(f"--metric {o.metric!r}: choose one of {', '.join(REGISTRATION_METRICS)}")
    if o.init not in REGISTRATION_INITS:
        raise MRHError(f"--init {o.init!r}: choose com (align centres of mass first) or header")
    if o.threads is not None and int(o.threads) < 1:
        raise MRHError(f"--threads {o.threads}: must be >= 1")
    return {"transform": transform, "contrast": o.contrast, "metric": o.metric, "init": o.init,
            "preset": o.preset}
