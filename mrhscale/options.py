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
PATCH_CODECS = ("none", "lz4", "zstd")
CACHE_MODES = ("auto", "on", "off")
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


# below these a registration counts as not converged: |Pearson r| of the registered contrast
# with a cohort's reference; normalised mutual information of a stain with its MRI
COHORT_MIN_SIMILARITY = 0.4
HISTOLOGY_MIN_SIMILARITY = 0.1


# ---- ingest ----
@dataclass(frozen=True)
class IngestOptions:
    """How a cohort's files become a Zarr store."""

    chunks: tuple[int, int, int] = option((64, 32, 64), "Largest spatial chunk X,Y,Z, each axis cut evenly (all contrasts per chunk).",
                                          metavar="X,Y,Z")
    compression: str = option("zstd", "Blosc codec.", choices=COMPRESSIONS)
    clevel: int = option(3, "Blosc compression level.", cli=False)
    checksums: bool = option(True, "sha256 of every source file (--no-checksums: faster on huge cohorts).",
                             flag="--checksums/--no-checksums")
    skip_bad: bool = option(False, "Ingest the good subjects and list the bad ones instead of stopping.")


# ---- synth ----
@dataclass(frozen=True)
class CohortOptions:
    """A synthetic cohort's size and format (what differs between its subjects: SynthVariation)."""

    n_subjects: int = option(4, "Number of subjects.", short="-n", renamed=("--subjects",))
    shape: tuple[int, int, int] = option((48, 32, 64), "Grid size (each >= 8); 200,128,280 is the real data's "
                                         "grid (0.06 mm voxels).", metavar="X,Y,Z")
    seed: int = option(0, "Same seed, same cohort.")
    fmt: str = option("nii.gz", "File format (nii is fastest at full size).", flag="--format",
                      choices=SYNTH_FORMATS)
    inverted_mask: bool = option(False, "Write masks as the original does: 1 OUTSIDE the brain.")


# ---- importance ----
@dataclass(frozen=True)
class ImportanceOptions:
    """Permutation importance: which patches, how many shuffles."""

    split: str = option("val", "Patch split to permute.", choices=("val", "train"))
    repeats: int = option(3, "Permutations per channel/group.")
    max_patches: int = option(10_000, "Random subset size.")
    seed: int = option(0, "Seed of the subset and the permutations.")
    stain: str | None = option(None, "For a network of several stains: the stain scored (default: its first "
                                     "that PATCHES has).")


# ---- info ----
@dataclass(frozen=True)
class InfoOptions:
    """What ``info`` prints for a model bundle."""

    card: bool = option(False, "For a model bundle: its model card (Markdown: stains, inputs, recipe, training "
                               "data, validation, intended use, limits; docs/model-card.md).")
    as_json: bool = option(False, "With --card: the card as JSON.", flag="--json")


# ---- import-matlab / export ----
@dataclass(frozen=True)
class MatlabImportOptions:
    """What a MATLAB network file does not say about how it was trained."""

    channels: str | None = option(
        None, "Input channel names in training order: a file (one per line) or comma-separated. Default for 67 "
        "channels: the original's order (dwi2000 x34, dwi5000 x30, t2, mt_off, mt_on).", metavar="FILE|NAMES")
    input_scale: str = option(
        "subject-max", "Input scaling (the file does not hold it): subject-max divides each brain by its own "
        "maximum, as the original's testing (MRH_testing); global-max=VALUE by one fixed maximum (the "
        "original's training inputs'); identity: inputs already scaled.",
        metavar="subject-max|global-max=VALUE|identity", renamed=("--norm",))
    target_max: float = option(1.0, "Global maximum the training labels were divided by; outputs x this = raw "
                                    "stain units (1: keep the network's own units).")
    target: str | None = option(None, "Stain name (default: from the file name: Fluo/AF->af, NF, MBP, Nissl).")
    patch_axis: str = option("y", "Slice axis: patches lie in the plane of the two other axes (original: y).",
                             choices=AXES)
    allow_renamed: bool = option(False, "Accept the MRH-Net structure under other layer names.")


@dataclass(frozen=True)
class ExportOptions:
    fmt: str = option("onnx", "onnx (onnxruntime and other runtimes) or pt2 (torch.export.load).",
                      flag="--format", choices=EXPORT_FORMATS)
    opset: int | None = option(None, "ONNX opset (default: the exporter's).")


