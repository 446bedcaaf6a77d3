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

import functools
import hashlib
import os
import time
from typing import Any

import numpy as np

from mrhscale.errors import MRHError
from mrhscale.patches import _numba

SPATIAL = ("x", "y", "z")
AGGREGATES = ("centre", "mean")
BLOCK_BYTES = 96 << 20  # input bytes per prediction block (see subject_prediction)
FORMAT = "mrhscale-predictions"
_LOADS = 0  # models loaded by this process (tests check: once per worker, not per chunk)


# --------------------------------------------------------------------------- model on workers
@functools.lru_cache(maxsize=4)
def _cached_model(path: str, size: int, mtime_ns: int, device: str, threads: int | None):
    global _LOADS
    import torch

    from mrhscale.bundle import load_model
    from mrhscale.cluster import tune_malloc

    tune_malloc()  # Dask workers start with a malloc setting that halves torch's speed
    if threads:
        torch.set_num_threads(int(threads))
    model, _ = load_model(path, device=device)
    _warm_gather()
    _LOADS += 1
    return model


def _warm_gather() -> None:
    """Compile (or load from numba's cache) the float32 block gather once per process,
    with the model, instead of inside the first block's task."""
    if _gather_normalised_nb is not None:
        z = np.zeros(1, np.float32)
        i = np.zeros(1, np.int64)
        vol = np.zeros((2, 2, 2, 1), np.float32)
        for src in (vol, vol.transpose(1, 0, 2, 3)):  # slice axis x (contiguous) or y/z (a view)
            _gather_normalised_nb(src, i, i, i, 0, z, z, z, np.empty((1, 1, 1, 1), np.float32))


def _worker_model(path: str, device: str, threads: int | None):
    """The bundle's model, loaded once per process (re-loaded only if the file changes)."""
    st = os.stat(path)
    return _cached_model(os.path.abspath(path), st.st_size, st.st_mtime_ns, device, threads)


def load_count() -> int:
    return _LOADS


# --------------------------------------------------------------------------- patches
def block_patches(norm_block: np.ndarray, s: np.ndarray, r: np.ndarray, q: np.ndarray, half: int):
    """Patches ``[N, C, P, P]`` centred at (s, r + half, q + half) of a normalised block.

    ``norm_block`` is ``[S, R, Q, C]`` (slice axis first, contrast last, already
    padded by ``half`` on the two in-plane axes); ``r, q`` index the UNPADDED
    in-plane positions. The training gather itself (``patches.gather_patches``,
    compiled, one pass): the same geometry by construction and no per-voxel loop.
    """
    from mrhscale.patches import gather_patches

    centres = np.stack([s, r + half, q + half], axis=1)
    return gather_patches(norm_block, centres, half, "x")


def normalise_block(mri: np.ndarray, order: tuple[int, int, int], offset, inv_scale) -> np.ndarray:
    """``[S, R, Q, C]`` float32 (axes ``order`` of the x, y, z block, contrast last) of
    ``(mri - offset) * inv_scale`` with NaN/inf -> 0: the numpy fallback of the fused
    gather below (a whole-block pass the compiled path does not need)."""
    blk = np.transpose(mri, (*order, 3))
    blk = (blk.astype(np.float32, copy=False) - offset) * inv_scale
    np.copyto(blk, 0.0, where=~np.isfinite(blk))  # NaN/inf -> 0 (two passes, not nan_to_num's four)
    return blk


def _gather_normalised_py(src, s, r, q, half, off, inv, edge, out):
    # src [S, R, Q, C] raw (any strides), out [n, C, P, P]; positions outside R x Q
    # take ``edge`` (raw 0 normalised): the volume's zero padding, never materialised
    n_r, n_q, n_c = src.shape[1], src.shape[2], src.shape[3]
    p = 2 * half + 1
    for i in range(s.shape[0]):
        si = s[i]
        for a in range(p):
            rr = r[i] + a - half
            for b in range(p):
                qq = q[i] + b - half
                if rr >= 0 and rr < n_r and qq >= 0 and qq < n_q:
                    for c in range(n_c):
                        v = (np.float32(src[si, rr, qq, c]) - off[c]) * inv[c]
                        out[i, c, a, b] = v if np.isfinite(v) else np.float32(0.0)
                else:
                    for c in range(n_c):
                        out[i, c, a, b] = edge[c]
    return out


