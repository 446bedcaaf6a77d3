"""The store layer: the only code that opens, creates, replaces or deletes what mrhscale writes.

Its rules (docs/stores.md), each tested in tests/stores/:

- never delete what mrhscale did not make: an output location holding anything
  but an mrhscale output of the expected kind is refused untouched;
- replace means build aside, then swap: a failure leaves the old output as it was;
- every output records what made it (``made_by`` and its ``fingerprint``) and is
  reused or resumed only when that matches;
- several processes may commit different subjects to one store at once; a
  second writer of the same unit is refused;
- paths are resolved to absolute URLs where the user typed them;
- storage options never reach a file or a log unmasked.
"""

from mrhscale.stores.base import (
    atomic_write,
    check_input,
    check_output,
    config_file,
    differences,
    explain_mismatch,
    fingerprint,
    inspect,
    kill_point,
    sha256_file,
    write_json,
    write_text,
)
from mrhscale.stores.cohort import CohortStore, list_subjects, open_cohort, open_subject
from mrhscale.stores.folders import Folder
from mrhscale.stores.locks import Claim
from mrhscale.stores.patches import PatchStore
from mrhscale.stores.predictions import PredictionStore
from mrhscale.stores.secrets import StorageOptions, mask_options, mask_text, mask_url
from mrhscale.stores.urls import is_local, local_path, resolve, url_options

__all__ = [
    "Claim", "CohortStore", "config_file", "Folder", "PatchStore", "PredictionStore", "StorageOptions",
    "atomic_write", "check_input", "check_output", "differences", "explain_mismatch", "fingerprint",
    "describe", "inspect", "is_local", "kill_point", "list_subjects", "local_path", "mask_options", "mask_text",
    "mask_url", "open_cohort", "open_subject", "resolve", "sha256_file", "url_options", "write_json", "write_text",
]


def describe(url: str, storage_options: dict | None = None) -> str:
    """Human summary of any mrhscale store (cohort, patches, predictions, OME-Zarr image)."""
    from mrhscale.errors import MRHError

    found = inspect(resolve(url), url_options(resolve(url), storage_options))
    kinds = {"mrhscale-cohort": CohortStore, "mrhscale-patches": PatchStore,
             "mrhscale-predictions": PredictionStore}
    if found.format in ("mrhscale-cohort", "mrhscale-predictions"):
        return kinds[found.format](url, storage_options).describe()
    if found.format == "mrhscale-ome-zarr":
        from mrhscale.stores.omezarr import describe as describe_image

        return describe_image(url, storage_options)
    if found.format == "mrhscale-patches":
        if not (found.attrs or {}).get("complete"):
            return f"store: {mask_url(url)}\nformat: mrhscale-patches\nincomplete (being built, or interrupted)"
        return PatchStore.open(url, storage_options).describe()
    raise MRHError(f"{mask_url(url)}: {found.description}"
                   + ("" if found.absent else ", not an mrhscale store"))
