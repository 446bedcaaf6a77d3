"""Training numerics (mrhscale.training.accel): the candidates a request allows, the
measured and cached choice, compiled training against eager, exact resume per mode."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import make_patch_store

from mrhscale.errors import MRHError
from mrhscale.io.bundle import read_bundle
from mrhscale.nn import accel as NA
from mrhscale.nn.accel import Acceleration
from mrhscale.nn.model import MRHNet
from mrhscale.training import accel as TA
from mrhscale.training import train

CPU = torch.device("cpu")
RUN = dict(depth=1, width=16, batch_size=64, seed=3, threads=1, quiet=True)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_patch_store(tmp_path_factory.mktemp("p") / "patches.zarr", n_train=1024, n_val=256)


def modes(options):
    return [(o.precision, o.compile) for o in options]


def test_candidates_follow_request_units_and_compiler(monkeypatch):
    monkeypatch.setattr(TA, "bf16_units", lambda dev: "avx512_bf16")
    monkeypatch.setattr(NA, "compiler_missing", lambda kind: None)
    assert modes(TA.candidates("auto", "auto", CPU)) == [("fp32", False), ("fp32", True),
                                                          ("bf16", False), ("bf16", True)]
    assert modes(TA.candidates("fp32", "auto", CPU)) == [("fp32", False), ("fp32", True)]
    assert modes(TA.candidates("auto", "off", CPU)) == [("fp32", False), ("bf16", False)]
    # a GPU with bf16 tensor cores: bf16 compiled, nothing to measure
    assert modes(TA.candidates("auto", "auto", torch.device("cuda"))) == [("bf16", True)]
    monkeypatch.setattr(TA, "bf16_units", lambda dev: None)
    monkeypatch.setattr(NA, "compiler_missing", lambda kind: "no C++ compiler (test)")
    assert modes(TA.candidates("auto", "auto", CPU)) == [("fp32", False)]
    with pytest.raises(MRHError, match="--compile on: no C\\+\\+ compiler"):
        TA.candidates("auto", "on", CPU)


def test_fastest_keeps_eager_fp32_unless_clearly_beaten():
    e, c, b = Acceleration("fp32", False), Acceleration("fp32", True), Acceleration("bf16", True)
    assert TA.fastest({e: 100.0, c: 104.0}).eager_fp32  # within 5%: the reference numerics
    best = TA.fastest({e: 100.0, c: 104.0, b: 140.0})
    assert (best.precision, best.compile) == ("bf16", True) and "bf16 compiled 140" in best.why


def test_choice_is_measured_once_then_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("MRHSCALE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(TA, "bf16_units", lambda dev: "avx512_bf16")
    monkeypatch.setattr(NA, "compiler_missing", lambda kind: None)
    calls = []

    def fake_measure(mode, *a):
        calls.append(mode.label)
        return {"fp32 eager": 100.0, "fp32 compiled": 90.0, "bf16 eager": 80.0, "bf16 compiled": 150.0}[mode.label]

    monkeypatch.setattr(TA, "measure", fake_measure)
    net = MRHNet(5, depth=1, width=8)
    args = (("auto", "auto"), CPU, net, lambda m: torch.optim.SGD(m.parameters(), 0.1), None, (64, 5, 3, 3))
    first = TA.choose(*args, describe=("sgd",))
    assert (first.precision, first.compile) == ("bf16", True) and len(calls) == 4
    again = TA.choose(*args, describe=("sgd",))
    assert (again.precision, again.compile) == ("bf16", True) and again.why.startswith("cached")
    assert len(calls) == 4  # not measured again
    table = json.load(open(tmp_path / "training-modes.json"))
    assert list(table.values())[0]["rates"]["bf16 compiled"] == 150.0
    TA.choose(*args[:5], (128, 5, 3, 3), describe=("sgd",))  # another batch shape: measured
    assert len(calls) == 8
    # a narrower request (the demo's --compile off) picks from the cached rates: fp32 eager 100 > bf16 eager 80
    off = TA.choose(("auto", "off"), *args[1:], describe=("sgd",))
    assert (off.precision, off.compile) == ("fp32", False) and off.why.startswith("cached") and len(calls) == 8
    # ... and what it measures itself does not answer a wider request later: auto measures compiling too
    narrow = TA.choose(("auto", "off"), *args[1:], describe=("adamw",))
    assert (narrow.precision, narrow.compile) == ("fp32", False) and len(calls) == 10
    wide = TA.choose(*args, describe=("adamw",))
    assert (wide.precision, wide.compile) == ("bf16", True) and len(calls) == 14


def test_measure_times_a_real_mode():
    net = MRHNet(5, depth=1, width=8)
    rate = TA.measure(Acceleration("fp32", False), CPU, net, lambda m: torch.optim.SGD(m.parameters(), 0.1),
                      lambda p, t: (p - t).square().mean(), (32, 5, 3, 3))
    assert rate > 100  # patches/s


def test_resume_keeps_the_checkpointed_numerics():
    rec = {"precision": "bf16", "compile": True, "why": "measured"}
    kept = TA.from_checkpoint(rec, ("auto", "auto"))
    assert (kept.precision, kept.compile) == ("bf16", True)
    assert TA.from_checkpoint(rec, ("bf16", "on")) is not None
    assert TA.from_checkpoint(rec, ("fp32", "auto")) is None  # asked otherwise: honoured
    assert TA.requested("fp32", None)[0] == "fp32"  # --no-amp is now --precision fp32 (cli: a renamed option)


def test_compiled_training_follows_eager(store, tmp_path):
    """Same seed and data: compiled fp32 gives eager's loss curve; bf16 compiled a close one."""
    runs = {}
    for precision, comp in (("fp32", "off"), ("fp32", "on"), ("bf16", "on")):
        res = train(store, str(tmp_path / f"{precision}-{comp}"), epochs=3, precision=precision,
                    compile=comp, **RUN)
        runs[(precision, comp)] = res
        assert read_bundle(res["model"])["provenance"]["numerics"]["compile"] == (comp == "on")
    ref = [h["train_loss"] for h in runs[("fp32", "off")]["history"]]
    assert ref[-1] < ref[0]
    for key, rel in ((("fp32", "on"), 1e-3), (("bf16", "on"), 0.05)):
        got = [h["train_loss"] for h in runs[key]["history"]]
        assert got == pytest.approx(ref, rel=rel), key
    assert runs[("bf16", "on")]["history"][-1]["val_r"] == pytest.approx(
        runs[("fp32", "off")]["history"][-1]["val_r"], abs=0.02)
    sd = read_bundle(runs[("bf16", "on")]["model"])["state_dict"]
    assert all(v.dtype == torch.float32 for v in sd.values())  # bundles stay plain fp32


