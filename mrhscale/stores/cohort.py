"""The cohort store: one xarray group per subject, readable with plain xarray.

Layout (see docs/stores.md)::

    cohort.zarr/              root attrs: format, channels, subjects (an index of the complete ones)
      <subject>/              an xarray Dataset written with ``to_zarr(group=subject)``
        mri   float32 (x, y, z, contrast)   chunks (cx, cy, cz, all contrasts)
        mask  bool    (x, y, z)
        fa    float32 (x, y, z)
        <target> float32 (x, y, z)          one per histology stain (af, nf, mbp, ...)
        <label>  bool (x, y, z)             optional condition/lesion labels
        attrs: subject, affine, voxel_size, ..., made_by, fingerprint, complete (last)
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading

import numpy as np
import zarr

from mrhscale.errors import MRHError
from mrhscale.stores.base import quiet_zarr
from mrhscale.stores.subjects import GroupStore
from mrhscale.stores.urls import Location

FORMAT = "mrhscale-cohort"


class CohortStore(GroupStore):
    FORMAT = FORMAT

    def channels(self) -> list[str] | None:
        ch = self.attrs.get("channels")
        return list(ch) if ch is not None else None

    def open_cohort(self, subjects: list[str] | None = None) -> dict:
        """Lazy datasets of several subjects, keyed by id; checks that channels agree."""
        ids = list(dict.fromkeys(subjects)) if subjects else self.subjects()
        if not ids:
            raise MRHError(f"{self.name}: store holds no complete subject")
        out = {sid: self.open_subject(sid) for sid in ids}
        ref = list(out[ids[0]].contrast.values)
        for sid, ds in out.items():
            self.check_channels(sid, ds, ids[0], ref)
        return out

    def mri_regions(self, sid: str, identity: dict | None = None) -> MRIRegions:
        """A picklable reader of regions of a complete subject's ``mri`` (all contrasts);
        ``identity``: the subject's, when the caller has read it already."""
        return MRIRegions(self.loc, sid, str((identity or self.identity(sid))["fingerprint"]))

    def cohort_ids(self, subjects: list[str] | None = None) -> list[str]:
        """The ids of a cohort to open a few at a time: ``subjects`` (each checked to be
        complete), else every complete subject."""
        ids = list(dict.fromkeys(subjects)) if subjects else self.subjects()
        if not ids:
            raise MRHError(f"{self.name}: store holds no complete subject")
        for sid in ids if subjects else ():
            self.subject_attrs(sid)  # names the complete ones if it is not
        return ids

    def check_channels(self, sid: str, ds, ref_id: str, ref: list) -> None:
        """Subject ``sid`` (its dataset ``ds``) has the channels of subject ``ref_id``."""
        ch = list(ds.contrast.values)
        if ch != ref:
            first = next((a, b) for a, b in zip(ch + [None] * len(ref), ref + [None] * len(ch)) if a != b)
            raise MRHError(f"{self.name}: subject {sid!r} has channels that differ from {ref_id!r} "
                           f"({len(ch)} vs {len(ref)} channels; first difference: {first})")

    def identity(self, sid: str, attrs: dict | None = None) -> dict:
        """What identifies a subject's data: its fingerprint, or store and id if it has none
        (``attrs``: its ``subject_attrs``, when the caller has read them)."""
        a = attrs if attrs is not None else self.subject_attrs(sid)
        return {"fingerprint": a.get("fingerprint") or f"{self.url}#{sid}", "subject": sid}

    def describe(self) -> str:
        ids = self.subjects()
        lines = [f"store: {self.name}", f"format: {self.FORMAT}",
                 f"subjects ({len(ids)}): {', '.join(ids) if ids else 'none complete'}"]
        incomplete = sorted(set(self.subject_groups()) - set(ids))
        if incomplete:
            lines.append(f"incomplete (an interrupted or running write): {', '.join(incomplete)}")
        for sid in ids:
            lines.append("  " + _subject_line(sid, self.open_subject(sid)))
        if ids:
            ds = self.open_subject(ids[0])
            if "contrast" in ds.coords:
                lines.append(f"channels ({ds.sizes['contrast']}): {short([str(c) for c in ds.contrast.values])}")
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class MRIRegions:
    """Regions of one subject's ``mri`` read straight from the store in a task: one zarr
    read decodes the region's chunks into one array (no per-chunk tasks and no concatenation
    of them), and a task can read its next region while it computes on this one.
    ``contrasts``: the indices to keep, in that order (None: all, as stored)."""

    loc: Location
    subject: str
    fingerprint: str  # what the subject's data is: a replaced subject is opened afresh
    contrasts: tuple[int, ...] | None = None

    def picking(self, contrasts, stored: int) -> MRIRegions:
        """These contrasts (indices among the ``stored`` ones), in this order."""
        idx = tuple(int(i) for i in contrasts)
        return dataclasses.replace(self, contrasts=None if idx == tuple(range(stored)) else idx)

    def read_soon(self, region: tuple[slice, slice, slice]) -> None:
        """Queue ``read(region)`` to start in this process when a task runs out of regions of
        its own to read (``start_soon``): the first block of a task that runs next here is
        then decoded while the task before it computes its last one, instead of before its own
        first one (a task gets the read from ``read``; ``forget_soon`` drops any left)."""
        with _SOON_LOCK:
            _SOON[(self, _key(region))] = None

    def read(self, region: tuple[slice, slice, slice]) -> np.ndarray:
        """``mri[region]`` (x, y, z, contrast) as float32, the picked contrasts in their order."""
        with _SOON_LOCK:
            ahead = _SOON.pop((self, _key(region)), None)
        return ahead.result() if ahead is not None else self._read(region)

    def _read(self, region: tuple[slice, slice, slice]) -> np.ndarray:
        arr = _mri_array(self.loc, self.subject, self.fingerprint)
        raw = arr[(*region, slice(None))]
        if self.contrasts is not None:
            raw = np.take(raw, self.contrasts, axis=3)
        return np.asarray(raw, np.float32)


