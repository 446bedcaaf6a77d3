"""Files -> cohort store: each subject's volumes become one chunked, compressed xarray group.

Reads stay lazy (nibabel proxies sliced per chunk inside Dask tasks) and the
writes run on the Dask cluster. A subject becomes visible only once complete:
it is written under ``_staging/<id>`` and renamed into place (local stores),
and in every case its id is added to the root's ``subjects`` attr last. A
rerun skips complete subjects and clears any half-written remains.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shutil
import warnings
from dataclasses import dataclass, field

import dask
import dask.array as da
import numpy as np
import xarray as xr
import zarr
from zarr.codecs import BloscCodec

from mrhscale import __version__
from mrhscale.errors import MRHError
from mrhscale.manifest import Manifest, SubjectSpec, load_manifest
from mrhscale.store import STAGING, SUBJECTS_ATTR, is_local, local_path
from mrhscale.volumes import Volume, checksum, open_volume, read_sidecars

DEFAULT_CHUNKS = (64, 32, 64)
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


def plan_subject(spec: SubjectSpec) -> SubjectPlan:
    """Open every file of a subject (headers only, plus the mask) and check they agree."""
    sid = spec.id
    opened: dict[str, Volume] = {}
    for role, path in spec.files().items():
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
    )


def _after_write(_written, nan_counts):
    return nan_counts


def _read_slab(parts, shape, z0: int, z1: int) -> tuple[np.ndarray, int]:
    """All contrasts of z-slab [z0, z1) as one contrast-last float32 block, NaNs zeroed and counted.

    NIfTI/Analyze data are Fortran-ordered, so a slab of full x-y planes is one
    contiguous run per volume: reading slabs (not small 3D chunks, which would be
    thousands of 256-byte runs) keeps reads sequential. Zeroing and counting NaNs
    here, while the block is hot in cache, saves two passes over the data.
    """
    from mrhscale.cluster import tune_malloc

    tune_malloc()  # Dask's worker malloc setting page-faults every slab-sized buffer
    sx, sy, _ = shape
    out = np.empty((sx, sy, z1 - z0, sum(n for _, n in parts)), np.float32)
    c = 0
    for proxy, n in parts:
        blk = np.asarray(proxy[:, :, z0:z1], dtype=np.float32)
        out[..., c:c + n] = blk.reshape(sx, sy, z1 - z0, n)
        c += n
    nans = np.isnan(out)
    n_nan = int(np.count_nonzero(nans))
    if n_nan:
        out[nans] = 0
    return out, n_nan


def _total(counts) -> int:
    return int(sum(counts))


def lazy_volume(vol: Volume, shape: tuple[int, ...], chunks: tuple[int, ...]):
    """One file as a float32 dask array (NaNs zeroed) and a lazy count of its NaNs."""
    return lazy_group([(vol, shape[3] if len(shape) == 4 else 1)], shape[:3], chunks[:3], squeeze=len(shape) == 3)


def lazy_group(vols: list[tuple[Volume, int]], shape3, chunks3, squeeze: bool = False):
    """Volumes of one grid concatenated along contrast, contrast-last, chunked (cx, cy, cz, all).

    Returns the array (NaNs zeroed) and a Delayed NaN count computed by the same
    read tasks. gzip has no random access, so a .gz group is read whole once.
    """
    shape3 = tuple(int(s) for s in shape3)
    spatial = tuple(min(c, s) for c, s in zip(chunks3, shape3))
    n_total = sum(n for _, n in vols)
    parts = [(v.proxy, n) for v, n in vols]
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


def subject_dataset(plan: SubjectPlan, chunks=DEFAULT_CHUNKS) -> tuple[xr.Dataset, dict]:
    """The subject as a lazy Dataset (NaNs zeroed) and lazy NaN counts per variable."""
    sx, sy, sz = plan.shape
    spatial = tuple(min(c, s) for c, s in zip(chunks, plan.shape))
    mri, n_nan = lazy_group([(vol, n) for _, vol, n in plan.mri], plan.shape, spatial)
    nan_counts = {"mri": n_nan}
    xyz = ("x", "y", "z")
    data = {
        "mri": (xyz + ("contrast",), mri),
        "mask": (xyz, da.from_array(plan.mask, chunks=spatial)),
    }
    three = {"fa": plan.fa} if plan.fa is not None else {}
    three.update(plan.targets)
    for name, vol in three.items():
        a, nan_counts[name] = lazy_volume(vol, plan.shape, spatial)
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
        "orientation": plan.orientation,
        "shape": list(plan.shape),
        "targets": list(plan.targets),
        "labels": list(plan.labels),
        "mask_inverted_in_source": bool(plan.spec.mask_inverted),
        "mask_source": "mask" if plan.spec.mask else "fa > 0",
        "brain_voxels": int(plan.mask.sum()),
        "mrhscale_version": __version__,
    }
    return xr.Dataset(data, coords=coords, attrs=attrs), nan_counts


def _encoding(ds: xr.Dataset, compression: str, clevel: int) -> dict:
    enc = {}
    for name, var in ds.data_vars.items():
        comp = BloscCodec(cname=compression, clevel=clevel, shuffle="bitshuffle" if var.dtype == bool else "shuffle")
        enc[name] = {"compressors": [comp], "chunks": tuple(c[0] for c in var.chunks)}
    return enc


def _remove_group(url: str, path: str, storage_options) -> None:
    if is_local(url):
        shutil.rmtree(os.path.join(local_path(url), path), ignore_errors=True)
    else:
        root = zarr.open_group(url, mode="a", storage_options=storage_options)
        if path in root:
            del root[path]


def _check_out(url: str, storage_options) -> zarr.Group:
    if is_local(url):
        p = local_path(url)
        if os.path.isfile(p):
            raise MRHError(f"--out {url}: is a file; give a directory path for the store (e.g. cohort.zarr)")
        if os.path.isdir(p) and os.listdir(p) and not os.path.exists(os.path.join(p, "zarr.json")):
            raise MRHError(f"--out {url}: directory exists and is not a Zarr store; choose a new path")
    try:
        root = zarr.open_group(url, mode="a", storage_options=storage_options, zarr_format=3)
    except Exception as e:
        raise MRHError(f"--out {url}: cannot open as a Zarr v3 store ({type(e).__name__}: {e})") from None
    fmt = root.attrs.get("format")
    if fmt not in (None, FORMAT):
        raise MRHError(f"--out {url}: holds a {fmt!r} store, not a cohort store")
    return root


def ingest(
    manifest: str | Manifest,
    out: str,
    *,
    subjects: list[str] | None = None,
    chunks: tuple[int, int, int] = DEFAULT_CHUNKS,
    scheduler: str | None = None,
    workers: int | None = None,
    client=None,
    skip_bad: bool = False,
    overwrite: bool = False,
    compression: str = "zstd",
    clevel: int = 3,
    checksums: bool = True,
    quiet: bool = False,
    storage_options: dict | None = None,
) -> dict:
    """Write the manifest's subjects into the cohort store at ``out``; returns a summary."""
    from mrhscale.cluster import dask_client

    man = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    specs = man.select(subjects)
    if len(chunks) != 3 or any(int(c) < 1 for c in chunks):
        raise MRHError(f"--chunks: expected 3 positive integers, got {chunks}")
    if compression not in ("zstd", "lz4", "lz4hc", "zlib", "blosclz"):
        raise MRHError(f"--compression {compression!r}: choose zstd, lz4, lz4hc, zlib or blosclz")
    out = str(out)
    root = _check_out(out, storage_options)
    done = list(root.attrs.get(SUBJECTS_ATTR, []))
    store_channels = root.attrs.get("channels")
    if overwrite:
        done = [s for s in done if s not in {sp.id for sp in specs}]
        root.attrs[SUBJECTS_ATTR] = done
    todo = [s for s in specs if s.id not in done]
    skipped = [s.id for s in specs if s.id in done]

    plans, bad = [], {}
    for spec in todo:
        try:
            plan = plan_subject(spec)
            ref = store_channels or (plans[0].channels if plans else None)
            if ref is not None and plan.channels != list(ref):
                diff = next(((i, a, b) for i, (a, b) in enumerate(zip(plan.channels, ref)) if a != b), None)
                what = f"channel {diff[0]} is {diff[1]!r}, expected {diff[2]!r}" if diff else f"{len(plan.channels)} channels, expected {len(ref)}"
                raise MRHError(f"subject {spec.id}: channels differ from the rest of the cohort ({what})")
            plans.append(plan)
        except MRHError as e:
            if not skip_bad:
                raise
            bad[spec.id] = str(e)
    if not plans:
        return {"store": out, "written": [], "skipped": skipped, "bad": bad}

    root.attrs.update({
        "format": FORMAT,
        "format_version": 1,
        "channels": plans[0].channels,
        "mrhscale_version": __version__,
    })
    local = is_local(out)
    written = []
    with dask_client(scheduler, workers, quiet=quiet) if client is None else contextlib.nullcontext(client) as cl:
        from distributed import as_completed
        from tqdm.auto import tqdm

        futures = {}
        for plan in plans:
            sid = plan.spec.id
            target = f"{STAGING}/{sid}" if local else sid
            _remove_group(out, target, storage_options)
            _remove_group(out, sid, storage_options)
            ds, nans = subject_dataset(plan, chunks)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*does not have a Zarr V3 specification.*")
                warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
                write = ds.to_zarr(out, group=target, mode="w", compute=False, consolidated=False,
                                   zarr_format=3, encoding=_encoding(ds, compression, clevel),
                                   storage_options=storage_options)
            sums = [cl.submit(checksum, p, pure=False) for p in plan.spec.files().values()] if checksums else []
            fut = cl.compute(dask.delayed(_after_write)(write, nans))
            futures[fut] = (plan, target, sums)
        bar = tqdm(total=len(futures), desc="ingest", unit="subject", disable=quiet)
        for fut in as_completed(list(futures)):
            plan, target, sums = futures[fut]
            sid = plan.spec.id
            try:
                nan_counts = fut.result()
                digests = cl.gather(sums) if sums else []
            except MRHError:
                raise
            except Exception as e:
                msg = f"subject {sid}: failed while reading/writing ({type(e).__name__}: {e})"
                _remove_group(out, target, storage_options)
                if not skip_bad:
                    for f in futures:
                        f.cancel()
                    raise MRHError(msg) from None
                bad[sid] = msg
                bar.update()
                continue
            files = plan.spec.files()
            g = zarr.open_group(out, path=target, mode="a", storage_options=storage_options)
            g.attrs.update({
                "nan_counts": {k: int(v) for k, v in nan_counts.items()},
                "sources": {role: {"path": p, **({"checksum": d} if checksums else {})}
                            for (role, p), d in zip(files.items(), digests or [None] * len(files))},
                "ingested": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                "manifest": man.path,
            })
            if local:
                os.replace(os.path.join(local_path(out), target), os.path.join(local_path(out), sid))
            done.append(sid)
            order = {s.id: i for i, s in enumerate(man.subjects)}
            done = sorted(done, key=lambda s: order.get(s, -1))
            root.attrs[SUBJECTS_ATTR] = done
            written.append(sid)
            bar.update()
        bar.close()
    if local:
        shutil.rmtree(os.path.join(local_path(out), STAGING), ignore_errors=True)
    return {"store": out, "written": written, "skipped": skipped, "bad": bad}