def test_resume_is_exact_in_compiled_bf16(store, tmp_path, monkeypatch):
    """Run 2 epochs, extend to 3 with --resume (auto keeps the checkpoint's mode): the same
    weights as 3 epochs straight (the paper recipe's lr does not depend on the epoch count)."""
    monkeypatch.setenv(NA.ENV_PRECISION, "auto")
    monkeypatch.setenv(NA.ENV_COMPILE, "auto")
    straight = train(store, str(tmp_path / "straight"), epochs=3, precision="bf16", compile="on", recipe="paper",
                     **RUN)
    out = str(tmp_path / "resumed")
    train(store, out, epochs=2, precision="bf16", compile="on", recipe="paper", **RUN)
    ck = torch.load(os.path.join(out, "checkpoints", "last.pt"), weights_only=True)
    assert ck["numerics"]["precision"] == "bf16" and ck["numerics"]["compile"]
    res = train(store, out, resume=True, epochs=3, quiet=True, threads=1)
    assert read_bundle(res["model"])["provenance"]["numerics"]["why"] == "as the checkpointed run"
    a, b = read_bundle(res["model"])["state_dict"], read_bundle(straight["model"])["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # ~50 s cold (compiles on 2 ranks): DDP in test_train, compiled training and the measured choice above
def test_torchrun_two_gloo_ranks_compile_the_ddp_model(store, tmp_path):
    """DDP wrapped, then compiled (as torch documents); auto measures on every rank and all
    take rank 0's choice; the replicas stay identical."""
    import subprocess
    import sys

    out = str(tmp_path / "ddp")
    mrh = os.path.join(os.path.dirname(sys.executable), "mrhscale")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python",
           mrh, "train", store, "--out", out, "--depth", "1", "--epochs", "2", "--batch-size", "64",
           "--threads", "1", "--precision", "auto", "--compile", "auto", "-q"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MRHSCALE_DIST_TIMEOUT="120",
               MRHSCALE_CACHE_DIR=str(tmp_path / "cache"))
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.load(open(os.path.join(out, "metrics.json")))["summary"]
    assert summary["world_size"] == 2 and summary["replica_max_abs_diff"] == 0.0
    numerics = read_bundle(os.path.join(out, "model.pt"))["provenance"]["numerics"]
    if NA.cpu_bf16_units() and not NA.compiler_missing("cpu"):
        assert numerics["why"].startswith("measured patches/s")  # rank 0 measured, both ranks agree
    table = json.load(open(tmp_path / "cache" / "training-modes.json"))
    assert len(table) == 1
