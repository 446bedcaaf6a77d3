"""predict with an ensemble bundle: the members' mean as the virtual stain, their calibrated
spread as <stain>_uncertainty, exactly; NIfTI, OME-Zarr, predict_volume, importance, export."""

import importlib.util
import os

import nibabel as nib
import numpy as np
import pytest
import torch
import xarray as xr
from click.testing import CliRunner
from helpers import write_ensemble
from test_predict import reference_patch, write_store

from mrhscale.cli import main
from mrhscale.io.bundle import load_model
from mrhscale.options import PredictOptions
from mrhscale.parallel.context import Context
from mrhscale.stages.predict import predict

SYNC = Context(scheduler="synchronous", quiet=True)

HAVE_OME = importlib.util.find_spec("ome_zarr") is not None or importlib.util.find_spec("ngff_zarr") is not None


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("ens")
    store, ids = write_store(d / "c.zarr", n_subjects=2)
    names = [str(c) for c in xr.open_zarr(store, group=ids[0], consolidated=False).contrast.values]
    model, singles = write_ensemble(str(d / "ens.pt"), names[:4], members=3, factor=1.5)
    return d, store, ids, model, singles


def _map(pred_url, sid, var):
    return xr.open_zarr(pred_url, group=sid, consolidated=False)[var].values


@pytest.mark.parametrize("aggregate", ["centre", "mean"])
def test_mean_and_calibrated_spread_of_the_members(setup, tmp_path, aggregate):
    d, store, ids, model, singles = setup
    res = predict(model, store, str(tmp_path / "p.zarr"), subjects=ids[:1], nifti_dir=str(tmp_path / "nii"),
                  options=PredictOptions(aggregate=aggregate), ctx=SYNC)
    assert res.uncertainty == "af_uncertainty" and res.variable == "af_virtual"
    each = np.stack([_map(predict(m, store, str(tmp_path / f"m{k}.zarr"), subjects=ids[:1], ctx=SYNC,
                                  options=PredictOptions(aggregate=aggregate)).out, ids[0], "af_virtual")
                     for k, m in enumerate(singles)])
    virt, unc = _map(res.out, ids[0], "af_virtual"), _map(res.out, ids[0], "af_uncertainty")
    mask = _map(res.out, ids[0], "mask")
    np.testing.assert_allclose(virt, each.mean(0), atol=1e-3)  # the members' mean (of overlap means)
    if aggregate == "centre":  # the members' sd pooled over each voxel's output patch, x 1.5
        ds = xr.open_zarr(store, group=ids[0], consolidated=False)
        mri = ds["mri"].values
        for v in np.argwhere(mask)[::7][:12]:
            outs = []
            for m in singles:
                net, meta = load_model(m)
                idx = [list(ds.contrast.values).index(c) for c in meta["channels"]]
                x = reference_patch(mri, idx, meta["norm"], tuple(v), 1, "y")
                with torch.no_grad():
                    outs.append(net(torch.from_numpy(x[None]))[0].double().numpy())
            sd = np.sqrt(np.stack(outs).var(0, ddof=1).mean()) * meta["norm"].target_scale[0]
            assert unc[tuple(v)] == pytest.approx(1.5 * sd, rel=1e-3, abs=1e-4)
    assert (unc[mask] > 0).all()
    assert (unc[~mask] == 0).all() and (unc[mask] > 0).all()
    attrs = xr.open_zarr(res.out, group=ids[0], consolidated=False)["af_uncertainty"].attrs
    assert attrs["calibration_factor"] == 1.5 and attrs["kind"] == "uncertainty"
    for var in ("af_virtual", "af_uncertainty"):
        f = tmp_path / "nii" / f"{ids[0]}_{var}.nii.gz"
        np.testing.assert_allclose(np.asanyarray(nib.load(f).dataobj), _map(res.out, ids[0], var), atol=1e-5)


def test_rerun_reuses_and_root_names_the_uncertainty(setup, tmp_path):
    import zarr

    d, store, ids, model, _ = setup
    out = str(tmp_path / "p.zarr")
    predict(model, store, out, ctx=SYNC)
    again = predict(model, store, out, ctx=SYNC)
    assert again.skipped == ids and not again.predicted
    attrs = dict(zarr.open_group(out, mode="r").attrs)
    assert attrs["uncertainty"] == "af_uncertainty" and attrs["model"]["members"] == 3
    assert attrs["model"]["uncertainty"]["calibration"]["factor"] == 1.5
    r = CliRunner().invoke(main, ["info", out])
    assert r.exit_code == 0 and "uncertainty: af_uncertainty (ensemble of 3; spread x 1.5" in r.output


def test_predict_volume_gives_a_dataset_for_an_ensemble(setup):
    from mrhscale.stages.predict_volume import predict_volume

    d, store, ids, model, _ = setup
    ds = xr.open_zarr(store, group=ids[0], consolidated=False)
    got = predict_volume(model, ds)
    assert isinstance(got, xr.Dataset) and set(got.data_vars) == {"af_virtual", "af_uncertainty"}
    np.testing.assert_allclose(got["af_virtual"].values,
                               _map(predict(model, store, os.path.join(d, "pv.zarr"), subjects=ids[:1],
                                            ctx=SYNC).out, ids[0], "af_virtual"),
                               atol=1e-5)


@pytest.mark.skipif(not HAVE_OME, reason="ome extra not installed")
def test_ome_zarr_images_of_both_maps(setup, tmp_path):
    d, store, ids, model, _ = setup
    res = predict(model, store, str(tmp_path / "p.zarr"), subjects=ids[:1], ome_zarr=str(tmp_path / "ome"),
                  ctx=SYNC)
    names = sorted(os.path.basename(p) for p in res.ome_zarr)
    assert names == [f"{ids[0]}.af_uncertainty.ome.zarr", f"{ids[0]}.ome.zarr"]


def test_cli_says_it_wrote_the_uncertainty(setup, tmp_path):
    d, store, ids, model, _ = setup
    r = CliRunner().invoke(main, ["predict", model, store, "--out", str(tmp_path / "p.zarr"), "--subjects", ids[0],
                                  "--scheduler", "synchronous", "-q"])
    assert r.exit_code == 0, r.output
    assert "af_virtual with its af_uncertainty" in r.output
    r = CliRunner().invoke(main, ["info", model])
    assert r.exit_code == 0 and "3 members" in r.output


def test_export_writes_the_whole_ensemble_and_importance_uses_the_mean(setup, tmp_path):
    from helpers import make_patch_store

    d, store, ids, model, singles = setup
    r = CliRunner().invoke(main, ["export", model, "--out", str(tmp_path / "m.pt2"), "--format", "pt2", "-q"])
    assert r.exit_code == 0, r.output  # the graph of every member (tests/stages/test_export_deploy.py)
    from mrhscale.io.bundle import read_bundle
    from mrhscale.stages.importance import importance

    channels = read_bundle(model)["channels"]
    p = make_patch_store(tmp_path / "p.zarr", n_train=64, n_val=64, n_channels=len(channels))
    import zarr

    g = zarr.open_group(p, mode="r+")
    g.attrs["channels"] = channels
    res = importance(model, p, str(tmp_path / "imp"), max_patches=64, repeats=1, ctx=Context(quiet=True))
    assert np.isfinite(res["baseline_mse"]) and len(res["groups"]) >= 1
