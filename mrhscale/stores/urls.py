"""Where stores live: paths and URLs, resolved once where the user typed them.

Dask workers and torchrun ranks run in other working directories (often on
other machines), so a relative path means something else to them: every path
becomes absolute at the command line or the API entry, before any task is built.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import fsspec

from mrhscale.errors import MRHError
from mrhscale.stores.secrets import StorageOptions, mask_options, mask_url


def is_local(url: str) -> bool:
    scheme = urlparse(str(url)).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")


def local_path(url: str) -> str:
    u = str(url)
    return urlparse(u).path if u.startswith("file://") else u


def resolve(url, what: str = "path") -> str:
    """An absolute local path, or the URL itself without a trailing slash."""
    if url is None or not str(os.fspath(url)).strip():
        raise MRHError(f"{what}: empty path")
    u = str(os.fspath(url)).strip()
    if is_local(u):
        return os.path.abspath(os.path.expanduser(local_path(u)))
    return u.rstrip("/")


def url_options(url: str, storage_options: dict | None) -> dict | None:
    """``storage_options`` for a URL: fsspec's (s3://, gs://, memory://...) get them, a local
    path gets None (zarr refuses options it cannot use). Credentials may also come from the
    environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL...) with no option."""
    return None if is_local(url) or not storage_options else StorageOptions(storage_options)


def filesystem(url: str, storage_options: dict | None = None):
    """(fsspec filesystem, path inside it) for a store URL or local path.

    Listings are not cached across calls: zarr and other processes write to the same
    store, so a cached listing (s3fs keeps one per instance) would be stale."""

    if is_local(url):
        return fsspec.filesystem("file"), local_path(url)
    from mrhscale._optional import check_url_extra

    check_url_extra(url)
    fs, path = fsspec.core.url_to_fs(str(url), **(storage_options or {}))
    fs.invalidate_cache()
    return fs, path


@dataclass(frozen=True, repr=False)
class Location:
    """A store's place as one value: its resolved URL and the storage options that open it.

    The options travel with the URL, so no store function needs them beside it;
    ``Context.location(url)`` is where a stage makes one. None for a local path
    (zarr refuses options it cannot use); a masked ``StorageOptions`` otherwise.
    """

    url: str
    options: Mapping[str, Any] | None = None

    @classmethod
    def of(cls, place, options=None, what: str = "path") -> Location:
        """``place`` (a Location as it is, or a path or URL, resolved) with ``options``: a
        mapping, or anything holding ``storage_options`` (a Context); None: none needed."""
        if isinstance(place, Location):
            return place
        url = resolve(place, what)
        opts = getattr(options, "storage_options", options)
        return cls(url, url_options(url, dict(opts) if opts else None))

    def join(self, *parts: str) -> Location:
        """A place inside this one, opened with the same options."""
        return Location(join(self.url, *parts), self.options)

    def beside(self, name: str) -> Location:
        """A sibling (an aside build), opened with the same options."""
        parent, _ = split(self.url)
        return Location(join(parent, name) if parent else name, self.options)

    def claim_place(self) -> Location:
        """Where the claim of this whole output lives: ``.<name>.lock`` beside it."""
        return self.beside(f".{split(self.url)[1]}.lock")

    def filesystem(self):
        """(fsspec filesystem, path inside it)."""
        return filesystem(self.url, self.options)

    @property
    def local(self) -> bool:
        return is_local(self.url)

    @property
    def masked(self) -> str:
        """The URL as it may be shown (credentials masked)."""
        return mask_url(self.url)

    def __repr__(self) -> str:  # a task's arguments reach worker logs: never a credential
        return f"Location({self.masked!r}, {mask_options(dict(self.options)) if self.options else None!r})"


def join(url: str, *parts: str) -> str:
    return "/".join([str(url).rstrip("/"), *parts])


def split(url: str) -> tuple[str, str]:
    """(parent, name) of a store path or URL."""
    u = str(url).rstrip("/")
    if is_local(u):
        p = local_path(u)
        return os.path.dirname(p), os.path.basename(p)
    head, _, name = u.rpartition("/")
    return head, name


def same_place(a: str, b: str) -> bool:
    return resolve(a) == resolve(b)


def inside(child: str, parent: str) -> bool:
    """Whether ``child`` is ``parent`` or lies under it."""
    c, p = resolve(child), resolve(parent)
    return c == p or c.startswith(p.rstrip("/") + "/")
