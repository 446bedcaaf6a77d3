"""Trainer: DDP under torchrun, checkpoints and exact resume after a real kill, transfer
learning, the model bundle, and clear errors for bad inputs."""

import importlib.util
import inspect
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from helpers import StandInPatchStream, make_patch_store

from mrhscale.cli import main
from mrhscale.errors import MRHError
from mrhscale.io.bundle import describe_bundle, load_model, read_bundle
from mrhscale.ops.norm import Normalisation
from mrhscale.training import Runtime, TrainingInterrupted, finetune, train
from mrhscale.training.data import open_data

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where helpers.py is
BIN = os.path.dirname(sys.executable)
HAVE_STREAM = importlib.util.find_spec("mrhscale.training.stream") is not None
# Until mrhscale/training/stream.py exists the trainer is exercised with the stand-in from helpers.
STREAM_ENV = {} if HAVE_STREAM else {"MRHSCALE_STREAM": "helpers:StandInPatchStream"}

# one small recipe shared by the reference run and the killed/resumed runs
RECIPE = dict(depth=1, epochs=3, batch_size=64, seed=3, threads=1, quiet=True)


def env(**extra):
    e = dict(os.environ, **STREAM_ENV, OMP_NUM_THREADS="1", MRHSCALE_DIST_TIMEOUT="60")
    e["PYTHONPATH"] = os.pathsep.join([TESTS, e.get("PYTHONPATH", "")])
    e.update({k: str(v) for k, v in extra.items()})
    return e


def cli_args(patches, out):
    return [os.path.join(BIN, "mrhscale"), "train", patches, "--out", out, "--depth", "1",
            "--epochs", "3", "--batch-size", "64", "--seed", "3", "--threads", "1", "-q"]


@pytest.fixture(autouse=True)
def _stream(monkeypatch):
    for k, v in STREAM_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MRHSCALE_DIST_TIMEOUT", "60")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_patch_store(tmp_path_factory.mktemp("p") / "patches.zarr", n_train=1024, n_val=256)


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory):
    """An uninterrupted run of RECIPE (the yardstick for resume)."""
    saved = os.environ.get("MRHSCALE_STREAM")
    os.environ.update(STREAM_ENV)
    try:
        out = str(tmp_path_factory.mktemp("ref") / "run")
        res = train(store, out, **RECIPE)
    finally:
        if saved is None:
            os.environ.pop("MRHSCALE_STREAM", None)
    return res


def weights(path):
    return read_bundle(path)["state_dict"]


