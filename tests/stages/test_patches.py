"""Patch engine: rules vs a plain reference, chunk edges, shuffle, determinism, bad input."""

from __future__ import annotations

import os

import numpy as np
import pytest
import xarray as xr
import zarr
from click.testing import CliRunner
from helpers import make_cohort_store

from mrhscale.cli import main
from mrhscale.errors import MRHError
from mrhscale.options import PatchOptions
from mrhscale.parallel.context import Context
from mrhscale.stages.patches import extract_patches

AXES = ("x", "y", "z")


def _edit(ds: xr.Dataset, i: int) -> xr.Dataset:
    """Plant zero regions, NaNs and a partial mask so every rule bites somewhere."""
    chunks = {k: v[0] for k, v in ds.mri.chunksizes.items() if k != "contrast"}
    ds = ds.load()
    rng = np.random.default_rng(100 + i)
    t = ds.af.values
    t[rng.random(t.shape) < 0.3] = 0.0  # sparse labels: the nonzero rule matters
    t[:, : 2 + i, :] = 0.0  # slices without data: default slice range differs per subject
    t *= rng.uniform(0.05, 1.0, t.shape).astype(np.float32)  # low sums: the sum rule matters
    t[rng.random(t.shape) < 0.01] = np.nan
    mri = ds.mri.values
    mri[rng.random(mri.shape[:3]) < 0.01, rng.integers(mri.shape[3])] = np.nan
    m = ds.mask.values
    m[rng.random(m.shape) < 0.2] = False
    ds["af"] = (("x", "y", "z"), t)
    ds["mri"] = (("x", "y", "z", "contrast"), mri)
    ds["mask"] = (("x", "y", "z"), m)
    ds["mri"] = ds.mri.chunk({**chunks, "contrast": -1})
    for v in ("mask", "fa", "af"):
        ds[v] = ds[v].chunk(chunks)
    return ds


@pytest.fixture(scope="module")
def rich_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("rich") / "cohort.zarr"
    ids = make_cohort_store(path, n_subjects=3, shape=(17, 11, 19), n_channels=4, chunks=(5, 4, 6),
                            edit=_edit)
    return str(path), ids


@pytest.fixture(scope="module")
def mid_store(tmp_path_factory):
    """Same data as rich_store with fewer, larger chunks: faster for the non-reference tests."""
    path = tmp_path_factory.mktemp("mid") / "cohort.zarr"
    ids = make_cohort_store(path, n_subjects=3, shape=(17, 11, 19), n_channels=4, chunks=(9, 6, 10),
                            edit=_edit)
    return str(path), ids


def reference(url, ids, target, half, stride, axis, slices, min_sum, min_nz):
    """The rules written out plainly: loop over subjects, slices and grid points."""
    s_ax = AXES.index(axis)
    r_ax, c_ax = (a for a in range(3) if a != s_ax)
    out = {}
    for sidx, sid in enumerate(ids):
        ds = xr.open_zarr(url, group=sid, consolidated=False).load()
        mri, tgt, mask = ds.mri.values, ds[target].values, ds.mask.values
        shp = tgt.shape
        if slices is None:
            has = [np.any((np.take(tgt, k, axis=s_ax) != 0) & ~np.isnan(np.take(tgt, k, axis=s_ax)))
                   for k in range(shp[s_ax])]
            nz = np.flatnonzero(has)
            if not len(nz):
                continue
            a, b = nz[0], nz[-1] + 1
        else:
            a, b = slices
        for k in range(a, b):
            for r in range(half, shp[r_ax] - half, stride):
                for c in range(half, shp[c_ax] - half, stride):
                    pos = [0, 0, 0]
                    pos[s_ax], pos[r_ax], pos[c_ax] = k, r, c
                    sel = [slice(p, p + 1) for p in pos]
                    sel[r_ax] = slice(r - half, r + half + 1)
                    sel[c_ax] = slice(c - half, c + half + 1)
                    lab = tgt[tuple(sel)].squeeze(axis=s_ax)
                    inp = np.moveaxis(mri[tuple(sel)].squeeze(axis=s_ax), -1, 0)
                    if np.isnan(lab).any() or np.isnan(inp).any():
                        continue
                    if lab.sum() < min_sum or np.count_nonzero(lab) < min_nz:
                        continue
                    if not mask[tuple(pos)]:
                        continue
                    out[(sidx, *pos)] = (inp, lab)
    return out


def read_split(url, split):
    g = zarr.open_group(url, mode="r")
    return g[f"{split}/inputs"][:], g[f"{split}/targets"][:], g[f"{split}/origin"][:]


