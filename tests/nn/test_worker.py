"""nn.worker: the network a task gets (cached per process, in the planned numerics), what
prepare reports, and the forward pass over a block's patches."""

import numpy as np
import torch
from helpers import write_model

from mrhscale.io.bundle import load_model
from mrhscale.nn import accel
from mrhscale.nn import worker as W
from mrhscale.options import Numerics


def test_the_network_loads_once_per_process_and_spec(tmp_path):
    mp = write_model(tmp_path / "m.pt", ["a", "b", "c"])
    spec = W.NetworkSpec(mp, load_model, batch_size=64)
    before = W.load_count()
    first = W.network(spec)
    assert W.network(W.NetworkSpec(mp, load_model, batch_size=128)) is first  # eager: one network for any batch
    assert W.load_count() == before + 1 and first.accel.eager_fp32
    assert spec.planned(accel.Acceleration("bf16", False)).accel == accel.Acceleration("bf16", False)


def test_prepare_plans_on_the_worker_only_when_asked(tmp_path, monkeypatch):
    mp = write_model(tmp_path / "m.pt", ["a", "b", "c"])
    monkeypatch.setattr(accel, "cpu_bf16_units", lambda: None)
    monkeypatch.setattr(accel, "compiler_missing", lambda kind: "no C++ compiler (test)")
    got = W.prepare(W.NetworkSpec(mp, load_model), Numerics("auto", "auto"), patches=10)
    assert got["device"] and got["planned"]["precision"] == "fp32" and not got["used"]["compile"]
    assert "no bf16 matrix units" in got["planned"]["why"]
    given = W.prepare(W.NetworkSpec(mp, load_model, precision="bf16"))
    assert given["planned"] == {"precision": "bf16", "compile": False, "why": ""} == given["used"]


def test_forward_gives_centres_or_whole_outputs_in_batches(tmp_path):
    mp = write_model(tmp_path / "m.pt", ["a", "b", "c"])
    net, _ = load_model(mp)
    x = np.random.default_rng(0).random((10, 3, 3, 3)).astype(np.float32)
    centres = (np.arange(10), np.zeros(10, int), np.zeros(10, int))
    model = W.network(W.NetworkSpec(mp, load_model))
    whole = W.forward(model, lambda s, r, q: x[s], centres, batch_size=4, half=1, centre=False)
    centre = W.forward(model, lambda s, r, q: x[s], centres, batch_size=3, half=1, centre=True)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    assert whole.shape == (10, 1, 3, 3) and centre.shape == (10, 1)
    np.testing.assert_allclose(whole, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(centre, ref[:, :, 1, 1], rtol=1e-5, atol=1e-6)