_SOON: dict[tuple, concurrent.futures.Future | None] = {}  # reads queued (None) or started ahead (read_soon)
_SOON_LOCK = threading.Lock()
_SOON_POOL = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mrhscale-read-soon")


def start_soon() -> None:
    """Start the oldest read queued by ``MRIRegions.read_soon`` (a task has no more of its own)."""
    with _SOON_LOCK:
        for (regions, key), fut in _SOON.items():
            if fut is None:
                _SOON[(regions, key)] = _SOON_POOL.submit(regions._read, tuple(slice(*k) for k in key))
                return


def forget_soon() -> None:
    """Drop the reads queued or started ahead (a run ended: nothing will ask for them)."""
    with _SOON_LOCK:
        _SOON.clear()


def _key(region) -> tuple:
    return tuple((s.start, s.stop) for s in region)


_OPEN: dict[tuple[str, str, str], zarr.Array] = {}  # this process's open mri arrays (a few subjects)


def _mri_array(loc: Location, subject: str, fingerprint: str):
    """A subject's ``mri`` array opened once per process and version (its metadata read once)."""
    key = (loc.url, subject, fingerprint)
    arr = _OPEN.get(key)
    if arr is None:
        with quiet_zarr():
            arr = zarr.open_array(loc.url, path=f"{subject}/mri", mode="r", storage_options=loc.options,
                                  zarr_format=3)
        if len(_OPEN) >= 64:
            _OPEN.pop(next(iter(_OPEN)))
        _OPEN[key] = arr
    return arr


def _subject_line(sid: str, ds) -> str:
    shape = "x".join(str(ds.sizes[d]) for d in ("x", "y", "z") if d in ds.sizes)
    extra = [v for v in ds.data_vars if v not in ("mri", "mask", "fa")]
    vox = "x".join(f"{v:.4g}" for v in ds.attrs.get("voxel_size", []))
    bad = ds.attrs.get("nonfinite_counts") or {}
    nonfinite = sum(int(v) for v in bad.values())
    note = (f", non-finite values zeroed: {nonfinite} ("
            + ", ".join(f"{k} {v}" for k, v in bad.items() if v) + ")") if nonfinite else ""
    return (f"{sid}: grid {shape}, {ds.sizes.get('contrast', 0)} contrasts, voxel {vox}, "
            f"brain voxels {ds.attrs.get('brain_voxels', '?')}, variables: {', '.join(extra) or '-'}{note}")


def short(names: list[str], n: int = 8) -> str:
    names = list(names)
    return ", ".join(names) if len(names) <= 2 * n else ", ".join(names[:n]) + ", ..., " + ", ".join(names[-n:])


# ---- the functional API (mrhscale.list_subjects, mrhscale.open_subject): for notebooks, a plain
# path or URL; ``ctx`` (a Context, or storage options) says how to open a URL store
def list_subjects(store, ctx=None) -> list[str]:
    """Ids of the complete subjects of a cohort store (a path, URL or Location)."""
    return CohortStore.open(Location.of(store, ctx)).subjects()


def open_subject(store, subject: str, ctx=None, chunks="auto_zarr"):
    """A subject as a lazy xarray Dataset (dask-backed with the store's chunks)."""
    return CohortStore.open(Location.of(store, ctx)).open_subject(subject, chunks)


def open_cohort(store, subjects: list[str] | None = None, ctx=None) -> dict:
    """Lazy datasets of several subjects of a cohort store, keyed by id."""
    return CohortStore.open(Location.of(store, ctx)).open_cohort(subjects)