@pytest.mark.parametrize(
    "half,stride,axis,slices",
    [(1, 2, "y", None), pytest.param(2, 3, "z", (1, 17), marks=pytest.mark.slow),
     pytest.param(1, 1, "x", (2, 15), marks=pytest.mark.slow)],  # stride 1: 14 s, same code paths
)
def test_matches_reference(rich_store, tmp_path, half, stride, axis, slices):
    url, ids = rich_store
    out = str(tmp_path / "p.zarr")
    s = extract_patches(url, "af", out, options=PatchOptions(
                            half=half, stride=stride, axis=axis, slices=slices, min_label_sum=30,
                            min_label_nonzero=4, val_fraction=0.25, seed=3, chunk_size=37),
                        ctx=Context(scheduler="synchronous", quiet=True), bucket_bytes=60_000)
    ref = reference(url, ids, "af", half, stride, axis, slices, 30, 4)
    assert len(ref) > 100
    got = {}
    for split in ("train", "val"):
        inp, lab, org = read_split(out, split)
        assert inp.shape[1:] == (4, 2 * half + 1, 2 * half + 1) and inp.dtype == np.float32
        for i in range(len(org)):
            key = tuple(int(v) for v in org[i])
            assert key not in got, "sample written twice"
            got[key] = (inp[i], lab[i])
    assert set(got) == set(ref)
    for key, (inp, lab) in ref.items():
        np.testing.assert_array_equal(got[key][0], inp)
        np.testing.assert_array_equal(got[key][1], lab[None])  # [T, P, P]: one stain, T = 1
    attrs = dict(zarr.open_group(out, mode="r").attrs)
    assert attrs["complete"] is True
    assert attrs["n_train"] + attrs["n_val"] == len(ref) == s["n_train"] + s["n_val"]
    assert attrs["patch"] == {"half": half, "size": 2 * half + 1, "axis": axis}
    assert attrs["subjects"] == ids and attrs["target"] == "af"
    assert len(attrs["channels"]) == 4 and attrs["provenance"]["stage"] == "patches"
    assert not (tmp_path / "p.zarr" / "_staging").exists()
    if slices is None:  # per-subject default range: subject i has no data in its first 2+i slices
        assert [attrs["rules"]["slices"][sid][0] for sid in ids] == [2, 3, 4]


def test_chunk_edges_and_halo_are_covered(rich_store):
    """Chunk boundaries of the store (5, 4, 6) split the grid; the halo must not lose samples."""
    url, ids = rich_store
    ds = xr.open_zarr(url, group=ids[0], consolidated=False)
    assert ds.mri.chunksizes["x"][0] == 5 and ds.mri.chunksizes["z"][0] == 6


@pytest.mark.slow  # default-run budget (README: make test <= 6 min on 2 cores); run in .ci/run's slow step
def test_shuffle_is_global_and_deterministic(mid_store, tmp_path):
    url, _ = mid_store
    kw = dict(ctx=Context(scheduler="threads", quiet=True), bucket_bytes=400_000)
    opts = dict(stride=1, chunk_size=64, min_label_sum=0, min_label_nonzero=0)
    a, b, c = (str(tmp_path / n) for n in ("a.zarr", "b.zarr", "c.zarr"))
    extract_patches(url, "af", a, options=PatchOptions(seed=1, **opts), **kw)
    extract_patches(url, "af", b, options=PatchOptions(seed=1, **opts), **kw)
    extract_patches(url, "af", c, options=PatchOptions(seed=2, **opts), **kw)
    ia, _, oa = read_split(a, "train")
    ib, _, ob = read_split(b, "train")
    _, _, oc = read_split(c, "train")
    np.testing.assert_array_equal(oa, ob)
    np.testing.assert_array_equal(ia, ib)
    assert not np.array_equal(oa, oc)
    assert sorted(map(tuple, oa)) == sorted(map(tuple, oc))
    subj = oa[:, 0]
    # every chunk mixes subjects, and the subject sequence switches about as often as random
    for j in range(0, len(subj), 64):
        assert len(set(subj[j:j + 64])) == 3
    switches = np.count_nonzero(np.diff(subj))
    assert switches > 0.5 * len(subj)
    # positions are not sorted within a subject either
    first = oa[subj == 0][:50, 1:]
    assert not np.all(np.diff(first[:, 0]) >= 0)