# ---- export-image ----
@dataclass(frozen=True)
class ImageOptions:
    contrast: str | None = option(None, "Contrast of --var mri (e.g. t2).")
    levels: int = option(3, "Resolution levels; each halves every axis (block mean; masks: block majority).")


# ---- training: every field None = the recipe's value (RECIPES) ----
LOSSES = ("matlab", "mse", "centre-mse")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("piecewise", "cosine")
INITS = ("glorot", "torch")
INPUT_NORMS = ("global", "subject-percentile", "subject-max")  # ops/norm.py
AUGMENTATIONS = ("gain", "offset", "bias", "noise", "flip")
CALIBRATION_MODES = ("conformal", "risk")  # stages/calibrate.py; risk: ops/risk.py

# Named presets of the settings that decide speed, convergence and transfer to a new brain;
# explicit options override them. "paper" is MRH_training.m exactly (and TrainConfig's
# defaults); "robust", the default, is what the recipe study found transfers best to a
# brain from another scanner (docs/recipes.md); "fast" is tuned for CPUs (docs/training.md).
RECIPES: dict[str, dict] = {
    "paper": {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4,
              "schedule": "piecewise", "drop_period": 10, "drop_factor": 0.1, "batch_size": 128,
              "epochs": 30, "clip": 0.01, "loss": "matlab", "init": "glorot", "val_patches": None,
              "augment": "", "norm": "global"},
    # each brain scaled by its own robust range, AdamW + cosine, in-plane flips: +0.092 mean
    # held-out Pearson r over "paper" on a scanner-varied cohort at the paper's budget,
    # every subject better by 0.066 or more (docs/recipes.md)
    "robust": {"optimizer": "adamw", "lr": 2e-3, "momentum": 0.9, "weight_decay": 1e-4,
               "schedule": "cosine", "drop_period": 10, "drop_factor": 0.1, "batch_size": 128,
               "epochs": 30, "clip": 0.0, "loss": "matlab", "init": "glorot", "val_patches": None,
               "augment": "flip", "norm": "subject-percentile"},
    # Adam's per-parameter step sizes make clipping unnecessary; per-epoch validation on
    # a fixed 8192-patch subset (the last epoch: the whole split); robust's normalisation
    "fast": {"optimizer": "adamw", "lr": 2e-3, "momentum": 0.9, "weight_decay": 1e-4,
             "schedule": "cosine", "drop_period": 10, "drop_factor": 0.1, "batch_size": 256,
             "epochs": 6, "clip": 0.0, "loss": "matlab", "init": "glorot", "val_patches": 8192,
             "augment": "", "norm": "subject-percentile"},
}
DEFAULT_RECIPE = "robust"
DEFAULT_LR = {"sgd": 0.1, "adamw": 1e-3}  # an optimiser chosen without --lr starts here
FINETUNE_DEFAULTS = {"lr": 1e-4, "head_lr_factor": 10.0, "freeze_backbone": False}


def recipe_values(name: str) -> str:
    """'[robust: a; paper: b; fast: c]' for a recipe setting (the default recipe first)."""
    order = [DEFAULT_RECIPE, *(r for r in RECIPES if r != DEFAULT_RECIPE)]
    vals = [(r, RECIPES[r][name]) for r in order]
    if len({repr(v) for _, v in vals}) == 1:
        return f"[{_shown(vals[0][1])}]"
    return "[" + "; ".join(f"{r}: {_shown(v)}" for r, v in vals) + "]"


def _shown(v) -> str:
    return "none" if v in (None, "") else f"{v:g}" if isinstance(v, float) else str(v)


