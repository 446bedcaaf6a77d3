"""Every trained model exports (issue 30): the default recipe's per-subject model with the
brain's statistics as graph inputs, an ensemble as one graph of each stain's mean and
calibrated spread; onnxruntime against torch, and predict_volume on the exported file
against the bundle.

The references are built here from the bundle's networks and records, not from the export
code: a per-subject brain scaled by its own statistics, the members' mean and their sd
(ddof 1) pooled over the patch times the target scale and the calibration factor.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import channel_names, make_cohort_store, make_patch_store

import mrhscale
from mrhscale.cli import main
from mrhscale.errors import MRHError
from mrhscale.io.bundle import load_model, read_bundle, save_bundle
from mrhscale.nn.model import MRHNet
from mrhscale.ops.norm import Normalisation, graph_statistics, subject_normalisation
from mrhscale.options import PredictOptions
from mrhscale.stages.export import export_model
from mrhscale.stages.predict_graph import subject_arrays
from mrhscale.training import train

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

TOL = 1e-4
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHANNELS = channel_names(5)  # the patch store's and the cohort store's


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-member ensemble of the default recipe, a few steps; member 0 alone is a default model."""
    d = tmp_path_factory.mktemp("deploy")
    store = make_patch_store(d / "p.zarr", n_train=256, n_val=128)
    res = train(store, str(d / "run"), members=2, seed=3, depth=1, width=8, epochs=1, batch_size=64, threads=1,
                quiet=True)
    single = os.path.join(res.out_dir, "members", "m00", "model.pt")
    exports = {name: export_model(m, str(d / f"{name}.onnx"), "onnx")
               for name, m in (("single", single), ("ensemble", res.model))}
    return {"single": single, "ensemble": res.model, "exports": exports, "dir": d}


@pytest.fixture(scope="module")
def brain(tmp_path_factory):
    store = tmp_path_factory.mktemp("brain") / "c.zarr"
    make_cohort_store(store, n_subjects=1)
    return str(store), mrhscale.open_subject(str(store), "s01")


def numpy_statistics(mri, mask, mode):
    """docs/inference.md's numpy function, run as written there: a brain's offset and scale without mrhscale."""
    with open(os.path.join(ROOT, "docs", "inference.md"), encoding="utf-8") as fh:
        block = re.search(r"```python\n(def brain_statistics.*?)```", fh.read(), re.S).group(1)
    assert len(block.strip().splitlines()) == 7  # the def and its six lines
    space = {"np": np}
    exec(block, space)
    return space["brain_statistics"](mri, mask, mode)


def raw_patches(n, size=3, seed=0):
    x = np.random.default_rng(seed).gamma(2.0, 50.0, size=(n, len(CHANNELS), size, size)).astype(np.float32)
    x[0, 1, 0, 0] = np.nan
    return x


def member_outputs(model, x, offset, scale):
    """Each network's output [K, N, T, P, P] on ``x`` scaled by the brain's statistics, and the record."""
    b = read_bundle(model)
    states = [b["state_dict"], *b.get("member_state_dicts", [])]
    net, meta = load_model(model)
    norm = meta["norm"].for_subject({meta["norm"].mode: {"offset": offset.tolist(), "scale": scale.tolist()}})
    xn = np.nan_to_num(norm.apply_inputs(x, channel_axis=1), nan=0.0, posinf=0.0, neginf=0.0)
    outs = []
    for state in states:
        net.load_state_dict(state)
        with torch.inference_mode():
            outs.append(net(torch.from_numpy(xn)).numpy().astype(np.float64))
    return np.stack(outs), norm, b


