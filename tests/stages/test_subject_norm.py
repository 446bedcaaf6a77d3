"""train --norm subject-percentile|subject-max: statistics stored with the patches, applied
per row in the stream, recomputed identically by predict, and a scanner's gain cancels out."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
import zarr
from click.testing import CliRunner
from helpers import channel_names, make_cohort_store, subject_dataset

from mrhscale.cli import main
from mrhscale.ops.norm import Normalisation, subject_normalisation
from mrhscale.options import PatchOptions
from mrhscale.parallel.context import Context
from mrhscale.stages.patches import extract_patches
from mrhscale.stages.predict import predict
from mrhscale.stages.predict_graph import subject_arrays
from mrhscale.stores import CohortStore
from mrhscale.training.stream import PatchStream, StreamOptions

GAINS = np.array([0.6, 1.4, 0.9, 2.0, 1.2], np.float32)
SHAPE = (12, 10, 14)


def _gained(ds, i):
    """s02 is s01 scanned with other per-contrast gains; s03 is its own brain."""
    if i != 1:
        return ds
    base = subject_dataset("s01", SHAPE, 5, 0)
    return ds.assign(mri=base["mri"] * xr.DataArray(GAINS, dims="contrast"), mask=base["mask"],
                     af=base["af"])


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    d = tmp_path_factory.mktemp("subject_norm")
    store = str(d / "c.zarr")
    make_cohort_store(store, edit=_gained)
    patches = str(d / "p.zarr")
    extract_patches(store, "af", patches, ctx=Context(scheduler="synchronous", quiet=True),
                    options=PatchOptions(stride=1, min_label_sum=0, min_label_nonzero=0, val_subjects=["s03"]))
    return d, store, patches


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_patch_store_holds_each_subjects_statistics_as_predict_computes_them(cohort):
    _, store, patches = cohort
    stats = zarr.open_group(patches, mode="r").attrs["subject_norm"]
    assert sorted(stats) == ["s01", "s02", "s03"]
    meta = {"norm": Normalisation.subject_mode("subject-percentile", 5, 0.0, 1.0), "channels": channel_names(5)}
    for sid in stats:
        ds = CohortStore.open(store).open_subject(sid)
        got = subject_normalisation(meta["norm"], *subject_arrays(ds, meta["channels"]))
        assert got.meta["subject"] == stats[sid]["subject-percentile"]
    s1, s2 = (np.asarray(stats[s]["subject-percentile"]["scale"]) for s in ("s01", "s02"))
    assert np.allclose(s2 / s1, GAINS, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float16"])  # the fused (numba) and the numpy paths
def test_stream_normalises_each_row_by_its_own_subject(cohort, dtype, tmp_path):
    _, store, patches = cohort
    if dtype == "float16":
        patches = str(tmp_path / "p16.zarr")
        extract_patches(store, "af", patches, ctx=Context(scheduler="synchronous", quiet=True),
                        options=PatchOptions(stride=1, min_label_sum=0, min_label_nonzero=0, val_subjects=["s03"],
                                             dtype="float16"))
    rec = Normalisation.subject_mode("subject-percentile", 5, 0.0, 1.0)
    s = PatchStream(patches, batch_size=64, shuffle=False, drop_last=False, norm=rec,
                    options=StreamOptions(with_origin=True))
    x, _, origin = (np.concatenate([b[k].numpy() for b in s]) for k in range(3))
    root = zarr.open_group(patches, mode="r")
    raw, stats = root["train/inputs"][:].astype(np.float32), root.attrs["subject_norm"]
    names = root.attrs["subjects"]
    for k in np.unique(origin[:, 0]):
        st = stats[names[k]]["subject-percentile"]
        rows = origin[:, 0] == k
        want = (raw[rows] - np.float32(st["offset"])[:, None, None]) / np.float32(st["scale"])[:, None, None]
        assert np.allclose(x[rows], want, rtol=1e-4, atol=1e-5)
    assert len(np.unique(origin[:, 0])) == 2


def test_a_model_with_per_subject_norm_gives_the_same_map_whatever_the_gain(cohort):
    d, store, patches = cohort
    for norm in ("subject-percentile", "global"):
        r = run("train", patches, "--out", d / f"run-{norm}", "--norm", norm, "--epochs", "2", "--depth", "1",
                "--batch-size", "64", "-q")
        assert r.exit_code == 0, r.output
        out = d / f"pred-{norm}.zarr"
        predict(str(d / f"run-{norm}" / "model.pt"), store, str(out), subjects=["s01", "s02"],
                ctx=Context(scheduler="synchronous", quiet=True))
        a, b = (xr.open_zarr(out, group=s, consolidated=False)["af_virtual"].values for s in ("s01", "s02"))
        same = np.allclose(a, b, atol=1e-3 * np.abs(a).max())
        assert same == (norm != "global")  # the global statistics see the gain, the subject's cancel it
    lineage = xr.open_zarr(d / "pred-subject-percentile.zarr", group="s02", consolidated=False).attrs["lineage"]
    assert np.allclose(lineage["subject_norm"]["scale"],
                       zarr.open_group(patches).attrs["subject_norm"]["s02"]["subject-percentile"]["scale"])
    r = run("info", d / "run-subject-percentile" / "model.pt")
    assert "subject-percentile" in r.output and "own voxels inside its mask" in r.output


def test_importance_predict_volume_and_export_of_a_per_subject_model(cohort):
    d, store, patches = cohort
    model = d / "run-subject-percentile" / "model.pt"
    if not model.exists():
        pytest.skip("needs the model of the test above")
    r = run("importance", model, patches, "--out", d / "imp", "--max-patches", "200", "--repeats", "1", "-q")
    assert r.exit_code == 0, r.output
    from mrhscale.stages.predict_volume import predict_volume

    ds = CohortStore.open(store).open_subject("s02")
    vol = predict_volume(model, ds, ctx=Context(scheduler="synchronous"))
    ref = xr.open_zarr(d / "pred-subject-percentile.zarr", group="s02", consolidated=False)["af_virtual"].values
    assert np.allclose(vol["af_virtual"].values, ref, atol=1e-5 * np.abs(ref).max())
    pytest.importorskip("onnxruntime")
    r = run("export", model, "--out", d / "m.onnx", "-q")
    assert r.exit_code == 0, r.output  # the brain's statistics are graph inputs (test_export_deploy.py)
    got = predict_volume(str(d / "m.onnx"), ds, ctx=Context(scheduler="synchronous"))
    assert np.abs(got["af_virtual"].values - ref).max() <= 1e-4  # s02's own gains, computed for the graph


def test_train_refuses_a_per_subject_mode_on_a_store_without_statistics(cohort, tmp_path):
    import shutil

    _, _, patches = cohort
    old = str(tmp_path / "old.zarr")
    shutil.copytree(patches, old)
    g = zarr.open_group(old)
    attrs = dict(g.attrs)
    attrs.pop("subject_norm")
    g.attrs.put(attrs)
    r = run("train", old, "--out", tmp_path / "r", "--norm", "subject-max", "--epochs", "1", "-q")
    assert r.exit_code == 2 and "no per-subject statistics" in r.output and "patches --overwrite" in r.output
    r = run("train", old, "--out", tmp_path / "r2", "--norm", "bogus", "-q")
    assert r.exit_code == 2 and "bogus" in r.output
