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

A store's place is one value, ``Location(url, options)`` (``ctx.location(url)`` makes it):
every function here takes it, so storage options travel inside it, never beside a URL.

Its names load on first use: ``mrhscale.stores.urls`` (paths, used by every command
line) must not pull zarr and xarray into a ``--help``.
"""

from importlib import import_module

_LAZY = {
    "atomic_write": "mrhscale.stores.base",
    "check_input": "mrhscale.stores.base",
    "check_output": "mrhscale.stores.base",
    "config_file": "mrhscale.stores.base",
    "differences": "mrhscale.stores.base",
    "explain_mismatch": "mrhscale.stores.base",
    "fingerprint": "mrhscale.stores.base",
    "inspect": "mrhscale.stores.base",
    "kill_point": "mrhscale.stores.base",
    "sha256_file": "mrhscale.stores.base",
    "write_json": "mrhscale.stores.base",
    "write_text": "mrhscale.stores.base",
    "CohortStore": "mrhscale.stores.cohort",
    "list_subjects": "mrhscale.stores.cohort",
    "open_cohort": "mrhscale.stores.cohort",
    "open_subject": "mrhscale.stores.cohort",
    "Folder": "mrhscale.stores.folders",
    "Claim": "mrhscale.stores.locks",
    "PatchStore": "mrhscale.stores.patches",
    "PredictionStore": "mrhscale.stores.predictions",
    "StorageOptions": "mrhscale.stores.secrets",
    "mask_options": "mrhscale.stores.secrets",
    "mask_text": "mrhscale.stores.secrets",
    "mask_url": "mrhscale.stores.secrets",
    "Location": "mrhscale.stores.urls",
    "is_local": "mrhscale.stores.urls",
    "local_path": "mrhscale.stores.urls",
    "resolve": "mrhscale.stores.urls",
    "url_options": "mrhscale.stores.urls",
    "describe": "mrhscale.stores.summary",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mrhscale.stores' has no attribute {name!r}")


def __dir__():
    return __all__
