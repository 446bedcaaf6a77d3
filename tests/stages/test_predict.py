"""mrhscale.stages.predict: voxel-exact against the bare model, geometry, mask, resume, bad input."""

from __future__ import annotations

import os
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from click.testing import CliRunner
from helpers import subject_dataset, write_model

from mrhscale.errors import MRHError
from mrhscale.io.bundle import load_model
from mrhscale.nn.gather import DevicePatches
from mrhscale.nn.worker import NetworkSpec
from mrhscale.ops.blocks import block_patches
from mrhscale.options import PredictOptions
from mrhscale.parallel.context import Context
from mrhscale.stages.predict import predict
from mrhscale.stages.predict_graph import BlockJob, predict_block, subject_prediction

SHAPE = (11, 7, 13)
QUIET = Context(quiet=True)


def write_store(path, n_subjects=2, shape=SHAPE, n_channels=5, chunks=(4, 3, 5), full_mask=False,
                nan=False, seed=0):
    """Cohort store with odd chunking; optionally a mask touching the volume edge and NaNs."""
    ids = [f"s{i + 1:02d}" for i in range(n_subjects)]
    from mrhscale.stores import CohortStore

    store = CohortStore(str(path))
    store.prepare({})
    for i, sid in enumerate(ids):
        ds = subject_dataset(sid, shape, n_channels, seed + i, chunks)
        mri = ds["mri"].values
        mask = ds["mask"].values
        if full_mask:
            mask = np.ones(shape, bool)
            mask[0, 0, 0] = False
        if nan:
            mri[1, 2, 3, 1] = np.nan
            mri[2, 3, 4, :] = np.nan
        cx, cy, cz = chunks
        ds["mri"] = (("x", "y", "z", "contrast"), mri)
        ds["mask"] = (("x", "y", "z"), mask)
        ds["mri"] = ds["mri"].chunk({"x": cx, "y": cy, "z": cz, "contrast": -1})
        ds["mask"] = ds["mask"].chunk({"x": cx, "y": cy, "z": cz})
        ds.attrs["affine"] = [[0.05, 0, 0, 1.5], [0, 0.07, 0, -2.0], [0, 0, 0.06, 3.0], [0, 0, 0, 1]]
        for v in ds.variables:
            ds[v].encoding.pop("chunks", None)
        store.put(sid, ds, {"stage": "tests", "seed": seed + i})
    return str(path), ids


def reference_patch(mri, channels_idx, norm, centre, half, axis):
    """The patch of one voxel built the slow, obvious way: pad RAW with zeros, cut, normalise."""
    ax = "xyz".index(axis)
    inplane = [a for a in range(3) if a != ax]
    vol = mri[..., channels_idx]
    pad = [(0, 0)] * 4
    for a in inplane:
        pad[a] = (half, half)
    vol = np.pad(vol, pad)
    idx = [centre[0], centre[1], centre[2]]
    sl = [slice(None)] * 3
    sl[ax] = idx[ax]
    for a in inplane:
        sl[a] = slice(idx[a], idx[a] + 2 * half + 1)  # padded coords: centre+half is the centre
    p = vol[tuple(sl)]  # [P, P, C] rows = first in-plane axis
    p = np.moveaxis(p, -1, 0)
    off, inv = norm.input_arrays()
    p = (p - off[:, None, None]) * inv[:, None, None]
    return np.nan_to_num(p, nan=0.0).astype(np.float32)


@pytest.mark.parametrize("half,axis", [(1, "y"), (2, "x"), (1, "z")])
def test_voxels_equal_direct_model_on_their_patch(tmp_path, half, axis):
    store, ids = write_store(tmp_path / "c.zarr", n_subjects=1, full_mask=True, nan=True)
    ds = xr.open_zarr(store, group=ids[0], consolidated=False)
    names = [str(c) for c in ds.contrast.values]
    bundle_channels = names[::-1][:4]  # reordered subset: selection must go by NAME
    mp = write_model(tmp_path / "m.pt", bundle_channels, half=half, axis=axis)
    model, meta = load_model(mp)
    maps = subject_prediction(ds, meta, NetworkSpec(mp, load_model, batch_size=37)).compute(scheduler="sync")
    assert maps.shape == (*SHAPE, 1) and maps.dtype == np.float32  # (x, y, z, V): one stain
    pred = maps[..., 0]
    mri = ds["mri"].values
    cidx = [names.index(c) for c in bundle_channels]
    rng = np.random.default_rng(1)
    vox = [tuple(rng.integers(0, s) for s in SHAPE) for _ in range(25)]
    vox += [(0, 3, 5), (10, 6, 12), (1, 2, 3), (2, 3, 4), (10, 0, 0)]  # edges, NaN voxels
    vox = [v for v in vox if ds["mask"].values[v]]
    patches = np.stack([reference_patch(mri, cidx, meta["norm"], v, half, axis) for v in vox])
    with torch.no_grad():
        direct = model(torch.from_numpy(patches))[:, :, half, half].numpy()  # [N, T]
    direct = meta["norm"].invert_target(direct)[:, 0]
    got = np.array([pred[v] for v in vox])
    np.testing.assert_allclose(got, direct, rtol=1e-4, atol=1e-3)