@dataclass(frozen=True)
class TrainingOptions:
    """What a run learns and how (TrainConfig's settings); None = the --recipe's value."""

    recipe: str | None = option(None, "Preset of optimiser, schedule, lr, batch, epochs, normalisation, "
                                "augmentation: robust (transfers best to a new scanner, docs/recipes.md), paper "
                                "(MRH_training.m exactly) or fast (tuned for CPUs); explicit options override it "
                                f"[{DEFAULT_RECIPE}].", choices=tuple(RECIPES))
    epochs: int | None = option(None, "Epochs " + recipe_values("epochs") + ".")
    batch_size: int | None = option(None, "GLOBAL mini-batch, split over torchrun processes "
                                    + recipe_values("batch_size") + ".")
    lr: float | None = option(None, "Initial learning rate " + recipe_values("lr") + "; another optimiser "
                              "without --lr starts at its own (sgd 0.1, adamw 1e-3); finetune: 1e-4.")
    optimizer: str | None = option(None, recipe_values("optimizer") + " (sgd: momentum 0.9).",
                                   choices=OPTIMIZERS)
    schedule: str | None = option(None, "piecewise: x drop-factor every drop-period epochs "
                                  + recipe_values("schedule") + ".", choices=SCHEDULES)
    drop_period: int | None = option(None, "Piecewise schedule period " + recipe_values("drop_period") + ".")
    drop_factor: float | None = option(None, "Piecewise schedule factor " + recipe_values("drop_factor") + ".")
    loss: str | None = option(None, "matlab: 0.5*sum of squared errors over the PxP outputs, batch mean (the "
                              "scale lr 0.1 and clip 0.01 were tuned for) " + recipe_values("loss") + ".",
                              choices=LOSSES)
    clip: float | None = option(None, "Gradient L2-norm threshold per parameter tensor; 0 = off "
                                + recipe_values("clip") + ".")
    weight_decay: float | None = option(None, "L2 on weights, not biases " + recipe_values("weight_decay") + ".")
    init: str | None = option(None, "Weight init of new layers " + recipe_values("init") + ".", choices=INITS)
    seed: int | None = option(None, "Seed of init and data order [0].")
    augment: str | None = option(None, "Training-time augmentation, comma-separated: " + ", ".join(AUGMENTATIONS)
                                 + ", or all (docs/training.md) " + recipe_values("augment") + ".",
                                 metavar="LIST")
    val_patches: int | None = option(None, "Validate on this fixed subset each epoch; the last epoch always on "
                                     "the whole val split " + recipe_values("val_patches") + ".")


@dataclass(frozen=True)
class NetworkOptions:
    """train's network and input scaling (finetune takes them from its model)."""

    depth: int | None = option(None, "Residual blocks [5]; the paper's AF net: 29-30.")
    norm: str | None = option(None, "Input scaling: the patch store's statistics (global), or each brain's own "
                              "inside its mask: 0.5-99.5th percentiles per contrast, or one maximum (the "
                              "original's test-time scaling); kept in the model, applied by predict "
                              + recipe_values("norm") + ".", choices=INPUT_NORMS)
    members: int | None = option(None, "Train a deep ensemble of this many networks (seeds SEED..SEED+K-1, one "
                                 "after another; K times the time): predict then writes their mean and a "
                                 "calibrated per-voxel <stain>_uncertainty (docs/uncertainty.md) [1].")
    aleatoric: bool | None = option(None, "Give each stain's head a second output, the voxel's noise scale, trained by "
                                    "a Laplace likelihood that does not touch the map; an ensemble's uncertainty "
                                    "then adds it to the members' spread (docs/uncertainty.md).",
                                    flag="--aleatoric")
    calibration_subjects: str | None = option(None, "Calibrate an ensemble's uncertainty on these whole brains of "
                                              "the patch store's cohort (comma list; with their reference stains), "
                                              "not on validation patches.", metavar="IDS")
    calibration_groups: str | None = option(None, "A calibration factor per group: value:N (N equal-count bins of "
                                            "the predicted value), labels of the cohort (e.g. wm,lesion: needs "
                                            "--calibration-subjects) or none (one factor) [value:4].",
                                            metavar="value:N|LABELS|none")
    calibration_mode: str = option("conformal", "How the calibration brains set the factor: conformal (95% of "
                                   "their voxels) or risk (brain-level risk control: with probability >= "
                                   "1 - risk-delta at most risk-alpha of a new brain's voxels outside its "
                                   "interval; needs --calibration-subjects, >= ceil(1/delta) - 1 of them).",
                                   choices=CALIBRATION_MODES)
    risk_alpha: float = option(0.05, "--calibration-mode risk: the share of a brain's voxels allowed outside.")
    risk_delta: float = option(0.1, "--calibration-mode risk: the probability that a new brain exceeds it.")


@dataclass(frozen=True)
class FinetuneOptions:
    freeze_backbone: bool | None = option(None, "Train only the new Conv4/Conv5.", flag="--freeze-backbone")
    head_lr_factor: float | None = option(None, "Learning-rate factor of Conv4/Conv5 [10].")
    add_stain: bool | None = option(None, "Keep MODEL's heads and add a head for each new stain of PATCHES: one "
                                    "network predicts them all (needs --freeze-backbone unless PATCHES has "
                                    "MODEL's stains too).", flag="--add-stain")


