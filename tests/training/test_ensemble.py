"""train --members K: K seeded runs in OUT/members, one bundle with all of them and the
calibration of their spread; resume inside an ensemble; refusals; torchrun."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import make_patch_store

from mrhscale.cli import main
from mrhscale.errors import MRHError
from mrhscale.io.bundle import describe_bundle, load_model, read_bundle
from mrhscale.nn.model import MRHEnsemble
from mrhscale.ops.ood import input_distance
from mrhscale.ops.uncertainty import Z95
from mrhscale.training import finetune, train

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
SMALL = dict(depth=1, width=8, epochs=2, batch_size=64, threads=1, quiet=True)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_patch_store(tmp_path_factory.mktemp("p") / "patches.zarr", n_train=512, n_val=512)


@pytest.fixture(scope="module")
def ensemble(store, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ens") / "run")
    return train(store, out, members=3, seed=5, **SMALL)


def states(path):
    b = read_bundle(path)
    return [b["state_dict"], *b.get("member_state_dicts", [])]


def test_ensemble_bundle_holds_every_member_and_their_calibration(ensemble, store):
    out = ensemble.out_dir
    b = read_bundle(ensemble.model)
    assert b["format_version"] == 2 and len(b["member_state_dicts"]) == 2
    for k in range(3):  # each member an ordinary run folder, seed 5 + k
        m = os.path.join(out, "members", f"m{k:02d}")
        assert os.path.exists(os.path.join(m, "model.pt")) and os.path.exists(os.path.join(m, "checkpoints", "last.pt"))
        assert json.load(open(os.path.join(m, "config.json")))["seed"] == 5 + k
        for key, v in read_bundle(os.path.join(m, "model.pt"))["state_dict"].items():
            assert torch.equal(v, states(ensemble.model)[k][key])
    first, second = states(ensemble.model)[:2]
    assert not torch.equal(first["conv1.weight"], second["conv1.weight"])  # other init, other data order
    top = b["uncertainty"]["calibration"]
    cal = top["stains"]["af"]  # a calibration per stain (one here), the factors listed on top
    assert b["uncertainty"]["seeds"] == [5, 6, 7] and cal["fitted_on"] == "val" and cal["n"] == 512
    assert top["factor"] == [cal["factor"]] and top["fitted_on"] == "val" and top["val_r"] == cal["val_r"]
    assert cal["factor"] > 0 and 0.95 <= cal["coverage_after"] <= 0.97  # conformal: at least 95% (ties above)
    assert cal["ood_power"] in [float(p) for p in cal["ood_power_widths"]] and "ood" in b  # the score's widening
    assert json.load(open(os.path.join(out, "config.json")))["members"] == 3
    assert ensemble.members and len(ensemble.members) == 3 and ensemble.final["val_r"] == cal["val_r"]
    model, meta = load_model(ensemble.model, ensemble=True)
    assert isinstance(model, MRHEnsemble) and meta["members"] == 3
    assert model(torch.zeros(4, 5, 3, 3)).shape == (4, 3, 1, 3, 3)  # [B, K members, T stains, P, P]
    assert load_model(ensemble.model)[0](torch.zeros(2, 5, 3, 3)).shape == (2, 1, 3, 3)  # member 0 alone
    text = describe_bundle(ensemble.model)
    assert "3 members (seeds [5, 6, 7])" in text and "calibration factor" in text and "per member" in text
    card = b["card"]  # the model card: the ensemble, its calibration and validation figures
    assert card["model"]["architecture"]["members"] == 3 and card["recipe"]["members"] == 3
    assert card["calibration"]["af"]["factor"] == cal["factor"] and card["calibration"]["af"]["n"] == 512
    assert card["validation"] == {"val_r": cal["val_r"], "val_rmse": cal["val_rmse"]}


def test_member_k_is_the_single_run_with_seed_plus_k(ensemble, store, tmp_path):
    single = train(store, str(tmp_path / "one"), seed=6, **SMALL)
    for key, v in states(single.model)[0].items():
        torch.testing.assert_close(v, states(ensemble.model)[1][key], atol=1e-6, rtol=0)


def test_calibration_factor_makes_the_validation_interval_cover_95_percent(ensemble, store):
    """Recompute the members' centre outputs on the val split by hand: the factor fitted at
    training is the conformal quantile of |mean - target| / spread (the ceil((n+1) 0.95)-th
    smallest of the n scores) over 1.96."""
    import zarr

    model, meta = load_model(ensemble.model, ensemble=True)
    g = zarr.open_group(store, mode="r")
    x, t = np.asarray(g["val/inputs"][:]), np.asarray(g["val/targets"][:])
    origin = np.asarray(g["val/origin"][:])
    attrs = dict(g.attrs)
    names = list(attrs["subject_norm"])  # row -> subject: origin[:, 0] indexes these
    norm = meta["norm"]
    xs = np.empty_like(x)
    for i, sid in enumerate(names):
        rows = origin[:, 0] == i
        concrete = norm.for_subject(attrs["subject_norm"][sid])
        off, inv = concrete.input_arrays()
        xs[rows] = (x[rows] - off[None, :, None, None]) * inv[None, :, None, None]
    with torch.no_grad():
        y = model(torch.from_numpy(xs.astype(np.float32))).double().numpy()
    tn = (t[:, 0, 1, 1] - norm.target_offset[0]) / norm.target_scale[0]
    y = y[:, :, 0]  # [N, K, P, P]: the one stain
    err, spread = y[:, :, 1, 1].mean(1) - tn, np.sqrt(y.var(1, ddof=1).mean((1, 2)))  # pooled over the patch
    bundle = read_bundle(ensemble.model)
    cal = bundle["uncertainty"]["calibration"]["stains"]["af"]
    spread = spread * input_distance(xs.mean((-2, -1)), bundle["ood"]) ** cal["ood_power"]  # widened first
    scores = np.sort(np.abs(err) / spread)
    factor = scores[int(np.ceil((scores.size + 1) * 0.95)) - 1] / Z95
    assert cal["factor"] == pytest.approx(factor, rel=1e-3)


def test_resume_finishes_a_member_and_extends_every_one(store, ensemble, tmp_path):
    import shutil

    out = str(tmp_path / "run")
    shutil.copytree(ensemble.out_dir, out)
    m1 = os.path.join(out, "members", "m01")
    before = read_bundle(os.path.join(out, "members", "m00", "model.pt"))["state_dict"]
    shutil.rmtree(m1)  # as if the run had died before member 2 started
    os.remove(os.path.join(out, "model.pt"))
    res = train(store, out, resume=True, quiet=True, threads=1)
    assert torch.equal(read_bundle(os.path.join(out, "members", "m00", "model.pt"))["state_dict"]["conv1.weight"],
                       before["conv1.weight"])  # finished members are kept, not retrained
    for key, v in states(res.model)[1].items():  # the retrained member equals the original
        torch.testing.assert_close(v, states(ensemble.model)[1][key], atol=1e-6, rtol=0)
    res = train(store, out, resume=True, epochs=3, quiet=True, threads=1)  # more epochs: every member
    for k in range(3):
        ck = torch.load(os.path.join(out, "members", f"m{k:02d}", "checkpoints", "last.pt"), weights_only=True)
        assert ck["epoch"] == 3
    assert len(res.history) == 3


def test_ensemble_refusals(store, ensemble, tmp_path):
    with pytest.raises(MRHError, match="already holds a training run"):
        train(store, ensemble.out_dir, members=3, **SMALL)
    with pytest.raises(MRHError, match="members=2 differs"):
        train(store, ensemble.out_dir, resume=True, members=2, quiet=True)
    with pytest.raises(MRHError, match="--members 0"):
        train(store, str(tmp_path / "zero"), members=0, **SMALL)
    with pytest.raises(MRHError, match="--members 99"):
        train(store, str(tmp_path / "many"), members=99, **SMALL)
    with pytest.raises(MRHError, match="finetune trains one network"):
        finetune(ensemble.model, store, str(tmp_path / "ft"), members=2, epochs=1, quiet=True)
    r = CliRunner().invoke(main, ["train", store, "--out", str(tmp_path / "z"), "--members", "0", "-q"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "Traceback" not in r.output


def test_finetune_from_an_ensemble_starts_from_member_0(store, ensemble, tmp_path):
    res = finetune(ensemble.model, store, str(tmp_path / "ft"), epochs=1, batch_size=64, quiet=True, threads=1)
    b = read_bundle(res.model)
    assert "member_state_dicts" not in b and b["format_version"] == 1
    torch.testing.assert_close(b["state_dict"]["conv1.weight"], states(ensemble.model)[0]["conv1.weight"],
                               atol=1e-2, rtol=0)


def test_no_validation_split_leaves_the_spread_uncalibrated(tmp_path, caplog):
    p = make_patch_store(tmp_path / "noval.zarr", n_train=256, n_val=0)
    res = train(p, str(tmp_path / "run"), members=2, **{**SMALL, "epochs": 1})
    cal = read_bundle(res.model)["uncertainty"]["calibration"]
    assert cal == {"factor": [1.0], "fitted_on": None, "stains": {}}
    assert "uncalibrated" in describe_bundle(res.model)


@pytest.mark.slow  # 20 s: DDP in test_train's torchrun test, ensembles in this file
def test_torchrun_two_gloo_ranks_train_an_ensemble(store, tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python",
           os.path.join(BIN, "mrhscale"), "train", store, "--out", out, "--members", "2", "--depth", "1",
           "--epochs", "1", "--batch-size", "64", "--threads", "1"]
    e = dict(os.environ, OMP_NUM_THREADS="1", MRHSCALE_DIST_TIMEOUT="60")
    e["PYTHONPATH"] = os.pathsep.join([TESTS, e.get("PYTHONPATH", "")])
    p = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "ensemble of 2" in p.stdout and p.stdout.count("model ") == 1  # rank 0 talks, once
    b = read_bundle(os.path.join(out, "model.pt"))
    assert len(b["member_state_dicts"]) == 1 and b["uncertainty"]["calibration"]["fitted_on"] == "val"
    for k in range(2):
        summary = json.load(open(os.path.join(out, "members", f"m{k:02d}", "metrics.json")))["summary"]
        assert summary["world_size"] == 2 and summary["replica_max_abs_diff"] == 0.0


@pytest.mark.slow  # 15 s: a real kill + resume in test_train, resume inside an ensemble above
def test_killed_inside_a_member_resumes_to_the_uninterrupted_ensemble(store, tmp_path):
    """SIGKILL after member 0's first epoch (a real process death), then --resume: member 0
    finishes from its checkpoint, member 1 trains, and every weight equals the run that
    was never interrupted."""
    import signal

    opts = dict(members=2, seed=5, depth=1, epochs=2, batch_size=64, threads=1, quiet=True)
    reference = train(store, str(tmp_path / "ref"), **opts)
    out = str(tmp_path / "run")
    args = [os.path.join(BIN, "mrhscale"), "train", store, "--out", out, "--members", "2", "--seed", "5",
            "--depth", "1", "--epochs", "2", "--batch-size", "64", "--threads", "1", "-q"]
    e = dict(os.environ, OMP_NUM_THREADS="1", MRHSCALE_DEBUG_KILL_AFTER_EPOCH="1")
    p = subprocess.run(args, env=e, capture_output=True, text=True, timeout=180)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert not os.path.exists(os.path.join(out, "model.pt"))
    assert not os.path.exists(os.path.join(out, "members", "m01"))
    r = CliRunner().invoke(main, ["train", store, "--out", out, "--resume", "--threads", "1", "-q"])
    assert r.exit_code == 0, r.output
    for k in range(2):
        for key, v in states(os.path.join(out, "model.pt"))[k].items():
            torch.testing.assert_close(v, states(reference.model)[k][key], atol=1e-6, rtol=0)
