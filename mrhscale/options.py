"""Every option of mrhscale, once: its name, type, default, choices and help.

The library's option dataclasses below are the table: a stage takes one of them
(``predict(..., options=PredictOptions(batch_size=8192))``) and the CLI builds its
click options from their fields (``mrhscale.cli.options``), so a default or a list
of choices is stated here and nowhere else. Importable without torch, Dask or zarr.

A field's metadata holds its help text and, where the CLI spelling differs from
``--field-name``, its flag; ``renamed`` lists old spellings, which the CLI refuses
with one line naming the new one.
"""

from __future__ import annotations

from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

# ---- vocabularies (one tuple each; the library validates against these) ----
AXES = ("x", "y", "z")
PRECISIONS = ("auto", "fp32", "bf16")
COMPILE_MODES = ("auto", "on", "off")
AGGREGATES = ("centre", "mean")
PATCH_STATS = ("percentile", "global-max")
PATCH_DTYPES = ("float32", "float16")
COMPRESSIONS = ("zstd", "lz4", "lz4hc", "zlib", "blosclz")
REGISTRATION_TRANSFORMS = ("rigid", "affine", "syn", "affine+syn")
REGISTRATION_METRICS = ("mattes", "cc", "meansquares")
REGISTRATION_INITS = ("com", "header")
SYNTH_FORMATS = ("nii.gz", "nii", "analyze")
EXPORT_FORMATS = ("onnx", "pt2")


def option(default: Any = MISSING, help: str = "", *, flag: str | None = None, short: str | None = None,
           choices: tuple | None = None, metavar: str | None = None, renamed: tuple[str, ...] = (),
           default_factory: Any = MISSING, cli: bool = True) -> Any:
    """A dataclass field that is also a documented option (see the module docstring)."""
    meta = {"help": help, "flag": flag, "short": short, "choices": choices, "metavar": metavar,
            "renamed": renamed, "cli": cli}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def option_fields(cls) -> list[Field]:
    """The fields of an options dataclass that the CLI shows."""
    return [f for f in fields(cls) if f.metadata.get("cli", True)]


def flag_of(f: Field) -> str:
    """The CLI spelling of a field: its metadata's flag, else --field-name."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


# ---- numerics: how a network computes (predict, importance, training) ----
@dataclass(frozen=True)
class Numerics:
    """The arithmetic requested for a network; resolved per device by ``nn.accel``."""

    precision: str = option(
        "auto", "Arithmetic of the network: auto = bf16 where the CPU/GPU has bf16 matrix units "
        "(training: where measured faster), else fp32 ($MRHSCALE_PRECISION overrides auto). "
        "See docs/precision.md.", choices=PRECISIONS)
    compile: str = option(
        "auto", "torch.compile the network: auto = where a working compiler is found (training: where "
        "measured faster) ($MRHSCALE_COMPILE overrides auto).", choices=COMPILE_MODES)


# ---- predict ----
@dataclass(frozen=True)
class PredictOptions:
    """How predict computes each voxel's value (not where it writes: see predict's outputs)."""

    batch_size: int = option(4096, "Patches per forward pass.")
    aggregate: str = option(
        "centre", "centre: the network's centre output per voxel (as the original); mean: average of all "
        "overlapping PxP outputs.", choices=AGGREGATES)
    tta: bool = option(False, "Test-time augmentation: average the network over each patch's 8 in-plane "
                              "flips and quarter turns (8x the compute).")
    numerics: Numerics = option(default_factory=Numerics, cli=False)
    torch_threads: int | None = option(None, "Torch threads per worker (default: the cores each worker has).",
                                       cli=False)


# ---- register ----
@dataclass(frozen=True)
class RegistrationOptions:
    """How one moving image is registered to the reference (ANTs)."""

    transform: str = option("affine+syn", "syn = affine+syn: an affine stage, then SyN (deformable).",
                            choices=REGISTRATION_TRANSFORMS)
    contrast: str = option("fa", "Contrast that drives the registration: fa, a channel (e.g. dwi2000_0, a b0), "
                                 "t2, mask.")
    metric: str = option("mattes", "ANTs similarity metric (mattes = mutual information).",
                         choices=REGISTRATION_METRICS)
    init: str = option("com", "com: align centres of mass first; header: trust the headers' world coordinates.",
                       choices=REGISTRATION_INITS)
    fast: bool = option(False, "Fewer iterations (small grids, previews).")
    threads: int = option(1, "ITK threads per subject task.")
    seed: int | None = option(1, "Seed of ANTs' sampling (None: ANTs' own, not reproducible).", cli=False)

    @property
    def preset(self) -> str:
        return "fast" if self.fast else "default"


# ---- importance ----
@dataclass(frozen=True)
class ImportanceOptions:
    """Which patches importance permutes and how often (the network's numerics and batch: PredictOptions)."""

    split: str = option("val", "Patch split to permute (val or train).")
    repeats: int = option(3, "Permutations per channel/group.")
    seed: int = option(0, "Seed of the sample and the permutations.")
    max_patches: int = option(10000, "Random subset size.")
    stain: str | None = option(None, "For a network of several stains: the stain scored (default: its first that "
                                     "PATCHES has).")
