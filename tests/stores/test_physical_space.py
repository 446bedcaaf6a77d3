"""Physical space and portability of every store: x/y/z in mm, UTF-8 strings, no warning on
open, NIfTI headers that keep the source's space."""

from __future__ import annotations

import json
import os
import warnings

import nibabel as nib
import numpy as np
import pytest
import xarray as xr
import zarr
from helpers import make_patch_store, write_file_cohort, write_model

from mrhscale.ops.space import header_space, is_axis_aligned, spatial_coords
from mrhscale.parallel.context import Context
from mrhscale.stages.export_image import export_image
from mrhscale.stages.ingest import ingest
from mrhscale.stages.predict import predict

LAS = [[-0.06, 0, 0, 1.5], [0, 0.06, 0, -2.0], [0, 0, 0.08, 3.0], [0, 0, 0, 1]]


def test_coordinates_from_affines():
    c = spatial_coords(LAS, (4, 3, 2))
    assert np.allclose(c["x"][1], [1.5, 1.44, 1.38, 1.32]) and c["x"][2]["units"] == "mm"
    assert np.allclose(c["z"][1], [3.0, 3.08]) and c["y"][2]["world_axis"] == "y"
    permuted = [[0, 0.1, 0, 5], [0.2, 0, 0, 6], [0, 0, 0.3, 7], [0, 0, 0, 1]]
    c = spatial_coords(permuted, (2, 2, 2))
    assert c["x"][2]["world_axis"] == "y" and np.allclose(c["x"][1], [6, 6.2])
    th = np.deg2rad(20)
    oblique = [[0.1 * np.cos(th), -0.1 * np.sin(th), 0, 0], [0.1 * np.sin(th), 0.1 * np.cos(th), 0, 0],
               [0, 0, 0.1, 0], [0, 0, 0, 1]]
    assert is_axis_aligned(LAS) and is_axis_aligned(permuted) and not is_axis_aligned(oblique)
    c = spatial_coords(oblique, (3, 3, 3))
    assert np.allclose(c["x"][1], [0, 0.1, 0.2]) and "oblique" in c["x"][2]["comment"]
    assert np.allclose(spatial_coords(np.diag([60.0, 60, 60, 1]), (2, 2, 2), "micron")["x"][1], [0, 0.06])


def test_header_space_is_read_from_nifti_and_assumed_for_analyze(tmp_path):
    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
    img.set_qform(np.diag([0.1, 0.1, 0.1, 1]), code=1)
    img.set_sform(np.diag([0.2, 0.2, 0.2, 1]), code=2)
    img.header.set_xyzt_units("micron")
    s = header_space(img.header)
    assert (s["qform_code"], s["sform_code"], s["space_units"]) == (1, 2, "micron")
    assert np.allclose(s["qform"], np.diag([0.1, 0.1, 0.1, 1]))
    ana = nib.AnalyzeImage(np.zeros((2, 2, 2), np.float32), np.eye(4))
    assert header_space(ana.header) == {"space_units": "mm", "qform_code": 0, "sform_code": 1}


