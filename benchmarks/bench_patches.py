"""Patch extraction: the in-memory kernel, `mrhscale patches` end to end, and its peak memory.

Figures (medians of repeats, each next to a baseline measured in the same run):
- kernel: `gather_patches` (3x3 in-plane, 67 contrasts, stride 1 over the mask of
  full-size 200x280 slices) against a per-voxel Python loop like the original, MONAI
  `iter_patch` (what GridPatchDataset iterates) and TorchIO `GridSampler`, and as a
  fraction of the memory-bandwidth bound (patch bytes/s over measured copy bandwidth).
  Layout: contrast-last vs contrast-first gathering with the same numpy `take`.
- end to end: `extract_patches` (stride 6, rules, shuffle, write) on a synthetic cohort
  store with 1 and 2 Dask worker processes (cluster start-up excluded).
- memory: peak RSS per worker while extracting a cohort larger than the workers'
  memory limit (it must finish without a worker restart).
Default: 6 subjects of 100x48x140x67 (1.0 GiB); --full: 4 subjects of 200x128x280x67 (7.2 GiB).
Run under `flock /tmp/bench.lock` on shared machines.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

from mrhscale.parallel.context import Context

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import RSSPoller, print_rows, row, timed  # noqa: E402

C = 67
PATCH_BYTES = C * 9 * 4


# ------------------------------------------------------------------ synthetic data
def brain_mask(shape) -> np.ndarray:
    """An ellipsoid filling most of the box, like a brain in its field of view."""
    g = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    return sum(v ** 2 for v in g) < 0.85


def make_bench_cohort(path: str, n_subjects: int, shape, chunks, seed: int = 0) -> list[str]:
    """A cohort store written through mrhscale.stores (as ingest does), random contents, lazily."""
    import dask.array as da
    import xarray as xr

    from mrhscale.stores import CohortStore

    names = [f"dwi2000_{i}" for i in range(34)] + [f"dwi5000_{i}" for i in range(30)] + ["t2", "mt_off", "mt_on"]
    ids = [f"b{i:02d}" for i in range(n_subjects)]
    store = CohortStore(path)
    store.prepare({"channels": names})
    mask = brain_mask(shape)
    for i, sid in enumerate(ids):
        rs = da.random.RandomState(seed + i)
        mri = rs.random_sample((*shape, C), chunks=(*chunks, C)).astype(np.float32) * 1000
        af = rs.random_sample(shape, chunks=chunks).astype(np.float32) * 255 * mask
        m = da.from_array(mask, chunks=chunks)
        ds = xr.Dataset(
            {"mri": (("x", "y", "z", "contrast"), mri), "mask": (("x", "y", "z"), m),
             "fa": (("x", "y", "z"), af / 255), "af": (("x", "y", "z"), af)},
            coords={"contrast": names},
            attrs={"subject": sid, "targets": ["af"], "labels": [],
                   "affine": np.eye(4).tolist(), "voxel_size": [0.06] * 3},
        )
        enc = {v: {"compressors": None} for v in ds.data_vars}
        store.put(sid, ds, {"stage": "bench_patches", "seed": seed + i}, encoding=enc)
    return ids


# ------------------------------------------------------------------ kernel
def loop_gather(vol, centres, half=1):
    """The original's way: one Python iteration (and one small copy) per patch."""
    p = 2 * half + 1
    out = np.empty((len(centres), vol.shape[3], p, p), vol.dtype)
    for i, (x, y, z) in enumerate(centres):
        out[i] = vol[x - half:x + half + 1, y, z - half:z + half + 1, :].transpose(2, 0, 1)
    return out


