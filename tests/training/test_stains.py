"""Several stains in one network: the patch store (union of the stains' samples, NaN where
a stain is absent), the heads, the masked loss, training, predict (each head exactly as a
one-stain network of it), the ensemble's per-stain calibration, evaluate, importance and
finetune --add-stain (the base's heads untouched), and the bad input of each."""

import numpy as np
import pytest
import torch
import xarray as xr
from click.testing import CliRunner
from helpers import make_cohort_store

from mrhscale.cli import main
from mrhscale.errors import MRHError
from mrhscale.io.bundle import load_model, read_bundle, save_bundle
from mrhscale.nn.model import MRHNet
from mrhscale.options import PatchOptions
from mrhscale.parallel.context import Context
from mrhscale.stages.patches import extract_patches
from mrhscale.stores import PatchStore
from mrhscale.training import finetune, train
from mrhscale.training.optim import loss_function

SYNC = Context(scheduler="synchronous", quiet=True)

KW = dict(ctx=Context(scheduler="synchronous", quiet=True), options=PatchOptions(stride=2, val_subjects=["s02"]))
TRAIN = dict(epochs=3, depth=1, width=8, batch_size=64, quiet=True, lr=3e-3, recipe="fast", norm="global")


def _drop_mbp(ds, i):
    """Subject s03 has no mbp: it contributes af only (a mask for mbp, not zeros)."""
    return ds.drop_vars("mbp").assign_attrs(targets=["af"]) if i == 2 else ds


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    d = tmp_path_factory.mktemp("stains")
    make_cohort_store(d / "c.zarr", target_names=("af", "mbp"), edit=_drop_mbp)
    stores = {t: str(d / f"p-{t}.zarr") for t in ("af", "mbp", "af,mbp")}
    for t, p in stores.items():  # a one-stain store of mbp: of the subjects that have it
        extract_patches(str(d / "c.zarr"), t, p, subjects=["s01", "s02"] if t == "mbp" else None, **KW)
    return d, str(d / "c.zarr"), stores


@pytest.fixture(scope="module")
def joint(cohort):
    d, store, stores = cohort
    res = train(stores["af,mbp"], str(d / "joint"), **TRAIN)
    return res


def _rows(url, split="train"):
    x, t = PatchStore.open(url).split(split)
    o = PatchStore.open(url).root()[f"{split}/origin"][:]
    return {tuple(r): (xi, ti) for r, xi, ti in zip(o.tolist(), x[:], t[:], strict=True)}


def test_store_holds_the_union_of_the_stains_samples(cohort):
    _, _, stores = cohort
    ps = PatchStore.open(stores["af,mbp"])
    assert ps.attrs["target"] == "af,mbp" and ps.attrs["stains"] == ["af", "mbp"]
    x, t = ps.split("train")
    assert t.shape[1:] == (2, 3, 3) and tuple(t.metadata.dimension_names) == ("patch", "stain", "row", "col")
    assert len(ps.attrs["norm"]["target_scale"]) == 2
    for split in ("train", "val"):
        joint, single = _rows(stores["af,mbp"], split), {t: _rows(stores[t], split) for t in ("af", "mbp")}
        assert set(joint) == set(single["af"]) | set(single["mbp"])  # kept when ANY stain passes
        for k, t in enumerate(("af", "mbp")):
            for key, (xi, ti) in single[t].items():  # same inputs, same target where the stain passed
                np.testing.assert_array_equal(joint[key][0], xi)
                np.testing.assert_array_equal(joint[key][1][k], ti[0])  # a one-stain store: T = 1
    s03 = [v[1] for k, v in _rows(stores["af,mbp"]).items() if k[0] == 2]
    assert s03 and all(np.isnan(t[1]).all() and np.isfinite(t[0]).all() for t in s03)  # no mbp: masked


