"""The cohort store contract: one Zarr (v3) group per subject, readable with plain xarray.

Layout (see docs/stores.md)::

    cohort.zarr/              root group; attrs["subjects"] lists COMPLETE subjects only
      <subject>/              an xarray Dataset written with ``to_zarr(group=subject)``
        mri   float32 (x, y, z, contrast)   chunks (cx, cy, cz, all contrasts)
        mask  bool    (x, y, z)
        fa    float32 (x, y, z)
        <target> float32 (x, y, z)          one per histology stain (af, nf, mbp, ...)
        <label>  bool (x, y, z)             optional condition/lesion labels
      coords: contrast (str), group (contrast; the source file group), bval (contrast),
              bvec (contrast, vec)
      attrs: subject, affine, voxel_size, orientation, targets, labels, sources, ...

A subject group without its id in the root's ``subjects`` attr is incomplete
(a crash mid-write) and is never read.
"""

from __future__ import annotations

import os
from urllib.parse import urlparse

import xarray as xr
import zarr

from mrhscale.errors import MRHError

SUBJECTS_ATTR = "subjects"
STAGING = "_staging"


def is_local(url: str) -> bool:
    scheme = urlparse(str(url)).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")


def local_path(url: str) -> str:
    u = str(url)
    return urlparse(u).path if u.startswith("file://") else u


def url_options(url: str, storage_options: dict | None) -> dict | None:
    """``storage_options`` for a URL: fsspec's (s3://, gs://, memory://...) get them, a local
    path gets None (zarr refuses options it cannot use). Credentials may also come from the
    environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL...) with no option."""
    return None if is_local(url) or not storage_options else dict(storage_options)


def list_subjects(url: str, storage_options: dict | None = None) -> list[str]:
    """Ids of the complete subjects of a cohort store, in ingest order."""
    if is_local(url) and not os.path.exists(local_path(url)):
        raise MRHError(f"{url}: store does not exist")
    storage_options = url_options(url, storage_options)
    try:
        root = zarr.open_group(str(url), mode="r", storage_options=storage_options)
    except Exception as e:  # zarr raises several types for "not a group"
        raise MRHError(f"{url}: not a readable Zarr store ({type(e).__name__}: {e})") from None
    return list(root.attrs.get(SUBJECTS_ATTR, []))


def open_subject(url: str, subject: str, storage_options: dict | None = None, chunks="auto_zarr") -> xr.Dataset:
    """A subject as a lazy xarray Dataset (dask-backed with the store's chunks)."""
    subjects = list_subjects(url, storage_options)
    if subject not in subjects:
        raise MRHError(
            f"{url}: subject {subject!r} not in store (complete subjects: {', '.join(subjects) or 'none'})"
        )
    kw = {} if chunks == "auto_zarr" else {"chunks": chunks}
    storage_options = url_options(url, storage_options)
    return xr.open_zarr(str(url), group=subject, consolidated=False, storage_options=storage_options, **kw)


def open_cohort(url: str, subjects: list[str] | None = None, storage_options: dict | None = None) -> dict[str, xr.Dataset]:
    """Lazy datasets of several subjects, keyed by id; checks that channels agree."""
    ids = subjects or list_subjects(url, storage_options)
    if not ids:
        raise MRHError(f"{url}: store holds no complete subject")
    out = {sid: open_subject(url, sid, storage_options) for sid in ids}
    ref_id = ids[0]
    ref = list(out[ref_id].contrast.values)
    for sid, ds in out.items():
        ch = list(ds.contrast.values)
        if ch != ref:
            raise MRHError(
                f"{url}: subject {sid!r} has channels that differ from {ref_id!r} "
                f"({len(ch)} vs {len(ref)} channels; first difference: "
                f"{next((a, b) for a, b in zip(ch + [None] * len(ref), ref + [None] * len(ch)) if a != b)})"
            )
    return out


def describe_store(url: str, storage_options: dict | None = None) -> str:
    """Human summary of any mrhscale Zarr store (cohort, patches, predictions)."""
    ids = list_subjects(url, storage_options)
    storage_options = url_options(url, storage_options)
    root = zarr.open_group(str(url), mode="r", storage_options=storage_options)
    fmt = root.attrs.get("format", "?")
    lines = [f"store: {url}", f"format: {fmt}"]
    if "patch" in root.attrs and "channels" in root.attrs and "target" in root.attrs:  # a patch store
        a = root.attrs  # its "subjects" attr names the SOURCE subjects, not groups
        lines += [
            f"target: {a.get('target')}  patch: {a.get('patch')}",
            f"train patches: {a.get('n_train')}  val patches: {a.get('n_val')}",
            f"from subjects: {', '.join(a.get('subjects', []))}"
            f"  (validation subjects: {', '.join(a.get('val_subjects', [])) or 'none, a random fraction'})",
            f"normalisation: {(a.get('norm') or {}).get('mode', '?')}",
            f"channels ({len(a['channels'])}): {_short(a['channels'])}",
            f"complete: {bool(a.get('complete'))}",
        ]
        return "\n".join(lines)
    lines.append(f"subjects ({len(ids)}): {', '.join(ids) if ids else 'none complete'}")
    for sid in ids:
        ds = xr.open_zarr(str(url), group=sid, consolidated=False, storage_options=storage_options)
        shape = "x".join(str(ds.sizes[d]) for d in ("x", "y", "z") if d in ds.sizes)
        extra = [v for v in ds.data_vars if v not in ("mri", "mask", "fa")]
        nch = ds.sizes.get("contrast", 0)
        vox = "x".join(f"{v:.4g}" for v in ds.attrs.get("voxel_size", []))
        lines.append(
            f"  {sid}: grid {shape}, {nch} contrasts, voxel {vox}, "
            f"brain voxels {ds.attrs.get('brain_voxels', '?')}, variables: {', '.join(extra) or '-'}"
        )
    if ids:
        ds = xr.open_zarr(str(url), group=ids[0], consolidated=False, storage_options=storage_options)
        if "contrast" in ds.coords:
            lines.append(f"channels ({ds.sizes['contrast']}): {_short([str(c) for c in ds.contrast.values])}")
    return "\n".join(lines)


def _short(names: list[str], n: int = 8) -> str:
    names = list(names)
    return ", ".join(names) if len(names) <= 2 * n else ", ".join(names[:n]) + ", ..., " + ", ".join(names[-n:])
