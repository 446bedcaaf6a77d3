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
centre voxel is in the mask.

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

The in-memory kernel :func:`gather_patches` (also for inference) builds
``[n, C, P, P]`` patches from a contrast-last volume without a Python loop
over patches (numba when installed, else numpy ``take`` + transpose).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import os
import time

import numpy as np

from mrhscale.errors import MRHError

AXES = ("x", "y", "z")
SPLITS = ("train", "val")
STAGING = "_staging"
LOCAL_SCHEDULERS = ("synchronous", "sync", "single-threaded", "threads", "threading", "processes")
NORM_MODES = ("percentile", "global-max")
DTYPES = ("float32", "float16")
PERCENTILES = (0.5, 99.5)
STATS_ROWS = 32768  # percentiles are computed on a seeded subsample of this many train patches

try:  # optional accelerator: the numpy path below gives identical results
    import numba as _numba
except ImportError:  # pragma: no cover - exercised where numba is absent
    _numba = None


# --------------------------------------------------------------------------- geometry
def plane_axes(axis: str) -> tuple[int, int, int]:
    """(slice axis, row axis, col axis) as indices into (x, y, z)."""
    if axis not in AXES:
        raise MRHError(f"--axis must be one of x, y, z, got {axis!r}")
    s = AXES.index(axis)
    r, c = (a for a in range(3) if a != s)
    return s, r, c


def _offsets(shape_xyz, half: int, axis: str) -> np.ndarray:
    """Flat voxel offsets of the P*P patch positions (row-major) in a C-order (x,y,z) grid."""
    _, ra, ca = plane_axes(axis)
    strides = (shape_xyz[1] * shape_xyz[2], shape_xyz[2], 1)
    d = np.arange(-half, half + 1, dtype=np.int64)
    return (d[:, None] * strides[ra] + d[None, :] * strides[ca]).ravel()


def _flat_centres(centres: np.ndarray, shape_xyz, half: int, axis: str) -> np.ndarray:
    centres = np.asarray(centres)
    if centres.ndim != 2 or centres.shape[1] != 3:
        raise MRHError(f"centres must be an [n, 3] integer array of (x, y, z), got shape {centres.shape}")
    c = centres.astype(np.int64, copy=False)
    if len(c):
        _, ra, ca = plane_axes(axis)
        lo = np.zeros(3, np.int64)
        hi = np.asarray(shape_xyz, np.int64) - 1
        lo[[ra, ca]] += half
        hi[[ra, ca]] -= half
        if (c < lo).any() or (c > hi).any():
            raise MRHError(
                f"patch out of bounds: centres must lie in {lo.tolist()}..{hi.tolist()} "
                f"for half={half}, axis={axis!r} in a volume of shape {tuple(shape_xyz)}"
            )
    return (c[:, 0] * shape_xyz[1] + c[:, 1]) * shape_xyz[2] + c[:, 2]


if _numba is not None:

    @_numba.njit(nogil=True, cache=True, boundscheck=False)
    def _gather_nb(v, base, offs, out):  # v [V, C], out [n, C, Q]
        n = base.shape[0]
        q = offs.shape[0]
        c_n = v.shape[1]
        for i in range(n):
            b = base[i]
            for j in range(q):
                src = b + offs[j]
                for c in range(c_n):
                    out[i, c, j] = v[src, c]
        return out

    @_numba.njit(nogil=True, parallel=True, cache=True, boundscheck=False)
    def _gather_nb_par(v, base, offs, out):
        n = base.shape[0]
        q = offs.shape[0]
        c_n = v.shape[1]
        for i in _numba.prange(n):
            b = base[i]
            for j in range(q):
                src = b + offs[j]
                for c in range(c_n):
                    out[i, c, j] = v[src, c]
        return out


