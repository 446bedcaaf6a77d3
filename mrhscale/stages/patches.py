"""Training samples: lazy strided patch extraction over a cohort into a shuffled patch store.

Sampling rules (MRH_trainingPrep, see docs/patches.md)
-----------------------------------------------------
A sample is a (2H+1) x (2H+1) in-plane patch of all contrasts plus the target
patch at the same place. The slice axis (default ``y``: the original permuted
axes [1,3,2]) runs across slices; the patch lies in the plane of the two other
spatial axes, rows = the first of them in (x, y, z) order, columns = the second.
Candidate centres lie on a global grid: in-plane positions ``H + k*stride`` up to
``size - 1 - H`` (so the whole patch is inside the volume), every slice in the
slice range. A candidate is kept when the label patch sums to >= min_label_sum,
has >= min_label_nonzero nonzero voxels, neither patch holds a NaN, and the
centre voxel is in the mask. ``targets`` is ``[N, T, P, P]``, T stains (``--target
nf,mbp``; one stain: T = 1): a candidate is kept when any stain passes the label rules,
with NaN for a stain the sample lacks (docs/patches.md, "Several stains").

Out-of-core extraction and global shuffle (three Dask passes)
-------------------------------------------------------------
1. *Extract.* One task per spatial chunk of every subject (``dask.array.overlap``
   adds a halo of H voxels in the patch plane, none across slices). The task
   applies the rules to the grid centres it owns, draws for every kept sample a
   split (val subject / ``--val-fraction`` coin) and a random *bucket*, sorts
   the samples by (split, bucket) and writes them as one staging piece under
   ``PATCHES/_staging``. It returns only counts. Memory: one chunk plus halo.
2. *Shuffle.* One task per (split, bucket) reads its contiguous segment from
   every piece, permutes it, and writes the output chunks that lie entirely
   inside its range of the final order; the partial chunks at both ends go to
   small staging "edges". The number of buckets is chosen from an upper bound
   of the sample bytes so that one bucket holds at most ``bucket_bytes``
   (64 MiB, or a quarter of the smallest Dask worker's memory limit if less):
   memory per task is bounded whatever the cohort size.
   Random bucket then uniform shuffle within the bucket is a uniform random
   permutation of all samples (the order is exchangeable), so subjects
   interleave everywhere and the order depends only on the seed.
3. *Stitch.* One task per output chunk that straddles buckets assembles it
   from the edges. Then statistics, attrs, ``complete: true`` last; staging is
   deleted.

Every zarr chunk is written by exactly one task, so no locks are needed and the
same code runs on a LocalCluster, a remote cluster or the local schedulers.

The in-memory kernel is ``mrhscale.ops.patches.gather_patches`` (also used for
inference).
"""

from __future__ import annotations

import datetime as _dt
import functools
import math
import operator
import time

import dask
import dask.array as da
import numpy as np

from mrhscale import __version__
from mrhscale.errors import MRHError
from mrhscale.log import note
from mrhscale.ops.norm import PERCENTILES, Normalisation, robust_range, subject_stats_graph
from mrhscale.ops.patches import AXES, NUMBA, grid_positions, plane_axes, select_samples
from mrhscale.ops.stains import parse_stains, stain_record, target_name
from mrhscale.options import PATCH_DTYPES, PATCH_STATS, PatchOptions
from mrhscale.parallel.cluster import tune_malloc
from mrhscale.parallel.context import Context, Runner
from mrhscale.results import PatchesResult
from mrhscale.stores import CohortStore, PatchStore, resolve
from mrhscale.stores.patches import build, create_array, dims_of, open_array
from mrhscale.stores.urls import Location

SPLITS = ("train", "val")
STAGING = "_staging"
STATS_ROWS = 32768  # percentiles are computed on a seeded subsample of this many train patches