def test_outside_mask_is_zero_and_mean_aggregate_differs(tmp_path):
    store, ids = write_store(tmp_path / "c.zarr", n_subjects=1)
    ds = xr.open_zarr(store, group=ids[0], consolidated=False)
    mp = write_model(tmp_path / "m.pt", [str(c) for c in ds.contrast.values])
    model, meta = load_model(mp)
    centre = subject_prediction(ds, meta, NetworkSpec(mp, load_model)).compute(scheduler="sync")[..., 0]
    mean = subject_prediction(ds, meta, NetworkSpec(mp, load_model), aggregate="mean").compute(scheduler="sync")[..., 0]
    mask = ds["mask"].values
    assert np.all(centre[~mask] == 0) and np.all(mean[~mask] == 0)
    assert np.all(centre[mask] != 0)
    assert np.abs(mean[mask] - centre[mask]).max() > 1e-3  # a different estimator
    # 'mean' at voxel v = average over in-mask centres u within h (in-plane) of pred_u[v - u + h]
    names = [str(c) for c in ds.contrast.values]
    mri = ds["mri"].values
    v = (5, 3, 6)
    outs = []
    for dx in (-1, 0, 1):
        for dz in (-1, 0, 1):
            u = (v[0] + dx, v[1], v[2] + dz)
            if mask[u]:
                p = reference_patch(mri, list(range(len(names))), meta["norm"], u, 1, "y")
                with torch.no_grad():
                    o = model(torch.from_numpy(p[None]))[0].numpy()  # [T, P, P]
                outs.append(meta["norm"].invert_target(o, stain_axis=0)[0, 1 - dx, 1 - dz])
    assert mean[v] == pytest.approx(np.mean(outs), rel=1e-4)


def test_patch_building_has_no_per_voxel_python_loop(tmp_path):
    """Guard: Python-level calls while predicting a block do not grow with the voxel count."""
    rng = np.random.default_rng(0)
    mp = write_model(tmp_path / "m.pt", ["a", "b", "c"], depth=0, width=4)
    _, meta = load_model(mp)
    off, inv = meta["norm"].input_arrays()

    def calls(n):
        mri = rng.random((n + 2, 4, n + 2, 3), dtype=np.float32)
        mask = np.ones((n + 2, 4, n + 2, 1), bool)
        count = [0]

        def prof(frame, event, arg):
            if event == "call":
                count[0] += 1

        sys.setprofile(prof)
        try:
            job = BlockJob(NetworkSpec(mp, load_model, batch_size=10**6), half=1, slice_axis=1, offset=off,
                           inv_scale=inv, t_offset=np.zeros(1, np.float32), t_scale=np.ones(1, np.float32))
            out = predict_block(mri, mask, job, halo=1)
        finally:
            sys.setprofile(None)
        assert out.shape == (n, 4, n, 1)
        return count[0]

    small, big = calls(6), calls(40)  # 144 vs 6400 voxels
    assert big < 1.5 * small + 50, (small, big)
    # block_patches itself is a single gather
    blk = rng.random((2, 7, 8, 3)).astype(np.float32)
    s, r, q = np.array([0, 1]), np.array([0, 4]), np.array([5, 2])
    got = block_patches(blk, s, r, q, 1)
    np.testing.assert_array_equal(got[1], np.moveaxis(blk[1, 4:7, 2:5], -1, 0))