_gather_normalised_nb = (_numba.njit(nogil=True, cache=True, boundscheck=False)(_gather_normalised_py)
                         if _numba is not None else None)


class _BlockPatches:
    """Normalised patches of one raw block, gathered batch by batch.

    With numba, each batch is gathered and normalised in one compiled pass
    straight from the raw block (its slice-first view, no copy): the block is
    never normalised or padded as a whole, which was a full extra pass and a
    block-sized allocation per task. Without numba, the block is normalised
    and zero padded once (numpy) and ``block_patches`` gathers from it.
    ``centres`` (s, r, q) index the block's own frame; a patch reaching past
    its in-plane edges gets raw 0 there, normalised like a real voxel (the
    zero padding of the volume, as ``map_overlap(boundary=0)`` gives inside).
    """

    def __init__(self, mri: np.ndarray, order, offset, inv_scale, half: int):
        self.h = half
        self.off = np.asarray(offset, np.float32)
        self.inv = np.asarray(inv_scale, np.float32)
        self.edge = np.nan_to_num((np.float32(0.0) - self.off) * self.inv, nan=0.0, posinf=0.0, neginf=0.0)
        src = np.transpose(mri, (*order, 3))
        if _gather_normalised_nb is not None and src.dtype.kind in "fiub":
            self.src, self.padded = src, None
        else:
            blk = normalise_block(mri, order, offset, inv_scale)
            pad = np.broadcast_to(self.edge, (blk.shape[0], blk.shape[1] + 2 * half,
                                              blk.shape[2] + 2 * half, blk.shape[3])).copy()
            pad[:, half : half + blk.shape[1], half : half + blk.shape[2]] = blk
            self.src, self.padded = None, pad

    def __call__(self, s: np.ndarray, r: np.ndarray, q: np.ndarray) -> np.ndarray:
        if self.padded is not None:
            return block_patches(self.padded, s, r, q, self.h)
        p = 2 * self.h + 1
        out = np.empty((len(s), self.src.shape[3], p, p), np.float32)
        return _gather_normalised_nb(self.src, s, r, q, self.h, self.off, self.inv, self.edge, out)


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
    t_offset: float,
    t_scale: float,
    batch_size: int,
    aggregate: str,
    halo: int,
) -> np.ndarray:
    """One block with ``halo`` voxels of in-plane context -> its predicted interior
    (x, y, z) float32, 0 outside the mask.

    ``halo`` is 0 for a block spanning whole planes (nothing beyond it but the
    volume's zero padding) and the map_overlap depth otherwise.
    """
    import torch

    inplane = [a for a in range(3) if a != slice_axis]
    order = (slice_axis, *inplane)
    msk = np.transpose(mask[..., 0], order)
    S, R, Q = msk.shape
    depth = halo
    ri, qi = R - 2 * depth, Q - 2 * depth  # interior size
    out = np.zeros((S, ri, qi), np.float32)
    if out.size == 0:
        return np.transpose(out, np.argsort(order))
    h = half
    # Candidate centres: the interior ('centre') or the interior plus an h ring ('mean':
    # every output covering an interior voxel), clipped to the block: frame lo .. R-lo.
    lo = max(0, depth - (h if aggregate == "mean" else 0))
    cm = msk[:, lo : R - lo, lo : Q - lo]
    s, r, q = np.nonzero(cm)
    if not len(s):
        return np.transpose(out, np.argsort(order))
    model = _worker_model(model_path, device, threads)
    patches = _BlockPatches(mri, order, offset, inv_scale, h)
    rp, qp = r + lo, q + lo  # centres in the block's frame
    preds = []
    with torch.inference_mode():
        for a in range(0, len(s), batch_size):
            b = slice(a, a + batch_size)
            x = torch.from_numpy(patches(s[b], rp[b], qp[b])).to(device)
            y = model(x)
            if aggregate == "centre":
                preds.append(y[:, h, h].float().cpu().numpy())
            else:
                preds.append(y.float().cpu().numpy())
    pred = np.concatenate(preds) * t_scale + t_offset
    if aggregate == "centre":
        out[s, r, q] = pred  # centre: lo == depth, cm's frame is the interior
    else:
        acc = np.zeros(cm.shape, np.float64)  # frame lo .. R-lo, as cm
        cnt = np.zeros_like(acc)
        p = 2 * h + 1
        for i in range(p):  # P*P vectorised scatters, not a per-voxel loop
            for j in range(p):
                rr, qq = r + i - h, q + j - h
                ok = (rr >= 0) & (rr < acc.shape[1]) & (qq >= 0) & (qq < acc.shape[2])
                acc[s[ok], rr[ok], qq[ok]] += pred[ok, i, j]
                cnt[s[ok], rr[ok], qq[ok]] += 1
        mean = np.divide(acc, cnt, out=np.zeros_like(acc), where=cnt > 0)
        out[:] = mean[:, depth - lo : depth - lo + ri, depth - lo : depth - lo + qi]
    out *= msk[:, depth : R - depth, depth : Q - depth]
    return np.transpose(out, np.argsort(order))