def gather_patches(vol, centres, half: int = 1, axis: str = "y", *, out=None, threads: int = 1,
                   backend: str = "auto") -> np.ndarray:
    """In-plane patches of a contrast-last volume, as the model takes them.

    vol: ``[X, Y, Z, C]`` array (contrast fastest, as in the cohort store; a
    ``[X, Y, Z]`` volume gives ``[n, P, P]``). centres: ``[n, 3]`` integer
    (x, y, z) voxel indices of patch centres; every patch must lie inside
    ``vol`` (MRHError otherwise). Returns ``[n, C, P, P]`` (P = 2*half+1) of
    ``vol``'s dtype with ``out[i, c, r, k] = vol[..centre_i + (r-half) along
    the row axis + (k-half) along the col axis.., c]``; rows/cols are the two
    non-slice axes in (x, y, z) order (axis="y": rows x, cols z).

    Vectorised: no Python loop over patches. ``backend``: "numba" (one pass,
    used when installed), "numpy" (``take`` then transpose, ~3x slower), or
    "auto". ``threads > 1`` uses numba's parallel loop (keep 1 inside Dask
    workers, which already use every core).
    """
    v = np.asarray(vol)
    scalar = v.ndim == 3
    if scalar:
        v = v[..., None]
    if v.ndim != 4:
        raise MRHError(f"gather_patches: volume must be [X, Y, Z, C] or [X, Y, Z], got shape {v.shape}")
    if half < 0:
        raise MRHError(f"--half must be >= 0, got {half}")
    p = 2 * half + 1
    shape = v.shape[:3]
    n_c = v.shape[3]
    base = _flat_centres(centres, shape, half, axis)
    offs = _offsets(shape, half, axis)
    if not v.flags.c_contiguous:
        v = np.ascontiguousarray(v)
    flat = v.reshape(-1, n_c)
    n = len(base)
    if out is None:
        out = np.empty((n, n_c, p, p), v.dtype)
    elif out.shape != (n, n_c, p, p) or out.dtype != v.dtype or not out.flags.c_contiguous:
        raise MRHError(f"gather_patches: out must be a C-contiguous {v.dtype} array of shape {(n, n_c, p, p)}")
    use_numba = backend == "numba" or (backend == "auto" and _numba is not None)
    if backend == "numba" and _numba is None:
        raise MRHError("gather_patches: backend='numba' but numba is not installed")
    if use_numba and n:
        kern = _gather_nb_par if threads > 1 else _gather_nb
        kern(flat, base, offs, out.reshape(n, n_c, p * p))
    elif n:
        g = np.take(flat, (base[:, None] + offs[None, :]).ravel(), axis=0).reshape(n, p * p, n_c)
        out.reshape(n, n_c, p * p)[...] = g.transpose(0, 2, 1)
    return out[:, 0] if scalar else out


