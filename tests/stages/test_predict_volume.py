"""mrhscale.predict_volume: a notebook's call equals what `mrhscale predict` writes."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
import xarray as xr
from helpers import write_file_cohort, write_model

import mrhscale
from mrhscale.errors import MRHError
from mrhscale.parallel.context import Context

CHANNELS = ["dwi_0", "dwi_1", "dwi_2", "dwi_3", "dwi_4", "t2", "mt_off", "mt_on"]


@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
    root = tmp_path_factory.mktemp("pv")
    man = write_file_cohort(root / "files", n_subjects=1)
    cohort, pred = str(root / "cohort.zarr"), str(root / "pred.zarr")
    mrhscale.ingest(man, cohort, ctx=Context(scheduler="synchronous", quiet=True))
    model = write_model(root / "m.pt", CHANNELS, half=2)
    mrhscale.predict(model, cohort, pred, ctx=Context(scheduler="synchronous", quiet=True))
    want = mrhscale.PredictionStore.open(pred).open_subject("s01")["af_virtual"].load()
    return {"root": root / "files" / "s01", "cohort": cohort, "model": model, "want": want}


def test_from_a_store_subject_and_from_files_equal_the_predict_store(predicted):
    want, model = predicted["want"], predicted["model"]
    maps = mrhscale.predict_volume(model, mrhscale.open_subject(predicted["cohort"], "s01"))
    assert list(maps.data_vars) == ["af_virtual"]  # a Dataset: a map per stain of the model
    got = maps["af_virtual"]
    assert got.dims == ("x", "y", "z") and got.attrs["target"] == "af"
    np.testing.assert_array_equal(got.values, want.values)
    xr.testing.assert_equal(got.x, want.x)
    d = predicted["root"]
    files = {"dwi": str(d / "dwi.nii.gz"), "t2MTONOFF": {"path": str(d / "t2MTONOFF.nii.gz"),
                                                        "channels": ["t2", "mt_off", "mt_on"]},
             "mask": str(d / "mask.nii.gz")}
    np.testing.assert_array_equal(mrhscale.predict_volume(model, files)["af_virtual"].values, want.values)
    images = {"mri": {"dwi": nib.load(d / "dwi.nii.gz"),
                      "t2MTONOFF": {"path": nib.load(d / "t2MTONOFF.nii.gz"), "channels": ["t2", "mt_off", "mt_on"]}},
              "mask": nib.load(d / "mask.nii.gz")}
    got = mrhscale.predict_volume(model, images)["af_virtual"]
    np.testing.assert_array_equal(got.values, want.values)
    assert float(got.sel(x=1.06, y=2.12, z=-2.88, method="nearest")) == float(want.values[1, 2, 2])


def test_on_a_dask_client(predicted):
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cl, Client(cl) as client:
        got = mrhscale.predict_volume(predicted["model"], mrhscale.open_subject(predicted["cohort"], "s01"),
                                      ctx=Context(client=client))
    np.testing.assert_array_equal(got["af_virtual"].values, predicted["want"].values)


def test_bad_input_is_one_clear_error(predicted, tmp_path):
    model, ds = predicted["model"], mrhscale.open_subject(predicted["cohort"], "s01")
    with pytest.raises(MRHError, match="has no mask"):
        mrhscale.predict_volume(model, ds.drop_vars("mask"))
    with pytest.raises(MRHError, match="empty mask"):
        mrhscale.predict_volume(model, ds.assign(mask=ds["mask"] & False))
    with pytest.raises(MRHError, match="missing"):
        mrhscale.predict_volume(model, ds.sel(contrast=CHANNELS[:4]))
    with pytest.raises(MRHError, match="expected an xarray Dataset or a mapping"):
        mrhscale.predict_volume(model, np.zeros((3, 3, 3)))
    with pytest.raises(MRHError, match="file not found"):
        mrhscale.predict_volume(model, {"dwi": str(tmp_path / "nope.nii.gz"), "mask": str(tmp_path / "m.nii")})
    with pytest.raises(MRHError, match="expected a file path or a nibabel image"):
        mrhscale.predict_volume(model, {"dwi": 3.0, "mask": nib.load(predicted["root"] / "mask.nii.gz")})
    with pytest.raises(MRHError, match="model"):
        mrhscale.predict_volume(os.fspath(tmp_path / "none.pt"), ds)
