"""Optional extras: each import is asked for here, and a missing one is an error naming the
``pip install "mrhscale[extra]"`` that brings it (as TorchIO's ``external/imports.py``)."""

from __future__ import annotations

import importlib

from mrhscale.errors import MRHError

EXTRAS = {
    "ants": ("register", "antspyx"),
    "matio": ("matlab", "mat-io"),
    "s3fs": ("s3", "s3fs"),
    "dask_jobqueue": ("slurm", "dask-jobqueue"),
    "onnx": ("onnx", "onnx"),
    "onnxruntime": ("onnx", "onnxruntime"),
    "onnxscript": ("onnx", "onnxscript"),
    "ome_zarr": ("ome", "ome-zarr"),
    "bids": ("bids", "pybids"),
    "nbclient": ("notebooks", "nbclient"),
    "dask_cuda": ("gpu", "dask-cuda"),
}


def missing(module: str, what: str) -> MRHError:
    extra, package = EXTRAS[module]
    return MRHError(f'{what} needs the optional extra: pip install "mrhscale[{extra}]" ({package})')


def load(module: str, what: str):
    """The module, or an MRHError naming the extra to install (also when it cannot load)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise missing(module, what) from None
    except OSError as e:  # a binary wheel built for another platform
        raise MRHError(f"{missing(module, what)} (installed but cannot load: {e})") from None


def get_ants():
    return load("ants", "registration")


def get_matio(what: str = "reading a MATLAB network stored as class (MCOS) data"):
    return load("matio", what)


def check_url_extra(url: str) -> None:
    """An s3:// store needs s3fs (fsspec's own message does not name our extra)."""
    if str(url).startswith(("s3://", "s3a://")):
        load("s3fs", f"{url}: an S3 store")