def test_one_stain_stores_have_a_stain_axis_of_one(cohort):
    _, _, stores = cohort
    ps = PatchStore.open(stores["af"])
    x, t = ps.split("train")
    assert ps.attrs["stains"] == ["af"] and ps.attrs["target"] == "af" and t.shape[1:] == (1, 3, 3)
    assert tuple(t.metadata.dimension_names) == ("patch", "stain", "row", "col")
    assert len(ps.attrs["norm"]["target_scale"]) == 1


@pytest.mark.parametrize("target, msg", [
    ("af,af", "named twice"), (",", "no stain named"), ("af,nf", "no subject has nf"),
    ("af,b@d", "not a stain name"),
])
def test_bad_stain_lists_are_one_line_errors(cohort, tmp_path, target, msg):
    _, store, _ = cohort
    r = CliRunner().invoke(main, ["patches", store, "--target", target, "--out", str(tmp_path / "p.zarr"), "-q"])
    assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output


def test_heads_and_the_one_stain_graph():
    one = MRHNet(4, depth=1, width=8, stains=["af"])
    assert {"heads.0.conv4.weight", "heads.0.conv5.weight"} <= set(one.state_dict())
    assert one(torch.randn(2, 4, 3, 3)).shape == (2, 1, 3, 3) and one.config["stains"] == ["af"]
    two = MRHNet(4, depth=1, width=8, stains=["af", "mbp"])
    assert not any(k.startswith(("conv4", "conv5")) for k in two.state_dict())
    y = two(torch.randn(2, 4, 3, 3))
    assert y.shape == (2, 2, 3, 3) and two.config["stains"] == ["af", "mbp"]
    assert len(two.head_parameters()) == 8  # two heads x (conv4, conv5) x (weight, bias)


@pytest.mark.parametrize("name", ["matlab", "mse", "centre-mse"])
def test_loss_masks_absent_stains(name):
    torch.manual_seed(0)
    p, t = torch.randn(6, 2, 3, 3, requires_grad=True), torch.randn(6, 2, 3, 3)
    t[3:, 1] = float("nan")  # the last 3 samples lack stain 1
    loss = loss_function(name)(p, t)
    one = loss_function(name)
    want = one(p[:, :1], t[:, :1]) + one(p[:3, 1:], t[:3, 1:])  # each stain over the samples that have it
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert torch.isfinite(p.grad).all() and (p.grad[3:, 1] == 0).all()


def test_joint_training_learns_both_stains(joint):
    h = joint.history
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    assert {"val_r_af", "val_r_mbp", "val_rmse_af", "val_rmse_mbp"} <= set(h[-1])
    assert h[-1]["val_r"] == pytest.approx((h[-1]["val_r_af"] + h[-1]["val_r_mbp"]) / 2)
    b = read_bundle(joint.model)
    assert b["target"] == "af,mbp" and b["stains"] == ["af", "mbp"] and b["arch"]["stains"] == ["af", "mbp"]
    r = CliRunner().invoke(main, ["info", joint.model])
    assert r.exit_code == 0 and "stains         af, mbp  (one Conv4/Conv5 head each)" in r.output


def _head_alone(path: str, k: int, out: str) -> str:
    """Head k of a network of several stains as a one-stain bundle (same backbone)."""
    model, meta = load_model(path)
    one = MRHNet(model.in_channels, model.depth, model.width, stains=[meta["stains"][k]])
    state = {n: v for n, v in model.state_dict().items() if not n.startswith("heads.")}
    state.update({"heads.0." + n.split(".", 2)[2]: v for n, v in model.state_dict().items()
                  if n.startswith(f"heads.{k}.")})
    one.load_state_dict(state)
    save_bundle(out, one, channels=meta["channels"], norm=meta["norm"].stain(k),
                patch=meta["patch"])
    return out


def _map(url, sid, var):
    return xr.open_zarr(url, group=sid, consolidated=False)[var].values


