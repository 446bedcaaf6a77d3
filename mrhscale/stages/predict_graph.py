"""One subject's prediction as a lazy Dask graph: the hot path of predict and predict_volume.

Each voxel gets the (2h+1)x(2h+1) patch of all bundle channels in the plane of the
two non-slice axes, built exactly as for training (channels selected by NAME in the
bundle's order, the bundle's normalisation, NaN -> 0). Blocks are the subject's store
chunks merged in-plane (``BLOCK_BYTES`` of input at most); a block spanning whole planes
runs under ``dask.array.map_blocks`` (patches are in-plane, so it needs no neighbour),
others under ``map_overlap`` (halo h in-plane, 2h for ``mean``). Either way the RAW
volume is zero padded at its borders, and each block task gathers and normalises its
patches batch by batch straight from the raw block (``ops.blocks``), runs the network
(``nn.worker``: loaded once per worker process) and merges its outputs (``ops.merge``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses

import dask.array as da
import numpy as np

from mrhscale.errors import MRHError
from mrhscale.io.exported import graph_feeds
from mrhscale.log import logger
from mrhscale.nn.gather import block_patches
from mrhscale.nn.onnx import with_feeds
from mrhscale.nn.worker import NetworkSpec, forward, network
from mrhscale.ops.merge import BlockMerger, to_stain_units
from mrhscale.ops.uncertainty import (
    label_group,
    label_groups,
    ood_powers,
    spread_scale,
    value_groups,
)
from mrhscale.options import AGGREGATES, PredictOptions
from mrhscale.stores.cohort import start_soon
from mrhscale.stores.legacy import calibration_of, stains_of

SPATIAL = ("x", "y", "z")
BLOCK_BYTES = 96 << 20  # input bytes per prediction block (see subject_prediction)
PLANE_BYTES = 512 << 20  # ... when whole planes of a store's subject fit in it (planes_prediction)


@dataclasses.dataclass(frozen=True, eq=False)
class BlockJob:
    """What every block task of one subject needs besides its arrays: the network, the patch
    geometry, the normalisation (input offset and 1/scale; target offset and scale per
    stain), an ensemble's spread scale per stain (None: one network) and the aggregation.
    ``exported``: the network is an ONNX export (raw patches in, its outputs final: every
    scaling here identity), ``feeds`` its other inputs (a per-subject model's brain statistics)."""

    spec: NetworkSpec
    half: int
    slice_axis: int
    offset: np.ndarray
    inv_scale: np.ndarray
    t_offset: np.ndarray
    t_scale: np.ndarray
    spread_scale: np.ndarray | None = None
    aggregate: str = PredictOptions.aggregate
    tta: bool = False
    exported: bool = False
    feeds: dict | None = None
    value_groups: tuple | None = None  # per stain: (inner edges, relative factors) of a Mondrian calibration
    ood: bool = False  # the out-of-distribution score as the last value (the bundle has one: nn.ood)
    ood_power: np.ndarray | None = None  # per stain: the uncertainty times the score to this power

    @property
    def n_values(self) -> int:
        """Values per voxel: the T stains, an ensemble's T uncertainties, the score."""
        n_t = len(self.t_scale)
        return n_t * (1 if self.spread_scale is None else 2) + int(self.ood)


def predict_block(mri: np.ndarray, mask: np.ndarray, job: BlockJob, halo: int) -> np.ndarray:
    """One block (x, y, z, contrast) with ``halo`` voxels of in-plane context -> its interior
    (x, y, z, V) float32, 0 outside the mask: the T stains (an ensemble's: the members'
    mean), then an ensemble's T calibrated spreads, then (``job.ood``) the out-of-distribution score.
    ``halo`` is 0 for a block spanning whole planes and the map_overlap depth otherwise."""
    if mri.shape[3] != len(job.offset) or mri.shape[:3] != mask.shape[:3]:  # the compiled gather checks no bound
        raise ValueError(f"block of shape {mri.shape} for {len(job.offset)} channels and a mask of {mask.shape}")
    order = (job.slice_axis, *(a for a in range(3) if a != job.slice_axis))
    merger = BlockMerger(np.transpose(mask[..., 0], order), halo, job.half, job.aggregate, job.n_values)
    s, r, q = merger.centres()
    if len(s):
        model = with_feeds(network(job.spec), job.feeds)
        patches = block_patches(mri, order, job.offset, job.inv_scale, job.half, model.device)
        pred = forward(model, patches, (s, r, q),
                       batch_size=job.spec.batch_size, half=job.half, centre=job.aggregate == "centre",
                       tta=job.tta, ensemble=job.spread_scale is not None and not job.exported,
                       ood=job.ood and not job.exported)  # an export's graph returns its own score
        merger.aggregate(to_stain_units(pred, job.t_offset, job.t_scale, job.spread_scale, job.value_groups,
                                        job.ood_power if job.ood else None))
    return np.transpose(merger.finalize(), (*np.argsort(order), 3))


def subject_arrays(ds, channels: list[str]):
    """The subject's ``mri`` of ``channels`` (in that order, contrast in one chunk) and its
    ``mask``, as dask arrays chunked alike."""
    mri = ds["mri"].sel(contrast=channels).data
    if not isinstance(mri, da.Array):
        mri = da.from_array(mri, chunks=(64, 64, 64, -1))
    mri = mri.rechunk({3: -1})
    mask = ds["mask"].data
    mask = (da.from_array(mask, chunks=mri.chunks[:3]) if not isinstance(mask, da.Array)
            else mask.rechunk(mri.chunks[:3]))
    return mri, mask


def subject_prediction(ds, meta: dict, spec: NetworkSpec, *, aggregate: str = PredictOptions.aggregate, tta: bool = False,
                       norm=None, block_bytes: int = BLOCK_BYTES, regions=None, tasks: int = 1,
                       plane_bytes: int = PLANE_BYTES, soon: bool = False):
    """Lazy dask array (x, y, z, V) of one subject Dataset's maps, as ``predict_block``. ``spec``: the network and its
    planned numerics; ``tta``: the mean over the patch's 8 in-plane symmetries; ``norm``: this
    subject's concrete normalisation (default: the bundle's, which must then not be per
    subject: see ``ops.norm.subject_normalisation``). ``regions``: the subject's ``mri`` in its
    store (``stores.cohort.MRIRegions``): blocks of whole planes are then read by the task
    that predicts them, in ``tasks`` runs of blocks at most (``planes_prediction``), and
    may hold up to ``plane_bytes`` (a brain of 200x280 planes: 480 MB of 32 planes) where
    ``block_bytes`` would cut the planes and exchange halos. ``soon``: the tasks run in this
    process, one subject after another: the first block is read while the subject before it
    computes its last one (``MRIRegions.read_soon``).

    Store chunks are merged in-plane into blocks of up to ``block_bytes`` of input: the
    halo exchange costs dask ~40 tasks per block whatever its size, which on store-sized
    blocks was a measurable share of the time (benchmarks/bench_predict.py); blocks that
    span whole planes skip it.
    """
    if aggregate not in AGGREGATES:
        raise MRHError(f"--aggregate {aggregate}: expected one of {', '.join(AGGREGATES)}")
    h, slice_axis = _patch_geometry(meta)
    dims = ds["mri"].dims
    if tuple(dims) != (*SPATIAL, "contrast"):
        raise MRHError(f"subject {ds.attrs.get('subject')}: mri dims {dims}, expected (x, y, z, contrast)")
    channels = list(meta["channels"])
    check_channels(channels, [str(c) for c in ds["contrast"].values], f"subject {ds.attrs.get('subject')!r}")
    mri, mask = subject_arrays(ds, channels)
    depth = h if aggregate == "centre" else 2 * h
    whole = _blocks(mri, mask, slice_axis, depth, max(block_bytes, plane_bytes)) if regions is not None else None
    mri, mask = whole if whole and _whole_planes(whole[0].chunks, slice_axis) else _blocks(
        mri, mask, slice_axis, depth, block_bytes)
    norm = meta["norm"] if norm is None else norm
    cals = stain_calibrations(meta) if spread_scale(meta, norm) is not None else []
    job = block_job(meta, spec, norm, h, slice_axis, aggregate, tta, cals)
    out = _maps(ds, channels, mri, mask, job, slice_axis, depth, regions, tasks, soon)
    if job.spread_scale is None or job.exported:  # an export's graph applies its own calibration
        return out
    return with_label_groups(out, ds, label_groups(cals), len(job.t_scale), int(job.ood))


def stain_calibrations(meta: dict) -> list[dict]:
    """An ensemble bundle's calibration record of each stain, in its stain order."""
    per = calibration_of(meta, stains_of(meta))
    return [per.get(t, {}) for t in stains_of(meta)]


def with_label_groups(out, ds, groups: list, n_t: int, n_after: int = 0):
    """The uncertainties of ``out`` (x, y, z, V) times each voxel's tissue group's factor over
    the global one (a calibration by labels); a subject without those labels keeps the
    global factor (warned). ``n_after``: values after the uncertainties (the score), kept."""
    if not any(groups):
        return out
    scale = [da.ones(out.shape[:3], np.float32, chunks=out.chunks[:3])] * n_t
    for g in groups:
        scale.append(_label_scale(ds, g, out.chunks[:3]))
    scale += scale[:n_after]  # ones
    return out * da.stack(scale, axis=-1).rechunk(out.chunks)


def _label_scale(ds, group, chunks):
    ones = da.ones(tuple(map(sum, chunks)), np.float32, chunks=chunks)
    if group is None:
        return ones
    names, rel = group
    if any(n not in ds.data_vars for n in names):
        logger.warning(f"mrhscale: subject {ds.attrs.get('subject')} lacks label(s) "
                       f"{', '.join(n for n in names if n not in ds.data_vars)}: its uncertainty keeps the global "
                       "calibration factor, not the per-tissue ones")
        return ones
    labels = [ds[n].transpose(*SPATIAL).data for n in names]
    labels = [(lab if isinstance(lab, da.Array) else da.from_array(lab)).rechunk(chunks) for lab in labels]
    return da.map_blocks(lambda *ls: rel[label_group(ls, ls[0].shape)], *labels, dtype=np.float32)


def _maps(ds, channels, mri, mask, job: BlockJob, slice_axis: int, depth: int, regions, tasks: int,
          soon: bool = False):
    """The lazy (x, y, z, V) maps of ``subject_prediction`` (before tissue-group factors)."""
    n_out = job.n_values
    kw = dict(chunks=(*mri.chunks[:3], (n_out,)), dtype=np.float32, meta=np.empty((0,) * 4, np.float32), job=job)
    msk = mask.astype(bool)[..., None]
    if _whole_planes(mri.chunks, slice_axis):
        # blocks of whole planes: no neighbour has context to give, and the volume's zero
        # padding is applied inside the gather, so no halo exchange (its tasks and a padded
        # copy of every block) at all
        if regions is not None:
            store_contrasts = [str(c) for c in ds["contrast"].values]
            picked = regions.picking([store_contrasts.index(c) for c in channels], len(store_contrasts))
            return planes_prediction(picked, msk, mri.chunks[slice_axis], job, tasks, n_out, soon)
        return da.map_blocks(predict_block, mri, msk, halo=0, **kw)
    dep = {a: (0 if a in (slice_axis, 3) else depth) for a in range(4)}
    return da.map_overlap(predict_block, mri, msk, depth=dep, boundary=0, trim=False,
                          align_arrays=False, allow_rechunk=True, halo=depth, **kw)


def block_job(meta: dict, spec: NetworkSpec, norm, h: int, slice_axis: int, aggregate: str, tta,
              cals: list | None = None) -> BlockJob:
    """The block tasks' job: the bundle's scalings (``norm``: this subject's), an ensemble's
    value-group calibration and out-of-distribution widening (``cals``), or, for an ONNX export (``meta["exported"]``), identity
    ones and the graph's brain statistics."""
    t_off, t_scale = norm.target_arrays(np.float32)  # float32: what the map is computed in
    spread = spread_scale(meta, norm)
    if not meta.get("exported"):
        ens = spread is not None and bool(cals)
        return BlockJob(spec, h, slice_axis, *norm.input_arrays(), t_off, t_scale, spread, aggregate, bool(tta),
                        value_groups=value_groups(cals) if ens else None, ood=bool(meta.get("ood")),
                        ood_power=ood_powers(cals) if ens else None)
    n_c = len(meta["channels"])
    return BlockJob(spec, h, slice_axis, np.zeros(n_c, np.float32), np.ones(n_c, np.float32), np.zeros_like(t_off),
                    np.ones_like(t_scale), None if spread is None else np.ones_like(spread), aggregate, bool(tta),
                    exported=True, feeds=graph_feeds(norm), ood=bool(meta.get("ood")))


def _whole_planes(chunks, slice_axis: int) -> bool:
    return all(len(chunks[a]) == 1 for a in range(3) if a != slice_axis)


def planes_prediction(regions, msk, cuts: tuple[int, ...], job: BlockJob, tasks: int, n_out: int,
                      soon: bool = False):
    """The maps of blocks of whole planes (``cuts`` along the slice axis), each task reading
    its own run of blocks from the store and the next block while the network runs on this
    one: reading no longer waits for the network nor the network for reading, and no task
    concatenates store chunks. The output keeps the blocks as its chunks."""
    axis = job.slice_axis
    m = msk.rechunk({axis: plane_runs(cuts, tasks)})
    if soon:  # its first block read while the task before it here computes its last one
        regions.read_soon(tuple(slice(0, cuts[0]) if a == axis else slice(0, n) for a, n in enumerate(msk.shape[:3])))
    out = da.map_blocks(predict_planes, m, chunks=(*m.chunks[:3], (n_out,)), dtype=np.float32,
                        meta=np.empty((0,) * 4, np.float32), job=job, regions=regions, cuts=cuts)
    return out.rechunk({axis: cuts})


def plane_runs(cuts: tuple[int, ...], tasks: int) -> tuple[int, ...]:
    """The planes of each of ``tasks`` runs of consecutive blocks (fewer if there are fewer blocks)."""
    k = max(1, min(int(tasks), len(cuts)))
    edges = np.linspace(0, len(cuts), k + 1).round().astype(int)
    return tuple(int(sum(cuts[a:b])) for a, b in zip(edges[:-1], edges[1:]))


def predict_planes(mask: np.ndarray, job: BlockJob, regions, cuts: tuple[int, ...], block_info=None) -> np.ndarray:
    """One run of whole-plane blocks, read from the store block by block (the next one read
    in a thread while this one is predicted) -> (x, y, z, V) as ``predict_block`` gives."""
    loc = block_info[0]["array-location"][:3]
    axis, (a, b) = job.slice_axis, loc[job.slice_axis]
    ends = np.cumsum((0, *cuts))
    bounds = [(int(lo), int(hi)) for lo, hi in zip(ends[:-1], ends[1:]) if a <= lo and hi <= b]
    reads = [tuple(slice(lo, hi) if ax == axis else slice(*loc[ax]) for ax in range(3)) for lo, hi in bounds]
    outs = []
    for (lo, hi), raw in zip(bounds, read_ahead(regions.read, reads, then=start_soon), strict=True):
        sub = tuple(slice(lo - a, hi - a) if ax == axis else slice(None) for ax in range(3))
        outs.append(predict_block(raw, mask[sub], job, 0))
    return np.concatenate(outs, axis=axis)


def read_ahead(read, items, then=None):
    """``read(item)`` for each item in order, the next one read in a thread while the caller
    works on this one (Zarr's decode releases the GIL); ``then()`` when the last one is taken
    (the next task's first read may start: ``stores.cohort.start_soon``)."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mrhscale-read") as pool:
        nxt = pool.submit(read, items[0]) if items else None
        for k in range(len(items)):
            got = nxt.result()
            nxt = pool.submit(read, items[k + 1]) if k + 1 < len(items) else None
            if nxt is None and then is not None:
                then()
            yield got


def check_channels(bundle_channels: list[str], store_channels: list[str], where: str) -> None:
    """The user's error when the data lacks a channel the model needs."""
    missing = [c for c in bundle_channels if c not in set(store_channels)]
    if missing:
        shown = ", ".join(missing[:10]) + (f" ... ({len(missing)} in all)" if len(missing) > 10 else "")
        raise MRHError(
            f"{where}: the model needs channels the store does not have: {shown}; "
            "use a model trained on this protocol or ingest the missing contrasts"
        )


def _patch_geometry(meta: dict) -> tuple[int, int]:
    """(half, slice axis) of the bundle's patches."""
    patch = meta.get("patch") or {}
    h = int(patch.get("half", (int(patch.get("size", 3)) - 1) // 2))
    axis = str(patch.get("axis", "y"))
    if axis not in SPATIAL:
        raise MRHError(f"model bundle: patch axis {axis!r} is not one of x, y, z")
    return h, SPATIAL.index(axis)


def _blocks(mri, mask, slice_axis: int, depth: int, block_bytes: int):
    """``mri`` and ``mask`` rechunked into prediction blocks: store chunks merged in-plane,
    every block at least the halo deep (fixed here, so the output chunks declared are the
    ones map_overlap uses)."""
    new = merged_inplane(mri.chunks[:3], mri.shape[:3], slice_axis, mri.shape[3] * mri.dtype.itemsize,
                         block_bytes)
    for a in range(3):
        if a != slice_axis and min(new[a]) < depth:
            new[a] = even_chunks(mri.shape[a], max(new[a][0], depth), depth)
    if new != list(mri.chunks[:3]):
        mri = mri.rechunk((*new, -1))
        mask = mask.rechunk(new)
    return mri, mask


def merged_inplane(chunks, shape, slice_axis: int, voxel_bytes: int, block_bytes: int):
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
        new[a] = list(even_chunks(shape[a], size[a], 1))
    return [tuple(c) for c in new]


def even_chunks(n: int, size: int, minimum: int) -> tuple[int, ...]:
    """Chunks of ``size`` along a length ``n`` axis, the remainder merged if below ``minimum``."""
    ch = [size] * (n // size)
    rest = n - size * len(ch)
    if rest:
        if ch and rest < minimum:
            ch[-1] += rest
        else:
            ch.append(rest)
    return tuple(ch)


def zarr_chunks(chunks: tuple[tuple[int, ...], ...]) -> tuple[int, ...] | tuple[tuple[int, ...], ...]:
    """Chunks Zarr can store (uniform but the last); a halo-driven merge can break that."""
    ok = all(all(c == ch[0] for c in ch[:-1]) and ch[-1] <= ch[0] for ch in chunks)
    return chunks if ok else tuple(ch[0] for ch in chunks)
