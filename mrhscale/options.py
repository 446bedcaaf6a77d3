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

from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from typing import Any

from mrhscale.errors import MRHError

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
    threads: int | None = option(None, "ITK threads per subject task (default: 1 per subject of a cohort, "
                                       "ITK's own (every core) for one histology volume).")
    seed: int | None = option(1, "Seed of ANTs' sampling (None: ANTs' own, not reproducible).", cli=False)

    @property
    def preset(self) -> str:
        return "fast" if self.fast else "default"


# ---- patches ----
def parse_slices(slices) -> tuple[int | None, int | None] | None:
    """--slices A:B (half-open, 0-based; either end may be left out) as a pair, None for all."""
    if slices is None or slices == "" or slices == "auto":
        return None
    if isinstance(slices, str):
        try:
            a, b = slices.split(":")
            return (int(a) if a.strip() else None, int(b) if b.strip() else None)
        except ValueError:
            raise MRHError(f"--slices: expected A:B (half-open, 0-based), got {slices!r}") from None
    a, b = slices
    return (None if a is None else int(a), None if b is None else int(b))


@dataclass
class PatchOptions:
    """The sampling rules and the output layout of one extraction (docs/patches.md)."""

    half: int = option(1, "Patch is (2H+1)x(2H+1) in-plane.")
    stride: int = option(6, "In-plane grid stride.")
    slices: tuple | None = option(None, "Half-open 0-based slice range along --axis (default: slices where the "
                                        "target has data).", metavar="A:B")
    axis: str = option("y", "Slice axis; patches lie in the plane of the two others.", choices=AXES)
    min_label_sum: float = option(30, "Keep a sample only if its label patch sums to at least this (raw target "
                                      "units).")
    min_label_nonzero: int = option(4, "Keep a sample only if at least this many label voxels are nonzero.")
    val_fraction: float = option(0.0, "Random fraction of samples held out for validation.")
    val_subjects: list[str] = option(help="Subjects held out whole for validation.", default_factory=list)
    seed: int = option(0, "Seed of split and shuffle.")
    stats: str = option("percentile", "Input statistics stored with the patches (global-max = original).",
                        choices=PATCH_STATS, renamed=("--norm",))
    dtype: str = option("float32", "Data type of the stored input patches.", choices=PATCH_DTYPES)
    chunk_size: int | None = option(None, "Patches per output chunk (default ~8 MB).")
    compress: bool = option(False, "Blosc lz4 on the patch arrays (smaller; MRI floats shrink little, "
                                   "streaming slower).")

    def __post_init__(self):
        self.slices = parse_slices(self.slices)
        self.val_subjects = list(dict.fromkeys(self.val_subjects or []))

    @property
    def size(self) -> int:
        return 2 * self.half + 1

    def record(self) -> dict:
        """The options as the patch store records them (``made_by``, provenance). ``stats`` keeps
        the key it had before its rename, ``norm``: stores made before are recognised as the same."""
        d = asdict(self)
        d["norm"] = d.pop("stats")
        d["slices"] = None if self.slices is None else list(self.slices)
        d["val_subjects"] = sorted(self.val_subjects)
        return d


# ---- evaluate ----
@dataclass(frozen=True)
class EvaluateOptions:
    """The evaluation's sampling and figures (rarely changed)."""

    max_pool: int = option(2_000_000, "Voxels pooled over all subjects for Spearman and ROC (a uniform sample, "
                                      "at least 10,000 per subject).", cli=False)
    seed: int = option(0, "Seed of the pooled voxel sample.", cli=False)
    montage_subjects: int = option(3, "Subjects shown as slice montages.", cli=False)


# ---- synth ----
@dataclass(frozen=True)
class SynthVariation:
    """What differs between the synthetic subjects besides their anatomy (docs/synthetic.md)."""

    lesions: bool = option(True, "Demyelinating lesions in every other subject (s01, s03, ...); every subject "
                                 "still gets a (possibly empty) lesion label.", flag="--lesions/--no-lesions")
    scanner_variation: Any = option(
        None, "Scan these subjects (or all) on their own scanner: per-volume gains, a coil field, SNR, b-value "
              "and echo-time shifts; the ground truth does not change.", metavar="all|ID,...")
    artefact: Any = option(
        None, "Give these subjects (or all) a field-of-view artefact: a region whose contrasts are unlike any "
              "tissue, stains unchanged, marked by an `artefact` label.", metavar="all|ID,...")