def test_predict_writes_each_stain_as_its_head_alone(cohort, joint, tmp_path):
    from mrhscale.stages.predict import predict

    _, store, _ = cohort
    res = predict(joint.model, store, str(tmp_path / "p.zarr"), subjects=["s01"], ctx=SYNC,
                  nifti_dir=str(tmp_path / "nii"))
    assert res.variable == "af_virtual,mbp_virtual" and res.uncertainty is None
    assert sorted(p.rsplit("/", 1)[1] for p in res.nifti) == ["s01_af_virtual.nii.gz", "s01_mbp_virtual.nii.gz",
                                                              "s01_ood.nii.gz"]  # one score for every stain
    for k, t in enumerate(("af", "mbp")):
        one = _head_alone(joint.model, k, str(tmp_path / f"{t}.pt"))
        predict(one, store, str(tmp_path / f"p-{t}.zarr"), subjects=["s01"], ctx=SYNC)
        got = _map(tmp_path / "p.zarr", "s01", f"{t}_virtual")
        assert np.ptp(got) > 0
        np.testing.assert_array_equal(got, _map(tmp_path / f"p-{t}.zarr", "s01", f"{t}_virtual"))


def test_evaluate_and_importance_per_stain(cohort, joint, tmp_path):
    from mrhscale.stages.evaluate import evaluate
    from mrhscale.stages.importance import importance
    from mrhscale.stages.predict import predict

    _, store, stores = cohort
    pred = str(tmp_path / "p.zarr")
    predict(joint.model, store, pred, subjects=["s01", "s02"], ctx=SYNC)
    ev = {t: evaluate(pred, store, str(tmp_path / f"ev-{t}"), stains=[t], subjects=["s02"], ctx=Context(quiet=True)).by_stain[t]
          for t in ("af", "mbp")}
    assert ev["af"].pooled["virtual"]["pearson"] != ev["mbp"].pooled["virtual"]["pearson"]
    r = CliRunner().invoke(main, ["evaluate", pred, store, "--stain", "nf", "--out",
                                  str(tmp_path / "ev-nf"), "-q"])
    assert r.exit_code == 2 and "give --stain af or mbp" in r.output
    both = evaluate(pred, store, str(tmp_path / "ev-both"), subjects=["s02"], ctx=Context(quiet=True))
    assert both.stains == ["af", "mbp"]  # every stain of the prediction in one call, the same figures
    for t in ("af", "mbp"):
        assert both.by_stain[t].pooled["virtual"] == ev[t].pooled["virtual"]
    imp = {t: importance(joint.model, stores["af,mbp"], str(tmp_path / f"imp-{t}"), stain=t, repeats=1,
                         ctx=Context(quiet=True)) for t in ("af", "mbp")}
    assert imp["af"]["target"] == "af" and imp["mbp"]["n_patches"] < imp["af"]["n_patches"] + 1
    with pytest.raises(MRHError, match="give a stain of both"):
        importance(joint.model, stores["af"], str(tmp_path / "imp-x"), stain="mbp", ctx=Context(quiet=True))


def test_ensemble_of_several_stains_calibrates_each(cohort, tmp_path):
    from mrhscale.stages.predict import predict

    d, store, stores = cohort
    res = train(stores["af,mbp"], str(tmp_path / "ens"), members=2, **{**TRAIN, "epochs": 1})
    cal = res.uncertainty["calibration"]
    assert len(cal["factor"]) == 2 and set(cal["stains"]) == {"af", "mbp"}
    assert all(cal["stains"][t]["coverage_after"] == pytest.approx(0.95, abs=0.02) for t in ("af", "mbp"))
    r = CliRunner().invoke(main, ["info", res.model])
    assert r.exit_code == 0 and "a factor per stain" in r.output and "  mbp: calibration factor" in r.output
    out = str(tmp_path / "p.zarr")
    predict(res.model, store, out, subjects=["s01"], ctx=SYNC)
    ds = xr.open_zarr(out, group="s01", consolidated=False)
    for k, t in enumerate(("af", "mbp")):
        assert ds[f"{t}_uncertainty"].attrs["calibration_factor"] == pytest.approx(cal["factor"][k])
        assert float(ds[f"{t}_uncertainty"].max()) > 0