def test_end_to_end_cluster_nifti_resume_and_model_loaded_once_per_worker(tmp_path):
    from distributed import Client, LocalCluster

    from mrhscale.nn import worker

    store, ids = write_store(tmp_path / "c.zarr", n_subjects=3, chunks=(3, 3, 4))
    mp = write_model(tmp_path / "m.pt", [f"c{i:02d}" for i in range(5)])
    out, nii = str(tmp_path / "p.zarr"), str(tmp_path / "nii")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        on_cluster = Context(scheduler=cluster.scheduler_address, quiet=True)
        r1 = predict(mp, store, out, subjects=["s02"], ctx=on_cluster, options=PredictOptions(batch_size=64))
        assert r1["predicted"] == ["s02"]
        assert zarr.open_group(out, mode="r").attrs["subjects"] == ["s02"]
        # an interrupted run: s01's group half-written but not listed -> redone
        zarr.open_group(out, mode="a").create_group("s01")
        mtime = os.path.getmtime(os.path.join(out, "s02", "af_virtual", "zarr.json"))
        r2 = predict(mp, store, out, nifti_dir=nii, ctx=on_cluster)
        assert r2["skipped"] == ["s02"] and r2["predicted"] == ["s01", "s03"]
        assert os.path.getmtime(os.path.join(out, "s02", "af_virtual", "zarr.json")) == mtime
        loads = client.run(worker.load_count)
        assert list(loads.values()) == [1]  # many chunks, 2 runs, one load per worker
    root = zarr.open_group(out, mode="r")
    assert root.attrs["subjects"] == ["s01", "s02", "s03"]  # an index of the complete ones, natural order
    assert root.attrs["variable"] == "af_virtual" and root.attrs["aggregate"] == "centre"
    _, meta = load_model(mp)
    for sid in ids:
        src = xr.open_zarr(store, group=sid, consolidated=False)
        got = xr.open_zarr(out, group=sid, consolidated=False)
        ref = subject_prediction(src, meta, NetworkSpec(mp, load_model)).compute(scheduler="sync")[..., 0]
        np.testing.assert_allclose(got["af_virtual"].values, ref, rtol=1e-5, atol=1e-4)
        assert got["af_virtual"].dims == ("x", "y", "z")
        assert got.attrs["affine"] == src.attrs["affine"]
        assert got.attrs["lineage"]["model"]["sha256"].startswith("sha256:")
        assert got.attrs["lineage"]["source"]["store"] == store
        np.testing.assert_array_equal(got["mask"].values, src["mask"].values)
        img = nib.load(os.path.join(nii, f"{sid}_af_virtual.nii.gz"))
        assert img.shape == SHAPE
        np.testing.assert_allclose(img.affine, np.asarray(src.attrs["affine"]), atol=1e-6)
        np.testing.assert_allclose(np.asarray(img.dataobj), ref, rtol=1e-5, atol=1e-4)
    # a different model into the same output is refused rather than mixed
    mp2 = write_model(tmp_path / "m2.pt", [f"c{i:02d}" for i in range(5)], seed=3)
    with pytest.raises(MRHError, match="another model"):
        predict(mp2, store, out, ctx=QUIET)


def test_bad_input_errors(tmp_path):
    store, _ = write_store(tmp_path / "c.zarr", n_subjects=1)
    bad = write_model(tmp_path / "bad.pt", ["c00", "c01", "t2", "mt_on"])
    with pytest.raises(MRHError, match="t2, mt_on"):
        predict(bad, store, str(tmp_path / "p.zarr"), ctx=QUIET)
    good = write_model(tmp_path / "good.pt", [f"c{i:02d}" for i in range(5)])
    with pytest.raises(MRHError, match="s09"):
        predict(good, store, str(tmp_path / "p.zarr"), subjects=["s09"], ctx=QUIET)
    if not torch.cuda.is_available():
        with pytest.raises(MRHError, match="no CUDA GPU"):
            predict(good, store, str(tmp_path / "p.zarr"), ctx=Context(device="cuda", quiet=True))
    with pytest.raises(MRHError, match="aggregate"):
        predict(good, store, str(tmp_path / "p.zarr"), options=PredictOptions(aggregate="max"), ctx=QUIET)
    with pytest.raises(MRHError, match="not found"):
        predict(str(tmp_path / "none.pt"), store, str(tmp_path / "p.zarr"), ctx=QUIET)
    with pytest.raises(MRHError, match="input store"):
        predict(good, store, store, ctx=QUIET)
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["format"] = "mrhscale-cohort"
    with pytest.raises(MRHError, match="not a prediction store"):
        predict(good, store, str(tmp_path / "other.zarr"), ctx=QUIET)
    assert not os.path.exists(tmp_path / "p.zarr" / "s01")


