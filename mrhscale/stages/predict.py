"""Whole-brain inference: every brain voxel of every subject, on the Dask cluster.

Each voxel gets the (2h+1)x(2h+1) patch of all bundle channels in the plane
of the two non-slice axes, built exactly as for training (channels selected
by NAME in the bundle's order, the bundle's normalisation, NaN -> 0); the
network's centre output is written back to that voxel, as the original
MRH_recon did (``aggregate="mean"`` instead averages every overlapping PxP
output that covers a voxel). Voxels outside the brain mask are 0.

Distribution: blocks of the subject's store chunks merged in-plane; a block
spanning whole planes runs under ``dask.array.map_blocks`` (patches are
in-plane, so it needs no neighbour), others under ``map_overlap`` (halo h
in-plane, 2h for ``mean``). Either way the RAW volume is zero padded at its
borders and patches are gathered and normalised batch by batch straight from
the raw block; one batched forward pass per ``batch_size`` patches, and the model
loaded once per worker process (``_worker_model`` is an lru_cache keyed by the
bundle's path, size and mtime: workers must be able to read the bundle path).

Output store (Zarr v3, readable with plain xarray)::

    PRED/                      root attrs: subjects (COMPLETE ones), target, variable,
                               model {...}, source, aggregate, provenance
      <subject>/  <target>_virtual  float32 (x, y, z)  raw stain units, 0 outside mask
                  mask              bool (x, y, z)
                  same x/y/z coords and subject attrs (affine, ...) as the input,
                  plus attrs["lineage"] (model, source store, parameters)

A subject is listed in the root's ``subjects`` only after its group is fully
written, so an interrupted run resumes and skips finished subjects.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time

import numpy as np

from mrhscale.errors import MRHError
from mrhscale.log import logger
from mrhscale.ops.blocks import BlockPatches, warm_gather
from mrhscale.ops.stains import stains_of
from mrhscale.results import PredictResult

SPATIAL = ("x", "y", "z")
AGGREGATES = ("centre", "mean")
BLOCK_BYTES = 96 << 20  # input bytes per prediction block (see subject_prediction)
FORMAT = "mrhscale-predictions"
_LOADS = 0  # models loaded by this process (tests check: once per worker, not per chunk)


# --------------------------------------------------------------------------- model on workers
_LOAD_LOCK = threading.Lock()  # lru_cache may build twice when two threads miss at once


@functools.lru_cache(maxsize=8)
def _cached_model(path: str, size: int, mtime_ns: int, device: str, threads: int | None,
                  mode: tuple[str, bool], batch_size: int):
    global _LOADS
    import torch

    from mrhscale.io.bundle import load_model
    from mrhscale.nn.accel import Acceleration, InferenceModel
    from mrhscale.parallel.cluster import tune_malloc

    tune_malloc()  # Dask workers start with a malloc setting that halves torch's speed
    if threads:
        torch.set_num_threads(int(threads))
    model, meta = load_model(path, device=device, ensemble=True)
    runner = InferenceModel(model, Acceleration(*mode), device, batch_size, example=(len(meta["channels"]),
                                                                                     patch_size(meta)))
    warm_gather()
    _LOADS += 1
    return runner


def _worker_model(path: str, device: str, threads: int | None, mode=("fp32", False), batch_size: int = 4096,
                  strict: bool = False):
    """The bundle's model as this process runs it (``mode``: precision, compiled), loaded and
    compiled once per process (again only if the file changes), on this worker's own GPU
    for ``cuda`` in an embedded GPU cluster."""
    from mrhscale.parallel.cluster import worker_device

    st = os.stat(path)
    with _LOAD_LOCK:
        runner = _cached_model(os.path.abspath(path), st.st_size, st.st_mtime_ns, worker_device(device),
                               threads, tuple(mode), int(batch_size) if mode[1] else 0)  # eager: any batch
    return runner.warm_up(strict=strict)


def prepare_worker(path: str, device: str, threads: int | None, precision: str, compile: str,
                   batch_size: int, strict: bool = False) -> dict:
    """Resolve the request for this worker's device, then load and compile the model now
    (before any block); returns the mode it will run: ``key`` (what blocks pass to
    ``_worker_model``) and ``used`` (the numerics, after any fall-back)."""
    from mrhscale.nn.accel import resolve
    from mrhscale.parallel.cluster import worker_device

    accel = resolve(precision, compile, worker_device(device))
    key = (accel.precision, accel.compile)
    runner = _worker_model(path, device, threads, key, batch_size, strict=strict)
    return {"key": list(key), "used": runner.accel.record()}


def patch_size(meta: dict) -> int:
    patch = meta.get("patch") or {}
    return int(patch.get("size", 2 * int(patch.get("half", 1)) + 1))


def load_count() -> int:
    return _LOADS


def _predict_block(
    mri: np.ndarray,
    mask: np.ndarray,
    *,
    model_path: str,
    device: str,
    threads: int | None,
    half: int,
    slice_axis: int,
    offset: np.ndarray,
    inv_scale: np.ndarray,
    t_offset,
    t_scale,
    batch_size: int,
    aggregate: str,
    halo: int,
    mode: tuple = ("fp32", False),
    tta: bool = False,
    spread_scale=None,
) -> np.ndarray:
    """One block with ``halo`` voxels of in-plane context -> its predicted interior
    (x, y, z) float32, 0 outside the mask. Several stains (``t_offset``/``t_scale`` one
    per stain) or an ensemble (``spread_scale``: per stain, the target scale times the
    bundle's calibration factor) give (x, y, z, V): the T stains (the members' mean), then
    for an ensemble their T calibrated spreads.

    ``halo`` is 0 for a block spanning whole planes (nothing beyond it but the
    volume's zero padding) and the map_overlap depth otherwise.
    """
    inplane = [a for a in range(3) if a != slice_axis]
    order = (slice_axis, *inplane)
    msk = np.transpose(mask[..., 0], order)
    S, R, Q = msk.shape
    depth = halo
    ri, qi = R - 2 * depth, Q - 2 * depth  # interior size
    t_offset, t_scale = np.atleast_1d(t_offset), np.atleast_1d(t_scale)
    n_t = len(t_scale)
    n_out = n_t if spread_scale is None else 2 * n_t
    out = np.zeros((S, ri, qi, n_out), np.float32)
    # Candidate centres: the interior ('centre') or the interior plus an h ring ('mean':
    # every output covering an interior voxel), clipped to the block: frame lo .. R-lo.
    lo = max(0, depth - (half if aggregate == "mean" else 0))
    cm = msk[:, lo : R - lo, lo : Q - lo]
    s, r, q = np.nonzero(cm) if out.size else (np.zeros(0, int),) * 3
    if len(s):
        model = _worker_model(model_path, device, threads, mode, batch_size)
        patches = BlockPatches(mri, order, offset, inv_scale, half)
        pred = _network_outputs(model, patches, (s, r + lo, q + lo), device, batch_size, half,
                                aggregate == "centre", tta, (spread_scale is not None, n_t))
        ax = (slice(None), *([None] * (pred.ndim - 2)))  # the per-stain factors along pred's axis 1
        pred[:, :n_t] = pred[:, :n_t] * t_scale[ax] + t_offset[ax]
        if spread_scale is not None:
            pred[:, n_t:] *= np.atleast_1d(spread_scale)[ax]
        if aggregate == "centre":
            out[s, r, q] = pred  # centre: lo == depth, cm's frame is the interior
        else:
            mean = _overlap_mean(pred, (s, r, q), cm.shape, half)
            out[:] = mean[:, depth - lo : depth - lo + ri, depth - lo : depth - lo + qi]
        out *= msk[:, depth : R - depth, depth : Q - depth, None]
    out = np.transpose(out, (*np.argsort(order), 3))
    return out if n_out > 1 else out[..., 0]


def _network_outputs(model, patches, centres, device, batch_size: int, h: int, centre: bool,
                     tta: bool, layout: tuple[bool, int] = (False, 1)) -> np.ndarray:
    """The network (normalised units) at ``centres`` (s, r, q in the block's frame): [N, V]
    (``centre``) or [N, V, P, P] (the whole outputs); ``layout`` (an ensemble?, stains T):
    V = T, or 2T for an ensemble (its members' means, then their standard deviations)."""
    import torch

    from mrhscale.nn.model import mean_and_spread, per_stain
    from mrhscale.ops.symmetry import symmetric_mean

    ensemble, n_t = layout
    s, rp, qp = centres
    preds = []
    with torch.inference_mode():
        for a in range(0, len(s), batch_size):
            b = slice(a, a + batch_size)
            x = torch.from_numpy(patches(s[b], rp[b], qp[b])).to(device)
            y = per_stain((symmetric_mean(model, x) if tta else model(x)).float(), n_t)
            y = torch.cat(mean_and_spread(y), 1) if ensemble else y
            preds.append((y[:, :, h, h] if centre else y).cpu().numpy())
    return np.concatenate(preds)


def _overlap_mean(pred: np.ndarray, centres, shape, h: int) -> np.ndarray:
    """Every output [N, V, P, P] laid at its centre (s, r, q) and averaged where they
    overlap: [S, R, Q, V] on a frame of ``shape`` (P*P vectorised scatters, not a loop per voxel)."""
    s, r, q = centres
    acc = np.zeros((*shape, pred.shape[1]), np.float64)
    cnt = np.zeros(shape, np.float64)
    for i in range(2 * h + 1):
        for j in range(2 * h + 1):
            rr, qq = r + i - h, q + j - h
            ok = (rr >= 0) & (rr < shape[1]) & (qq >= 0) & (qq < shape[2])
            acc[s[ok], rr[ok], qq[ok]] += pred[ok, :, i, j]
            cnt[s[ok], rr[ok], qq[ok]] += 1
    return np.divide(acc, cnt[..., None], out=np.zeros_like(acc), where=cnt[..., None] > 0)


# --------------------------------------------------------------------------- checks
def check_channels(bundle_channels: list[str], store_channels: list[str], where: str) -> None:
    missing = [c for c in bundle_channels if c not in set(store_channels)]
    if missing:
        shown = ", ".join(missing[:10]) + (f" ... ({len(missing)} in all)" if len(missing) > 10 else "")
        raise MRHError(
            f"{where}: the model needs channels the store does not have: {shown}; "
            "use a model trained on this protocol or ingest the missing contrasts"
        )


def check_device(device: str) -> str:
    import torch

    d = str(device)
    if d == "cpu":
        return d
    if d == "cuda" or d.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise MRHError(f"--device {d}: no CUDA GPU is visible to torch here; use --device cpu")
        if ":" in d:
            try:
                k = int(d.split(":", 1)[1])
            except ValueError:
                raise MRHError(f"--device {d}: expected cuda or cuda:N") from None
            if k >= torch.cuda.device_count():
                raise MRHError(f"--device {d}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return d
    raise MRHError(f"--device {d}: expected cpu, cuda or cuda:N")


def _workers_device_ok(device: str) -> bool:
    import torch

    return device == "cpu" or torch.cuda.is_available()


# --------------------------------------------------------------------------- graph per subject
def subject_prediction(ds, meta: dict, model_path: str, *, device="cpu", threads=None,
                       batch_size=4096, aggregate="centre", block_bytes=BLOCK_BYTES, mode=("fp32", False),
                       tta=False, norm=None):
    """Lazy dask array (x, y, z) of the virtual stain for one subject Dataset (an ensemble
    bundle: (x, y, z, 2), the members' mean and calibrated spread, see :func:`uncertainty_scale`); ``mode``
    (precision, compiled) as ``prepare_worker`` resolved it (default: eager fp32);
    ``tta``: the mean over the patch's 8 in-plane symmetries (8x the forward passes);
    ``norm``: this subject's concrete normalisation (default: the bundle's, which must
    then not be per subject: see :func:`subject_normalisation`).

    Store chunks are merged in-plane into blocks of up to ``block_bytes`` of input:
    the halo exchange costs dask ~40 tasks per block whatever its size, which on
    store-sized blocks was a measurable share of the time (benchmarks/bench_predict.py);
    blocks that span whole planes skip it.
    """
    import dask.array as da

    if aggregate not in AGGREGATES:
        raise MRHError(f"--aggregate {aggregate}: expected one of {', '.join(AGGREGATES)}")
    patch = meta.get("patch") or {}
    h = int(patch.get("half", (int(patch.get("size", 3)) - 1) // 2))
    axis = str(patch.get("axis", "y"))
    if axis not in SPATIAL:
        raise MRHError(f"model bundle: patch axis {axis!r} is not one of x, y, z")
    dims = ds["mri"].dims
    if tuple(dims) != (*SPATIAL, "contrast"):
        raise MRHError(f"subject {ds.attrs.get('subject')}: mri dims {dims}, expected (x, y, z, contrast)")
    channels = list(meta["channels"])
    check_channels(channels, [str(c) for c in ds["contrast"].values], f"subject {ds.attrs.get('subject')!r}")
    mri = ds["mri"].sel(contrast=channels).data
    if not isinstance(mri, da.Array):
        mri = da.from_array(mri, chunks=(64, 64, 64, -1))
    mri = mri.rechunk({3: -1})
    mask = ds["mask"].data
    mask = (da.from_array(mask, chunks=mri.chunks[:3]) if not isinstance(mask, da.Array)
            else mask.rechunk(mri.chunks[:3]))
    slice_axis = SPATIAL.index(axis)
    depth = h if aggregate == "centre" else 2 * h
    # every chunk must be at least the halo deep; fix the chunking here so the output
    # chunks we declare are the ones map_overlap uses
    new = _merged_inplane(mri.chunks[:3], mri.shape[:3], slice_axis, mri.shape[3] * mri.dtype.itemsize,
                          block_bytes)
    for a in range(3):
        if a != slice_axis and min(new[a]) < depth:
            new[a] = _even_chunks(mri.shape[a], max(new[a][0], depth), depth)
    if new != list(mri.chunks[:3]):
        mri = mri.rechunk((*new, -1))
        mask = mask.rechunk(new)
    norm = meta["norm"] if norm is None else norm
    off, inv = norm.input_arrays()
    spread = uncertainty_scale(meta, norm)
    t_off, t_scale = norm.target_arrays(np.float32)  # float32: what the map is computed in
    n_out = len(t_scale) * (1 if spread is None else 2)
    kw = dict(
        **({"drop_axis": 3, "chunks": mri.chunks[:3]} if n_out == 1 else {"chunks": (*mri.chunks[:3], (n_out,))}),
        dtype=np.float32,
        meta=np.empty((0,) * (3 if n_out == 1 else 4), np.float32),
        model_path=os.path.abspath(model_path),
        device=device,
        threads=threads,
        half=h,
        slice_axis=slice_axis,
        offset=off,
        inv_scale=inv,
        t_offset=t_off,
        t_scale=t_scale,
        batch_size=int(batch_size),
        aggregate=aggregate,
        mode=tuple(mode),
        tta=bool(tta),
        spread_scale=spread,
    )
    msk = mask.astype(bool)[..., None]
    if all(len(mri.chunks[a]) == 1 for a in range(3) if a != slice_axis):
        # blocks of whole planes: no neighbour has context to give, and the volume's
        # zero padding is applied inside the gather, so no halo exchange (its tasks
        # and a padded copy of every block) at all
        return da.map_blocks(_predict_block, mri, msk, halo=0, **kw)
    dep = {a: (0 if a in (slice_axis, 3) else depth) for a in range(4)}
    return da.map_overlap(_predict_block, mri, msk, depth=dep, boundary=0, trim=False,
                          align_arrays=False, allow_rechunk=True, halo=depth, **kw)


def uncertainty_scale(meta: dict, norm) -> np.ndarray | None:
    """Per stain, stain units per unit of an ensemble's spread (the target scale times the
    calibration factor fitted on the validation split at training), or None for a single
    network."""
    if int(meta.get("members", 1)) < 2:
        return None
    scale = norm.target_arrays(np.float64)[1]
    return (scale * calibration_factors(meta, len(scale))).astype(np.float32)


def calibration_factors(meta: dict, n_stains: int) -> np.ndarray:
    """An ensemble bundle's calibration factor of each stain (1 where none was fitted)."""
    cal = (meta.get("uncertainty") or {}).get("calibration") or {}
    return np.broadcast_to(np.atleast_1d(np.asarray(cal.get("factor", 1.0), np.float64)), (n_stains,)).copy()


def subject_normalisation(meta: dict, ds, scheduler=None):
    """The bundle's normalisation made concrete for subject ``ds``: a per-subject mode takes
    the brain's own statistics inside its mask (computed on ``scheduler``), as at training."""
    import dask

    from mrhscale.ops.norm import subject_stats_graph

    norm = meta["norm"]
    if not norm.per_subject:
        return norm
    channels = list(meta["channels"])
    mri = ds["mri"].sel(contrast=channels).data
    mask = ds["mask"].data
    if not hasattr(mri, "dask"):
        import dask.array as da

        mri, mask = da.from_array(mri, chunks=(64, 64, 64, -1)), da.from_array(mask, chunks=(64, 64, 64))
    (stats,) = dask.compute(subject_stats_graph(mri, mask), scheduler=scheduler)
    return norm.for_subject(stats)


def _merged_inplane(chunks, shape, slice_axis: int, voxel_bytes: int, block_bytes: int):
    """Chunks with runs of whole store chunks merged along the two in-plane axes (the
    one with more chunks first) while a block stays within ``block_bytes``."""
    new = [list(c) for c in chunks]
    size = [max(c) for c in chunks]
    inplane = [a for a in range(3) if a != slice_axis]
    while True:
        cand = [a for a in inplane if size[a] < shape[a]
                and 2 * size[a] * size[slice_axis] * size[3 - a - slice_axis] * voxel_bytes <= block_bytes]
        if not cand:
            break
        a = max(cand, key=lambda k: len(new[k]))
        size[a] = min(2 * size[a], shape[a])
        new[a] = list(_even_chunks(shape[a], size[a], 1))
    return [tuple(c) for c in new]


def _even_chunks(n: int, size: int, minimum: int) -> tuple[int, ...]:
    """Chunks of ``size`` along a length ``n`` axis, the remainder merged if below ``minimum``."""
    ch = [size] * (n // size)
    rest = n - size * len(ch)
    if rest:
        if ch and rest < minimum:
            ch[-1] += rest
        else:
            ch.append(rest)
    return tuple(ch)


def _zarr_chunks(chunks: tuple[tuple[int, ...], ...]) -> tuple[int, ...] | tuple[tuple[int, ...], ...]:
    """Chunks Zarr can store (uniform but the last); a halo-driven merge can break that."""
    ok = all(all(c == ch[0] for c in ch[:-1]) and ch[-1] <= ch[0] for ch in chunks)
    return chunks if ok else tuple(ch[0] for ch in chunks)


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, np.generic):
        return v.item()
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return str(v)


def nifti_path(nifti_dir: str, sid: str, variable: str, native: bool = False) -> str:
    return os.path.join(nifti_dir, f"{sid}_{variable}{'_native' if native else ''}.nii.gz")


def native_transforms(to_native: str | bool, ds, sid: str) -> str:
    """The registration folder of ``sid`` for ``--to-native``: DIR/<sid> when a DIR is given,
    else the one beside the registered manifest the subject was ingested from."""
    from mrhscale.stages.register import read_transform_info, transforms_for_subject

    if isinstance(to_native, str) and to_native:
        d = os.path.join(os.fspath(to_native), sid)
        if not os.path.isdir(d):
            raise MRHError(f"--to-native {to_native}: no folder {sid}/ of subject {sid!r} "
                           "(give the --out folder of mrhscale register)")
    else:
        d = transforms_for_subject(ds.attrs.get("manifest"), sid)
        if d is None:
            raise MRHError(f"subject {sid!r} was not registered by mrhscale register "
                           f"(its manifest {ds.attrs.get('manifest')} has no {sid}/transforms beside it); "
                           "give --to-native DIR (the --out folder of mrhscale register)")
    info = read_transform_info(d)  # MRHError when the folder holds no registration
    ref = tuple(int(n) for n in info["reference_grid"]["shape"])
    have = tuple(int(ds.sizes[a]) for a in SPATIAL)
    if ref != have:
        raise MRHError(f"--to-native: subject {sid!r} has grid {have} in the store but its "
                       f"registration in {d} has reference grid {ref}; wrong registration folder?")
    return d


def _write_nifti(path: str, arr: np.ndarray, attrs: dict, descrip: str = "mrhscale") -> str:
    from mrhscale.io.volumes import write_volume

    affine = attrs.get("affine")
    if affine is None:
        vs = attrs.get("voxel_size") or [1.0, 1.0, 1.0]
        affine = np.diag([*map(float, vs), 1.0])
    return write_volume(path, np.asarray(arr, np.float32), np.asarray(affine, np.float64),
                        descrip=descrip, space=attrs)


# --------------------------------------------------------------------------- main entry
def predict(
    model_path: str,
    store_url: str,
    out_url: str,
    *,
    nifti_dir: str | None = None,
    subjects: list[str] | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    batch_size: int = 4096,
    device: str = "cpu",
    aggregate: str = "centre",
    quiet: bool = False,
    torch_threads: int | None = None,
    storage_options: dict | None = None,
    to_native: str | bool | None = None,
    overwrite: bool = False,
    client=None,
    ome_zarr: str | None = None,
    precision: str | None = None,
    compile: str | bool | None = None,
    tta: bool = False,
) -> PredictResult:
    """Predict the bundle's stain for every brain voxel of each subject; returns a summary.

    A subject already in ``out_url`` is reused only if it was predicted by the same model
    (checksum) and aggregation from the same input subject (its fingerprint); one made
    from anything else is an error unless ``overwrite`` (then it is replaced, the old
    version kept until the new one is whole). ``store_url`` and ``out_url`` may be URLs
    (s3://...) with fsspec ``storage_options``, which the workers get inside the task
    graph; the model bundle and ``nifti_dir`` are local paths. ``to_native``: also map
    each virtual stain back to the subject's own (pre-registration) grid,
    ``<nifti_dir>/<sid>_<variable>_native.nii.gz`` (needs ``nifti_dir``); True or ""
    finds the transforms beside the registered manifest the subject was ingested from, a
    folder (the ``--out`` of ``mrhscale register``) uses ``DIR/<sid>``. ``ome_zarr``: also
    write each subject's virtual stain as ``<ome_zarr>/<sid>.ome.zarr`` for viewers
    (``mrhscale.stages.export_image``; rewritten only when it does not hold this prediction).
    ``precision`` (auto|fp32|bf16) and ``compile`` (auto|on|off): see docs/precision.md;
    the mode used is part of what made each subject (eager fp32 records nothing new).
    ``tta``: test-time augmentation, the mean over each patch's 8 in-plane symmetries.
    """
    from mrhscale.parallel.context import Context
    from mrhscale.parallel.runner import use_client
    from mrhscale.stages.export_image import export_predictions, image_paths
    from mrhscale.stores import CohortStore, resolve
    from mrhscale.stores.predictions import output

    t0 = time.perf_counter()
    run = PredictRun(model_path, batch_size, device, aggregate, scheduler, to_native, nifti_dir,
                     precision, compile, tta)
    store_url, out_url = resolve(store_url), resolve(out_url)
    if out_url == store_url:
        raise MRHError(f"--out {out_url}: is the input store; give a separate prediction store")
    source = CohortStore.open(store_url, storage_options)
    ids, datasets = run.inputs(source, subjects)
    native_dirs = run.native_dirs(datasets)
    stores = Context(storage_options=storage_options)  # the export_image helpers take a Context
    images = {var: image_paths(ome_zarr, ids, stores, "" if var == run.variable else f".{var}")
              for var in run.variables} if ome_zarr else {}
    with contextlib.ExitStack() as stack:
        # an embedded cluster starts only if there is something to predict; its workers
        # are this machine's, so auto resolves here (a given or joined cluster: on its workers)
        embedded = embedded_cluster(client, scheduler, workers)
        env = None if embedded else stack.enter_context(use_client(client, scheduler, workers, quiet,
                                                                   device=run.device))
        run.resolve(env or "local", scheduler, torch_threads, brain_voxels(datasets.values()))
        with output(out_url, run.identity(), run.root_attrs(), overwrite=overwrite,
                    storage_options=storage_options) as pstore:
            todo, skipped = run.sort_out(pstore, source, ids, overwrite)
            if todo and env is None:
                env = stack.enter_context(use_client(None, None, workers, quiet, device=run.device))
                run.threads = run._threads(env, None, torch_threads)
            n_vox = run.predict_all(pstore, source, datasets, todo, env, quiet)
            nifti, native = run.write_nifti(pstore, ids, native_dirs)
    dt = time.perf_counter() - t0
    ome = [p for var, paths in images.items() for p in export_predictions(out_url, paths, var, stores)]
    return PredictResult(out=out_url, variable=run.variable, predicted=todo, skipped=skipped, brain_voxels=n_vox,
                         seconds=dt, voxels_per_s=n_vox / dt if dt > 0 and n_vox else 0.0, nifti=nifti,
                         native=native, ome_zarr=ome, uncertainty=run.uncertainty)


class PredictRun:
    """One predict call: the model, its options, and the steps of the run."""

    def __init__(self, model_path, batch_size, device, aggregate, scheduler, to_native, nifti_dir,
                 precision=None, compile=None, tta=False):
        from mrhscale.io.bundle import load_model
        from mrhscale.nn.accel import Acceleration, requested
        from mrhscale.stores import resolve

        if aggregate not in AGGREGATES:
            raise MRHError(f"--aggregate {aggregate}: expected one of {', '.join(AGGREGATES)}")
        if int(batch_size) < 1:
            raise MRHError(f"--batch-size must be >= 1, got {batch_size}")
        self.device = _check_device_for(str(device), scheduler)
        self.to_native = None if to_native is False else to_native
        self.nifti_dir = resolve(nifti_dir, "--nifti") if nifti_dir else None
        if self.to_native is not None and not self.nifti_dir:
            raise MRHError("--to-native needs --nifti DIR: the folder for the native-space NIfTI files")
        self.model_path = resolve(model_path, "model")
        _, self.meta = load_model(self.model_path)  # validates the bundle; workers load their own copy
        self.target = str(self.meta["target"])
        self.stains = stains_of(self.meta)
        self.virtuals = [f"{t}_virtual" for t in self.stains]
        self.members = int(self.meta.get("members", 1))
        self.uncertainties = [f"{t}_uncertainty" for t in self.stains] if self.members > 1 else []
        self.variable = ",".join(self.virtuals)  # the one map, or the list (as target)
        self.uncertainty = ",".join(self.uncertainties) or None
        self.aggregate, self.batch_size = aggregate, int(batch_size)
        self.model_rec = _model_record(self.model_path, self.meta)
        self.params = {"aggregate": aggregate, "batch_size": self.batch_size, "device": self.device,
                       "tta": bool(tta)}
        self.tta = bool(tta)
        self.request = requested(precision, compile)
        self.accel, self.mode = Acceleration(why="not resolved"), ("fp32", False)
        self.threads: int | None = None

    def identity(self) -> dict:
        return {"target": self.target, "variable": self.variable, "aggregate": self.aggregate,
                "model_sha256": self.model_rec["sha256"]}

    def root_attrs(self) -> dict:
        from mrhscale import __version__

        return _jsonable({"target": self.target, "variable": self.variable, "model": self.model_rec,
                          **({"stains": self.stains} if len(self.stains) > 1 else {}),
                          **({"uncertainty": self.uncertainty} if self.uncertainty else {}),
                          "aggregate": self.aggregate,
                          "provenance": {"stage": "predict", "mrhscale": __version__, **self.params}})

    def inputs(self, source, subjects):
        """The subjects to predict (all complete ones by default), channels checked on each."""
        available = source.subjects()
        if not available:
            raise MRHError(f"{source.name}: store holds no complete subject")
        ids = list(dict.fromkeys(subjects)) if subjects else available
        missing = [s for s in ids if s not in available]
        if missing:
            raise MRHError(f"{source.name}: subject(s) not in store: {', '.join(missing)} "
                           f"(complete subjects: {', '.join(available)})")
        datasets = {sid: source.open_subject(sid) for sid in ids}
        for sid, ds in datasets.items():
            check_channels(list(self.meta["channels"]), [str(c) for c in ds["contrast"].values],
                           f"{source.name}: subject {sid!r}")
        return ids, datasets

    def native_dirs(self, datasets) -> dict:
        if self.to_native is None:
            return {}
        from mrhscale.stages.register import ants_module

        ants_module()  # MRHError naming the optional extra before any work
        return {sid: native_transforms(self.to_native, ds, sid) for sid, ds in datasets.items()}

    def made_by(self, source, sid: str) -> dict:
        made = {"stage": "predict", "model_sha256": self.model_rec["sha256"], "target": self.target,
                "aggregate": self.aggregate, "source": source.identity(sid)["fingerprint"]}
        if not self.accel.eager_fp32:  # eager fp32 keeps the fingerprints of earlier versions
            made["numerics"] = self.accel.label
        if self.tta:  # absent without TTA, so earlier fingerprints still hold
            made["tta"] = True
        return made

    def sort_out(self, pstore, source, ids, overwrite: bool):
        """(subjects to predict, subjects already predicted from the same input and model)."""
        from mrhscale.stores.predictions import stale_reason

        todo, skipped = [], []
        for sid in ids:
            why = stale_reason(pstore, sid, self.made_by(source, sid))
            if why is None:
                skipped.append(sid)
            elif why == "incomplete" or overwrite:
                todo.append(sid)
            else:
                raise MRHError(f"{pstore.name}: subject {sid} there was predicted from another input "
                               f"({why}); pass --overwrite to replace it or choose another --out")
        return todo, skipped

    def predict_all(self, pstore, source, datasets, todo, env, quiet) -> int:
        if not todo:
            return 0
        from mrhscale.log import progress

        self.prepare(env)
        n_vox = 0
        with pstore.writer() as writer:
            for sid in progress(todo, desc="predict", unit="subject", quiet=quiet):
                n_vox += self._predict_subject(env, writer, source, datasets[sid], sid, self.threads)
        return n_vox

    def resolve(self, env, scheduler, threads, work: int) -> None:
        """Workers' device and threads checked, ``auto`` resolved for them (cheap: nothing
        is loaded) and for ``work`` (brain voxels to predict). Workers that resolve
        differently all run eager fp32."""
        from mrhscale.nn.accel import Acceleration, resolve, worth_compiling

        if not isinstance(env, str):
            self.threads = self._threads(env, scheduler, threads)
            got = env.run(_resolve_on_worker, self.device, *self.request)
        else:
            self.threads = threads
            got = {"local": resolve(*self.request, device=self.device).record()}
        modes = {(r["precision"], r["compile"]) for r in got.values()}
        if len(modes) > 1:
            self.accel = Acceleration(why=f"workers differ ({sorted(modes)}): eager fp32 on all")
            logger.warning(f"mrhscale: {self.accel.why}")
        else:
            self.accel = worth_compiling(Acceleration(**next(iter(got.values()))), self.request[1],
                                         work * (8 if self.tta else 1))
        logger.info(f"mrhscale predict: {self.accel.label} ({self.accel.why})")
        self.mode = (self.accel.precision, self.accel.compile)
        self.params["numerics"] = self.accel.record()

    def prepare(self, env) -> None:
        """Load and compile the model on every worker now, outside the first block's task;
        if compiling fails on any of them, every worker runs eager."""
        if self.accel.eager_fp32 or env in ("processes",):
            return
        args = (self.model_path, self.device, self.threads, self.accel.precision,
                "on" if self.accel.compile else "off", self.batch_size, self.request[1] == "on")
        got = ({"local": prepare_worker(*args)} if isinstance(env, str) else env.run(prepare_worker, *args))
        used = [r["used"] for r in got.values()]
        if any(u["compile"] != self.accel.compile for u in used):
            self.accel = self.accel.without_compile(next(u["why"] for u in used if not u["compile"]))
            self.mode = (self.accel.precision, False)
            self.params["numerics"] = self.accel.record()

    def _threads(self, client, scheduler, threads):
        if self.device != "cpu":
            ok = client.run(_workers_device_ok, self.device)
            bad = [w for w, v in ok.items() if not v]
            if bad:
                raise MRHError(f"--device {self.device}: no CUDA GPU on worker(s) {', '.join(bad)}; "
                               "use --device cpu")
        if threads is None and scheduler is None:
            nw = max(1, len(client.scheduler_info().get("workers", {})) or 1)
            threads = max(1, (os.cpu_count() or 1) // nw)
        return threads

    def _predict_subject(self, client, writer, source, ds, sid: str, threads) -> int:
        """One subject: graph, write (to its staged place), then commit through the store."""
        import dask

        from mrhscale.parallel.cluster import task_error

        path = writer.begin(sid)
        try:
            out = self._dataset(source, ds, sid, threads, client)
            write = writer.lazy_write(path, out)
            _, brain = dask.compute(write, out["mask"].data.sum(), scheduler=client)  # one pass, one round trip
        except BaseException as e:
            writer.abort(sid, path)
            if isinstance(e, Exception):
                raise task_error(e, f"subject {sid}") from None
            raise
        writer.commit(sid, path, self.made_by(source, sid), extra={"lineage": out.attrs["lineage"]})
        return int(brain)

    def _dataset(self, source, ds, sid: str, threads, client=None):
        import xarray as xr

        from mrhscale import __version__

        norm = subject_normalisation(self.meta, ds, client)
        pred = subject_prediction(ds, self.meta, self.model_path, device=self.device, threads=threads,
                                  batch_size=self.batch_size, aggregate=self.aggregate, mode=self.mode,
                                  tta=self.tta, norm=norm)
        maps = [pred] if pred.ndim == 3 else [pred[..., v] for v in range(pred.shape[3])]
        maps = [m.rechunk(_zarr_chunks(m.chunks)) for m in maps]
        n_t = len(self.stains)
        attrs = {k: v for k, v in _jsonable(dict(ds.attrs)).items()
                 if k not in ("complete", "made_by", "fingerprint")}
        attrs["lineage"] = _jsonable({
            "stage": "predict", "mrhscale": __version__, "model": self.model_rec,
            "source": {"store": source.url, "subject": sid, **source.identity(sid)}, **self.params,
            **({"subject_norm": norm.meta["subject"]} if "subject" in norm.meta else {})})
        out = xr.Dataset(
            {**{v: (SPATIAL, m, {"units": "raw stain units", "target": t, "kind": "virtual histology"})
                for v, t, m in zip(self.virtuals, self.stains, maps[:n_t], strict=True)},
             "mask": (SPATIAL, ds["mask"].data.rechunk(maps[0].chunks).astype(bool))},
            coords={k: ds.coords[k] for k in SPATIAL if k in ds.coords}, attrs=attrs)
        for k, (v, m) in enumerate(zip(self.uncertainties, maps[n_t:], strict=True)):
            out[v] = (SPATIAL, m, self.uncertainty_attrs(k))
        for v in out.variables:
            out[v].encoding.pop("chunks", None)
        return out

    def uncertainty_attrs(self, k: int = 0) -> dict:
        """The attrs of stain ``k``'s uncertainty map."""
        cal = (self.meta.get("uncertainty") or {}).get("calibration") or {}
        return _jsonable({
            "units": "raw stain units", "target": self.stains[k], "kind": "uncertainty",
            "estimator": f"deep ensemble of {self.members} networks: their standard deviation "
                         "(ddof 1) pooled over each voxel's output patch, times the calibration factor",
            "calibration_factor": float(calibration_factors(self.meta, len(self.stains))[k]),
            "calibrated_on": cal.get("fitted_on"),
            "interval": f"{self.virtuals[k]} +- 1.96 x {self.uncertainties[k]}: the 95% interval"})

    @property
    def variables(self) -> list[str]:
        """The maps a subject gets: the virtual stain(s), and an ensemble's uncertainty of each."""
        return [*self.virtuals, *self.uncertainties]

    def write_nifti(self, pstore, ids, native_dirs):
        """NIfTI of every requested subject, rewritten only when it is not of this prediction."""
        nifti: list[str] = []
        native: list[str] = []
        if not self.nifti_dir:
            return nifti, native
        for sid in ids:
            for var in self.variables:
                tag = _nifti_tag(self, pstore, sid, var)
                path = nifti_path(self.nifti_dir, sid, var)
                if not _nifti_current(path, tag):
                    nifti.append(_write_nifti_from_store(pstore, sid, var, path, tag))
                npath = nifti_path(self.nifti_dir, sid, var, True)
                if sid in native_dirs and not _nifti_current(npath, tag):
                    native.append(_write_native(pstore, sid, var, npath, native_dirs[sid], tag))
        return nifti, native


def embedded_cluster(client, scheduler, workers) -> bool:
    """Whether ``use_client`` would start an embedded LocalCluster for these arguments."""
    from mrhscale.parallel.runner import active_client

    return client is None and scheduler is None and (workers is not None or active_client() is None)


def brain_voxels(datasets) -> int:
    """Brain voxels of subjects: ingest records them, else their masks are counted."""
    return sum(int(ds.attrs.get("brain_voxels") or int(ds["mask"].sum())) for ds in datasets)


def _resolve_on_worker(device: str, precision: str, compile: str) -> dict:
    from mrhscale.nn.accel import resolve
    from mrhscale.parallel.cluster import worker_device

    return resolve(precision, compile, worker_device(device)).record()


def _check_device_for(device: str, scheduler) -> str:
    if scheduler is None:
        return check_device(device)  # embedded cluster: the workers see this machine's GPUs
    if device != "cpu" and not (device == "cuda" or device.startswith("cuda:")):
        raise MRHError(f"--device {device}: expected cpu, cuda or cuda:N")
    return device


def _model_record(model_path: str, meta: dict) -> dict:
    from mrhscale.stores import sha256_file

    return {"path": model_path, "sha256": sha256_file(model_path), "target": str(meta["target"]),
            "arch": _jsonable(meta.get("arch")), "channels": list(meta["channels"]),
            "patch": _jsonable(meta.get("patch")), "norm_mode": meta["norm"].mode,
            "provenance": _jsonable(meta.get("provenance", {})),
            **({"members": int(meta["members"]), "uncertainty": _jsonable(meta.get("uncertainty") or {})}
               if int(meta.get("members", 1)) > 1 else {})}


def _nifti_tag(run, pstore, sid: str, variable: str) -> str:
    """What a NIfTI header's descrip says about the prediction it holds (80 chars at most)."""
    from mrhscale import __version__

    fp = pstore.subject_attrs(sid).get("fingerprint", "")[7:19]
    return f"mrhscale {__version__} {variable} model:{run.model_rec['sha256'][7:15]} fp:{fp}"[:80]


def _nifti_current(path: str, tag: str) -> bool:
    """Whether ``path`` already holds this prediction; refuses a file mrhscale did not write."""
    from mrhscale.io.volumes import mrhscale_descrip

    if not os.path.exists(path):
        return False
    descrip = mrhscale_descrip(path)
    if descrip is None:
        raise MRHError(f"--nifti: {path} exists and was not written by mrhscale; "
                       "move it away or choose another --nifti folder")
    return descrip == tag


def _write_nifti_from_store(pstore, sid: str, variable: str, path: str, tag: str) -> str:
    ds = pstore.open_subject(sid)
    arr = ds[variable].transpose(*SPATIAL).values
    return _write_nifti(path, arr, dict(ds.attrs), tag)


def _write_native(pstore, sid: str, variable: str, path: str, transforms: str, tag: str) -> str:
    """The subject's virtual stain mapped back to its native grid (inverse registration)."""
    from mrhscale.io.volumes import write_volume
    from mrhscale.stages.register import Grid, read_transform_info, to_native

    ds = pstore.open_subject(sid)
    arr = ds[variable].transpose(*SPATIAL).values.astype(np.float32)
    native = to_native(arr, transforms, interpolator="linear")
    affine = Grid.from_dict(read_transform_info(transforms)["native_grid"]).affine
    return write_volume(path, native, affine, descrip=tag)  # written atomically