def test_finetune_adds_a_head_and_keeps_the_old_one(cohort, tmp_path):
    _, _, stores = cohort
    base = train(stores["af"], str(tmp_path / "af"), **{**TRAIN, "epochs": 1}).model
    with pytest.raises(MRHError, match="--freeze-backbone"):
        finetune(base, stores["mbp"], str(tmp_path / "bad"), epochs=1, batch_size=64, quiet=True, add_stain=True)
    res = finetune(base, stores["mbp"], str(tmp_path / "ft"), epochs=2, batch_size=64, quiet=True,
                   add_stain=True, freeze_backbone=True)
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"] * 1.5
    old, _ = load_model(base)
    new, meta = load_model(res.model)
    assert meta["stains"] == ["af", "mbp"]
    assert meta["norm"].target_scale == [*read_bundle(base)["norm"]["target_scale"],
                                         *PatchStore.open(stores["mbp"]).attrs["norm"]["target_scale"]]
    x = torch.randn(5, old.in_channels, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(new(x)[:, :1], old(x), rtol=0, atol=0)  # af: exactly as it was
    r = CliRunner().invoke(main, ["finetune", res.model, stores["mbp"], "--out", str(tmp_path / "again"),
                                  "--add-stain", "-q"])
    assert r.exit_code == 2 and "already predicts mbp" in r.output
    r = CliRunner().invoke(main, ["train", stores["af"], "--out", str(tmp_path / "t"), "--add-stain", "-q"])
    assert r.exit_code != 0


def test_export_of_several_stains_gives_each_stain_its_scaling(cohort, joint, tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from mrhscale.stages.export import export_model

    res = export_model(joint.model, str(tmp_path / "m.onnx"), "onnx")
    assert res.metadata["output"]["layout"] == "NTHW" and res.metadata["output"]["stains"] == ["af", "mbp"]
    x = np.random.default_rng(0).gamma(2.0, 50.0, (4, 5, 3, 3)).astype(np.float32)
    got, _ = ort.InferenceSession(res.out).run(None, {res.metadata["input"]["name"]: x})  # the stains, the score
    model, meta = load_model(joint.model)
    with torch.no_grad():
        want = model(torch.from_numpy(meta["norm"].apply_inputs(x, channel_axis=1))).numpy()
    np.testing.assert_allclose(got, meta["norm"].invert_target(want), rtol=1e-4, atol=1e-3)


@pytest.mark.slow  # DDP itself is covered in the default run (test_train's torchrun with 2 gloo ranks)
def test_torchrun_two_gloo_ranks_train_several_stains(cohort, tmp_path):
    import json
    import os
    import subprocess
    import sys

    _, _, stores = cohort
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python",
           os.path.join(os.path.dirname(sys.executable), "mrhscale"), "train", stores["af,mbp"], "--out", out,
           "--depth", "1", "--epochs", "1", "--batch-size", "64", "--threads", "1", "--norm", "global"]
    e = dict(os.environ, OMP_NUM_THREADS="1", MRHSCALE_DIST_TIMEOUT="60")
    p = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["summary"]["world_size"] == 2 and m["summary"]["replica_max_abs_diff"] == 0.0
    assert {"val_r_af", "val_r_mbp"} <= set(m["summary"]["final"])
    assert read_bundle(os.path.join(out, "model.pt"))["stains"] == ["af", "mbp"]


def test_crossval_scores_one_stain_at_a_time(cohort, tmp_path):
    _, store, _ = cohort
    r = CliRunner().invoke(main, ["crossval", store, "--target", "af,mbp", "--out", str(tmp_path / "cv"), "-q"])
    assert r.exit_code == 2 and "one stain at a time" in r.output


def test_resume_extends_a_network_of_several_stains(cohort, tmp_path):
    _, _, stores = cohort
    out = str(tmp_path / "run")
    train(stores["af,mbp"], out, **{**TRAIN, "epochs": 1})
    res = train(stores["af,mbp"], out, resume=True, **{**TRAIN, "epochs": 2})
    assert [r["epoch"] for r in res.history] == [1, 2] and "val_r_mbp" in res.history[-1]
    assert read_bundle(res.model)["stains"] == ["af", "mbp"]