def test_default_recipe_model_takes_the_brains_statistics_as_inputs(trained, brain):
    res = trained["exports"]["single"]
    sess = ort.InferenceSession(res.out, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["mri", "offset", "scale"]
    assert [o.name for o in sess.get_outputs()] == ["stain", "ood"]  # the out-of-distribution score travels too
    assert res.metadata["normalisation"]["mode"] == "subject-percentile"  # the default recipe's
    stats = mrhscale.brain_statistics(res.out, brain[1])
    for n, size in ((4, 3), (2, 7)):
        x = raw_patches(n, size, seed=n)
        got, ood = sess.run(None, {"mri": x, **stats})
        assert ood.shape == (n, 1, size, size) and (ood > 0).all() and (ood == ood[:, :, :1, :1]).all()
        outs, norm, _ = member_outputs(trained["single"], x, stats["offset"], stats["scale"])
        want = norm.invert_target(outs[0])
        diff = float(np.abs(got - want).max())
        assert got.shape == (n, 1, size, size) and diff <= TOL, f"max |onnx - torch| {diff:.3g}"
        assert float(np.abs(want).max()) > 10  # raw stain units
    print(f"default model: max |onnx - torch| {diff:.3g}, export's own check {res.max_abs_diff:.3g}")


def test_ensemble_returns_each_stains_mean_and_calibrated_spread(trained, brain):
    res = trained["exports"]["ensemble"]
    sess = ort.InferenceSession(res.out, providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["stain", "uncertainty", "ood"]
    stats = mrhscale.brain_statistics(res.out, brain[1])
    x = raw_patches(6, seed=3)
    stain, unc, ood = sess.run(None, {"mri": x, **stats})
    outs, norm, b = member_outputs(trained["ensemble"], x, stats["offset"], stats["scale"])
    factor = b["uncertainty"]["calibration"]["stains"]["af"]["factor"]
    sd = np.sqrt(outs.var(0, ddof=1).mean((-2, -1), keepdims=True))  # pooled over the patch
    want_unc = np.broadcast_to(sd * norm.target_scale[0] * factor, unc.shape).copy()
    groups = b["uncertainty"]["calibration"]["stains"]["af"].get("groups") or {}
    if groups.get("by") == "value":  # the default calibration: a factor per bin of the predicted value
        mean = norm.invert_target(outs.mean(0))
        rel = np.asarray(groups["factor"]) / factor
        want_unc *= rel[np.searchsorted(groups["edges"], mean, side="right")]
    want_unc *= ood ** b["uncertainty"]["calibration"]["stains"]["af"]["ood_power"]  # widened by the score
    d_stain = float(np.abs(stain - norm.invert_target(outs.mean(0))).max())
    d_unc = float(np.abs(unc - want_unc).max())
    assert len(outs) == 2 and factor != 1.0 and d_stain <= TOL and d_unc <= TOL, (d_stain, d_unc)
    assert res.metadata["members"] == 2 and res.metadata["uncertainty"]["calibration"]["stains"]["af"]["factor"] == factor
    print(f"ensemble: max |onnx - torch| {d_stain:.3g} (mean), {d_unc:.3g} (uncertainty)")


@pytest.mark.parametrize("kind", ["single", "ensemble"])
def test_predict_volume_on_the_export_equals_the_bundle(trained, brain, kind):
    ds = brain[1]
    want = mrhscale.predict_volume(trained[kind], ds)
    got = mrhscale.predict_volume(trained["exports"][kind].out, ds)
    assert list(got.data_vars) == list(want.data_vars) == ["af_virtual", *(["af_uncertainty"] * (kind != "single")),
                                                          "ood"]
    for v in want.data_vars:
        diff = float(np.abs(got[v].values - want[v].values).max())
        assert diff <= TOL and float(np.abs(want[v]).max()) > 1, f"{v}: max |export - bundle| {diff:.3g}"
        print(f"{kind} {v}: max |predict_volume(export) - predict_volume(bundle)| {diff:.3g}")
    assert got["af_virtual"].attrs["numerics"] == "fp32 eager"
    assert got["af_virtual"].attrs["model_sha256"] != want["af_virtual"].attrs["model_sha256"]  # the file it ran


def test_sidecar_says_how_to_compute_the_statistics_and_every_way_agrees(trained, brain):
    store, ds = brain
    with open(trained["exports"]["single"].sidecar) as fh:
        side = json.load(fh)
    st = side["statistics"]
    assert st["inputs"] == ["offset", "scale"] and st["mode"] == "subject-percentile"
    assert "mrhscale.brain_statistics" in st["reference"] and "0.5th percentile" in st["per_channel"]
    assert [i["name"] for i in side["inputs"]] == ["mri", "offset", "scale"] and side["format_version"] == 3
    mri, mask = ds["mri"].sel(contrast=CHANNELS).values, ds["mask"].values
    ours = mrhscale.brain_statistics(trained["exports"]["single"].sidecar, ds)  # the sidecar does, as the file
    arrays = graph_statistics(mri, mask, st["mode"])
    predicts = subject_normalisation(load_model(trained["single"])[1]["norm"], *subject_arrays(ds, CHANNELS))
    snippet = numpy_statistics(mri, mask, st["mode"])
    for k, i in (("offset", 0), ("scale", 1)):
        np.testing.assert_array_equal(ours[k], arrays[k])
        np.testing.assert_array_equal(ours[k], np.float32(predicts.meta["subject"][k]))
        np.testing.assert_allclose(ours[k], snippet[i], rtol=1e-6)
    files = write_nifti_brain(trained["dir"] / "nii", mri, mask)
    from_files = mrhscale.brain_statistics(trained["exports"]["single"].out, files)
    np.testing.assert_allclose(from_files["scale"], ours["scale"], rtol=1e-6)


def write_nifti_brain(d, mri, mask) -> dict:
    import nibabel as nib

    d.mkdir(exist_ok=True)
    aff = np.diag([0.06, 0.06, 0.06, 1.0])
    nib.save(nib.Nifti1Image(mri, aff), d / "mri.nii.gz")
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), aff), d / "mask.nii.gz")
    return {"mri": {"m": {"path": str(d / "mri.nii.gz"), "channels": CHANNELS}}, "mask": str(d / "mask.nii.gz")}


