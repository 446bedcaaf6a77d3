"""What each stage returns: small dataclasses (attribute access; ``to_dict()`` for JSON).

They also answer ``result["field"]`` and ``.get``, as the plain dicts of the first
release did, so scripts written against it keep working.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


class _Result:
    def __getitem__(self, key: str):
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def __contains__(self, key: str) -> bool:
        return key in {f.name for f in fields(self)} and getattr(self, key) is not None

    def get(self, key: str, default=None):
        return getattr(self, key, default)

    def keys(self):
        return [f.name for f in fields(self)]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class IngestResult(_Result):
    store: str
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bad: dict[str, str] = field(default_factory=dict)


@dataclass
class PatchesResult(_Result):
    out: str
    n_train: int
    n_val: int
    subjects: list[str]
    seconds: float
    reused: bool = False
    n_candidates: int | None = None
    chunk_size: int | None = None
    n_buckets: list[int] | None = None


@dataclass
class PredictResult(_Result):
    out: str
    variable: str
    predicted: list[str]
    skipped: list[str]
    brain_voxels: int
    seconds: float
    voxels_per_s: float
    nifti: list[str] = field(default_factory=list)
    native: list[str] = field(default_factory=list)
    ome_zarr: list[str] = field(default_factory=list)
    uncertainty: str | None = None  # the uncertainty variable (an ensemble's), else None
    bids: list[str] = field(default_factory=list)  # the maps (and sidecars) written into bids_dir
    bids_dir: str | None = None  # the BIDS derivatives folder, when there is one


@dataclass
class TrainResult(_Result):
    out_dir: str
    model: str
    checkpoint: str
    history: list[dict]
    config: dict
    epochs: int
    final: dict
    best_val_loss: float
    world_size: int
    replica_max_abs_diff: float
    members: list[dict] = field(default_factory=list)  # each member's final metrics (an ensemble)
    uncertainty: dict | None = None  # an ensemble's calibration (training/ensemble.py)


@dataclass
class StainEvaluation(_Result):
    """One stain's evaluation (``<out>/<stain>/metrics.json``)."""

    target: str
    variable: str
    subjects: list[str]
    label: str | None
    roi: str | None
    markers: dict
    pooled: dict
    per_subject: dict
    notes: list[str]
    methods: dict
    provenance: dict
    figures: list[str] = field(default_factory=list)
    figure_captions: dict = field(default_factory=dict)
    out_dir: str = ""
    report: str = ""
    roc_curves: dict | None = None
    uncertainty: dict | None = None  # when the prediction has an uncertainty (stages/evaluate.py)
    ood: dict | None = None  # when the prediction has an out-of-distribution score (stages/evaluate.py)


@dataclass
class EvaluationResult(_Result):
    """An evaluation of every stain scored: ``by_stain[stain]``, in ``stains`` order."""

    stains: list[str]
    subjects: list[str]
    by_stain: dict[str, StainEvaluation]
    out_dir: str = ""
    report: str = ""


@dataclass
class ImportanceResult(_Result):
    baseline_mse: float
    groups: list[dict]
    channels: list[dict]
    n_patches: int
    split: str
    repeats: int
    target: str
    provenance: dict
    out_dir: str
    figures: list[str]


@dataclass
class RegisterResult(_Result):
    out: str
    manifest: str | None
    registered: list[str]
    skipped: list[str]
    failed: dict[str, str]
    metrics: dict
    seconds: dict
    timing: dict
    landmarks: dict = field(default_factory=dict)  # subject -> TRE before/after (um), with --landmarks


@dataclass
class HistologyResult(_Result):
    """What ``register_histology`` wrote: the stain on the MRI grid and its transforms."""

    out: str
    transforms: str
    metrics: dict
    seconds: float
    landmarks: dict | None = None  # TRE before/after (um) when landmarks were given


@dataclass
class SectionsResult(_Result):
    """What ``register_sections`` wrote: the rebuilt stain, its transforms, the QC page, and how each
    section fared (status, position, similarity) with the landmark TRE when landmarks were given."""

    out: str
    transforms: str
    qc: str
    sections: list
    planes: dict
    seconds: float
    landmarks: dict | None = None


@dataclass
class LandmarksResult(_Result):
    """TRE of a landmark pair before and after a transform (``score_landmarks``): each of
    ``before``/``after`` is {"points": [{name, group, um}], "pooled": {n, mean, median, p90, max},
    "groups": {group: the same}}, in micrometres."""

    moving: str
    fixed: str
    formats: list[str]
    transforms: list[str]
    direction: str
    before: dict
    after: dict
    units: str = "um"
    out: str | None = None


@dataclass
class ManifestResult(_Result):
    """What ``write_manifest`` found and wrote."""

    manifest: str
    subjects: list[str]
    groups: list[str]
    targets: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)


@dataclass
class ExportImageResult(_Result):
    out: str
    subject: str
    variable: str
    contrast: str | None
    shapes: list[list[int]]  # per level, axes (z, y, x)
    scales: list[list[float]]  # per level, mm, axes (z, y, x)
    reused: bool = False
    exact_affine: bool = True  # False: the affine has rotations or flips NGFF cannot hold
    seconds: float = 0.0


@dataclass
class ExportResult(_Result):
    """What ``export_model`` wrote and how closely the exported graph matches torch."""

    out: str
    sidecar: str
    format: str
    exporter: str
    max_abs_diff: float
    dynamic: list[str]
    opset: int | None = None
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ImportMatlabResult(_Result):
    """What ``import_matlab`` wrote, and where each setting the file does not hold came from."""

    out: str
    depth: int
    in_channels: int
    channels_from: str
    parameters: int
    target: str
    target_from: str
    input_scale: str  # the bundle's normalisation mode: subject-max, global-max or identity
    input_max: float | None  # the global maximum inputs are divided by (None: subject-max, identity)
    renamed_layers: dict[str, str]  # layer name in the file -> name in the published graph
    source: str
    reader: str | None
    layers: int
    width: int
    target_max: float


def result(cls, d: dict[str, Any]):
    """A result from a dict (unknown keys are an error: the dataclass is the contract)."""
    return cls(**d)


@dataclass
class CrossvalResult(_Result):
    target: str
    scheme: str
    rows: list[dict]  # per held-out subject: subject, fold, pearson, mae, ssim, rmse
    summary: dict  # per metric: mean, sd
    recipe: dict  # train and patch options
    seconds: float
    out_dir: str
    table: str


@dataclass
class DemoResult(_Result):
    """The demo's summary (also its summary.json): headline numbers, stage times, where things are."""

    target: str
    stain: str
    virtual_pearson: float | None
    best_marker: str | None
    best_marker_pearson: float | None
    beats_every_marker: bool
    held_out: str
    train_subjects: list[str]
    val_subject: str
    stage_seconds: dict
    config: dict
    paths: dict
    subjects_in_store: list[str]
    report: str
    other_stains: dict = field(default_factory=dict)  # the stains after the headline one
    calibration_subjects: list = field(default_factory=list)  # the brains its uncertainty was calibrated on
    every_stain: dict = field(default_factory=dict)  # each stain's map and uncertainty figures
    virtual_auc: float | None = None  # with a lesion label
    best_marker_auc: str | None = None
    uncertainty_spearman: float | None = None  # an ensemble's
    uncertainty_coverage_95: float | None = None
    uncertainty_retention_area: float | None = None
    error_random_order_area: float | None = None
    artefact_uncertainty_ratio: float | None = None
    artefact_ood_ratio: float | None = None  # the out-of-distribution map inside the artefact / the rest