def test_cli_predict(tmp_path):
    from mrhscale.cli import main

    store, _ = write_store(tmp_path / "c.zarr", n_subjects=1)
    # half=2 with --aggregate mean: a 4-voxel halo forces irregular chunks, written regularly
    good = write_model(tmp_path / "good.pt", [f"c{i:02d}" for i in range(5)], half=2, axis="x")
    bad = write_model(tmp_path / "bad.pt", ["c00", "zz"])
    runner = CliRunner()
    r = runner.invoke(main, ["predict", bad, store, "--out", str(tmp_path / "p.zarr"), "-q"])
    assert r.exit_code == 2 and "zz" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
    if not torch.cuda.is_available():
        r = runner.invoke(main, ["predict", good, store, "--out", str(tmp_path / "p.zarr"),
                                 "--device", "cuda", "-q"])
        assert r.exit_code == 2 and "CUDA" in r.output
    r = runner.invoke(main, ["predict", good, store, "--out", str(tmp_path / "p.zarr"),
                             "--nifti", str(tmp_path / "nii"), "--scheduler", "synchronous",
                             "--aggregate", "mean", "--batch-size", "100", "-q"])
    assert r.exit_code == 0, r.output
    assert os.path.exists(tmp_path / "nii" / "s01_af_virtual.nii.gz")
    assert zarr.open_group(str(tmp_path / "p.zarr"), mode="r").attrs["aggregate"] == "mean"
    src = xr.open_zarr(store, group="s01", consolidated=False)
    _, meta = load_model(good)
    ref = subject_prediction(src, meta, NetworkSpec(good, load_model), aggregate="mean").compute(scheduler="sync")[..., 0]
    got = xr.open_zarr(str(tmp_path / "p.zarr"), group="s01", consolidated=False)["af_virtual"].values
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("axis", ["x", "y", "z"])
def test_inference_patches_equal_training_patches(axis):
    """The patch of a voxel is the same as extraction builds for training."""
    from mrhscale.ops import patches

    rng = np.random.default_rng(3)
    vol = rng.random((9, 8, 10, 4)).astype(np.float32)
    h = 1
    ax = "xyz".index(axis)
    inplane = [a for a in range(3) if a != ax]
    centres = np.stack([rng.integers(h if a != ax else 0, vol.shape[a] - (h if a != ax else 0), 20)
                        for a in range(3)], axis=1)
    train = patches.gather_patches(vol, centres, half=h, axis=axis)
    blk = np.transpose(vol, (ax, *inplane, 3))
    mine = block_patches(blk, centres[:, ax], centres[:, inplane[0]] - h, centres[:, inplane[1]] - h, h)
    np.testing.assert_array_equal(mine, train)


def test_prediction_blocks_merge_whole_store_chunks_in_plane():
    """Fewer, larger blocks (halo tasks per block are a fixed cost); only in-plane axes merge,
    boundaries stay on store-chunk boundaries, and the byte budget holds."""
    from mrhscale.stages.predict_graph import merged_inplane

    chunks = ((64, 64, 64, 8), (32, 32, 32, 32), (64, 64, 64, 64, 24))
    shape = (200, 128, 280)
    vb = 67 * 4
    got = merged_inplane(chunks, shape, 1, vb, 96 << 20)
    assert got[1] == chunks[1]
    for a in (0, 2):
        assert sum(got[a]) == shape[a]
        edges = set(__import__("itertools").accumulate(chunks[a]))
        assert set(__import__("itertools").accumulate(got[a])) <= edges
    assert max(got[0]) * 32 * max(got[2]) * vb <= 96 << 20
    assert len(got[0]) * len(got[2]) < len(chunks[0]) * len(chunks[2])
    assert merged_inplane(chunks, shape, 1, vb, 1) == [tuple(c) for c in chunks]


