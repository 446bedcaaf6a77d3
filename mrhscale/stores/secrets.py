"""Storage options hold credentials: none of them may reach a file or a log.

Masking is by allow-list: only option names known to carry no secret (an
endpoint, a region, flags) are shown; every other value, and every value under
a secret-looking name at any depth (``headers``, ``connection_string``...), is
replaced by ``***``. ``StorageOptions`` is a dict whose ``repr`` is masked, so a
Dask task that carries it (and is logged by a worker when it fails) never
prints a credential.
"""

from __future__ import annotations

import re

import yaml

MASK = "***"
SAFE = frozenset({
    "endpoint_url", "region_name", "region", "anon", "use_ssl", "requester_pays", "profile",
    "default_block_size", "default_fill_cache", "default_cache_type", "version_aware",
    "cache_regions", "use_listings_cache", "listings_expiry_time", "skip_instance_cache",
    "max_concurrency", "verify", "timeout", "connect_timeout", "read_timeout", "retries",
    "max_attempts", "project", "bucket", "auto_mkdir", "addressing_style", "signature_version",
    "client_kwargs", "config_kwargs", "s3_additional_kwargs", "s3", "asynchronous", "loop",
})
_SECRETISH = re.compile(r"key|secret|token|passw|credential|auth|header|connection|sas|signature|"
                        r"cookie|session|private|cert", re.IGNORECASE)


def mask_options(value):
    """A copy of storage options (a mapping, or JSON/YAML text of one) with secrets masked."""
    if isinstance(value, str):
        value = _parse(value)
        if not isinstance(value, dict):
            return MASK
    if not isinstance(value, dict):
        return MASK if value is not None else None
    return {str(k): _mask_entry(str(k), v) for k, v in value.items()}


def _mask_entry(key: str, v):
    if _SECRETISH.search(key) and key not in SAFE:
        return MASK
    if isinstance(v, dict):
        return {str(k): _mask_entry(str(k), x) for k, x in v.items()}
    if key not in SAFE:
        return MASK
    if isinstance(v, str):
        return mask_url(v)
    return v if v is None or isinstance(v, bool | int | float) else MASK


def _parse(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None


def mask_url(url: str) -> str:
    """A URL with its user:password and query string (e.g. SAS tokens) masked."""
    u = str(url)
    u = re.sub(r"(?<=://)[^/@\s]+@", MASK + "@", u)
    return re.sub(r"\?.*$", "?" + MASK, u) if "://" in u else u


def mask_text(text: str, storage_options: dict | None) -> str:
    """``text`` with every secret value of ``storage_options`` replaced by ``***``."""
    out = str(text)
    for s in sorted(_secret_values(storage_options), key=len, reverse=True):
        out = out.replace(s, MASK)
    return out


def _secret_values(value, key: str = "") -> set[str]:
    if isinstance(value, dict):
        return {s for k, v in value.items() for s in _secret_values(v, str(k))}
    if isinstance(value, list | tuple):
        return {s for v in value for s in _secret_values(v, key)}
    if isinstance(value, str) and len(value) >= 4 and (key not in SAFE or _SECRETISH.search(key)):
        return {value}
    return set()


class StorageOptions(dict):
    """fsspec storage options whose repr (in logs, worker tracebacks) hides credentials."""

    def __repr__(self) -> str:
        return f"StorageOptions({mask_options(dict(self))!r})"

    __str__ = __repr__

    def __reduce__(self):
        return (StorageOptions, (dict(self),))