def test_subject_max_model_exports_and_its_statistics_are_one_maximum(tmp_path, brain):
    torch.manual_seed(0)
    net = MRHNet(len(CHANNELS), depth=1, width=8, stains=["af"])
    model = save_bundle(tmp_path / "m.pt", net, channels=CHANNELS, patch={"half": 1, "size": 3, "axis": "y"},
                        norm=Normalisation.subject_mode("subject-max", len(CHANNELS), 5.0, 40.0))
    res = export_model(model, tmp_path / "m.onnx")
    stats = mrhscale.brain_statistics(res.out, brain[1])
    mri, mask = brain[1]["mri"].values, brain[1]["mask"].values
    np.testing.assert_allclose(stats["scale"], numpy_statistics(mri, mask, "subject-max")[1], rtol=1e-6)
    assert np.all(stats["offset"] == 0) and np.all(stats["scale"] == stats["scale"][0])
    x = raw_patches(3, seed=1)
    (got,) = ort.InferenceSession(res.out, providers=["CPUExecutionProvider"]).run(None, {"mri": x, **stats})
    outs, norm, _ = member_outputs(model, x, stats["offset"], stats["scale"])
    assert float(np.abs(got - norm.invert_target(outs[0])).max()) <= TOL
    assert "max(data(:))" in res.metadata["statistics"]["per_channel"]


def test_pt2_export_of_a_per_subject_model_takes_the_same_inputs(trained, brain, tmp_path):
    res = export_model(trained["single"], tmp_path / "m.pt2", "pt2")
    stats = mrhscale.brain_statistics(res.out, brain[1])
    x = raw_patches(2, seed=7)
    with torch.inference_mode():
        got = torch.export.load(res.out).module()(torch.from_numpy(x), *(torch.from_numpy(stats[k])
                                                                         for k in ("offset", "scale")))
    want = ort.InferenceSession(trained["exports"]["single"].out).run(None, {"mri": x, **stats})
    assert len(got) == len(want) == 2  # the stain and the out-of-distribution score
    assert max(float(np.abs(g.numpy() - w).max()) for g, w in zip(got, want, strict=True)) <= TOL


def test_cli_predict_with_the_exported_ensemble(trained, brain, tmp_path):
    store, ds = brain
    r = CliRunner().invoke(main, ["predict", trained["exports"]["ensemble"].out, store, "--out",
                                  str(tmp_path / "p.zarr"), "--scheduler", "synchronous", "-q"])
    assert r.exit_code == 0, r.output
    got = mrhscale.PredictionStore.open(str(tmp_path / "p.zarr")).open_subject("s01")
    want = mrhscale.predict_volume(trained["ensemble"], ds)
    for v in ("af_virtual", "af_uncertainty"):
        assert float(np.abs(got[v].values - want[v].values).max()) <= TOL


def test_refusals_are_one_clear_error(trained, brain, tmp_path):
    ds = brain[1]
    with pytest.raises(MRHError, match="--tta with an exported ensemble"):
        mrhscale.predict_volume(trained["exports"]["ensemble"].out, ds, options=PredictOptions(tta=True))
    pt2 = export_model(trained["single"], tmp_path / "m.pt2", "pt2").out
    with pytest.raises(MRHError, match="predict runs model bundles and ONNX exports"):
        mrhscale.predict_volume(pt2, ds)
    with pytest.raises(MRHError, match="not an mrhscale export"):
        mrhscale.brain_statistics(trained["single"], ds)
    with pytest.raises(MRHError, match="needs channels"):
        mrhscale.brain_statistics(trained["exports"]["single"].out, ds.sel(contrast=CHANNELS[:3]))
    from helpers import write_model

    glob = export_model(write_model(tmp_path / "g.pt", CHANNELS), tmp_path / "g.onnx").out
    with pytest.raises(MRHError, match="normalised globally"):
        mrhscale.brain_statistics(glob, ds)
    with pytest.raises(MRHError, match="takes no brain statistics"):
        graph_statistics(ds["mri"].values, ds["mask"].values, "percentile")
    r = CliRunner().invoke(main, ["predict", pt2, brain[0], "--out", str(tmp_path / "p.zarr"), "-q"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output, r.output
