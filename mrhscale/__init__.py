"""mrhscale: virtual histology from multi-contrast mouse-brain MRI, at cohort scale.

Heavy dependencies (torch, dask, zarr) are imported lazily so that
``import mrhscale`` stays cheap and the model is usable without Dask or Zarr.
"""

from importlib import import_module

from mrhscale.errors import MRHError

__version__ = "0.1.0"

_LAZY = {
    "MRHNet": "mrhscale.nn.model",
    "load_model": "mrhscale.io.bundle",
    "save_bundle": "mrhscale.io.bundle",
    "open_subject": "mrhscale.stores",
    "list_subjects": "mrhscale.stores",
    "PatchStream": "mrhscale.training.stream",
}

__all__ = ["MRHError", "__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mrhscale' has no attribute {name!r}")