def copy_bandwidth(nbytes=256 << 20) -> float:
    """np.copyto bytes/s. At this size glibc's memcpy uses non-temporal (streaming) stores,
    which skip reading the destination lines first: no loop with ordinary stores gets there."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    t, _ = timed(lambda: np.copyto(dst, src), repeats=5, warmup=1)
    return nbytes / t


def store_copy_bandwidth(nbytes=256 << 20) -> float | None:
    """Bytes/s of a compiled element-by-element copy loop (ordinary cached stores, like any
    gather kernel's): the copy bound for a kernel whose output is not written by memcpy."""
    from mrhscale.ops.patches import NUMBA

    if NUMBA is None:
        return None

    @NUMBA.njit(nogil=True, boundscheck=False)
    def copy_loop(src, dst):
        for i in range(src.shape[0]):
            dst[i] = src[i]

    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    t, _ = timed(lambda: copy_loop(src, dst), repeats=5, warmup=1)
    return nbytes / t


def monai_rate(vol, y, repeats) -> tuple[float | None, str]:
    try:
        from monai.data.utils import iter_patch
    except ImportError as e:
        return None, f"MONAI not installed ({e})"
    arr = np.ascontiguousarray(vol[:100, y, :140].transpose(2, 0, 1))  # (C, X, Z) slice part

    n_pos = (arr.shape[1] - 2) * (arr.shape[2] - 2)
    out = np.empty((n_pos, C, 3, 3), np.float32)

    def go():  # PatchIter fixes overlap=0, so call its iter_patch with stride 1 and keep each patch
        i = 0
        for patch, _ in iter_patch(arr, patch_size=(C, 3, 3), overlap=(0, 2, 2), copy_back=False,
                                   mode=None):
            out[i] = patch
            i += 1
        return i

    n = go()
    t, _ = timed(go, repeats=repeats)
    return n / t, "monai iter_patch (GridPatchDataset's iterator) at stride 1, each patch copied out"


def torchio_rate(vol, y, repeats, n_max=1500) -> tuple[float | None, str]:
    try:
        import torch
        import torchio as tio
    except ImportError as e:
        return None, f"TorchIO not installed ({e})"
    t_img = torch.from_numpy(np.ascontiguousarray(vol[:, y:y + 1, :].transpose(3, 0, 1, 2)))
    subj = tio.Subject(img=tio.ScalarImage(tensor=t_img))
    sampler = tio.GridSampler(subj, patch_size=(3, 1, 3), patch_overlap=(2, 0, 2))

    def go():
        n = 0
        for _ in sampler:
            n += 1
            if n >= n_max:
                break
        return n

    t, _ = timed(go, repeats=repeats)
    return n_max / t, f"torchio.GridSampler, first {n_max} patches"


def kernel_rows(full: bool, repeats: int) -> list[dict]:
    from mrhscale.ops.patches import NUMBA, gather_patches

    ny = 8 if full else 4
    rng = np.random.default_rng(0)
    vol = rng.random((200, ny, 280, C), dtype=np.float32)
    mask = brain_mask((200, ny, 280))
    mask[[0, -1], :, :] = False
    mask[:, :, [0, -1]] = False
    cen = np.argwhere(mask)
    n = len(cen)
    gather_patches(vol, cen[:10], 1, "y")  # JIT warm-up
    buf = np.empty((n, C, 3, 3), np.float32)  # reused, like the copy-bandwidth destination
    t_k, _ = timed(lambda: gather_patches(vol, cen, 1, "y", out=buf), repeats=repeats, warmup=1)
    rate = n / t_k
    t_fresh, _ = timed(lambda: gather_patches(vol, cen, 1, "y"), repeats=repeats)
    t_np, _ = timed(lambda: gather_patches(vol, cen, 1, "y", backend="numpy", out=buf), repeats=repeats)
    rate_np = n / t_np
    sub = cen[: 20000 if not full else 60000]
    t_loop, _ = timed(lambda: loop_gather(vol, sub), repeats=repeats)
    rate_loop = len(sub) / t_loop
    np.testing.assert_array_equal(loop_gather(vol, sub[:500]), gather_patches(vol, sub[:500], 1, "y"))
    bw = copy_bandwidth()
    bound = bw / PATCH_BYTES
    bw_st = store_copy_bandwidth()
    bound_st = bw_st / PATCH_BYTES if bw_st else None
    why = ""
    if bound_st:  # what this machine allows any gather kernel with ordinary stores
        why = (f"; ordinary-store copy bound {bound_st / 1e6:.2f} M/s = {bound_st / rate_loop:.1f}x the loop "
               f"({'so >= 15x is out of reach' if bound_st < 15 * rate_loop else '15x reachable'}); "
               f"3 M/s is {3e6 / bound_st:.2f} of that bound")
    rows = [
        row("kernel gather_patches (1 thread)", rate, "patches/s", "per-voxel Python loop (original)",
            rate_loop, ">= 3 M/s and >= 15x loop", rate >= 3e6 and rate >= 15 * rate_loop,
            note=f"{n} patches 3x3x67, numba={'yes' if NUMBA else 'no'}{why}"),
        row("kernel vs memory-bandwidth bound", rate, "patches/s", "copy-bandwidth bound (memcpy)", bound,
            ">= 0.5 of bound", rate >= 0.5 * bound,
            note=f"np.copyto {bw / 1e9:.1f} GB/s (streaming stores), {PATCH_BYTES} B/patch"),
    ]
    if bound_st:
        rows.append(row("kernel vs ordinary-store copy bound", rate, "patches/s",
                        "copy-loop bound (ordinary stores)", bound_st, ">= 0.5 of bound", rate >= 0.5 * bound_st,
                        note=f"compiled copy loop {bw_st / 1e9:.1f} GB/s: what a kernel writing with ordinary "
                             "stores can reach (memcpy's streaming stores are out of a gather's reach)"))
    rows += [
        row("kernel numpy backend (no numba)", rate_np, "patches/s", "per-voxel Python loop (original)",
            rate_loop),
        row("kernel allocating its output", n / t_fresh, "patches/s", "into a reused buffer", rate,
            note="page faults of a fresh output array"),
    ]
    if NUMBA is not None:
        gather_patches(vol, cen[:10], 1, "y", threads=2)
        t2, _ = timed(lambda: gather_patches(vol, cen, 1, "y", threads=2, out=buf), repeats=repeats)
        rows.append(row("kernel gather_patches (2 threads)", n / t2, "patches/s",
                        "gather_patches (1 thread)", rate))
    m_rate, m_note = monai_rate(vol, ny // 2, repeats)
    if m_rate is None:
        print(f"skipping MONAI baseline: {m_note}")
    else:
        lim = (f"; the copy-loop bound allows at most {bound_st / m_rate:.1f}x" if bound_st else "")
        rows.append(row("kernel vs MONAI", rate, "patches/s", "MONAI iter_patch", m_rate, ">= 60x",
                        rate >= 60 * m_rate, note=m_note + lim))
    t_rate, t_note = torchio_rate(vol, ny // 2, repeats)
    if t_rate is None:
        print(f"skipping TorchIO baseline: {t_note}")
    else:
        rows.append(row("kernel vs TorchIO", rate, "patches/s", "TorchIO GridSampler", t_rate, None,
                        note=t_note))
    # layout: the same numpy take from contrast-last vs contrast-first volumes
    from mrhscale.ops.patches import flat_centres, patch_offsets

    idx = (flat_centres(cen, vol.shape[:3], 1, "y")[:, None] + patch_offsets(vol.shape[:3], 1, "y")).ravel()
    flat_last = vol.reshape(-1, C)
    flat_first = np.ascontiguousarray(flat_last.T)
    t_last, _ = timed(lambda: np.take(flat_last, idx, axis=0), repeats=repeats)
    t_first, _ = timed(lambda: np.take(flat_first, idx, axis=1), repeats=repeats)
    rows.append(row("gather contrast-last", n / t_last, "patches/s", "contrast-first", n / t_first,
                    "~10x", note="numpy take of the 9 voxels x 67 contrasts"))
    return rows


# ------------------------------------------------------------------ end to end + memory
def e2e_rows(full: bool, repeats: int, work: str) -> list[dict]:
    from distributed import Client, LocalCluster

    from mrhscale.options import PatchOptions
    from mrhscale.stages.patches import extract_patches

    shape, chunks, n_sub = ((200, 128, 280), (64, 64, 64), 4) if full else ((100, 48, 140), (48, 48, 48), 6)
    store = os.path.join(work, "cohort.zarr")
    t0 = time.perf_counter()
    ids = make_bench_cohort(store, n_sub, shape, chunks)
    cohort_bytes = n_sub * np.prod(shape) * C * 4
    print(f"cohort: {len(ids)} x {shape} x {C} = {cohort_bytes / 2**30:.2f} GiB written in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    rates = {}
    out = os.path.join(work, "patches.zarr")
    summary = {}
    for nw in (1, 2):
        with LocalCluster(n_workers=nw, threads_per_worker=1, processes=True, dashboard_address=None,
                          silence_logs=40) as cl, Client(cl):
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                summary = extract_patches(store, "af", out, ctx=Context(quiet=True), overwrite=True,
                                          options=PatchOptions(seed=0, val_fraction=0.05))
                ts.append(time.perf_counter() - t0)
            rates[nw] = (summary["n_train"] + summary["n_val"]) / statistics.median(ts)
    n_samples = summary["n_train"] + summary["n_val"]
    rows = [
        row("end-to-end patches, 2 Dask workers", rates[2], "patches/s", "1 Dask worker", rates[1],
            note=f"{n_samples} patches of {summary['n_candidates']} candidates, stride 6, "
                 f"{cohort_bytes / 2**30:.2f} GiB read per run"),
        row("end-to-end input read rate, 2 workers",
            cohort_bytes / (n_samples / rates[2]) / 2**20, "MiB/s", "1 worker",
            cohort_bytes / (n_samples / rates[1]) / 2**20),
    ]
    # peak memory under a limit smaller than the cohort
    limit = (1 << 30) if full else (450 << 20)  # a worker idles at ~250 MiB (numba, xarray, zarr)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      memory_limit=limit, silence_logs=40) as cl, Client(cl) as client:
        pids0 = client.run(os.getpid)
        with RSSPoller(list(pids0.values()), children=False) as poll:
            t0 = time.perf_counter()
            extract_patches(store, "af", out, ctx=Context(quiet=True), overwrite=True)
            dt = time.perf_counter() - t0
        pids1 = client.run(os.getpid)
    peak = max(poll.peak.values())
    restarted = sorted(pids0.values()) != sorted(pids1.values())
    rows.append(row("extraction peak RSS per worker", peak / 2**20, "MiB", "worker memory limit",
                    limit / 2**20, "finishes; peak < limit", (not restarted) and peak < limit,
                    note=f"cohort {cohort_bytes / 2**20:.0f} MiB > 2 x {limit / 2**20:.0f} MiB; "
                         f"{dt:.0f} s; worker restarts: {'yes' if restarted else 'no'}"))
    return rows


def run(full: bool = False, repeats: int | None = None) -> list[dict]:
    repeats = repeats or (5 if not full else 3)
    rows = kernel_rows(full, repeats)
    work = tempfile.mkdtemp(prefix="bench-patches-")
    try:
        rows += e2e_rows(full, 3 if not full else 2, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="full-size cohort (slow)")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--kernel-only", action="store_true")
    a = ap.parse_args()
    rows = kernel_rows(a.full, 5) if a.kernel_only else run(a.full)
    print_rows(rows)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)
