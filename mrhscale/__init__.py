"""mrhscale: virtual histology from multi-contrast mouse-brain MRI, at cohort scale.

The public API: every command of the CLI is one of these functions, and each stage
returns a small result dataclass (``mrhscale.results``). Heavy dependencies (torch,
dask, zarr) are imported lazily, on first use of a name, so ``import mrhscale``
stays cheap and the model is usable without Dask or Zarr.
"""

from importlib import import_module

from mrhscale.errors import MRHError

__version__ = "0.5.0"  # the one place it is written (pyproject reads it; CHANGELOG.md, docs/release.md)

_LAZY = {
    # stages, in data-flow order
    "make_cohort": "mrhscale.synth.phantom",
    "register_cohort": "mrhscale.stages.register",
    "register_histology": "mrhscale.stages.register",
    "score_landmarks": "mrhscale.stages.register",
    "map_points": "mrhscale.stages.register",
    "tre": "mrhscale.stages.register",
    "ingest": "mrhscale.stages.ingest",
    "extract_patches": "mrhscale.stages.patches",
    "train": "mrhscale.training",
    "finetune": "mrhscale.training",
    "predict": "mrhscale.stages.predict",
    "predict_volume": "mrhscale.stages.predict_volume",
    "evaluate": "mrhscale.stages.evaluate",
    "importance": "mrhscale.stages.importance",
    "crossval": "mrhscale.stages.crossval",
    "export_image": "mrhscale.stages.export_image",
    "import_matlab": "mrhscale.stages.import_matlab",
    "export_model": "mrhscale.stages.export",
    "brain_statistics": "mrhscale.stages.export",
    "run_demo": "mrhscale.demo",
    # configuration and results
    "Context": "mrhscale.parallel.context",
    "TrainConfig": "mrhscale.training",
    "Runtime": "mrhscale.training",
    "PatchOptions": "mrhscale.options",
    "EvaluateOptions": "mrhscale.options",
    "RegistrationOptions": "mrhscale.options",
    "PredictOptions": "mrhscale.options",
    "Numerics": "mrhscale.options",
    "ImportanceOptions": "mrhscale.options",
    "SynthVariation": "mrhscale.options",
    "SectionOptions": "mrhscale.options",
    "IngestResult": "mrhscale.results",
    "PatchesResult": "mrhscale.results",
    "TrainResult": "mrhscale.results",
    "PredictResult": "mrhscale.results",
    "EvaluationResult": "mrhscale.results",
    "StainEvaluation": "mrhscale.results",
    "CrossvalResult": "mrhscale.results",
    "ImportanceResult": "mrhscale.results",
    "RegisterResult": "mrhscale.results",
    "HistologyResult": "mrhscale.results",
    "LandmarksResult": "mrhscale.results",
    "ManifestResult": "mrhscale.results",
    "DemoResult": "mrhscale.results",
    "ExportResult": "mrhscale.results",
    "ExportImageResult": "mrhscale.results",
    "ImportMatlabResult": "mrhscale.results",
    # data and model
    "open_subject": "mrhscale.stores",
    "subject_from_files": "mrhscale.stages.predict_volume",
    "list_subjects": "mrhscale.stores",
    "CohortStore": "mrhscale.stores",
    "PatchStore": "mrhscale.stores",
    "PredictionStore": "mrhscale.stores",
    "PatchStream": "mrhscale.training.stream",
    "MRHNet": "mrhscale.nn.model",
    "load_model": "mrhscale.io.bundle",
    "save_bundle": "mrhscale.io.bundle",
    "Landmarks": "mrhscale.io.landmarks",
    "read_landmarks": "mrhscale.io.landmarks",
    "read_landmark_pairs": "mrhscale.io.landmarks",
    "write_landmarks": "mrhscale.io.landmarks",
    "write_landmark_pairs": "mrhscale.io.landmarks",
}

__all__ = ["MRHError", "__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mrhscale' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
