"""export-image and predict --ome-zarr: OME-NGFF 0.5 images, read back with ome-zarr-py's reader."""

from __future__ import annotations

import os

import numpy as np
import pytest
import xarray as xr
import zarr
from click.testing import CliRunner
from helpers import make_cohort_store, write_model

from mrhscale.cli import main
from mrhscale.stages.export_image import Geometry, export_image

pytest.importorskip("ome_zarr")

SHAPE = (11, 8, 13)  # odd sizes: each level drops an odd last voxel
AFFINE = [[0.05, 0, 0, 1.5], [0, 0.07, 0, -2.0], [0, 0, 0.06, 3.0], [0, 0, 0, 1]]
VOX_ZYX = np.array([0.06, 0.07, 0.05])
ORIGIN_ZYX = np.array([3.0, -2.0, 1.5])


def cohort(tmp_path, n=2):
    path = tmp_path / "c.zarr"
    ids = make_cohort_store(path, n_subjects=n, shape=SHAPE, chunks=(4, 3, 5),
                            edit=lambda ds, i: ds.assign_attrs(affine=AFFINE))
    return str(path), ids


def prediction(tmp_path, store, ids):
    """A prediction store as predict writes it (variable, mask, lineage with the model checksum)."""
    from mrhscale.stores import CohortStore, PredictionStore

    pred = str(tmp_path / "p.zarr")
    pstore = PredictionStore(pred)
    pstore.prepare({"variable": "af_virtual", "target": "af", "model": {"sha256": "sha256:feed"}})
    for sid in ids:
        ds = xr.open_zarr(store, group=sid, consolidated=False)
        out = xr.Dataset({"af_virtual": (("x", "y", "z"), ds["af"].values * 0.5 + 1),
                          "mask": (("x", "y", "z"), ds["mask"].values)},
                         attrs={**ds.attrs, "lineage": {"model": {"sha256": "sha256:feed"}}})
        pstore.put(sid, out, {"stage": "tests", "source": CohortStore(store).identity(sid)["fingerprint"]})
    return pred