# --------------------------------------------------------------------------- pass 1: extract
def _extract_block(mri_b, tgt_b, mask_b, job: dict) -> dict:
    """Rules over the grid centres this chunk owns; write them sorted by (split, bucket)."""
    tune_malloc()  # Dask's worker malloc setting page-faults every chunk-sized buffer
    origin = np.asarray(job["origin"], np.int64)
    lo, hi = job["owned_lo"], job["owned_hi"]
    half, stride, axis = job["half"], job["stride"], job["axis"]
    s_ax, r_ax, c_ax = plane_axes(axis)
    size = job["size"]
    axes_pos = [None, None, None]
    axes_pos[s_ax] = np.arange(lo[s_ax], hi[s_ax], dtype=np.int64)
    for a in (r_ax, c_ax):
        axes_pos[a] = grid_positions(lo[a], hi[a], size[a], half, stride)
    n_b = job["n_buckets"]
    counts = np.zeros((2, max(n_b)), np.int64)
    if any(len(p) == 0 for p in axes_pos):
        return {"piece": None, "counts": counts, "candidates": 0}
    gx, gy, gz = np.meshgrid(*axes_pos, indexing="ij")
    cent = np.stack([gx.ravel(), gy.ravel(), gz.ravel()], axis=1)
    mri_b = np.asarray(mri_b)
    idx, inputs, labels = select_samples(
        mri_b, np.asarray(tgt_b, np.float32), np.asarray(mask_b), cent - origin, half, axis,
        job["min_label_sum"], job["min_label_nonzero"],
    )
    n = len(idx)
    if n == 0:
        return {"piece": None, "counts": counts, "candidates": len(cent)}
    if job["dtype"] == "float16":
        inputs = inputs.astype(np.float16)
        if not np.isfinite(inputs).all():
            raise MRHError(
                f"subject {job['subject']!r}: inputs exceed the float16 range (65504); use --dtype float32"
            )
    elif inputs.dtype != np.float32:
        inputs = inputs.astype(np.float32)
    org = np.empty((n, 4), np.int32)
    org[:, 0] = job["sidx"]
    org[:, 1:] = cent[idx]
    rng = np.random.default_rng([job["seed"], 1, job["sidx"], job["block"]])
    if job["val_mode"] == "subject":
        split = np.full(n, 1 if job["is_val"] else 0, np.int64)
    elif job["val_mode"] == "fraction":
        split = (rng.random(n) < job["val_fraction"]).astype(np.int64)
    else:
        split = np.zeros(n, np.int64)
    bucket = np.where(split == 1, rng.integers(0, n_b[1], n), rng.integers(0, n_b[0], n))
    key = split * counts.shape[1] + bucket
    order = np.argsort(key, kind="stable")
    counts[:] = np.bincount(key, minlength=counts.size).reshape(counts.shape)
    loc = job["out"]
    name = f"{STAGING}/p{job['sidx']}_{job['block']}"
    rows = max(1, min(n, job["stage_rows"]))
    for var, data in (("inputs", inputs), ("targets", labels.astype(np.float32)), ("origin", org)):
        arr = create_array(loc, f"{name}_{var}", data.shape, (rows, *data.shape[1:]), data.dtype,
                           dims_of(var), "none")
        arr[...] = data[order]
    return {"piece": name, "counts": counts, "candidates": len(cent)}


# --------------------------------------------------------------------------- pass 2: shuffle
def _read_rows(loc, name, start, stop):
    return tuple(open_array(loc, f"{name}_{v}", "r")[start:stop] for v in ("inputs", "targets", "origin"))