def test_val_subjects_and_norm_stats(mid_store, tmp_path):
    url, ids = mid_store
    out = str(tmp_path / "p.zarr")
    sync = Context(scheduler="synchronous", quiet=True)
    s = extract_patches(url, "af", out, options=PatchOptions(stride=1, val_subjects=[ids[1]]), ctx=sync)
    _, _, org_t = read_split(out, "train")
    inp_v, _, org_v = read_split(out, "val")
    assert set(org_t[:, 0]) == {0, 2} and set(org_v[:, 0]) == {1}
    attrs = dict(zarr.open_group(out, mode="r").attrs)
    assert attrs["val_subjects"] == [ids[1]] and s["n_val"] == len(inp_v)
    inp, lab, _ = read_split(out, "train")
    nrm = attrs["norm"]
    assert nrm["mode"] == "percentile"
    per_c = inp.transpose(1, 0, 2, 3).reshape(4, -1)
    lo, hi = np.percentile(per_c, [0.5, 99.5], axis=1)
    np.testing.assert_allclose(nrm["offset"], lo, rtol=1e-6)
    np.testing.assert_allclose(nrm["scale"], hi - lo, rtol=1e-6)
    np.testing.assert_allclose(nrm["target_scale"], np.percentile(lab, 99.5), rtol=1e-6)
    out2 = str(tmp_path / "g.zarr")
    extract_patches(url, "af", out2, ctx=sync, options=PatchOptions(
        stride=1, val_subjects=[ids[1]], stats="global-max", dtype="float16"))
    g = zarr.open_group(out2, mode="r")
    assert g["train/inputs"].dtype == np.float16
    n2 = g.attrs["norm"]
    assert n2["mode"] == "global-max"
    assert n2["scale"] == [pytest.approx(float(inp.max()), rel=1e-3)] * 4
    assert n2["target_scale"] == [pytest.approx(float(lab.max()))]


def test_complete_store_reused_protected_and_incomplete_replaced(cohort_store, tmp_path):
    url, _ = cohort_store
    out = str(tmp_path / "p.zarr")
    kw = dict(ctx=Context(scheduler="synchronous", quiet=True), options=PatchOptions(stride=3))
    first = extract_patches(url, "af", out, **kw)
    stamp = os.path.getmtime(os.path.join(out, "zarr.json"))
    again = extract_patches(url, "af", out, **kw)  # same inputs and options: reused as it is
    assert again["reused"] and again["n_train"] == first["n_train"]
    assert os.path.getmtime(os.path.join(out, "zarr.json")) == stamp
    with pytest.raises(MRHError, match=r"stride: 3 -> 4.*--overwrite"):
        extract_patches(url, "af", out, **{**kw, "options": PatchOptions(stride=4)})
    extract_patches(url, "af", out, overwrite=True, **kw)
    zarr.open_group(out, mode="a").attrs["complete"] = False  # as after a crash
    s = extract_patches(url, "af", out, **kw)
    assert zarr.open_group(out, mode="r").attrs["complete"] is True and s["n_train"] > 0


def test_stats_is_recorded_under_its_old_key_so_stores_made_before_are_reused(cohort_store, tmp_path):
    """PatchOptions.stats was ``norm``: the store's made_by (its fingerprint) keeps that key."""
    url, _ = cohort_store
    rec = PatchOptions(stats="global-max").record()
    assert rec["norm"] == "global-max" and "stats" not in rec
    out = str(tmp_path / "p.zarr")
    extract_patches(url, "af", out, ctx=Context(scheduler="synchronous", quiet=True),
                    options=PatchOptions(stride=3))
    made = zarr.open_group(out, mode="r").attrs["made_by"]["options"]
    assert made["norm"] == "percentile" and "stats" not in made


def _mismatch(ds, i):
    if i == 1:
        ds = ds.assign_coords(contrast=[f"other{k}" for k in range(ds.sizes["contrast"])])
    return ds


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"target": "nope"}, "unknown target"),
        ({"half": 9}, "larger than the volume"),
        ({"slices": "3:99"}, "out of bounds"),
        ({"slices": "5:5"}, "out of bounds"),
        ({"stride": 0}, "stride"),
        ({"half": -1}, "half"),
        ({"min_label_sum": 1e9}, "zero samples"),
        ({"val_fraction": 1.5}, "val-fraction"),
        ({"val_subjects": ["zz"]}, "val-subjects"),
        ({"axis": "w"}, "axis"),
    ],
)
def test_bad_input_raises_and_writes_nothing(cohort_store, tmp_path, kwargs, match):
    url, _ = cohort_store
    out = tmp_path / "p.zarr"
    kw = {"target": "af", **kwargs}
    target = kw.pop("target")
    with pytest.raises(MRHError, match=match):
        extract_patches(url, target, str(out), ctx=Context(scheduler="synchronous", quiet=True),
                        options=PatchOptions(**kw))
    assert not out.exists()