def read(path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    return next(iter(Reader(parse_url(str(path)))()))


def transforms(node, kind):
    return [next(t[kind] for t in level if t["type"] == kind) for level in node.metadata["coordinateTransformations"]]


def blocks(a, reduce=np.mean):
    """The reference downsampling: 2x2x2 blocks, an odd last voxel dropped."""
    z, y, x = (s // 2 for s in a.shape)
    return reduce(a[:2 * z, :2 * y, :2 * x].reshape(z, 2, y, 2, x, 2), axis=(1, 3, 5))


def one_line_error(r, *words):
    assert r.exit_code == 2, r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output, r.output
    for w in words:
        assert w in r.output, r.output


def test_cohort_contrast_levels_values_and_millimetre_scales(tmp_path):
    store, _ = cohort(tmp_path)
    out = tmp_path / "t2.ome.zarr"
    r = export_image(store, "s01", "mri", out, contrast="c02", levels=3)
    node = read(out)
    src = xr.open_zarr(store, group="s01", consolidated=False)["mri"].sel(contrast="c02").values
    zyx = src.transpose(2, 1, 0)  # image[k, j, i] = volume[i, j, k]
    assert [tuple(a.shape) for a in node.data] == [(13, 8, 11), (6, 4, 5), (3, 2, 2)] == \
        [tuple(s) for s in r.shapes]
    np.testing.assert_array_equal(np.asarray(node.data[0]), zyx)
    np.testing.assert_allclose(np.asarray(node.data[1]), blocks(zyx), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(node.data[2]), blocks(blocks(zyx)), rtol=1e-5)
    assert [(a["name"], a["type"], a["unit"]) for a in node.metadata["axes"]] == \
        [(n, "space", "millimeter") for n in "zyx"]
    for level, (scale, shift) in enumerate(zip(transforms(node, "scale"), transforms(node, "translation"))):
        np.testing.assert_allclose(scale, VOX_ZYX * 2 ** level)  # voxel size in mm per level
        np.testing.assert_allclose(shift, ORIGIN_ZYX + VOX_ZYX * (2 ** level - 1) / 2)  # block centres
    attrs = zarr.open_group(str(out), mode="r").attrs
    assert attrs["ome"]["version"] == "0.5" and attrs["ome"]["multiscales"][0]["name"] == "s01 mri c02"
    own = attrs["mrhscale"]
    assert own["format"] == "mrhscale-ome-zarr" and own["complete"] and own["affine"] == AFFINE
    assert own["made_by"]["var"] == "mri" and own["made_by"]["contrast"] == "c02"
    assert own["source"]["store"] == store and own["source"]["subject"] == "s01"
    assert r.exact_affine and not r.reused


def test_prediction_map_and_mask_majority(tmp_path):
    store, ids = cohort(tmp_path, n=1)
    pred = prediction(tmp_path, store, ids)
    r = export_image(pred, "s01", "af_virtual", tmp_path / "v.ome.zarr", levels=2)
    ds = xr.open_zarr(pred, group="s01", consolidated=False)
    node = read(r.out)
    np.testing.assert_array_equal(np.asarray(node.data[0]), ds["af_virtual"].values.transpose(2, 1, 0))
    assert len(node.data) == 2
    made_by = zarr.open_group(r.out, mode="r").attrs["mrhscale"]["made_by"]
    assert made_by["model_sha256"] == "sha256:feed" and made_by["source"].startswith("sha256:")
    m = export_image(pred, "s01", "mask", tmp_path / "m.ome.zarr", levels=2)
    node = read(m.out)
    mask = ds["mask"].values.transpose(2, 1, 0)
    assert node.data[0].dtype == np.uint8 and node.data[1].dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(node.data[0]), mask)
    np.testing.assert_array_equal(np.asarray(node.data[1]), blocks(mask.astype(float)) >= 0.5)


def test_oblique_or_flipped_affine_keeps_voxel_size_and_says_so():
    t = np.deg2rad(30)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    a = np.eye(4)
    a[:3, :3], a[:3, 3] = rot @ np.diag([0.1, 0.2, 0.3]), [1, 2, 3]
    g = Geometry.from_attrs({"affine": a.tolist()}, "s")
    assert not g.exact
    np.testing.assert_allclose(g.voxel, [0.1, 0.2, 0.3])
    assert not Geometry.from_attrs({"affine": np.diag([-0.1, 0.1, 0.1, 1]).tolist()}, "s").exact
    assert Geometry.from_attrs({"voxel_size": [0.1, 0.1, 0.2]}, "s").exact


def test_bad_subject_var_contrast_levels_store_are_one_line_errors(tmp_path):
    store, _ = cohort(tmp_path, n=1)
    out = str(tmp_path / "x.ome.zarr")
    run = CliRunner().invoke
    base = ["export-image", store, "--out", out]
    one_line_error(run(main, [*base, "--subject", "s09", "--var", "fa"]), "s09", "s01")
    one_line_error(run(main, [*base, "--subject", "s01", "--var", "nope"]), "nope", "mri")
    one_line_error(run(main, [*base, "--subject", "s01", "--var", "mri"]), "--contrast", "c00")
    one_line_error(run(main, [*base, "--subject", "s01", "--var", "mri", "--contrast", "t9"]), "t9")
    one_line_error(run(main, [*base, "--subject", "s01", "--var", "fa", "--contrast", "c00"]), "no contrast")
    one_line_error(run(main, [*base, "--subject", "s01", "--var", "fa", "--levels", "0"]), "--levels")
    one_line_error(run(main, ["export-image", str(tmp_path / "none.zarr"), "--subject", "s01", "--var", "fa",
                              "--out", out]), "does not exist")
    assert not os.path.exists(out)


def test_foreign_refused_and_kept_own_reused_or_replaced_with_overwrite(tmp_path):
    store, _ = cohort(tmp_path, n=1)
    run = CliRunner().invoke
    mine = tmp_path / "mine.ome.zarr"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    plain = tmp_path / "plain.zarr"
    zarr.open_group(str(plain), mode="w").attrs["owner"] = "someone"
    for foreign in (mine, plain):
        r = run(main, ["export-image", store, "--subject", "s01", "--var", "fa", "--out", str(foreign),
                       "--overwrite"])
        one_line_error(r, "not made by mrhscale")
    assert os.listdir(mine) == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
    assert zarr.open_group(str(plain), mode="r").attrs["owner"] == "someone"

    out = str(tmp_path / "img.ome.zarr")
    fa = ["export-image", store, "--subject", "s01", "--var", "fa", "--out", out]
    assert run(main, fa).exit_code == 0
    r = run(main, fa)
    assert r.exit_code == 0 and "up to date" in r.output
    af = ["export-image", store, "--subject", "s01", "--var", "af", "--out", out]
    one_line_error(run(main, af), "--overwrite", "var")
    np.testing.assert_array_equal(np.asarray(read(out).data[0]),  # the old image kept
                                  xr.open_zarr(store, group="s01", consolidated=False)["fa"].values.T)
    r = run(main, [*af, "--overwrite"])
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(np.asarray(read(out).data[0]),
                                  xr.open_zarr(store, group="s01", consolidated=False)["af"].values.T)
    assert not [n for n in os.listdir(tmp_path) if ".mrhscale-" in n]  # nothing left aside
    r = run(main, ["info", out])
    assert r.exit_code == 0 and "OME-Zarr" in r.output and "af" in r.output


def test_predict_ome_zarr_writes_one_image_per_subject(tmp_path):
    store, ids = cohort(tmp_path)
    mp = write_model(tmp_path / "m.pt", [f"c{i:02d}" for i in range(5)])
    pred, images = str(tmp_path / "p.zarr"), tmp_path / "ome"
    cmd = ["predict", mp, store, "--out", pred, "--ome-zarr", str(images), "--scheduler", "sync", "-q"]
    r = CliRunner().invoke(main, cmd)
    assert r.exit_code == 0, r.output
    assert sorted(n for n in os.listdir(images) if not n.startswith(".")) == [f"{sid}.ome.zarr" for sid in ids]
    for sid in ids:
        node = read(images / f"{sid}.ome.zarr")
        got = xr.open_zarr(pred, group=sid, consolidated=False)["af_virtual"].values
        np.testing.assert_array_equal(np.asarray(node.data[0]), got.transpose(2, 1, 0))
        np.testing.assert_allclose(transforms(node, "scale")[0], VOX_ZYX)
    stamp = os.path.getmtime(images / "s01.ome.zarr" / "zarr.json")
    r = CliRunner().invoke(main, cmd)
    assert r.exit_code == 0 and os.path.getmtime(images / "s01.ome.zarr" / "zarr.json") == stamp  # kept
