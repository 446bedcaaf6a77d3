"""A human summary of any mrhscale store, whatever its kind (``mrhscale info``)."""

from __future__ import annotations

from mrhscale.errors import MRHError
from mrhscale.stores.base import inspect
from mrhscale.stores.cohort import CohortStore
from mrhscale.stores.omezarr import describe as describe_image
from mrhscale.stores.patches import PatchStore
from mrhscale.stores.predictions import PredictionStore
from mrhscale.stores.urls import Location


def describe(loc: Location | str) -> str:
    """Human summary of any mrhscale store (cohort, patches, predictions, OME-Zarr image)."""
    loc = Location.of(loc)
    found = inspect(loc)
    kinds = {"mrhscale-cohort": CohortStore, "mrhscale-patches": PatchStore,
             "mrhscale-predictions": PredictionStore}
    if found.format in ("mrhscale-cohort", "mrhscale-predictions"):
        return kinds[found.format](loc).describe()
    if found.format == "mrhscale-ome-zarr":
        return describe_image(loc)
    if found.format == "mrhscale-patches":
        if not (found.attrs or {}).get("complete"):
            return f"store: {loc.masked}\nformat: mrhscale-patches\nincomplete (being built, or interrupted)"
        return PatchStore.open(loc).describe()
    raise MRHError(f"{loc.masked}: {found.description}"
                   + ("" if found.absent else ", not an mrhscale store"))