def test_channel_mismatch(tmp_path):
    url = tmp_path / "c.zarr"
    make_cohort_store(url, n_subjects=2, edit=_mismatch)
    with pytest.raises(MRHError, match="channels"):
        extract_patches(str(url), "af", str(tmp_path / "p.zarr"),
                        ctx=Context(scheduler="synchronous", quiet=True))
    assert not (tmp_path / "p.zarr").exists()


@pytest.mark.parametrize(
    "args,match",
    [
        (["--target", "nope"], "unknown target"),
        (["--target", "af", "--stride", "0"], "stride"),
        (["--target", "af", "--half", "9"], "larger than the volume"),
        (["--target", "af", "--slices", "0:99"], "out of bounds"),
        (["--target", "af", "--min-label-sum", "1e9"], "zero samples"),
    ],
)
def test_cli_bad_input_exit_2(cohort_store, tmp_path, args, match):
    url, _ = cohort_store
    out = tmp_path / "p.zarr"
    res = CliRunner().invoke(main, ["patches", url, "--out", str(out), "--scheduler", "synchronous",
                                    "-q", *args])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and match in lines[0] and "Traceback" not in res.output
    assert not out.exists()


def test_cli_channel_mismatch_exit_2(tmp_path):
    url = tmp_path / "c.zarr"
    make_cohort_store(url, n_subjects=2, edit=_mismatch)
    res = CliRunner().invoke(main, ["patches", str(url), "--target", "af", "--out",
                                    str(tmp_path / "p.zarr"), "--scheduler", "synchronous"])
    assert res.exit_code == 2 and "channels" in res.output


def test_cli_end_to_end_local_cluster(cohort_store, tmp_path):
    """The real path: embedded LocalCluster with worker processes."""
    url, ids = cohort_store
    out = tmp_path / "p.zarr"
    res = CliRunner().invoke(main, ["patches", url, "--target", "af", "--out", str(out), "--stride",
                                    "2", "--val-subjects", ids[0], "--dask-workers", "2", "-q"])
    assert res.exit_code == 0, res.output
    g = zarr.open_group(str(out), mode="r")
    assert g.attrs["complete"] is True and g.attrs["n_train"] == g["train/inputs"].shape[0] > 0
    opened = xr.open_zarr(str(out), group="train", consolidated=False)
    assert opened.inputs.dims == ("patch", "contrast", "row", "col")


# ---------------------------------------------------------------- the in-memory kernel


def test_cli_info_describes_a_patch_store(mid_store, tmp_path):
    """`mrhscale info` on a patch store: its own summary, not a cohort lookup of the source
    subjects named in its attrs (which crashed with a traceback)."""
    out = str(tmp_path / "p.zarr")
    summ = extract_patches(mid_store[0], "af", out, ctx=Context(scheduler="synchronous", quiet=True),
                           options=PatchOptions(stride=2, val_fraction=0.2, min_label_sum=0, min_label_nonzero=0))
    res = CliRunner().invoke(main, ["info", out])
    assert res.exit_code == 0, res.output
    assert "stains: af" in res.output
    assert f"train patches: {summ['n_train']}" in res.output
    assert "complete: True" in res.output
    assert "per-subject statistics: yes" in res.output


@pytest.mark.parametrize("opts", [{}, {"slices": (2, 9), "val_subjects": ["s02"]}])
def test_subjects_a_batch_at_a_time_make_the_store_of_one_batch(mid_store, tmp_path, monkeypatch, opts):
    """The survey and the extraction open the subjects a batch at a time: batches of one
    subject give the same patches, statistics and attrs as the whole cohort at once."""
    from mrhscale.stages import patches as stage

    url, _ = mid_store
    kw = dict(ctx=Context(scheduler="synchronous", quiet=True), bucket_bytes=400_000,
              options=PatchOptions(stride=2, chunk_size=64, **opts))
    a, b = str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")
    extract_patches(url, "af", a, **kw)
    opened = []
    monkeypatch.setattr(stage._Extraction, "BATCH", 1)
    real = stage.CohortStore.open_subject
    monkeypatch.setattr(stage.CohortStore, "open_subject", lambda self, sid, *x: opened.append(sid) or real(self, sid, *x))
    extract_patches(url, "af", b, **kw)
    assert opened == ["s01", "s02", "s03"] * 2  # once to survey, once to extract
    for split in ("train", "val"):
        for x, y in zip(read_split(a, split), read_split(b, split), strict=True):
            np.testing.assert_array_equal(x, y)
    attrs = [{k: v for k, v in zarr.open_group(p, mode="r").attrs.items() if k != "provenance"} for p in (a, b)]
    assert attrs[0] == attrs[1]