@dataclass(frozen=True)
class RunOptions:
    """How a training run uses this machine (training.Runtime); not part of what it learns."""

    loader_workers: int = option(0, "Data-loading processes per training process.", renamed=("--workers",))
    cache: str = option("auto", "Hold the patches resident (normalised, on the GPU or in RAM on a CPU) and draw "
                        "batches there: auto when they fit half the free memory; the same batches as streaming "
                        "(docs/training.md).", choices=CACHE_MODES)
    threads: int | None = option(None, "Torch CPU threads per process (default: torch's; torchrun sets 1).")
    device: str | None = option(None, "cpu, cuda, cuda:N (default: cuda:LOCAL_RANK if available).")
    resume: bool = option(False, "Continue the run in --out from its last checkpoint.")
    keep_checkpoints: bool = option(False, "Also keep one checkpoint per epoch.")


# ---- crossval ----
@dataclass(frozen=True)
class CrossvalOptions:
    folds: str = option("leave-one-subject-out", "Hold out each subject in turn, or split the subjects into K "
                        "folds.", metavar="leave-one-subject-out|K")
    recipe: str | None = option(
        None, "A training recipe (robust, paper, fast) or a YAML mapping of training options (as `train`) and "
        "patch options (as `patches`), plus `tta: true` to predict with test-time augmentation, e.g. "
        "{recipe: fast, epochs: 4, stride: 2} [robust].", metavar="NAME|FILE.yaml")
    fold_workers: int | None = option(None, "Run folds side by side, one per Dask worker process (default: one "
                                            "after another).")
    threads: int | None = option(None, "Torch threads per fold.")


# ---- demo ----
# The demo's training budget with the fast recipe (the recipe's own: 6 epochs in batches of 256):
# the demo's conclusions (each stain's map beats every single MRI marker, the lesion's AUC, the
# uncertainty ranks the errors and flags the artefact) in about half the training time (docs/training.md,
# "The demo's budget"). An explicit --epochs wins; another recipe trains as that recipe says.
DEMO_FAST_BUDGET = {"epochs": 3, "batch_size": 128}


@dataclass(frozen=True)
class DemoOptions:
    n_subjects: int = option(5, "Synthetic subjects (the last lesioned one is held out).", renamed=("--subjects",))
    shape: tuple[int, int, int] = option((48, 32, 64), "Synthetic grid X,Y,Z.", metavar="X,Y,Z")
    target: str = option("mbp,nf", "Stain(s) to learn, one network with a head each: af, nf, mbp or a comma list "
                         "(the first is the headline; mbp: myelin, the lesion is a demyelination).")
    recipe: str = option("fast", "Training recipe (see `mrhscale train --help`): fast, or robust / paper (30 "
                         "epochs: about 5x the training time).", choices=tuple(RECIPES))
    epochs: int | None = option(None, f"Training epochs [fast: {DEMO_FAST_BUDGET['epochs']} in batches of "
                                      f"{DEMO_FAST_BUDGET['batch_size']}, the demo's budget (the recipe's own: "
                                      f"{RECIPES['fast']['epochs']} of {RECIPES['fast']['batch_size']}); robust / "
                                      "paper: the recipe's].")
    depth: int = option(5, "Residual blocks of each network.")
    members: int = option(3, "Networks in the ensemble (their spread is the uncertainty map); 1: a single "
                             "network, no uncertainty, a third of the training time.")
    quick: bool = option(False, "Tiny cohort and 2 epochs: checks the chain in about a minute.")


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
    compress: str = option("none", "Codec of the patch arrays: none streams fastest from a local disk (~4x "
                                   "lz4's decode rate); lz4 or zstd (Blosc, byte shuffle) shrink MRI floats ~1.3x, "
                                   "for slow or remote storage (docs/patches.md).", choices=PATCH_CODECS)

    def __post_init__(self):
        if isinstance(self.compress, bool):  # before codecs were named: True was lz4
            self.compress = "lz4" if self.compress else "none"
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
        if d["compress"] in ("none", "lz4"):  # as recorded when it was a flag: older stores stay up to date
            d["compress"] = d["compress"] == "lz4"
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


SECTION_FORMATS = ("png", "tiff")

SECTION_AXES = ("auto", "x", "y", "z")