@pytest.mark.parametrize(("aggregate", "pick"), [("centre", "first"), ("mean", "reversed"), ("centre", "all")])
def test_blocks_read_by_their_own_task_give_the_same_bits(tmp_path, aggregate, pick):
    """Whole-plane blocks read from the store by the task that predicts them (runs of blocks,
    the next read while this one computes; a model of fewer contrasts, in another order)
    give the dataset path's bits, chunks and dtype, for any number of runs."""
    from mrhscale.stages.predict_graph import plane_runs
    from mrhscale.stores import CohortStore

    path, ids = write_store(tmp_path / "c.zarr", n_subjects=1, full_mask=True, nan=True)
    source = CohortStore.open(path)
    ds = source.open_subject(ids[0])
    stored = [str(c) for c in ds.contrast.values]
    channels = {"first": stored[:3], "reversed": stored[::-1][:3], "all": stored}[pick]
    mp = write_model(tmp_path / "m.pt", channels)
    _, meta = load_model(mp)
    spec = NetworkSpec(mp, load_model, batch_size=29)
    ref = subject_prediction(ds, meta, spec, aggregate=aggregate)
    want = ref.compute(scheduler="sync")
    assert len(ref.chunks[1]) > 2  # several blocks along the slice axis (y)
    for tasks in (1, 2, 99):
        got = subject_prediction(ds, meta, spec, aggregate=aggregate, regions=source.mri_regions(ids[0]), tasks=tasks)
        assert got.chunks == ref.chunks and got.dtype == ref.dtype
        assert got.compute(scheduler="sync").tobytes() == want.tobytes()
    assert plane_runs((3, 3, 3, 1), 2) == (6, 4) and plane_runs((3, 3), 5) == (3, 3) and plane_runs((3,), 1) == (3,)
    # its first block queued to be read ahead (``soon``), started as a task before it would, then
    # taken by its own task: the same bits, nothing left queued
    from mrhscale.stores import cohort

    ahead = subject_prediction(ds, meta, spec, aggregate=aggregate, regions=source.mri_regions(ids[0]), soon=True)
    assert list(cohort._SOON.values()) == [None]
    cohort.start_soon()
    assert ahead.compute(scheduler="sync").tobytes() == want.tobytes() and not cohort._SOON
    # blocks too small for whole planes (halo exchange) become whole planes when read from the store
    cut = subject_prediction(ds, meta, spec, aggregate=aggregate, regions=source.mri_regions(ids[0]),
                             block_bytes=1, plane_bytes=1 << 30)
    names = {str(k[0] if isinstance(k, tuple) else k) for k in dict(cut.__dask_graph__())}
    assert not any("overlap" in n for n in names) and cut.chunks == ref.chunks
    assert cut.compute(scheduler="sync").tobytes() == want.tobytes()


@pytest.mark.parametrize("aggregate", ["centre", "mean"])
@pytest.mark.parametrize("half,axis", [(1, "y"), (2, "x")])
def test_block_layouts_and_gather_backends_agree(tmp_path, monkeypatch, aggregate, half, axis):
    """Whole-plane blocks (no halo exchange, zero padding inside the gather), store-chunk
    blocks with map_overlap halos, and the numpy fallback give the same voxels; the
    device-side gather (torch) gives the compiled gather's bits."""
    from mrhscale.ops import blocks
    from mrhscale.stages import predict_graph as P

    store, ids = write_store(tmp_path / "c.zarr", n_subjects=1, full_mask=True, nan=True)
    ds = xr.open_zarr(store, group=ids[0], consolidated=False)
    mp = write_model(tmp_path / "m.pt", [str(c) for c in ds.contrast.values], half=half, axis=axis)
    _, meta = load_model(mp)

    def run(block_bytes):
        arr = subject_prediction(ds, meta, NetworkSpec(mp, load_model, batch_size=29), aggregate=aggregate,
                                 block_bytes=block_bytes)
        names = {str(k[0] if isinstance(k, tuple) else k) for k in dict(arr.__dask_graph__())}
        return arr.compute(scheduler="sync"), arr.numblocks, any("overlap" in n for n in names)

    whole, nb_whole, halo_whole = run(P.BLOCK_BYTES)
    ax = "xyz".index(axis)
    assert all(nb_whole[a] == 1 for a in range(3) if a != ax) and not halo_whole
    chunked, nb_chunked, halo_chunked = run(1)
    assert any(nb_chunked[a] > 1 for a in range(3) if a != ax) and halo_chunked
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)
    with monkeypatch.context() as m:  # the GPU's path (raw block uploaded, gathered by torch), here on the CPU
        m.setattr(P, "block_patches", lambda mri, order, off, inv, h, device: DevicePatches(mri, order, off, inv, h, device))
        assert run(P.BLOCK_BYTES)[0].tobytes() == whole.tobytes()
    monkeypatch.setattr(blocks, "gather_normalised_nb", None)
    for bb in (P.BLOCK_BYTES, 1):
        np.testing.assert_allclose(run(bb)[0], whole, rtol=1e-5, atol=1e-5)