def _source_with_codes(root):
    """A file cohort whose images carry qform code 1 (its own affine) and sform code 2."""
    man = write_file_cohort(root, n_subjects=1, affine=LAS)
    qform = np.array(LAS) + np.array([[0, 0, 0, 0.5], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    for f in os.listdir(os.path.join(root, "s01")):
        if f.endswith(".nii.gz"):
            p = os.path.join(root, "s01", f)
            img = nib.load(p)
            img = nib.Nifti1Image(np.asarray(img.dataobj), LAS, header=img.header)
            img.set_sform(np.array(LAS), code=2)
            img.set_qform(qform, code=1)
            nib.save(img, p)
    return man, qform


@pytest.fixture
def stores(tmp_path):
    man, qform = _source_with_codes(tmp_path / "files")
    cohort = str(tmp_path / "cohort.zarr")
    ingest(man, cohort, ctx=Context(scheduler="synchronous", quiet=True))
    model = write_model(tmp_path / "m.pt", ["dwi_0", "dwi_1", "dwi_2", "dwi_3", "dwi_4", "t2", "mt_off", "mt_on"])
    pred = str(tmp_path / "pred.zarr")
    predict(model, cohort, pred, nifti_dir=str(tmp_path / "nifti"),
            ctx=Context(scheduler="synchronous", quiet=True))
    patches = str(tmp_path / "patches.zarr")
    make_patch_store(patches, n_train=64, n_val=16)
    return {"cohort": cohort, "pred": pred, "patches": patches, "nifti": tmp_path / "nifti", "qform": qform,
            "model": model}


def test_every_store_opens_with_plain_xarray_and_zarr_without_a_warning(stores):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for url in (stores["cohort"], stores["pred"]):
            ds = xr.open_zarr(url, group="s01", consolidated=False)
            assert ds.x.attrs["units"] == "mm" and ds.x.attrs["world_axis"] == "x"
            assert np.allclose(ds.x.values, 1.5 - 0.06 * np.arange(ds.sizes["x"]))
            assert np.allclose(ds.z.values, 3.0 + 0.08 * np.arange(ds.sizes["z"]))
            v = ds.sel(x=1.32, y=-1.88, z=3.17, method="nearest")  # voxel (3, 2, 2)
            assert np.isclose(float(v.x), 1.32) and np.isclose(float(v.z), 3.16)
            assert float(v.mask) == float(ds.mask[3, 2, 2])
            list(zarr.open_group(url, mode="r").members())
        for split in ("train", "val"):
            xr.open_zarr(stores["patches"], group=split, consolidated=False).load()
        ds = xr.open_zarr(stores["cohort"], group="s01", consolidated=False)
        assert ds.attrs["voxel_size_units"] == "mm" and list(ds.contrast.values)[:1] == ["dwi_0"]
        image = os.path.join(os.path.dirname(stores["cohort"]), "t2.ome.zarr")
        export_image(stores["cohort"], "s01", "mri", image, contrast="t2", levels=2)
        levels = [a for _, a in zarr.open_group(image, mode="r").arrays()]
        assert len(levels) == 2 and levels[0].dtype == np.float32
    meta = json.load(open(os.path.join(stores["cohort"], "s01", "contrast", "zarr.json")))
    assert meta["data_type"] == "string"


def test_predicted_nifti_keeps_the_source_space(stores):
    from mrhscale import __version__
    from mrhscale.stores import sha256_file

    (path,) = [p for p in stores["nifti"].rglob("*.nii*")]
    h = nib.load(path).header
    assert (int(h["qform_code"]), int(h["sform_code"])) == (1, 2)
    assert np.allclose(h.get_sform(), LAS) and np.allclose(h.get_qform(), stores["qform"], atol=1e-5)
    assert h.get_xyzt_units()[0] == "mm"
    descrip = bytes(h["descrip"]).decode().rstrip("\x00")
    assert __version__ in descrip and "af" in descrip
    assert sha256_file(stores["model"])[7:15] in descrip


def test_written_volumes_say_scanner_aligned_or_template(tmp_path):
    from mrhscale.io.volumes import write_volume

    for xform, code in ((None, 1), ("aligned", 2), ("template", 5)):
        p = write_volume(str(tmp_path / f"{code}.nii.gz"), np.zeros((2, 2, 2)), LAS, xform=xform)
        h = nib.load(p).header
        assert (int(h["qform_code"]), int(h["sform_code"]), h.get_xyzt_units()[0]) == (code, code, "mm")
    p = write_volume(str(tmp_path / "u.nii"), np.zeros((2, 2, 2)), LAS, space={"space_units": "micron",
                                                                                "qform_code": 0, "sform_code": 3})
    h = nib.load(p).header
    assert (int(h["qform_code"]), int(h["sform_code"]), h.get_xyzt_units()[0]) == (0, 3, "micron")