def _shuffle_bucket(job: dict) -> dict:
    """Read one (split, bucket) from all pieces, permute, write its whole output chunks.

    Memory: the bucket once (read into preallocated arrays) plus one output chunk.
    """
    loc = job["out"]
    n = sum(b - a for _, a, b in job["segments"])
    data = None
    pos = 0
    for name, a, b in job["segments"]:
        part = _read_rows(loc, name, a, b)
        if data is None:
            data = [np.empty((n, *x.shape[1:]), x.dtype) for x in part]
        for dst, x in zip(data, part, strict=True):
            dst[pos:pos + len(x)] = x
        pos += b - a
    del part
    perm = np.random.default_rng([job["seed"], 2, job["split"], job["bucket"]]).permutation(n)
    g0, nc, total = job["start"], job["chunk"], job["total"]
    g1 = g0 + n
    split = SPLITS[job["split"]]
    names = ("inputs", "targets", "origin")
    arrs = {v: open_array(loc, f"{split}/{v}") for v in names}
    first_full = -(-g0 // nc) * nc
    j0 = first_full
    while j0 < g1:
        j1 = min(j0 + nc, total)
        if j1 > g1:
            break
        rows = perm[j0 - g0:j1 - g0]
        for v, x in zip(names, data, strict=True):
            arrs[v][j0:j1] = x[rows]
        j0 = j1
    head = (g0, min(first_full, g1))
    tail = (max(j0, head[1]), g1)
    keep = [(a, b) for a, b in (head, tail) if b > a]
    edges = []
    if keep:
        sel = perm[np.concatenate([np.arange(a - g0, b - g0) for a, b in keep])]
        name = f"{STAGING}/e{job['split']}_{job['bucket']}"
        for var, x in zip(names, data, strict=True):
            d = x[sel]
            arr = create_array(loc, f"{name}_{var}", d.shape, (max(1, len(d)), *d.shape[1:]), d.dtype,
                               dims_of(var), "none")
            arr[...] = d
        off = 0
        for a, b in keep:
            edges.append({"name": name, "row": off, "start": a, "stop": b})
            off += b - a
    res = {"edges": edges}
    if job["split"] == 0:
        rows = perm[:job["stats_rows"]]
        res["sample_inputs"] = data[0][rows].astype(np.float32)
        res["sample_targets"] = data[1][rows]
        res["input_max"] = float(data[0].max()) if n else -np.inf
        res["target_max"] = _stain_max(data[1]) if n else -np.inf
    return res


def _stain_max(t: np.ndarray):
    """The largest target value of each stain (NaN = absent ignored)."""
    with np.errstate(invalid="ignore"):
        m = np.nanmax(np.where(np.isnan(t), -np.inf, t), axis=(0, 2, 3))
    return m.astype(float).tolist()


# --------------------------------------------------------------------------- pass 3: stitch
def _stitch_chunk(job: dict) -> int:
    loc = job["out"]
    j0, j1 = job["lo"], job["hi"]
    split = SPLITS[job["split"]]
    bufs = {}
    for e in job["edges"]:
        a, b = max(e["start"], j0), min(e["stop"], j1)
        r0 = e["row"] + a - e["start"]
        for var, data in zip(("inputs", "targets", "origin"),
                             _read_rows(loc, e["name"], r0, r0 + b - a), strict=True):
            if var not in bufs:
                bufs[var] = np.empty((j1 - j0, *data.shape[1:]), data.dtype)
            bufs[var][a - j0:b - j0] = data
    for var, data in bufs.items():
        open_array(loc, f"{split}/{var}")[j0:j1] = data
    return j1 - j0


# --------------------------------------------------------------------------- running
TIMINGS: dict = {}  # seconds per pass of the last extract_patches call (also in provenance)


def _run(runner: Runner, tasks: list, desc: str, bar: bool = True) -> list:
    """The pass's tasks on the runner (a progress bar unless ``bar`` is False or the runner is
    quiet), timed for the provenance."""
    t0 = time.perf_counter()
    try:
        return runner.compute(tasks, desc, what=f"patches ({desc})", quiet=None if bar else True)
    finally:  # a pass run a batch of subjects at a time: its batches' sum
        TIMINGS[desc] = round(TIMINGS.get(desc, 0.0) + time.perf_counter() - t0, 3)


# --------------------------------------------------------------------------- the stage
def chunk_rows(n_c: int, p: int, itemsize: int, target_bytes: int = 8 << 20) -> int:
    per = n_c * p * p * itemsize
    return int(min(65536, max(64, 2 ** int(math.log2(max(1, target_bytes // per))))))


def check_options(o: PatchOptions) -> None:
    """The options' values, each named by its flag when wrong."""
    if o.stats not in PATCH_STATS:
        raise MRHError(f"--stats must be one of {', '.join(PATCH_STATS)}, got {o.stats!r}")
    if o.dtype not in PATCH_DTYPES:
        raise MRHError(f"--dtype must be one of {', '.join(PATCH_DTYPES)}, got {o.dtype!r}")
    if not isinstance(o.half, int | np.integer) or o.half < 0:
        raise MRHError(f"--half must be an integer >= 0, got {o.half!r}")
    if not isinstance(o.stride, int | np.integer) or o.stride < 1:
        raise MRHError(f"--stride must be an integer >= 1, got {o.stride!r}")
    plane_axes(o.axis)
    if o.min_label_nonzero < 0 or o.min_label_nonzero > o.size ** 2:
        raise MRHError(f"--min-label-nonzero must be in 0..{o.size ** 2}, got {o.min_label_nonzero}")
    if o.val_subjects and o.val_fraction:
        raise MRHError("give either --val-fraction or --val-subjects, not both")
    if not 0.0 <= float(o.val_fraction) < 1.0:
        raise MRHError(f"--val-fraction must be in [0, 1), got {o.val_fraction}")
    if o.chunk_size is not None and o.chunk_size < 1:
        raise MRHError(f"chunk_size must be >= 1, got {o.chunk_size}")


def _check_val(sids: list[str], o: PatchOptions) -> None:
    """The held-out subjects are among the cohort's, and leave some for training."""
    unknown = [s for s in o.val_subjects if s not in sids]
    if unknown:
        raise MRHError(f"--val-subjects: {', '.join(unknown)} not among the subjects ({', '.join(sids)})")
    if o.val_subjects and set(o.val_subjects) >= set(sids):
        raise MRHError("--val-subjects: every subject is held out; leave at least one for training")


def _check_subject(sid: str, ds, stains: list[str], o: PatchOptions) -> tuple[int, int, int]:
    """The subject has room for a patch and the stain (with several: at least one of them);
    returns its (x, y, z) shape."""
    if not any(has_stain(ds, t) for t in stains):
        avail = ds.attrs.get("targets") or [v for v in ds.data_vars if v not in ("mri", "mask", "fa")]
        raise MRHError(f"subject {sid!r}: unknown target {target_name(stains)!r} "
                       f"(available: {', '.join(map(str, avail)) or 'none'})")
    s_ax, r_ax, c_ax = plane_axes(o.axis)
    shp = tuple(int(ds.sizes[a]) for a in AXES)
    for a in (r_ax, c_ax):
        if shp[a] < o.size:
            raise MRHError(f"subject {sid!r}: patch {o.size}x{o.size} (--half {o.half}) is larger than "
                           f"the volume along {AXES[a]} ({shp[a]} voxels)")
    if o.slices is not None:
        a0, b0 = _slice_bounds(o.slices, shp[s_ax])
        if not 0 <= a0 < b0 <= shp[s_ax]:
            raise MRHError(f"--slices {a0}:{b0} out of bounds for subject {sid!r}: {AXES[s_ax]} has "
                           f"{shp[s_ax]} slices (give A:B with 0 <= A < B <= {shp[s_ax]})")
    return shp


def has_stain(ds, stain: str) -> bool:
    return stain in ds.data_vars and stain in ds.attrs.get("targets", [stain])


def _slice_bounds(slices, n: int) -> tuple[int, int]:
    return (0 if slices[0] is None else slices[0], n if slices[1] is None else slices[1])


def extract_patches(
    store_url: str,
    target: str,
    out_url: str,
    *,
    subjects: list[str] | None = None,
    overwrite: bool = False,
    options: PatchOptions | None = None,
    ctx: Context | None = None,
    bucket_bytes: int | None = None,
) -> PatchesResult:
    """Extract training patches of ``target`` (a stain, or several: ``"nf,mbp"``) from a
    cohort store into a shuffled patch store.

    ``options``: the sampling rules and output layout (:class:`mrhscale.options.PatchOptions`;
    see the module docstring and docs/patches.md). Runs on ``ctx``'s Dask cluster or local
    scheduler. A complete store at ``out_url`` made from the same cohort subjects,
    target and options is reused as it is; one made from anything else is replaced
    only with ``overwrite`` (built aside, swapped in when complete). Returns a summary.
    """
    ctx = ctx or Context()
    t_start = time.perf_counter()
    TIMINGS.clear()
    opts = options or PatchOptions()
    check_options(opts)
    stains = parse_stains(target)
    store_url, out_url = resolve(store_url), resolve(out_url)
    if store_url == out_url:
        raise MRHError("--out must differ from the cohort store")
    source = CohortStore.open(ctx.location(store_url))
    sids = source.cohort_ids(subjects)
    _check_val(sids, opts)
    made_by = {"stage": "patches", "target": target_name(stains), "options": opts.record(),
               "subjects": {sid: source.identity(sid)["fingerprint"] for sid in sids}}
    with build(ctx.location(out_url), made_by, overwrite=overwrite) as b:
        if b is None:
            return _reused(out_url, ctx)
        with ctx.runner() as runner:
            job = _Extraction(runner, source, sids, stains, opts, b.loc)
            summary = job.run(bucket_bytes)
            b.finish(job.attrs(summary, store_url, t_start), made_by)
    res = PatchesResult(out=out_url, seconds=round(time.perf_counter() - t_start, 3), subjects=sids,
                        reused=False, **summary)
    _say(ctx, f"{res.n_train} train + {res.n_val} val patches -> {out_url} ({res.seconds:.1f} s)")
    return res


def _say(ctx: Context, msg: str) -> None:
    note(f"mrhscale patches: {msg}", ctx.quiet)


def _reused(out_url: str, ctx: Context) -> PatchesResult:
    a = PatchStore.open(ctx.location(out_url)).attrs
    _say(ctx, f"{out_url} is up to date (same cohort subjects, target and options): reused")
    return PatchesResult(out=out_url, n_train=a["n_train"], n_val=a["n_val"], subjects=a["subjects"],
                         seconds=0.0, reused=True)


def _default_bucket_bytes(runner: Runner) -> int:
    """64 MiB, or a quarter of the smallest worker's memory limit if that is less."""
    lims = [x for x in runner.worker_memory_limits() if x]
    return int(min(64 << 20, max(4 << 20, min(lims) // 4))) if lims else 64 << 20


class _Extraction:
    """The passes (survey, extract, shuffle, stitch) into a patch store being built.

    The survey and the extraction open the cohort's subjects a batch at a time: the driver
    holds a batch's lazy datasets and task graphs, not the cohort's, however many subjects."""

    BATCH = 32  # subjects opened at once (at least; 4 per worker thread on a larger cluster)

    def __init__(self, runner: Runner, source, sids: list[str], stains, opts: PatchOptions, out: Location):
        self.runner, self.source, self.sids, self.stains = runner, source, sids, stains
        self.o, self.out = opts, out
        self.val_set = set(opts.val_subjects)
        self.val_mode = "subject" if self.val_set else ("fraction" if opts.val_fraction > 0 else "none")

    def run(self, bucket_bytes: int | None) -> dict:
        self.survey()
        in_item = 2 if self.o.dtype == "float16" else 4
        self.nc = self.o.chunk_size or chunk_rows(len(self.channels), self.o.size, in_item)
        self.n_buckets = self.plan_buckets(bucket_bytes or _default_bucket_bytes(self.runner))
        pieces, n_cand = self.extract()
        totals = np.zeros((2, max(self.n_buckets)), np.int64)
        for _, c in pieces:
            totals += c
        n_split = totals.sum(axis=1)
        self.check_counts(n_split, n_cand)
        self.create_outputs(n_split)
        jobs2, res2, norm = self.shuffle(pieces, totals, n_split)
        self.stitch(jobs2, res2, n_split)
        return {"n_train": int(n_split[0]), "n_val": int(n_split[1]), "n_candidates": n_cand,
                "norm": norm, "subject_norm": self.norms, "chunk_size": self.nc,
                "n_buckets": list(self.n_buckets)}

    def batches(self):
        """The subjects as lazy datasets, a batch at a time, in cohort order."""
        size = max(self.BATCH, 4 * self.runner.n_threads())
        for k in range(0, len(self.sids), size):
            yield {sid: self.source.open_subject(sid) for sid in self.sids[k:k + size]}

    def survey(self) -> None:
        """Each subject checked (its channels, shape and stains), with the slices to sample and
        its own input statistics: ``shapes``, ``ranges``, ``norms``, ``channels``."""
        self.shapes, self.ranges, self.norms, seen = {}, {}, {}, set()
        for batch in self.batches():
            for sid, ds in batch.items():
                self._check(sid, ds)
                seen |= {t for t in self.stains if has_stain(ds, t)}
            self._survey_batch(batch)
        nowhere = [t for t in self.stains if t not in seen]
        if nowhere:
            raise MRHError(f"--target: no subject has {', '.join(nowhere)}")

    def _check(self, sid: str, ds) -> None:
        if not self.shapes:
            self.channels = [str(c) for c in ds.contrast.values]
            self._ref = (sid, list(ds.contrast.values))
        self.source.check_channels(sid, ds, *self._ref)
        self.shapes[sid] = _check_subject(sid, ds, self.stains, self.o)

    def _survey_batch(self, batch: dict) -> None:
        """A batch's slice ranges and subject statistics, in one run of its tasks."""
        stats = [subject_stats_graph(ds["mri"].data, ds["mask"].data) for ds in batch.values()]
        if self.o.slices is not None:
            s_ax = plane_axes(self.o.axis)[0]
            ranges = [_slice_bounds(self.o.slices, self.shapes[sid][s_ax]) for sid in batch]
            res = _run(self.runner, stats, "subject statistics", bar=False)
        else:
            res = _run(self.runner, [self._range_task(ds) for ds in batch.values()] + stats, "survey", bar=False)
            ranges = [self._range_of(has) for has in res[:len(batch)]]
            res = res[len(batch):]
        self.ranges.update(zip(batch, ranges, strict=True))
        self.norms.update(zip(batch, res, strict=True))

    def _range_task(self, ds):
        """Whether each slice holds target data (non-zero, not NaN) in some stain."""
        s_ax, r_ax, c_ax = plane_axes(self.o.axis)
        has = [((t != 0) & ~da.isnan(t)).any(axis=(r_ax, c_ax))
               for t in (ds[s].data for s in self.stains if has_stain(ds, s))]
        return dask.delayed(np.asarray)(functools.reduce(operator.or_, has))

    @staticmethod
    def _range_of(has) -> tuple[int, int] | None:
        """The slices to sample: from the first to the last that holds target data."""
        nz = np.flatnonzero(has)
        return (int(nz[0]), int(nz[-1]) + 1) if len(nz) else None

    def plan_buckets(self, bucket_bytes: int) -> list[int]:
        """Shuffle buckets per split, from an upper bound of the sample bytes."""
        o = self.o
        s_ax, r_ax, c_ax = plane_axes(o.axis)
        p = o.size
        per = len(self.channels) * p * p * (2 if o.dtype == "float16" else 4) + len(self.stains) * p * p * 4 + 16
        est = [0.0, 0.0]
        for sid in self.sids:
            if self.ranges[sid] is None:
                continue
            shp = self.shapes[sid]
            nr = len(grid_positions(0, shp[r_ax], shp[r_ax], o.half, o.stride))
            ncol = len(grid_positions(0, shp[c_ax], shp[c_ax], o.half, o.stride))
            cand = nr * ncol * (self.ranges[sid][1] - self.ranges[sid][0]) * per
            if sid in self.val_set:
                est[1] += cand
            else:
                est[0] += cand * (1 - o.val_fraction)
                est[1] += cand * o.val_fraction
        return [max(1, math.ceil(e / bucket_bytes)) for e in est]

    def extract(self):
        """Pass 1: one task per chunk of every subject, a batch of subjects at a time;
        returns (pieces, candidates)."""
        index = {sid: i for i, sid in enumerate(self.sids)}
        pieces, n_cand = [], 0
        for batch in self.batches():
            tasks = [t for sid, ds in batch.items() if self.ranges[sid] is not None
                     for t in self._subject_tasks(index[sid], sid, ds)]
            res = _run(self.runner, tasks, "extract")
            pieces += [(r["piece"], r["counts"]) for r in res if r["piece"] is not None]
            n_cand += int(sum(r["candidates"] for r in res))
        return pieces, n_cand

    def _subject_tasks(self, sidx: int, sid: str, ds) -> list:
        o = self.o
        s_ax, r_ax, c_ax = plane_axes(o.axis)
        a, b = self.ranges[sid]
        sel = [slice(None)] * 3
        sel[s_ax] = slice(a, b)
        mri = ds["mri"].data
        if mri.chunks[3] != (len(self.channels),):
            mri = mri.rechunk({3: -1})
        mri = mri[(*sel, slice(None))]
        spatial = mri.chunks[:3]
        tgt = self._target_volume(ds, tuple(sel), spatial)
        mask = ds["mask"].data[tuple(sel)].rechunk(spatial)
        if o.half:
            depth = {r_ax: o.half, c_ax: o.half}
            if any(min(mri.chunks[ax]) < o.half for ax in (r_ax, c_ax)):
                raise MRHError(f"subject {sid!r}: store chunks smaller than the patch halo ({o.half})")
            mri = da.overlap.overlap(mri, depth={**depth, 3: 0}, boundary="none")
            tgt = da.overlap.overlap(tgt, depth={**depth, 3: 0}, boundary="none")
            mask = da.overlap.overlap(mask, depth=depth, boundary="none")
        dm, dt, dk = mri.to_delayed(), tgt.to_delayed(), mask.to_delayed()
        starts = [np.concatenate([[0], np.cumsum(c)]) for c in spatial]
        tasks = []
        for bi in np.ndindex(*dm.shape[:3]):
            lo = [int(starts[ax][bi[ax]]) for ax in range(3)]
            hi = [int(starts[ax][bi[ax] + 1]) for ax in range(3)]
            lo[s_ax] += a
            hi[s_ax] += a
            org = [lo[ax] - (o.half if ax in (r_ax, c_ax) and bi[ax] > 0 else 0) for ax in range(3)]
            job = self._block_job(sid, sidx, int(np.ravel_multi_index(bi, dm.shape[:3])), org, lo, hi)
            tasks.append(dask.delayed(_extract_block, pure=False)(dm[(*bi, 0)], dt[(*bi, 0)], dk[bi], job))
        return tasks

    def _target_volume(self, ds, sel: tuple, spatial):
        """The stains stacked (x, y, z, stain), NaN for one the subject lacks (the loss's mask)."""
        shape = tuple(sum(c) for c in spatial)
        vols = [ds[s].data[sel].rechunk(spatial).astype(np.float32) if has_stain(ds, s)
                else da.full(shape, np.nan, dtype=np.float32, chunks=spatial) for s in self.stains]
        return da.stack(vols, axis=-1).rechunk((*spatial, -1))

    def _block_job(self, sid, sidx, block, origin, lo, hi) -> dict:
        o = self.o
        return {
            "subject": sid, "sidx": sidx, "block": block, "origin": origin, "owned_lo": lo,
            "owned_hi": hi, "size": self.shapes[sid], "half": o.half, "stride": o.stride,
            "axis": o.axis, "min_label_sum": o.min_label_sum, "min_label_nonzero": o.min_label_nonzero,
            "dtype": o.dtype, "seed": o.seed, "val_mode": self.val_mode, "val_fraction": o.val_fraction,
            "is_val": sid in self.val_set, "n_buckets": self.n_buckets, "out": self.out,
            "stage_rows": max(256, self.nc // 8),
        }

    def check_counts(self, n_split, n_cand: int) -> None:
        o = self.o
        if n_split.sum() == 0:
            raise MRHError(
                f"zero samples survive the rules ({n_cand} candidates; min_label_sum={o.min_label_sum}, "
                f"min_label_nonzero={o.min_label_nonzero}, centre in mask, no NaN): check --target, "
                "--slices, --stride and the thresholds")
        if n_split[0] == 0:
            raise MRHError("no training samples survive the rules (all samples fell in the validation split)")
        if self.val_mode != "none" and n_split[1] == 0:
            raise MRHError("the validation split is empty: raise --val-fraction or choose other --val-subjects")

    def create_outputs(self, n_split) -> None:
        n_c, p, nc = len(self.channels), self.o.size, self.nc
        in_dtype = np.float16 if self.o.dtype == "float16" else np.float32
        for s, split in enumerate(SPLITS):
            n = int(n_split[s])
            t_shape = (n, len(self.stains), p, p)
            for var, shape, dtype in (("inputs", (n, n_c, p, p), in_dtype), ("targets", t_shape, np.float32),
                                      ("origin", (n, 4), np.int32)):
                create_array(self.out, f"{split}/{var}", shape, (nc, *shape[1:]), dtype, dims_of(var),
                             self.o.compress)

    def shuffle(self, pieces, totals, n_split):
        """Pass 2: one task per (split, bucket)."""
        piece_off = [np.concatenate([[0], np.cumsum(c.ravel())])[:-1].reshape(c.shape) for _, c in pieces]
        jobs, n_train = [], int(n_split[0])
        for s in range(2):
            g = 0
            for bkt in range(totals.shape[1]):
                nb = int(totals[s, bkt])
                if nb == 0:
                    continue
                segs = [(name, int(off[s, bkt]), int(off[s, bkt] + c[s, bkt]))
                        for (name, c), off in zip(pieces, piece_off, strict=True) if c[s, bkt]]
                q = nb if n_train <= STATS_ROWS else int(STATS_ROWS * nb // n_train)
                jobs.append({"split": s, "bucket": bkt, "segments": segs, "start": g, "chunk": self.nc,
                             "total": int(n_split[s]), "seed": self.o.seed, "out": self.out,
                             "stats_rows": q})
                g += nb
        return (jobs, *self._shuffled(jobs))

    def _shuffled(self, jobs: list) -> tuple[list, dict]:
        """The buckets shuffled (their edges, for the stitch) and the store's normalisation,
        computed beside them: the train sample (up to STATS_ROWS patches) never comes here."""
        res = [dask.delayed(_shuffle_bucket, pure=False)(j) for j in jobs]
        train = [r for j, r in zip(jobs, res, strict=True) if j["split"] == 0]
        norm = dask.delayed(_norm_record)(train, self.o.stats, len(self.channels), len(self.stains))
        out = _run(self.runner, [dask.delayed(_edges)(r) for r in res] + [norm], "shuffle")
        return out[:-1], out[-1]

    def stitch(self, jobs2, res2, n_split) -> None:
        """Pass 3: one task per output chunk that straddles buckets."""
        nc, jobs = self.nc, []
        for s in range(2):
            by_chunk: dict[int, list] = {}
            for e in (e for j, r in zip(jobs2, res2, strict=True) if j["split"] == s for e in r["edges"]):
                for cj in range(e["start"] // nc, (e["stop"] - 1) // nc + 1):
                    by_chunk.setdefault(cj, []).append(e)
            jobs += [{"split": s, "lo": cj * nc, "hi": min((cj + 1) * nc, int(n_split[s])), "edges": es,
                      "out": self.out} for cj, es in sorted(by_chunk.items())]
        _run(self.runner, [dask.delayed(_stitch_chunk, pure=False)(j) for j in jobs], "stitch")

    def attrs(self, summary: dict, store_url: str, t_start: float) -> dict:
        """The root attrs of the finished store (docs/stores.md)."""
        o = self.o
        prov = {"stage": "patches", "mrhscale": __version__, "source": store_url,
                "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                "params": {**o.record(), "chunk_size": self.nc, "n_buckets": list(self.n_buckets)},
                "numba": NUMBA is not None, "seconds": round(time.perf_counter() - t_start, 3),
                "pass_seconds": dict(TIMINGS)}
        return {
            "channels": self.channels, **stain_record(self.stains),
            "patch": {"half": o.half, "size": o.size, "axis": o.axis}, "norm": summary.pop("norm"),
            "subject_norm": summary.pop("subject_norm"), "subjects": self.sids,
            "val_subjects": sorted(self.val_set), "n_train": summary["n_train"],
            "n_val": summary["n_val"], "seed": o.seed,
            "rules": {"stride": o.stride,
                      "slices": {sid: (list(r) if r else None) for sid, r in self.ranges.items()},
                      "min_label_sum": o.min_label_sum, "min_label_nonzero": o.min_label_nonzero},
            "provenance": prov,
        }


def _edges(res: dict) -> dict:
    """What of a shuffled bucket the stitch needs."""
    return {"edges": res["edges"]}


def _norm_record(train_res: list, mode: str, n_c: int, n_stains: int) -> dict:
    return _norm_stats(train_res, mode, n_c, n_stains).to_dict()


def _norm_stats(train_res: list, mode: str, n_c: int, n_stains: int = 1):
    """The store's normalisation: inputs per channel, targets per stain."""
    if mode == "global-max":
        in_max = max(r["input_max"] for r in train_res)
        t_max = np.max([np.atleast_1d(r["target_max"]) for r in train_res], axis=0)
        t_max = [float(v) if v > 0 else 1.0 for v in t_max]
        return Normalisation.global_max(n_c, in_max if in_max > 0 else 1.0, t_max)
    x = np.concatenate([r["sample_inputs"] for r in train_res])
    t = np.concatenate([r["sample_targets"] for r in train_res])
    lo, scale = robust_range(x.transpose(1, 0, 2, 3).reshape(n_c, -1), axis=1)
    t_hi = [_target_high(t[:, k]) for k in range(n_stains)]
    return Normalisation(
        "percentile", lo.astype(float).tolist(), scale.astype(float).tolist(),
        [0.0] * n_stains, t_hi,
        meta={"percentiles": list(PERCENTILES), "rows_sampled": int(len(x)), "split": "train",
              "target": f"offset 0, scale = {PERCENTILES[1]}th percentile of train target values"
                        + " (per stain, where present)"},
    )


def _target_high(t: np.ndarray) -> float:
    """The target scale: its 99.5th percentile (NaN = absent ignored), else its max, else 1."""
    t = t[~np.isnan(t)]
    hi = float(np.percentile(t, PERCENTILES[1])) if t.size else 1.0
    if not hi > 0:
        hi = float(t.max()) if t.size and t.max() > 0 else 1.0
    return hi