@dataclass(frozen=True)
class SectionRegistrationOptions:
    """How a stack of 2D sections is placed on, registered to and rebuilt on a subject's MRI
    (register-sections; docs/sections.md)."""

    contrast: str = option("fa", "MRI contrast the sections are registered to (a channel, fa, t2...): one "
                                 "whose tissue contrast looks like the stain's.")
    axis: str = option("auto", "Grid axis the sections were cut across (auto: the one closest to anterior-"
                               "posterior, i.e. coronal sections).", choices=SECTION_AXES)
    step_um: float | None = option(None, "Grid step (um) of the 2D registrations (default: half the MRI's "
                                         "finest in-plane voxel).", metavar="UM")
    tilt_deg: float = option(5.0, "Largest cutting tilt searched (degrees off the axis; 0: sections exactly "
                                  "across the axis).")
    nonlinear: bool = option(True, "A smooth non-linear (SyN) stage after the affine one, per section.",
                             flag="--nonlinear/--affine-only")
    max_gap_mm: float | None = option(None, "Interpolate between two sections at most this far apart; "
                                            "farther (a lost section) stays NaN beyond half a spacing of "
                                            "each (default: 1.5 x the table's median spacing).", metavar="MM")
    min_similarity: float = option(0.2, "A section whose |Pearson r| with its MRI plane stays below this "
                                        "after registration is reported failed and left NaN.")
    scale_to: float = option(255.0, "The rebuilt stain scaled so its 99.5th percentile in the brain is this: the "
                                    "range of 8-bit stain volumes, which patches' defaults (--min-label-sum) "
                                    "expect; 0 keeps the channel's own units (optical density).", metavar="VALUE")
    pixel_um: float | None = option(None, "Pixel size (um) of sections whose table row and file do not say.",
                                    metavar="UM")
    channel: str | None = option(None, "Channel of sections whose table row does not say (dab, haematoxylin, "
                                       "estimate, fluorescence[:NAME]).")
    threads: int | None = option(None, "ITK threads (default: every core).")
    seed: int | None = option(1, "Seed of ANTs' sampling.", cli=False)




@dataclass(frozen=True)
class SectionOptions:
    """A synthetic stack of 2D histology sections cut from one subject's true stain, degraded as slides are
    (docs/synthetic.md): the test bed of section registration, with the exact truth and landmarks."""

    sections: int = option(0, "Also cut N histology sections of one subject's true stain (0: none), into "
                              "OUTDIR/sections/.", metavar="N")
    subject: str = option("s01", "Subject whose stain is cut.", flag="--section-subject")
    stain: str = option("nf", "Stain cut: nf/mbp give RGB DAB brightfield, af one fluorescence channel.",
                        flag="--section-stain")
    axis: str = option("y", "Cutting axis of the grid.", flag="--section-axis", choices=AXES)
    every: int = option(0, "Planes between sections (0: N sections spread evenly over the stain).",
                        flag="--section-every")
    pixel_um: float = option(20.0, "Slide pixel size in micrometres.", flag="--section-pixel-um")
    jitter_deg: float = option(4.0, "Sd of each section's in-plane rotation (degrees).", flag="--section-jitter-deg")
    jitter_mm: float = option(0.25, "Sd of each section's in-plane shift (mm).", flag="--section-jitter-mm")
    shrink_min: float = option(0.85, "Smallest shrinkage factor per in-plane axis.", flag="--section-shrink-min")
    shrink_max: float = option(0.97, "Largest shrinkage factor per in-plane axis.", flag="--section-shrink-max")
    warp_mm: float = option(0.08, "Sd of the smooth non-linear warp's coefficients (mm).", flag="--section-warp-mm")
    warp_scale_mm: float = option(2.0, "Length scale of the warp (mm).", flag="--section-warp-scale-mm")
    tilt_deg: float = option(2.0, "Cutting tilt: the planes' normal leans this far off the axis (degrees).",
                             flag="--section-tilt-deg")
    torn: float = option(0.2, "Fraction of the sections with a tear.", flag="--section-torn")
    missing: float = option(0.1, "Fraction of the sections lost.", flag="--section-missing")
    flipped: float = option(0.0, "Fraction of the sections mounted mirrored (flagged in the table).",
                            flag="--section-flipped")
    bias: float = option(0.15, "Amplitude of each section's smooth multiplicative stain bias.",
                         flag="--section-bias")
    noise: float = option(0.02, "Noise sd (stain optical density, or fraction of 255 for fluorescence).",
                          flag="--section-noise")
    landmarks: int = option(10, "Landmarks per section.", flag="--section-landmarks")
    image_format: str = option("png", "Image files.", flag="--section-format", choices=SECTION_FORMATS)
    positions_mm: tuple | None = option(None, "Library only: the sections' positions along the axis (grid mm, "
                                              "voxel index x voxel size), one per section.", cli=False)