def grid_positions(lo: int, hi: int, size: int, half: int, stride: int) -> np.ndarray:
    """Global in-plane grid positions ``half + k*stride <= size-1-half`` that fall in [lo, hi)."""
    lo = max(lo, half)
    hi = min(hi, size - half)
    if hi <= lo:
        return np.zeros(0, np.int64)
    first = half + (-(-(lo - half) // stride)) * stride
    return np.arange(first, hi, stride, dtype=np.int64)


def select_samples(mri, target, mask, centres, half: int, axis: str, min_label_sum: float,
                   min_label_nonzero: int):
    """Apply the sampling rules to candidate centres of an in-memory block.

    mri [X,Y,Z,C], target/mask [X,Y,Z] (block-local), centres [n,3] block-local.
    Returns (keep_index, inputs [k,C,P,P], labels [k,P,P]) for the kept candidates.
    """
    labels = gather_patches(target, centres, half, axis)
    lab = labels.reshape(len(labels), -1)
    with np.errstate(invalid="ignore"):
        ok = (lab.sum(axis=1, dtype=np.float64) >= min_label_sum)
    ok &= np.count_nonzero(lab, axis=1) >= min_label_nonzero  # NaN labels: dropped next line
    ok &= ~np.isnan(lab).any(axis=1)
    c = centres
    ok &= np.asarray(mask)[c[:, 0], c[:, 1], c[:, 2]].astype(bool)
    idx = np.flatnonzero(ok)
    inputs = gather_patches(mri, centres[idx], half, axis)
    finite = ~np.isnan(inputs).any(axis=(1, 2, 3))
    if not finite.all():
        idx, inputs = idx[finite], inputs[finite]
    return idx, inputs, labels[idx]


# --------------------------------------------------------------------------- storage helpers
def _fs(url: str, storage_options: dict | None):
    import fsspec

    return fsspec.core.url_to_fs(str(url), **(storage_options or {}))


def _exists(url: str, storage_options: dict | None) -> bool:
    fs, path = _fs(url, storage_options)
    return fs.exists(path)


def _remove(url: str, storage_options: dict | None) -> None:
    from mrhscale.store import is_local, local_path

    if is_local(url):
        import shutil

        shutil.rmtree(local_path(url), ignore_errors=True)
        return
    fs, path = _fs(url, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _join(url: str, *parts: str) -> str:
    return "/".join([str(url).rstrip("/"), *parts])


def _open_array(url: str, path: str, storage_options: dict | None, mode: str = "r+"):
    import zarr

    return zarr.open_array(str(url), path=path, mode=mode, storage_options=storage_options,
                           zarr_format=3)


def _create(url: str, path: str, shape, chunks, dtype, dims, storage_options, compress: bool):
    import zarr
    from zarr.codecs import BloscCodec

    comp = (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),) if compress else None
    return zarr.create_array(
        str(url), name=path, shape=tuple(int(s) for s in shape),
        chunks=tuple(max(1, int(c)) for c in chunks), dtype=dtype, compressors=comp,
        dimension_names=dims, storage_options=storage_options, overwrite=True, fill_value=0,
        chunk_key_encoding={"name": "default", "separator": "."},
    )


DIMS = {
    "inputs": ["patch", "contrast", "row", "col"],
    "targets": ["patch", "row", "col"],
    "origin": ["patch", "coord"],
}


# --------------------------------------------------------------------------- pass 1: extract
def _extract_block(mri_b, tgt_b, mask_b, job: dict) -> dict:
    """Rules over the grid centres this chunk owns; write them sorted by (split, bucket)."""
    from mrhscale.cluster import tune_malloc

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
    url, so = job["out"], job["storage_options"]
    name = f"{STAGING}/p{job['sidx']}_{job['block']}"
    rows = max(1, min(n, job["stage_rows"]))
    for var, data in (("inputs", inputs), ("targets", labels.astype(np.float32)), ("origin", org)):
        arr = _create(url, f"{name}_{var}", data.shape, (rows, *data.shape[1:]), data.dtype,
                      DIMS[var], so, compress=False)
        arr[...] = data[order]
    return {"piece": name, "counts": counts, "candidates": len(cent)}


# --------------------------------------------------------------------------- pass 2: shuffle
def _read_rows(url, name, so, start, stop):
    return tuple(_open_array(url, f"{name}_{v}", so, "r")[start:stop] for v in ("inputs", "targets", "origin"))


def _shuffle_bucket(job: dict) -> dict:
    """Read one (split, bucket) from all pieces, permute, write its whole output chunks.

    Memory: the bucket once (read into preallocated arrays) plus one output chunk.
    """
    url, so = job["out"], job["storage_options"]
    n = sum(b - a for _, a, b in job["segments"])
    data = None
    pos = 0
    for name, a, b in job["segments"]:
        part = _read_rows(url, name, so, a, b)
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
    arrs = {v: _open_array(url, f"{split}/{v}", so) for v in names}
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
            arr = _create(url, f"{name}_{var}", d.shape, (max(1, len(d)), *d.shape[1:]), d.dtype,
                          DIMS[var], so, compress=False)
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
        res["target_max"] = float(data[1].max()) if n else -np.inf
    return res


# --------------------------------------------------------------------------- pass 3: stitch
def _stitch_chunk(job: dict) -> int:
    url, so = job["out"], job["storage_options"]
    j0, j1 = job["lo"], job["hi"]
    split = SPLITS[job["split"]]
    bufs = {}
    for e in job["edges"]:
        a, b = max(e["start"], j0), min(e["stop"], j1)
        r0 = e["row"] + a - e["start"]
        for var, data in zip(("inputs", "targets", "origin"),
                             _read_rows(url, e["name"], so, r0, r0 + b - a), strict=True):
            if var not in bufs:
                bufs[var] = np.empty((j1 - j0, *data.shape[1:]), data.dtype)
            bufs[var][a - j0:b - j0] = data
    for var, data in bufs.items():
        _open_array(url, f"{split}/{var}", so)[j0:j1] = data
    return j1 - j0


# --------------------------------------------------------------------------- running
def _active_client():
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


@contextlib.contextmanager
def _compute_env(scheduler, workers, quiet):
    if scheduler in LOCAL_SCHEDULERS:
        yield ("local", scheduler)
        return
    if scheduler is None and workers is None:
        client = _active_client()
        if client is not None:
            yield ("client", client)
            return
    from mrhscale.cluster import dask_client

    with dask_client(scheduler=scheduler, workers=workers, quiet=quiet) as client:
        yield ("client", client)


TIMINGS: dict = {}  # seconds per pass of the last extract_patches call (also in provenance)


def _run(env, tasks: list, desc: str, quiet: bool) -> list:
    t0 = time.perf_counter()
    try:
        return _run_inner(env, tasks, desc, quiet)
    finally:
        TIMINGS[desc] = round(time.perf_counter() - t0, 3)


def _run_inner(env, tasks: list, desc: str, quiet: bool) -> list:
    import dask

    if not tasks:
        return []
    kind, obj = env
    if kind == "local":
        if quiet:
            return list(dask.compute(*tasks, scheduler=obj))
        from dask.diagnostics import ProgressBar

        print(f"mrhscale patches: {desc}", flush=True)
        with ProgressBar():
            return list(dask.compute(*tasks, scheduler=obj))
    from distributed import as_completed

    futures = obj.compute(tasks)
    try:
        if not quiet:
            from tqdm.auto import tqdm

            for f in tqdm(as_completed(futures), total=len(futures), desc=desc, leave=False):
                if f.status == "error":
                    break
        return obj.gather(futures)
    except BaseException:
        obj.cancel(futures)  # nothing may keep writing into a store that is being removed
        raise


# --------------------------------------------------------------------------- the stage
def _parse_slices(slices):
    if slices is None or slices == "" or slices == "auto":
        return None
    if isinstance(slices, str):
        try:
            a, b = slices.split(":")
            return (int(a) if a.strip() else None, int(b) if b.strip() else None)
        except ValueError:
            raise MRHError(f"--slices: expected A:B (half-open, 0-based), got {slices!r}") from None
    a, b = slices
    return (None if a is None else int(a), None if b is None else int(b))


def _chunk_rows(n_c: int, p: int, itemsize: int, target_bytes: int = 8 << 20) -> int:
    per = n_c * p * p * itemsize
    return int(min(65536, max(64, 2 ** int(math.log2(max(1, target_bytes // per))))))


def extract_patches(
    store_url: str,
    target: str,
    out_url: str,
    *,
    half: int = 1,
    stride: int = 6,
    slices=None,
    axis: str = "y",
    subjects: list[str] | None = None,
    min_label_sum: float = 30,
    min_label_nonzero: int = 4,
    val_fraction: float = 0.0,
    val_subjects: list[str] | None = None,
    seed: int = 0,
    norm: str = "percentile",
    dtype: str = "float32",
    scheduler: str | None = None,
    workers: int | None = None,
    quiet: bool = False,
    storage_options: dict | None = None,
    overwrite: bool = False,
    chunk_size: int | None = None,
    bucket_bytes: int | None = None,
    compress: bool = False,
) -> dict:
    """Extract training patches of ``target`` from a cohort store into a shuffled patch store.

    See the module docstring and docs/patches.md for the rules and the store
    format. ``scheduler``: None (an active distributed client, else an embedded
    LocalCluster with ``workers`` processes), a scheduler address, or a local
    Dask scheduler name ("synchronous", "threads"). ``slices``: (A, B) or "A:B",
    half-open and 0-based along ``axis``; None = per subject, the slices where
    the target has data. ``compress``: Blosc lz4 on the output (smaller, but
    MRI floats shrink little and streaming is ~2.5x slower; off by default).
    Returns a summary dict (also stored as attrs).
    """
    from mrhscale.store import open_cohort

    t_start = time.perf_counter()
    TIMINGS.clear()
    # ---- options that need no data
    if norm not in NORM_MODES:
        raise MRHError(f"--norm must be one of {', '.join(NORM_MODES)}, got {norm!r}")
    if dtype not in DTYPES:
        raise MRHError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not isinstance(half, int | np.integer) or half < 0:
        raise MRHError(f"--half must be an integer >= 0, got {half!r}")
    if not isinstance(stride, int | np.integer) or stride < 1:
        raise MRHError(f"--stride must be an integer >= 1, got {stride!r}")
    s_ax, r_ax, c_ax = plane_axes(axis)
    if min_label_nonzero < 0 or min_label_nonzero > (2 * half + 1) ** 2:
        raise MRHError(f"--min-label-nonzero must be in 0..{(2 * half + 1) ** 2}, got {min_label_nonzero}")
    if val_subjects and val_fraction:
        raise MRHError("give either --val-fraction or --val-subjects, not both")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise MRHError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if chunk_size is not None and chunk_size < 1:
        raise MRHError(f"chunk_size must be >= 1, got {chunk_size}")
    sl_req = _parse_slices(slices)
    out_url = str(out_url).rstrip("/")
    if os.path.abspath(str(out_url)) == os.path.abspath(str(store_url)).rstrip("/"):
        raise MRHError("--out must differ from the cohort store")

    cohort = open_cohort(store_url, subjects, storage_options)  # checks channels agree
    sids = list(cohort)
    if val_subjects:
        unknown = [s for s in val_subjects if s not in cohort]
        if unknown:
            raise MRHError(f"--val-subjects: {', '.join(unknown)} not among the subjects ({', '.join(sids)})")
        if set(val_subjects) >= set(sids):
            raise MRHError("--val-subjects: every subject is held out; leave at least one for training")
    first = cohort[sids[0]]
    channels = [str(c) for c in first.contrast.values]
    n_c = len(channels)
    p = 2 * half + 1
    shapes = {}
    for sid, ds in cohort.items():
        if target not in ds.data_vars or target not in ds.attrs.get("targets", [target]):
            avail = ds.attrs.get("targets") or [v for v in ds.data_vars if v not in ("mri", "mask", "fa")]
            raise MRHError(
                f"subject {sid!r}: unknown target {target!r} (available: {', '.join(map(str, avail)) or 'none'})"
            )
        shp = tuple(int(ds.sizes[a]) for a in AXES)
        shapes[sid] = shp
        for a in (r_ax, c_ax):
            if shp[a] < p:
                raise MRHError(
                    f"subject {sid!r}: patch {p}x{p} (--half {half}) is larger than the volume along "
                    f"{AXES[a]} ({shp[a]} voxels)"
                )
        if sl_req is not None:
            a0 = 0 if sl_req[0] is None else sl_req[0]
            b0 = shp[s_ax] if sl_req[1] is None else sl_req[1]
            if not 0 <= a0 < b0 <= shp[s_ax]:
                raise MRHError(
                    f"--slices {a0}:{b0} out of bounds for subject {sid!r}: {AXES[s_ax]} has "
                    f"{shp[s_ax]} slices (give A:B with 0 <= A < B <= {shp[s_ax]})"
                )

    # ---- output store: refuse a complete one unless overwrite; clear an incomplete one
    import zarr

    from mrhscale.store import url_options

    out_so = url_options(out_url, storage_options)  # fsspec options for a URL, None for a path
    if _exists(out_url, out_so):
        complete = False
        with contextlib.suppress(Exception):
            complete = bool(zarr.open_group(out_url, mode="r", storage_options=out_so).attrs.get("complete"))
        if complete and not overwrite:
            raise MRHError(f"{out_url}: a complete patch store exists; pass --overwrite to replace it")

    def say(msg):
        if not quiet:
            print(f"mrhscale patches: {msg}", flush=True)

    with _compute_env(scheduler, workers, quiet) as env:
        import dask

        # ---- slice ranges
        ranges = {}
        if sl_req is None:
            todo = []
            for ds in cohort.values():
                t = ds[target].data
                has = ((t != 0) & ~da_isnan(t)).any(axis=(r_ax, c_ax))
                todo.append(has)
            res = _run(env, [dask.delayed(np.asarray)(h) for h in todo], "slice ranges", True)
            for sid, has in zip(sids, res, strict=True):
                nz = np.flatnonzero(has)
                ranges[sid] = (int(nz[0]), int(nz[-1]) + 1) if len(nz) else None
        else:
            for sid in sids:
                shp = shapes[sid]
                ranges[sid] = (0 if sl_req[0] is None else sl_req[0],
                               shp[s_ax] if sl_req[1] is None else sl_req[1])

        # ---- bucket counts from an upper bound of the candidates
        in_item = 2 if dtype == "float16" else 4
        per = n_c * p * p * in_item + p * p * 4 + 16
        est = [0.0, 0.0]
        val_set = set(val_subjects or [])
        for sid in sids:
            if ranges[sid] is None:
                continue
            shp = shapes[sid]
            nr = len(grid_positions(0, shp[r_ax], shp[r_ax], half, stride))
            ncol = len(grid_positions(0, shp[c_ax], shp[c_ax], half, stride))
            cand = nr * ncol * (ranges[sid][1] - ranges[sid][0]) * per
            if sid in val_set:
                est[1] += cand
            else:
                est[0] += cand * (1 - val_fraction)
                est[1] += cand * val_fraction
        if bucket_bytes is None:
            bucket_bytes = _default_bucket_bytes(env)
        n_buckets = [max(1, math.ceil(e / bucket_bytes)) for e in est]
        val_mode = "subject" if val_set else ("fraction" if val_fraction > 0 else "none")
        nc = chunk_size or _chunk_rows(n_c, p, in_item)

        _remove(out_url, out_so)
        root = zarr.open_group(out_url, mode="w", storage_options=out_so, zarr_format=3)
        root.attrs["complete"] = False
        zarr.open_group(_join(out_url, STAGING), mode="w", storage_options=out_so,
                        zarr_format=3)
        try:
            summary = _extract_all(
                env, cohort, sids, ranges, target, out_url, out_so, half, stride, axis,
                min_label_sum, min_label_nonzero, val_mode, val_fraction, val_set, seed, dtype,
                n_buckets, nc, norm, channels, quiet, say, compress,
            )
            _remove(_join(out_url, STAGING), out_so)
            prov = {
                "stage": "patches",
                "mrhscale": _version(),
                "source": str(store_url),
                "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                "params": {
                    "half": half, "stride": stride, "axis": axis, "slices": None if sl_req is None else list(sl_req),
                    "min_label_sum": min_label_sum, "min_label_nonzero": min_label_nonzero,
                    "val_fraction": val_fraction, "val_subjects": sorted(val_set), "seed": seed,
                    "norm": norm, "dtype": dtype, "chunk_size": nc, "n_buckets": n_buckets,
                    "compress": compress,
                },
                "numba": _numba is not None,
                "seconds": round(time.perf_counter() - t_start, 3),
                "pass_seconds": dict(TIMINGS),
            }
            attrs = {
                "channels": channels,
                "target": target,
                "patch": {"half": half, "size": p, "axis": axis},
                "norm": summary.pop("norm"),
                "subjects": sids,
                "val_subjects": sorted(val_set),
                "n_train": summary["n_train"],
                "n_val": summary["n_val"],
                "seed": seed,
                "rules": {
                    "stride": stride,
                    "slices": {sid: (list(r) if r else None) for sid, r in ranges.items()},
                    "min_label_sum": min_label_sum,
                    "min_label_nonzero": min_label_nonzero,
                },
                "provenance": prov,
            }
            root.attrs.update(attrs)
            root.attrs["complete"] = True
        except BaseException:
            with contextlib.suppress(Exception):
                _remove(out_url, out_so)
            raise
    summary.update({"out": out_url, "seconds": prov["seconds"], "subjects": sids})
    say(f"{summary['n_train']} train + {summary['n_val']} val patches -> {out_url} "
        f"({summary['seconds']:.1f} s)")
    return summary


def _default_bucket_bytes(env) -> int:
    """64 MiB, or a quarter of the smallest worker's memory limit if that is less."""
    b = 64 << 20
    if env[0] == "client":
        with contextlib.suppress(Exception):
            lims = [w.get("memory_limit") or 0 for w in env[1].scheduler_info()["workers"].values()]
            lims = [x for x in lims if x]
            if lims:
                b = min(b, max(4 << 20, min(lims) // 4))
    return int(b)


def da_isnan(x):
    import dask.array as da

    return da.isnan(x)


def _version() -> str:
    from mrhscale import __version__

    return __version__


def _extract_all(env, cohort, sids, ranges, target, out_url, so, half, stride, axis, min_label_sum,
                 min_label_nonzero, val_mode, val_fraction, val_set, seed, dtype, n_buckets, nc,
                 norm, channels, quiet, say, compress) -> dict:
    import dask
    import dask.array as da

    s_ax, r_ax, c_ax = plane_axes(axis)
    p = 2 * half + 1
    n_c = len(channels)
    tasks = []
    for sidx, sid in enumerate(sids):
        if ranges[sid] is None:
            continue
        ds = cohort[sid]
        a, b = ranges[sid]
        sel = [slice(None)] * 3
        sel[s_ax] = slice(a, b)
        mri = ds["mri"].data
        if mri.chunks[3] != (n_c,):
            mri = mri.rechunk({3: -1})
        mri = mri[(*sel, slice(None))]
        spatial = mri.chunks[:3]
        tgt = ds[target].data[tuple(sel)].rechunk(spatial)
        mask = ds["mask"].data[tuple(sel)].rechunk(spatial)
        depth = {r_ax: half, c_ax: half}
        if half:
            if any(min(mri.chunks[ax]) < half for ax in (r_ax, c_ax)):
                raise MRHError(f"subject {sid!r}: store chunks smaller than the patch halo ({half})")
            mri = da.overlap.overlap(mri, depth={**depth, 3: 0}, boundary="none")
            tgt = da.overlap.overlap(tgt, depth=depth, boundary="none")
            mask = da.overlap.overlap(mask, depth=depth, boundary="none")
        dm, dt, dk = mri.to_delayed(), tgt.to_delayed(), mask.to_delayed()
        starts = [np.concatenate([[0], np.cumsum(c)]) for c in spatial]
        shp = tuple(int(ds.sizes[x]) for x in AXES)
        for bi in np.ndindex(*dm.shape[:3]):
            lo = [int(starts[ax][bi[ax]]) for ax in range(3)]
            hi = [int(starts[ax][bi[ax] + 1]) for ax in range(3)]
            lo[s_ax] += a
            hi[s_ax] += a
            org = list(lo)
            for ax in (r_ax, c_ax):
                if bi[ax] > 0:
                    org[ax] -= half
            job = {
                "subject": sid, "sidx": sidx, "block": int(np.ravel_multi_index(bi, dm.shape[:3])),
                "origin": org, "owned_lo": lo, "owned_hi": hi, "size": shp, "half": half,
                "stride": stride, "axis": axis, "min_label_sum": min_label_sum,
                "min_label_nonzero": min_label_nonzero, "dtype": dtype, "seed": seed,
                "val_mode": val_mode, "val_fraction": val_fraction, "is_val": sid in val_set,
                "n_buckets": n_buckets, "out": out_url, "storage_options": so,
                "stage_rows": max(256, nc // 8),
            }
            tasks.append(dask.delayed(_extract_block, pure=False)(dm[(*bi, 0)], dt[bi], dk[bi], job))
    res = _run(env, tasks, "extract", quiet)
    pieces = [(r["piece"], r["counts"]) for r in res if r["piece"] is not None]
    n_cand = int(sum(r["candidates"] for r in res))
    totals = np.zeros((2, max(n_buckets)), np.int64)
    for _, c in pieces:
        totals += c
    n_split = totals.sum(axis=1)
    if n_split.sum() == 0:
        raise MRHError(
            f"zero samples survive the rules ({n_cand} candidates; min_label_sum={min_label_sum}, "
            f"min_label_nonzero={min_label_nonzero}, centre in mask, no NaN): check --target, "
            "--slices, --stride and the thresholds"
        )
    if n_split[0] == 0:
        raise MRHError("no training samples survive the rules (all samples fell in the validation split)")
    if val_mode != "none" and n_split[1] == 0:
        raise MRHError("the validation split is empty: raise --val-fraction or choose other --val-subjects")

    # ---- output arrays
    in_dtype = np.float16 if dtype == "float16" else np.float32
    for s, split in enumerate(SPLITS):
        n = int(n_split[s])
        _create(out_url, f"{split}/inputs", (n, n_c, p, p), (nc, n_c, p, p), in_dtype, DIMS["inputs"], so, compress)
        _create(out_url, f"{split}/targets", (n, p, p), (nc, p, p), np.float32, DIMS["targets"], so, compress)
        _create(out_url, f"{split}/origin", (n, 4), (nc, 4), np.int32, DIMS["origin"], so, compress)

    # ---- pass 2
    width = totals.shape[1]
    piece_off = []
    for _, c in pieces:
        flat = c.ravel()
        piece_off.append(np.concatenate([[0], np.cumsum(flat)])[:-1].reshape(c.shape))
    jobs2 = []
    n_train = int(n_split[0])
    for s in range(2):
        g = 0
        for bkt in range(width):
            nb = int(totals[s, bkt])
            if nb == 0:
                continue
            segs = [(name, int(off[s, bkt]), int(off[s, bkt] + c[s, bkt]))
                    for (name, c), off in zip(pieces, piece_off, strict=True) if c[s, bkt]]
            q = nb if n_train <= STATS_ROWS else int(STATS_ROWS * nb // n_train)
            jobs2.append({"split": s, "bucket": bkt, "segments": segs, "start": g, "chunk": nc,
                          "total": int(n_split[s]), "seed": seed, "out": out_url,
                          "storage_options": so, "stats_rows": q})
            g += nb
    res2 = _run(env, [dask.delayed(_shuffle_bucket, pure=False)(j) for j in jobs2], "shuffle", quiet)

    # ---- pass 3
    jobs3 = []
    for s in range(2):
        edges = [e for j, r in zip(jobs2, res2, strict=True) if j["split"] == s for e in r["edges"]]
        by_chunk: dict[int, list] = {}
        for e in edges:
            for cj in range(e["start"] // nc, (e["stop"] - 1) // nc + 1):
                by_chunk.setdefault(cj, []).append(e)
        for cj, es in sorted(by_chunk.items()):
            jobs3.append({"split": s, "lo": cj * nc, "hi": min((cj + 1) * nc, int(n_split[s])),
                          "edges": es, "out": out_url, "storage_options": so})
    _run(env, [dask.delayed(_stitch_chunk, pure=False)(j) for j in jobs3], "stitch", quiet)

    # ---- normalisation statistics on the train split
    train_res = [r for j, r in zip(jobs2, res2, strict=True) if j["split"] == 0]
    nrm = _norm_stats(train_res, norm, n_c)
    return {"n_train": int(n_split[0]), "n_val": int(n_split[1]), "n_candidates": n_cand,
            "norm": nrm.to_dict(), "chunk_size": nc, "n_buckets": list(n_buckets)}


def _norm_stats(train_res: list, mode: str, n_c: int):
    from mrhscale.norm import Normalisation

    if mode == "global-max":
        in_max = max(r["input_max"] for r in train_res)
        t_max = max(r["target_max"] for r in train_res)
        return Normalisation.global_max(n_c, in_max if in_max > 0 else 1.0, t_max if t_max > 0 else 1.0)
    x = np.concatenate([r["sample_inputs"] for r in train_res])
    t = np.concatenate([r["sample_targets"] for r in train_res])
    per_c = x.transpose(1, 0, 2, 3).reshape(n_c, -1)
    lo, hi = np.percentile(per_c, PERCENTILES, axis=1)
    scale = hi - lo
    bad = ~(np.isfinite(scale) & (scale > 0))
    scale[bad] = np.maximum(np.abs(lo[bad]), 1.0)
    t_hi = float(np.percentile(t, PERCENTILES[1])) if t.size else 1.0
    if not t_hi > 0:
        t_hi = float(t.max()) if t.size and t.max() > 0 else 1.0
    return Normalisation(
        "percentile", lo.astype(float).tolist(), scale.astype(float).tolist(), 0.0, t_hi,
        meta={"percentiles": list(PERCENTILES), "rows_sampled": int(len(x)), "split": "train",
              "target": f"offset 0, scale = {PERCENTILES[1]}th percentile of train target values"},
    )