# --------------------------------------------------------------------------- checks
def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


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
                       batch_size=4096, aggregate="centre", block_bytes=BLOCK_BYTES):
    """Lazy dask array (x, y, z) of the virtual stain for one subject Dataset.

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
    norm = meta["norm"]
    off, inv = norm.input_arrays()
    kw = dict(
        drop_axis=3,
        chunks=mri.chunks[:3],
        dtype=np.float32,
        meta=np.empty((0, 0, 0), np.float32),
        model_path=os.path.abspath(model_path),
        device=device,
        threads=threads,
        half=h,
        slice_axis=slice_axis,
        offset=off,
        inv_scale=inv,
        t_offset=float(norm.target_offset),
        t_scale=float(norm.target_scale),
        batch_size=int(batch_size),
        aggregate=aggregate,
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
    from mrhscale.register import read_transform_info, transforms_for_subject

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


def _write_nifti(path: str, arr: np.ndarray, attrs: dict) -> str:
    from mrhscale.volumes import write_volume

    affine = attrs.get("affine")
    if affine is None:
        vs = attrs.get("voxel_size") or [1.0, 1.0, 1.0]
        affine = np.diag([*map(float, vs), 1.0])
    return write_volume(path, np.asarray(arr, np.float32), np.asarray(affine, np.float64))


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
) -> dict[str, Any]:
    """Predict the bundle's stain for every brain voxel of each subject; returns a summary.

    Subjects already listed as complete in ``out_url`` are skipped (resume);
    their NIfTI is (re)written if ``nifti_dir`` lacks it. ``store_url`` and ``out_url`` may be
    URLs (s3://...) with fsspec ``storage_options`` (endpoint, credentials), which the workers
    get inside the task graph; the model bundle and ``nifti_dir`` are local paths.
    ``to_native``: also map each virtual stain back to the subject's own (pre-registration)
    grid, ``<nifti_dir>/<sid>_<variable>_native.nii.gz`` (needs ``nifti_dir``); True or ""
    finds the transforms beside the registered manifest the subject was ingested from, a
    folder (the ``--out`` of ``mrhscale register``) uses ``DIR/<sid>``.
    """
    import dask
    import xarray as xr
    import zarr

    from mrhscale import __version__
    from mrhscale.bundle import load_model
    from mrhscale.cluster import dask_client
    from mrhscale.store import list_subjects, open_subject, url_options

    t0 = time.perf_counter()
    if aggregate not in AGGREGATES:
        raise MRHError(f"--aggregate {aggregate}: expected one of {', '.join(AGGREGATES)}")
    if int(batch_size) < 1:
        raise MRHError(f"--batch-size must be >= 1, got {batch_size}")
    device = str(device)
    if scheduler is None:
        device = check_device(device)  # embedded cluster: the workers see this machine's GPUs
    elif device not in ("cpu",) and not (device == "cuda" or device.startswith("cuda:")):
        raise MRHError(f"--device {device}: expected cpu, cuda or cuda:N")
    if to_native is False:
        to_native = None
    if to_native is not None and not nifti_dir:
        raise MRHError("--to-native needs --nifti DIR: the folder for the native-space NIfTI files")
    in_so = url_options(store_url, storage_options)
    out_so = url_options(out_url, storage_options)
    _, meta = load_model(model_path)  # validates the bundle; workers load their own copy
    model_path = os.path.abspath(os.fspath(model_path))
    target = str(meta["target"])
    variable = f"{target}_virtual"
    available = list_subjects(store_url, in_so)
    if not available:
        raise MRHError(f"{store_url}: store holds no complete subject")
    ids = list(subjects) if subjects else available
    missing = [s for s in ids if s not in available]
    if missing:
        raise MRHError(
            f"{store_url}: subject(s) not in store: {', '.join(missing)} "
            f"(complete subjects: {', '.join(available)})"
        )
    # channel check on every subject before any work
    datasets = {sid: open_subject(store_url, sid, in_so) for sid in ids}
    for sid, ds in datasets.items():
        check_channels(list(meta["channels"]), [str(c) for c in ds["contrast"].values],
                       f"{store_url}: subject {sid!r}")
    native_dirs = {}
    if to_native is not None:
        from mrhscale.register import _ants

        _ants()  # MRHError naming the optional extra before any work
        native_dirs = {sid: native_transforms(to_native, ds, sid) for sid, ds in datasets.items()}

    model_rec = {
        "path": model_path,
        "sha256": _sha256(model_path),
        "target": target,
        "arch": _jsonable(meta.get("arch")),
        "channels": list(meta["channels"]),
        "patch": _jsonable(meta.get("patch")),
        "norm_mode": meta["norm"].mode,
        "provenance": _jsonable(meta.get("provenance", {})),
    }
    params = {"aggregate": aggregate, "batch_size": int(batch_size), "device": device}
    if str(out_url).rstrip("/") == str(store_url).rstrip("/"):
        raise MRHError(f"--out {out_url}: is the input store; give a separate prediction store")
    root = zarr.open_group(str(out_url), mode="a", zarr_format=3, storage_options=out_so)
    fmt = root.attrs.get("format")
    if fmt not in (None, FORMAT):
        raise MRHError(f"{out_url}: is a {fmt} store, not a prediction store; give another --out")
    done = list(root.attrs.get("subjects", []))
    prev = root.attrs.get("model")
    if done and prev and (prev.get("sha256") != model_rec["sha256"]
                          or root.attrs.get("aggregate") != aggregate):
        raise MRHError(
            f"{out_url}: holds predictions from another model or --aggregate "
            f"({prev.get('path')}, {root.attrs.get('aggregate')}); use a new --out or delete it"
        )
    root.attrs.update(_jsonable({
        "format": FORMAT, "format_version": 1, "target": target, "variable": variable,
        "model": model_rec, "source": str(store_url), "aggregate": aggregate, "subjects": done,
        "provenance": {"stage": "predict", "mrhscale": __version__, **params},
    }))
    todo = [s for s in ids if s not in done]
    skipped = [s for s in ids if s in done]
    nifti: list[str] = []
    native: list[str] = []
    n_vox = 0
    if todo:
        with dask_client(scheduler=scheduler, workers=workers, quiet=quiet) as client:
            if device != "cpu":
                ok = client.run(_workers_device_ok, device)
                if not all(ok.values()):
                    bad = [w for w, v in ok.items() if not v]
                    raise MRHError(f"--device {device}: no CUDA GPU on worker(s) {', '.join(bad)}; use --device cpu")
            threads = torch_threads
            if threads is None and scheduler is None:
                nw = max(1, len(client.scheduler_info().get("workers", {})) or 1)
                threads = max(1, (os.cpu_count() or 1) // nw)
            bar = None
            if not quiet:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(todo), desc="predict", unit="subject")
            for sid in todo:
                ds = datasets[sid]
                pred = subject_prediction(ds, meta, model_path, device=device, threads=threads,
                                          batch_size=batch_size, aggregate=aggregate)
                pred = pred.rechunk(_zarr_chunks(pred.chunks))
                coords = {k: ds.coords[k] for k in SPATIAL if k in ds.coords}
                attrs = _jsonable(dict(ds.attrs))
                attrs["lineage"] = _jsonable({
                    "stage": "predict", "mrhscale": __version__, "model": model_rec,
                    "source": {"store": str(store_url), "subject": sid}, **params,
                })
                out = xr.Dataset(
                    {
                        variable: (SPATIAL, pred, {"units": "raw stain units", "target": target,
                                                   "kind": "virtual histology"}),
                        "mask": (SPATIAL, ds["mask"].data.rechunk(pred.chunks).astype(bool)),
                    },
                    coords=coords,
                    attrs=attrs,
                )
                for v in out.variables:
                    out[v].encoding.pop("chunks", None)
                write = out.to_zarr(str(out_url), group=sid, mode="w", consolidated=False, zarr_format=3,
                                    storage_options=out_so, compute=False)
                _, brain = dask.compute(write, out["mask"].data.sum())  # one pass, one round trip
                n_vox += int(brain)
                # completion marker last: a crash before this line leaves sid unlisted
                root = zarr.open_group(str(out_url), mode="a", zarr_format=3, storage_options=out_so)
                done = list(root.attrs.get("subjects", [])) + [sid]
                root.attrs["subjects"] = done
                if nifti_dir:
                    nifti.append(_write_nifti_from_store(out_url, sid, variable, nifti_dir, out_so))
                if sid in native_dirs:
                    native.append(_write_native(out_url, sid, variable, nifti_dir, native_dirs[sid],
                                                out_so))
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
    if nifti_dir:
        for sid in skipped:
            p = nifti_path(nifti_dir, sid, variable)
            if not os.path.exists(p):
                nifti.append(_write_nifti_from_store(out_url, sid, variable, nifti_dir, out_so))
            if sid in native_dirs and not os.path.exists(nifti_path(nifti_dir, sid, variable, True)):
                native.append(_write_native(out_url, sid, variable, nifti_dir, native_dirs[sid], out_so))
    dt = time.perf_counter() - t0
    return {
        "out": str(out_url),
        "variable": variable,
        "predicted": todo,
        "skipped": skipped,
        "brain_voxels": n_vox,
        "seconds": dt,
        "voxels_per_s": n_vox / dt if dt > 0 and n_vox else 0.0,
        "nifti": nifti,
        "native": native,
    }


def _write_nifti_from_store(out_url: str, sid: str, variable: str, nifti_dir: str,
                            storage_options: dict | None = None) -> str:
    import xarray as xr

    ds = xr.open_zarr(str(out_url), group=sid, consolidated=False, storage_options=storage_options)
    arr = ds[variable].transpose(*SPATIAL).values
    return _write_nifti(nifti_path(nifti_dir, sid, variable), arr, dict(ds.attrs))


def _write_native(out_url: str, sid: str, variable: str, nifti_dir: str, transforms: str,
                  storage_options: dict | None = None) -> str:
    """The subject's virtual stain mapped back to its native grid (inverse registration)."""
    import xarray as xr

    from mrhscale.register import to_native

    ds = xr.open_zarr(str(out_url), group=sid, consolidated=False, storage_options=storage_options)
    arr = ds[variable].transpose(*SPATIAL).values.astype(np.float32)
    path = nifti_path(nifti_dir, sid, variable, native=True)
    to_native(arr, transforms, interpolator="linear", out=path)  # written atomically
    return path
