"""Files -> cohort store: each subject's volumes become one chunked, compressed xarray group.

Reads stay lazy (nibabel proxies sliced per chunk inside Dask tasks) and the
writes run on the Dask cluster. The store layer (``mrhscale.stores``) owns the
store: each subject is claimed, written under this run's own staging folder,
moved into place when whole and committed by its ``complete`` marker, so
several ingest processes can fill one store at once. A subject already in the
store is reused only while its source files are the ones it was made from
(size and mtime, else sha256); otherwise ingest stops and names the file.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field

import dask
import dask.array as da
import numpy as np
import xarray as xr
from zarr.codecs import BloscCodec

from mrhscale import __version__
from mrhscale.errors import MRHError
from mrhscale.io.manifest import Manifest, SubjectSpec, load_manifest
from mrhscale.io.volumes import Volume, checksum, open_volume, read_sidecars
from mrhscale.ops.space import header_space
from mrhscale.options import COMPRESSIONS, IngestOptions
from mrhscale.parallel.cluster import task_error, tune_malloc
from mrhscale.parallel.context import Context, Runner
from mrhscale.results import IngestResult
from mrhscale.stores import CohortStore, differences

DEFAULTS = IngestOptions()  # the options table states each default once
DEFAULT_CHUNKS = DEFAULTS.chunks
FORMAT = "mrhscale-cohort"


@dataclass
class SubjectPlan:
    """A validated subject: opened volumes, channel names, geometry."""

    spec: SubjectSpec
    shape: tuple[int, int, int]
    affine: np.ndarray
    zooms: tuple[float, ...]
    orientation: list[str]
    mri: list[tuple[str, Volume, int]]  # (group, volume, n_volumes)
    channels: list[str]
    groups: list[str]
    bval: np.ndarray
    bvec: np.ndarray
    mask: np.ndarray
    fa: Volume | None
    targets: dict[str, Volume] = field(default_factory=dict)
    labels: dict[str, Volume] = field(default_factory=dict)
    space: dict = field(default_factory=dict)  # source unit, qform/sform (ops.space.header_space)


def _spatial(vol: Volume, sid: str, role: str) -> tuple[int, int, int]:
    shape = vol.shape
    if len(shape) == 5 and shape[3] == 1:  # some NIfTI writers put volumes on the 5th axis
        shape = (*shape[:3], shape[4])
    if len(shape) == 4 and role.split("/")[0] != "mri" and shape[3] == 1:
        shape = shape[:3]
    ok_ndim = (3, 4) if role.startswith("mri/") else (3,)
    if len(shape) not in ok_ndim:
        want = "3D or 4D" if role.startswith("mri/") else "3D"
        raise MRHError(f"subject {sid}: {role} {vol.path}: expected a {want} volume, got shape {vol.shape}")
    if vol.dtype.kind not in "biuf":
        raise MRHError(f"subject {sid}: {role} {vol.path}: unsupported data type {vol.dtype}")
    return shape


def plan_subject(spec: SubjectSpec, opened: dict[str, Volume] | None = None) -> SubjectPlan:
    """Open every file of a subject (headers only, plus the mask) and check they agree;
    ``opened``: volumes given already, by role (in-memory images of ``predict_volume``)."""
    sid = spec.id
    opened = dict(opened or {})
    for role, path in spec.files().items():
        if role not in opened:
            opened[role] = open_volume(path, what=f"subject {sid}: {role}")
    ref_role = f"mri/{spec.mri[0].name}"
    ref = opened[ref_role]
    ref_shape = _spatial(ref, sid, ref_role)[:3]
    for role, vol in opened.items():
        shape = _spatial(vol, sid, role)
        if shape[:3] != ref_shape:
            raise MRHError(
                f"subject {sid}: {role} {vol.path}: grid {shape[:3]} differs from {ref_role} {ref_shape}; "
                "all files of a subject must be co-registered on the same grid"
            )
        if not np.allclose(vol.affine, ref.affine, atol=1e-3):
            raise MRHError(
                f"subject {sid}: {role} {vol.path}: affine differs from {ref_role}'s; "
                "files must share one voxel grid (register/resample them first)"
            )
    mri, channels, groups, bvals, bvecs = [], [], [], [], []
    for g in spec.mri:
        vol = opened[f"mri/{g.name}"]
        shape = _spatial(vol, sid, f"mri/{g.name}")
        n = shape[3] if len(shape) == 4 else 1
        if g.channels is not None:
            if len(g.channels) != n:
                raise MRHError(
                    f"subject {sid}: mri/{g.name} {vol.path}: {len(g.channels)} channel names given "
                    f"for {n} volumes"
                )
            names = list(g.channels)
        else:
            names = [f"{g.name}_{i}" for i in range(n)] if len(shape) == 4 else [g.name]
        side = read_sidecars(vol.path)
        if side is not None and side[0].size != n:
            raise MRHError(
                f"subject {sid}: mri/{g.name}: sidecar lists {side[0].size} b-values for {n} volumes"
            )
        bvals.append(side[0] if side else np.full(n, np.nan))
        bvecs.append(side[1] if side else np.full((n, 3), np.nan))
        mri.append((g.name, vol, n))
        channels += names
        groups += [g.name] * n
    if len(set(channels)) != len(channels):
        dup = sorted({c for c in channels if channels.count(c) > 1})
        raise MRHError(f"subject {sid}: duplicate channel names {dup}")
    if spec.mask:
        m = np.asarray(opened["mask"].proxy, dtype=np.float32).reshape(ref_shape)
        m = np.nan_to_num(m) > 0.5
        if spec.mask_inverted:
            m = ~m
    else:
        m = np.nan_to_num(np.asarray(opened["fa"].proxy, dtype=np.float32).reshape(ref_shape)) > 0
    if not m.any():
        hint = "" if spec.mask_inverted else " (if it is 1 outside the brain, as in the original data, set 'inverted: true')"
        raise MRHError(f"subject {sid}: mask {spec.mask or spec.fa}: empty mask, no brain voxel{hint}")
    return SubjectPlan(
        spec=spec,
        shape=ref_shape,
        affine=ref.affine,
        zooms=ref.zooms,
        orientation=ref.orientation,
        mri=mri,
        channels=channels,
        groups=groups,
        bval=np.concatenate(bvals),
        bvec=np.concatenate(bvecs),
        mask=m,
        fa=opened.get("fa"),
        targets={k: opened[f"targets/{k}"] for k in spec.targets},
        labels={k: opened[f"labels/{k}"] for k in spec.labels},
        space=header_space(ref.header),
    )


def _read_slab(parts, shape, z0: int, z1: int) -> tuple[np.ndarray, int]:
    """All contrasts of z-slab [z0, z1) as one contrast-last float32 block, with its
    non-finite values (NaN, +-inf) zeroed and counted.

    NIfTI/Analyze data are Fortran-ordered, so a slab of full x-y planes is one
    contiguous run per volume: reading slabs (not small 3D chunks, which would be
    thousands of 256-byte runs) keeps reads sequential. Zeroing and counting here,
    while the block is hot in cache, saves two passes over the data. A file that
    cannot be read (truncated, damaged, gone) is named in the error.
    """
    tune_malloc()  # Dask's worker malloc setting page-faults every slab-sized buffer
    sx, sy, _ = shape
    out = np.empty((sx, sy, z1 - z0, sum(n for _, _, n in parts)), np.float32)
    c = 0
    for path, proxy, n in parts:
        try:
            blk = np.asarray(proxy[:, :, z0:z1], dtype=np.float32)
        except Exception as e:
            raise MRHError(f"{path}: unreadable ({type(e).__name__}: {e}); is the file complete?") from None
        out[..., c:c + n] = blk.reshape(sx, sy, z1 - z0, n)
        c += n
    bad = ~np.isfinite(out)
    n_bad = int(np.count_nonzero(bad))
    if n_bad:
        out[bad] = 0
    return out, n_bad


def _total(counts) -> int:
    return int(sum(counts))


def lazy_volume(vol: Volume, shape: tuple[int, ...], chunks: tuple[int, ...]):
    """One file as a float32 dask array (non-finite values zeroed) and a lazy count of them."""
    return lazy_group([(vol, shape[3] if len(shape) == 4 else 1)], shape[:3], chunks[:3], squeeze=len(shape) == 3)


def lazy_group(vols: list[tuple[Volume, int]], shape3, chunks3, squeeze: bool = False):
    """Volumes of one grid concatenated along contrast, contrast-last, chunked (cx, cy, cz, all).

    Returns the array (non-finite values zeroed) and a Delayed count of them computed by
    the same read tasks. gzip has no random access, so a .gz group is read whole once.
    """
    shape3 = tuple(int(s) for s in shape3)
    spatial = tuple(min(int(c), s) for c, s in zip(chunks3, shape3))
    n_total = sum(n for _, n in vols)
    parts = [(v.path, v.proxy, n) for v, n in vols]
    if any(v.path.lower().endswith(".gz") for v, _ in vols):
        slabs_z = [(0, shape3[2])]
    else:
        cz = spatial[2]
        slabs_z = [(z, min(z + cz, shape3[2])) for z in range(0, shape3[2], cz)]
    reads = [dask.delayed(_read_slab, pure=True, nout=2)(parts, shape3, z0, z1) for z0, z1 in slabs_z]
    blocks = [da.from_delayed(r[0], shape=(*shape3[:2], z1 - z0, n_total), dtype=np.float32)
              for r, (z0, z1) in zip(reads, slabs_z)]
    arr = da.concatenate(blocks, axis=2) if len(blocks) > 1 else blocks[0]
    arr = arr.rechunk((*spatial, n_total))
    nan_count = dask.delayed(_total, pure=True)([r[1] for r in reads])
    return (arr[..., 0] if squeeze else arr), nan_count


def even_chunks(chunks, shape) -> tuple[int, ...]:
    """Chunks of at most ``chunks`` that tile ``shape`` evenly: an axis of 80 with chunk 64 is
    cut 40 + 40, not 64 + 16. Every chunk is decoded whole, so a thin last one costs a full
    chunk's decode for a fraction of its voxels (2.4x the bytes on 80x48x112 with 64,32,64:
    benchmarks/RESULTS.md, "feed")."""
    return tuple(-(-int(s) // -(-int(s) // int(c))) for c, s in zip(chunks, shape))


def subject_dataset(plan: SubjectPlan, chunks=DEFAULT_CHUNKS) -> tuple[xr.Dataset, dict]:
    """The subject as a lazy Dataset (non-finite values zeroed) and lazy counts of them per variable."""
    sx, sy, sz = plan.shape
    spatial = even_chunks(chunks, plan.shape)
    mri, n_bad = lazy_group([(vol, n) for _, vol, n in plan.mri], plan.shape, spatial)
    counts = {"mri": n_bad}
    xyz = ("x", "y", "z")
    data = {
        "mri": (xyz + ("contrast",), mri),
        "mask": (xyz, da.from_array(plan.mask, chunks=spatial)),
    }
    three = {"fa": plan.fa} if plan.fa is not None else {}
    three.update(plan.targets)
    for name, vol in three.items():
        a, counts[name] = lazy_volume(vol, plan.shape, spatial)
        data[name] = (xyz, a)
    for name, vol in plan.labels.items():
        a, _ = lazy_volume(vol, plan.shape, spatial)
        data[name] = (xyz, a > 0.5)
    coords = {
        "contrast": np.array(plan.channels, dtype=object),
        "group": ("contrast", np.array(plan.groups, dtype=object)),
        "bval": ("contrast", plan.bval.astype(np.float32)),
        "bvec": (("contrast", "vec"), plan.bvec.astype(np.float32)),
    }
    attrs = {
        "subject": plan.spec.id,
        "affine": plan.affine.tolist(),
        "voxel_size": [float(z) for z in plan.zooms],
        "voxel_size_units": plan.space.get("space_units", "mm"),
        **plan.space,
        "orientation": plan.orientation,
        "shape": list(plan.shape),
        "targets": list(plan.targets),
        "labels": list(plan.labels),
        "mask_inverted_in_source": bool(plan.spec.mask_inverted),
        "mask_source": "mask" if plan.spec.mask else "fa > 0",
        "brain_voxels": int(plan.mask.sum()),
        "mrhscale_version": __version__,
    }
    return xr.Dataset(data, coords=coords, attrs=attrs), counts


def _encoding(ds: xr.Dataset, compression: str, clevel: int) -> dict:
    enc = {}
    for name, var in ds.data_vars.items():
        comp = BloscCodec(cname=compression, clevel=clevel, shuffle="bitshuffle" if var.dtype == bool else "shuffle")
        enc[name] = {"compressors": [comp], "chunks": tuple(c[0] for c in var.chunks)}
    return enc


def _spec_record(spec: SubjectSpec) -> dict:
    """What of the manifest entry shapes the stored subject (besides the files' contents)."""
    return {"mri": [[g.name, g.channels] for g in spec.mri], "mask_inverted": bool(spec.mask_inverted),
            "roles": sorted(spec.files())}


def _stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _changed(spec: SubjectSpec, attrs: dict) -> str | None:
    """Why a complete subject no longer matches its manifest entry (None: it does).

    Files are compared by path, size and mtime first, by sha256 when those differ;
    a source file that is gone from its recorded path cannot differ and is accepted.
    """
    made = attrs.get("made_by") or {}
    if not made.get("legacy") and made.get("manifest") != _spec_record(spec):
        return "; ".join(differences(made.get("manifest") or {}, _spec_record(spec))[:2])
    sources = attrs.get("sources") or {}
    for role, path in spec.files().items():
        old = sources.get(role) or {}
        now = _stat(path)
        if old.get("path") == path and (now is None or list(now) == [old.get("size"), old.get("mtime_ns")]):
            continue
        if old.get("checksum") and now is not None and checksum(path) == old["checksum"]:
            continue
        return f"{role} {path} is not the file it was made from"
    return None


def _reusable(store: CohortStore, specs: list[SubjectSpec], overwrite: bool, exists: bool):
    """(subjects to write, subjects already there and still matching their files)."""
    groups = store.subject_groups() if exists else {}
    todo, skipped = [], []
    for spec in specs:
        attrs = groups.get(spec.id)
        if attrs is None or attrs.get("complete") is not True or overwrite:
            todo.append(spec)
            continue
        why = _changed(spec, attrs)
        if why:
            raise MRHError(f"{store.name}: subject {spec.id} was ingested from other files ({why}); "
                           "pass --overwrite to re-ingest it or choose another --out")
        skipped.append(spec.id)
    return todo, skipped


def _plan_all(todo: list[SubjectSpec], channels: list[str] | None, skip_bad: bool):
    """The subjects to write, each planned once to check it (its files, its channels against
    the cohort's), and their channels; bad ones aside. The plans are not kept: each holds its
    mask, and the write plans its subject again when its turn comes (bounded memory)."""
    good, bad = [], {}
    for spec in todo:
        try:
            channels = _checked_channels(spec, channels)
            good.append(spec)
        except MRHError as e:
            if not skip_bad:
                raise
            bad[spec.id] = str(e)
    return good, channels, bad


def _checked_channels(spec: SubjectSpec, ref: list[str] | None) -> list[str]:
    """The subject's channels, planned from its files and checked against ``ref``."""
    plan = plan_subject(spec)
    _check_channels(spec.id, plan.channels, ref)
    return plan.channels


def _check_channels(sid: str, channels: list[str], ref: list[str] | None) -> None:
    if ref is not None and list(channels) != list(ref):
        diff = next(((i, a, b) for i, (a, b) in enumerate(zip(channels, ref)) if a != b), None)
        what = (f"channel {diff[0]} is {diff[1]!r}, expected {diff[2]!r}" if diff
                else f"{len(channels)} channels, expected {len(ref)}")
        raise MRHError(f"subject {sid}: channels differ from the rest of the cohort ({what})")


def _check_options(chunks, compression: str) -> None:
    if len(chunks) != 3 or any(int(c) < 1 for c in chunks):
        raise MRHError(f"--chunks: expected 3 positive integers, got {chunks}")
    if compression not in COMPRESSIONS:
        raise MRHError(f"--compression {compression!r}: choose {', '.join(COMPRESSIONS[:-1])} or {COMPRESSIONS[-1]}")


def _made_by(plan: SubjectPlan, sources: dict) -> dict:
    return {"stage": "ingest", "manifest": _spec_record(plan.spec), "channels": list(plan.channels),
            "sources": {role: s.get("checksum") or f"size={s['size']},mtime_ns={s['mtime_ns']}"
                        for role, s in sources.items()}}


def _sources(spec: SubjectSpec, digests: list | None) -> dict:
    out = {}
    for k, (role, path) in enumerate(spec.files().items()):
        size, mtime = _stat(path) or (None, None)
        out[role] = {"path": path, "size": size, "mtime_ns": mtime,
                     **({"checksum": digests[k]} if digests else {})}
    return out


def ingest(
    manifest: str | Manifest,
    out: str,
    *,
    subjects: list[str] | None = None,
    chunks: tuple[int, int, int] = DEFAULTS.chunks,
    compression: str = DEFAULTS.compression,
    clevel: int = DEFAULTS.clevel,
    skip_bad: bool = DEFAULTS.skip_bad,
    overwrite: bool = False,
    checksums: bool = DEFAULTS.checksums,
    ctx: Context | None = None,
) -> IngestResult:
    """Write the manifest's subjects into the cohort store at ``out``; returns what was written.

    Subjects already complete and still matching their files are skipped; with
    ``overwrite`` they are rewritten, the old version kept until the new one is whole.
    Runs on ``ctx``'s Dask cluster (``Context()``: the active client, else an embedded one).
    """
    ctx = ctx or Context()
    man = manifest if isinstance(manifest, Manifest) else load_manifest(manifest, extra=False)
    specs = man.select(list(dict.fromkeys(subjects)) if subjects else None)
    _check_options(chunks, compression)
    store = CohortStore(ctx.location(out))
    exists = store.check_output()  # refuses anything but a cohort store
    todo, skipped = _reusable(store, specs, overwrite, exists)
    good, channels, bad = _plan_all(todo, store.channels() if exists else None, skip_bad)
    result = IngestResult(store.url, [], skipped, bad)
    if not good:
        return result
    root = store.prepare({"channels": channels, "mrhscale_version": __version__})
    _check_channels(good[0].id, channels, root.get("channels"))  # another process may have made it meanwhile
    with ctx.runner() as runner, store.writer() as w:
        job = _WriteJob(w, man, channels, chunks, _encoder(compression, clevel), checksums, skip_bad, bad)
        result.written = job.run(runner, good)
    return result


def _encoder(compression: str, clevel: int):
    return lambda ds: _encoding(ds, compression, clevel)


def _written(_write, counts, digests):
    """A subject's write done: its non-finite counts and its files' checksums (None: not asked)."""
    return counts, digests


class _WriteJob:
    """Subjects written side by side on the runner, each committed through the store writer as
    it finishes (a failed one is aborted, and with ``skip_bad`` listed instead of raised).

    A few subjects per worker thread are planned, claimed and in flight at a time: the
    driver holds that many graphs and claims, not the cohort's."""

    PER_THREAD = 4  # subjects in flight per worker thread: enough to keep every worker busy

    def __init__(self, writer, man, channels, chunks, encoding, checksums: bool, skip_bad: bool, bad: dict):
        self.w, self.man, self.channels, self.chunks = writer, man, channels, chunks
        self.encoding, self.checksums, self.skip_bad, self.bad = encoding, checksums, skip_bad, bad
        self.live: dict[int, tuple[SubjectPlan, str]] = {}  # task index -> (plan, staged path)
        self._taken = 0

    def run(self, runner: Runner, specs: list[SubjectSpec]) -> list[str]:
        written = []
        try:
            for i, res, err in runner.each_finished(self._tasks(specs), "ingest", unit="subject",
                                                    window=self.PER_THREAD * runner.n_threads(), total=len(specs)):
                plan, path = self.live.pop(i)
                if err is not None:
                    self._failed(plan.spec.id, path, err)
                    continue
                self._commit(plan, path, *res)
                written.append(plan.spec.id)
        finally:
            for plan, path in self.live.values():
                self.w.abort(plan.spec.id, path)
        order = {s.id: i for i, s in enumerate(specs)}
        return sorted(written, key=order.get)  # manifest order, whichever finished first

    def _tasks(self, specs: list[SubjectSpec]):
        """Each subject's write task, planned and claimed only when the runner takes it."""
        for spec in specs:
            plan = self._plan(spec)
            if plan is None:
                continue
            path = self.w.begin(spec.id)
            self.live[self._taken] = (plan, path)
            self._taken += 1
            yield self._task(plan, path)

    def _plan(self, spec: SubjectSpec) -> SubjectPlan | None:
        """The subject planned again (its files may have changed since they were checked)."""
        try:
            plan = plan_subject(spec)
            _check_channels(spec.id, plan.channels, self.channels)
            return plan
        except MRHError as e:
            if not self.skip_bad:
                raise
            self.bad[spec.id] = str(e)
            return None

    def _task(self, plan: SubjectPlan, path: str):
        """The subject's lazy write, with its files' checksums computed beside it."""
        ds, counts = subject_dataset(plan, self.chunks)
        write = self.w.lazy_write(path, ds, self.encoding(ds))
        sums = ([dask.delayed(checksum, pure=False)(p) for p in plan.spec.files().values()]
                if self.checksums else None)
        return dask.delayed(_written)(write, counts, sums)

    def _failed(self, sid: str, path: str, e: Exception) -> None:
        """Abort a subject; with ``skip_bad`` it is listed as bad, else the one-line error is raised."""
        self.w.abort(sid, path)
        err = task_error(e, f"subject {sid}")
        if not self.skip_bad:
            raise err from None
        self.bad[sid] = str(err)

    def _commit(self, plan: SubjectPlan, path: str, counts: dict, digests) -> None:
        sid = plan.spec.id
        sources = _sources(plan.spec, digests)
        self.w.commit(sid, path, _made_by(plan, sources), extra={
            "nonfinite_counts": {k: int(v) for k, v in counts.items()},
            "sources": sources,
            "ingested": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "manifest": self.man.path,
            "bids_root": self.man.bids_root,  # None: not from BIDS (predict's default derivatives)
        })