def assert_same_weights(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def test_train_writes_run_dir_and_bundle(store, reference):
    out = reference["out_dir"]
    for f in ("config.json", "metrics.csv", "metrics.json", "curve.png", "model.pt",
              "checkpoints/last.pt"):
        assert os.path.exists(os.path.join(out, f)), f
    hist = reference["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert np.isfinite(hist[-1]["val_loss"]) and hist[-1]["val_r"] > 0.5
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert (cfg["recipe"], cfg["loss"], cfg["optimizer"], cfg["lr"], cfg["norm"]) == (
        "robust", "matlab", "adamw", 2e-3, "subject-percentile")  # the default recipe
    with open(os.path.join(out, "metrics.csv")) as f:
        assert len(f.read().strip().splitlines()) == 4
    model, meta = load_model(reference["model"])
    assert meta["channels"] == [f"c{i:02d}" for i in range(5)] and meta["target"] == "af"
    assert meta["patch"] == {"half": 1, "size": 3, "axis": "y"}
    assert isinstance(meta["norm"], Normalisation)
    assert meta["provenance"]["config"]["depth"] == 1
    assert model(torch.zeros(2, 5, 3, 3)).shape == (2, 1, 3, 3) and meta["stains"] == ["af"]
    text = describe_bundle(reference["model"])
    assert "depth=1" in text and "stains         af" in text and "percentile" in text
    r = CliRunner().invoke(main, ["info", reference["model"]])
    assert r.exit_code == 0 and "parameters" in r.output


def test_model_card_of_a_trained_model(reference, store):
    """What the card of a trained bundle says, each part from the bundle's own records."""
    b = read_bundle(reference["model"])
    card, prov = b["card"], b["provenance"]
    assert card["model"]["kind"] == "trained with mrhscale train" and card["stains"] == ["af"]
    assert card["model"]["architecture"] == {"name": "MRHNet", "depth": 1, "width": 64, "in_channels": 5,
                                             "parameters_per_network": sum(v.numel() for v in b["state_dict"].values()),
                                             "members": 1}
    assert card["inputs"]["channels"] == [f"c{i:02d}" for i in range(5)]
    assert card["inputs"]["patch"] == {"size": 3, "half": 1, "slice_axis": "y",
                                       "meaning": "3x3 patches in the plane across slice axis 'y'"}
    assert card["normalisation"]["input"]["mode"] == b["norm"]["mode"] == prov["config"]["norm"]
    assert card["recipe"]["name"] == prov["config"]["recipe"] and card["recipe"]["epochs"] == 3
    assert card["recipe"]["seed"] == 3 and card["recipe"]["batch_size"] == 64
    data = card["training_data"]
    assert data["patches"] == store and data["n_train"] == 1024 and data["n_val"] == 256
    assert sorted(data["training_subjects"] + data["validation_subjects"]) == sorted(prov["patch_store"]["subjects"])
    fin = prov["final_metrics"]
    assert card["validation"]["val_rmse"] == fin["val_rmse"] and card["validation"]["epoch"] == 3
    assert card["validation"]["val_r_af"] == fin["val_r_af"] and card["calibration"] is None
    assert card["precision"]["weights"] == "float32" and card["precision"]["training"] == prov["numerics"]
    assert card["citation"]["imported_matlab_network"] is False
    r = CliRunner().invoke(main, ["info", reference["model"], "--card"])
    assert r.exit_code == 0 and "## Training data" in r.output and "- n_train: 1024" in r.output
    assert "- validation_subjects: " in r.output and "Adult C57BL/6" in r.output


def test_resume_after_sigkill_equals_uninterrupted_run(store, reference, tmp_path):
    out = str(tmp_path / "run")
    p = subprocess.run(cli_args(store, out), env=env(MRHSCALE_DEBUG_KILL_AFTER_EPOCH=2),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert not os.path.exists(os.path.join(out, "model.pt"))
    ck = torch.load(os.path.join(out, "checkpoints", "last.pt"), weights_only=True)
    assert (ck["epoch"], ck["step"]) == (2, 0)
    res = train(store, out, resume=True, quiet=True, threads=1)
    assert [h["epoch"] for h in res["history"]] == [1, 2, 3]
    assert_same_weights(weights(res["model"]), weights(reference["model"]))
    for a, b in zip(res["history"], reference["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)


@pytest.mark.slow  # 8 s: SIGTERM in process below, a real kill and exact resume above
def test_sigterm_mid_epoch_checkpoints_and_resume_is_exact(store, reference, tmp_path):
    out = str(tmp_path / "run")
    p = subprocess.Popen(cli_args(store, out), env=env(MRHSCALE_DEBUG_STEP_DELAY=0.05),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 90
        while not os.path.exists(os.path.join(out, "metrics.csv")) and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # into epoch 2 (16 steps of >= 0.05 s)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 143, err
    assert "--resume" in err and "Traceback" not in err
    ck = torch.load(os.path.join(out, "checkpoints", "last.pt"), weights_only=True)
    assert ck["epoch"] in (1, 2) and 0 < ck["step"] < 16  # stopped mid-epoch (2, or 3 if slow)
    r = CliRunner().invoke(main, ["train", store, "--out", out, "--resume", "--threads", "1", "-q"])
    assert r.exit_code == 0, r.output
    assert_same_weights(weights(os.path.join(out, "model.pt")), weights(reference["model"]))
    hist = json.load(open(os.path.join(out, "metrics.json")))["epochs"]
    for a, b in zip(hist, reference["history"], strict=True):  # the interrupted epoch included
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)


def test_sigterm_in_process_raises_after_checkpoint(store, tmp_path, monkeypatch):
    monkeypatch.setenv("MRHSCALE_DEBUG_STEP_DELAY", "0.001")
    import threading

    threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
    with pytest.raises(TrainingInterrupted) as e:
        train(store, tmp_path / "run", depth=1, epochs=50, batch_size=64, quiet=True)
    assert os.path.exists(e.value.checkpoint)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored


def test_torchrun_two_processes_gloo(store, tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--no-python", *cli_args(store, out)]
    p = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    hist = json.load(open(os.path.join(out, "metrics.json")))
    rows = hist["epochs"]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]  # the loss falls
    assert rows[0]["steps"] == 1024 // 2 // 32  # global batch 64 = 2 ranks x 32
    assert hist["summary"]["world_size"] == 2
    assert hist["summary"]["replica_max_abs_diff"] == 0.0  # identical parameters on both ranks
    meta = load_model(os.path.join(out, "model.pt"))[1]
    assert meta["provenance"]["world_size"] == 2 and meta["provenance"]["replica_max_abs_diff"] == 0


@pytest.fixture(scope="module")
def nf_store(tmp_path_factory):
    """A second stain with its own (different) normalisation statistics."""
    return make_patch_store(tmp_path_factory.mktemp("nf") / "nf.zarr", n_train=512, n_val=128,
                            seed=7, target="nf")


def test_finetune_frozen_backbone_changes_only_head(reference, nf_store, tmp_path):
    base = weights(reference["model"])
    res = finetune(reference["model"], nf_store, tmp_path / "ft", epochs=2, batch_size=64,
                   freeze_backbone=True, quiet=True)
    new = weights(res["model"])
    for k in base:
        if k.startswith("heads."):
            assert not torch.equal(base[k], new[k]), k
        else:
            assert torch.equal(base[k], new[k]), k
    b, m = read_bundle(reference["model"]), read_bundle(res["model"])
    s = Normalisation.from_dict(zarr.open_group(nf_store, mode="r").attrs["norm"])
    # inputs keep the MODEL's normalisation, the target takes the new stain's scaling
    assert m["norm"]["offset"] == b["norm"]["offset"] and m["norm"]["scale"] == b["norm"]["scale"]
    assert m["norm"]["target_scale"] == s.target_scale != b["norm"]["target_scale"]
    assert m["target"] == "nf" and m["provenance"]["base_model"]["target"] == "af"
    assert res["config"]["lr"] == 1e-4 and res["config"]["head_lr_factor"] == 10
    card = m["card"]  # the finetuned bundle's model card names its base and the new stain's data
    assert card["model"]["kind"] == "finetuned with mrhscale finetune" and card["stains"] == ["nf"]
    assert card["model"]["base_model"] == {"path": reference["model"], "stains": ["af"]}
    assert card["recipe"]["lr"] == 1e-4 and card["recipe"]["freeze_backbone"] is True
    assert card["training_data"]["patches"] == nf_store and card["validation"]["val_patches"] == 128


def test_finetune_full_changes_backbone(reference, nf_store, tmp_path):
    res = finetune(reference["model"], nf_store, tmp_path / "ft", epochs=1, batch_size=64,
                   quiet=True)
    base, new = weights(reference["model"]), weights(res["model"])
    assert not torch.equal(base["conv1.weight"], new["conv1.weight"])


class NoNormStream(StandInPatchStream):
    """A stream without a norm override parameter: the trainer must correct affinely."""

    def __init__(self, url, split="train", batch_size=128, shuffle=True, *, seed=0, rank=None,
                 world_size=None, drop_last=True, options=None, ctx=None):
        super().__init__(url, split, batch_size, shuffle, seed=seed, rank=rank, world_size=world_size,
                         drop_last=drop_last)


def test_model_normalisation_applied_with_or_without_stream_override(reference, nf_store,
                                                                     monkeypatch):
    from mrhscale.training import TrainConfig

    store_norm = Normalisation.from_dict(zarr.open_group(nf_store, mode="r").attrs["norm"])
    model_norm = Normalisation("percentile", [o + 3.0 for o in store_norm.offset],  # another model's
                               [v * 1.5 for v in store_norm.scale], 0.0, store_norm.target_scale)
    cfg = TrainConfig(patches=nf_store, seed=0)
    dev = torch.device("cpu")
    raw = zarr.open_group(nf_store, mode="r")["val/inputs"][...]
    want = torch.from_numpy(model_norm.apply_inputs(raw, channel_axis=1))
    assert store_norm.offset != model_norm.offset  # so a missing correction would show
    real = "mrhscale.training.stream:PatchStream" if HAVE_STREAM else "helpers:StandInPatchStream"
    for cls in (real, "helpers:StandInPatchStream", "test_train:NoNormStream"):
        monkeypatch.setenv("MRHSCALE_STREAM", cls)
        data = open_data(cfg, Runtime(), "val", 512, dev, norm=model_norm)
        # a stream taking a norm= override gets it; otherwise the trainer corrects affinely
        stream = getattr(data.stream, "stream", data.stream)  # resident (training/cache.py): its stream
        assert (data.a is None) == ("norm" in inspect.signature(stream.__class__).parameters)
        got = torch.cat([x for x, _ in data.batches(0)])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_dataloader_workers_and_extending_a_finished_run(store, reference, tmp_path):
    import shutil

    # cache off: the patches stream through a real DataLoader worker process (auto would hold them resident)
    res = train(store, tmp_path / "w", depth=0, epochs=1, batch_size=64, loader_workers=1, cache="off", quiet=True)
    assert res["history"][0]["steps"] == 16 and np.isfinite(res["history"][0]["train_loss"])
    out = str(tmp_path / "more")
    shutil.copytree(reference["out_dir"], out)
    res = train(store, out, resume=True, epochs=4, quiet=True, threads=1)
    assert [h["epoch"] for h in res["history"]] == [1, 2, 3, 4]
    assert res["history"][:3] == reference["history"]


def test_cli_finetune_frozen(reference, nf_store, tmp_path):
    out = str(tmp_path / "ft")
    r = CliRunner().invoke(main, ["finetune", reference["model"], nf_store, "--out", out,
                                  "--epochs", "1", "--batch-size", "64", "--freeze-backbone"])
    assert r.exit_code == 0, r.output
    meta = load_model(os.path.join(out, "model.pt"))[1]
    assert meta["target"] == "nf" and meta["provenance"]["config"]["freeze_backbone"] is True


# ------------------------------------------------------------------ bad inputs


def test_missing_and_incomplete_store(tmp_path):
    with pytest.raises(MRHError, match="does not exist"):
        train(tmp_path / "nope.zarr", tmp_path / "run", quiet=True)
    bad = make_patch_store(tmp_path / "half.zarr", n_train=64, n_val=0, complete=False)
    with pytest.raises(MRHError, match="incomplete"):
        train(bad, tmp_path / "run", quiet=True)


def test_mismatched_channels_and_patch(reference, tmp_path):
    four = make_patch_store(tmp_path / "four.zarr", n_train=64, n_val=0, n_channels=4)
    with pytest.raises(MRHError, match="channels do not match"):
        finetune(reference["model"], four, tmp_path / "ft", quiet=True)
    five = make_patch_store(tmp_path / "five.zarr", n_train=64, n_val=0, half=2)
    with pytest.raises(MRHError, match="patch half=2"):
        finetune(reference["model"], five, tmp_path / "ft2", quiet=True)


@pytest.mark.parametrize("opts,match", [
    (dict(epochs=0), "--epochs"), (dict(lr=-1.0), "--lr"), (dict(loss="l1"), "--loss"),
    (dict(optimizer="adam"), "--optimizer"), (dict(schedule="step"), "--schedule"),
    (dict(clip=-1.0), "--clip"), (dict(batch_size=0), "--batch-size"),
    (dict(loader_workers=-1), "--loader-workers"),
])
def test_bad_option_values(store, tmp_path, opts, match):
    with pytest.raises(MRHError, match=match):
        train(store, tmp_path / "run", quiet=True, **opts)


def test_resume_without_checkpoint_and_occupied_run_dir(store, reference, tmp_path):
    with pytest.raises(MRHError, match="no checkpoint"):
        train(store, tmp_path / "fresh", resume=True, quiet=True)
    with pytest.raises(MRHError, match="already holds a training run"):
        train(store, reference["out_dir"], quiet=True)
    with pytest.raises(MRHError, match="differs from the checkpointed run"):
        train(store, reference["out_dir"], resume=True, lr=0.5, quiet=True)


@pytest.mark.parametrize("args,msg", [
    (["train", "{tmp}/nope.zarr", "--out", "{tmp}/r"], "does not exist"),
    (["train", "{store}", "--out", "{tmp}/r", "--resume"], "no checkpoint"),
    (["train", "{store}", "--out", "{tmp}/r", "--epochs", "0"], "--epochs"),
    (["finetune", "{tmp}/none.pt", "{store}", "--out", "{tmp}/f"], "not found"),
])
def test_cli_errors_are_one_line(store, tmp_path, args, msg):
    args = [a.format(tmp=tmp_path, store=store) for a in args]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0] and "Traceback" not in r.output
