"""A human summary of any mrhscale store, whatever its kind (``mrhscale info``)."""

from __future__ import annotations

from mrhscale.errors import MRHError
from mrhscale.stores.base import inspect
from mrhscale.stores.cohort import CohortStore
from mrhscale.stores.omezarr import describe as describe_image
from mrhscale.stores.patches import PatchStore
from mrhscale.stores.predictions import PredictionStore
from mrhscale.stores.secrets import mask_url
from mrhscale.stores.urls import resolve, url_options


def describe(url: str, storage_options: dict | None = None) -> str:
    """Human summary of any mrhscale store (cohort, patches, predictions, OME-Zarr image)."""
    found = inspect(resolve(url), url_options(resolve(url), storage_options))
    kinds = {"mrhscale-cohort": CohortStore, "mrhscale-patches": PatchStore,
             "mrhscale-predictions": PredictionStore}
    if found.format in ("mrhscale-cohort", "mrhscale-predictions"):
        return kinds[found.format](url, storage_options).describe()
    if found.format == "mrhscale-ome-zarr":
        return describe_image(url, storage_options)
    if found.format == "mrhscale-patches":
        if not (found.attrs or {}).get("complete"):
            return f"store: {mask_url(url)}\nformat: mrhscale-patches\nincomplete (being built, or interrupted)"
        return PatchStore.open(url, storage_options).describe()
    raise MRHError(f"{mask_url(url)}: {found.description}"
                   + ("" if found.absent else ", not an mrhscale store"))
