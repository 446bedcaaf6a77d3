"""mrhscale.stages.importance: permutation importance ranks what the target truly depends on."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from helpers import known_model, make_patch_store, tiny_store

from mrhscale.errors import MRHError
from mrhscale.io.bundle import save_bundle
from mrhscale.nn.model import MRHNet
from mrhscale.ops.norm import Normalisation
from mrhscale.parallel.context import Context
from mrhscale.stages.importance import channel_groups, contrast_group, importance


def test_groups_from_names():
    names = ["dwi2000_b0_0", "dwi2000_dir07", "dwi5000_3", "t2", "mt_off", "mt_on", "c00", "foo_12"]
    assert [contrast_group(n) for n in names] == ["dwi2000", "dwi2000", "dwi5000", "t2", "mt", "mt",
                                                  "c00", "foo"]
    assert channel_groups(names)["mt"] == [4, 5]
    assert channel_groups(["a", "b"], ["g", "g"]) == {"g": [0, 1]}


def test_ranks_true_dependence_first_with_constructed_weights(tmp_path):
    store = tiny_store(tmp_path / "p.zarr", channels=("c", "b", "a"))  # store order differs
    model = known_model(tmp_path / "m.pt")
    out = str(tmp_path / "imp")
    res = importance(model, store, out, repeats=2, ctx=Context(quiet=True))
    ch = {r["name"]: r for r in res["channels"]}
    assert res["channels"][0]["name"] == "a"
    # b enters the model but not the target: shuffling it only reshuffles an error of the
    # same size (about 0 on average); c is not used at all (exactly 0)
    assert abs(ch["b"]["increase"]) < 0.05 * ch["a"]["increase"]
    assert ch["c"]["increase"] == pytest.approx(0, abs=1e-9)
    assert res["baseline_mse"] > 0
    assert {"importance.json", "importance.csv", "importance.png", "report.html"} <= set(os.listdir(out))
    saved = json.load(open(os.path.join(out, "importance.json")))
    assert saved["groups"][0]["name"] == "a"


def test_ranks_true_dependence_after_training(tmp_path):
    """A trained model: the helper store's target uses channels 0-2, not 3-4."""
    store = make_patch_store(tmp_path / "p.zarr", n_train=1024, n_val=512, n_channels=5, seed=1)
    root = zarr.open_group(store, mode="r")
    norm = Normalisation.from_dict(root.attrs["norm"])
    x = torch.from_numpy(norm.apply_inputs(root["train/inputs"][...], channel_axis=1))
    t = torch.from_numpy(norm.apply_target(root["train/targets"][...]).astype(np.float32))
    torch.manual_seed(0)
    m = MRHNet(5, depth=1, width=16, stains=["af"])
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for _step in range(300):
        j = torch.randint(0, len(x), (128,))
        loss = ((m(x[j]) - t[j]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path / "m.pt"
    save_bundle(path, m, channels=list(root.attrs["channels"]), norm=norm,
                patch=dict(root.attrs["patch"]))
    res = importance(str(path), store, str(tmp_path / "imp"), repeats=2, ctx=Context(quiet=True))
    ch = {r["name"]: r["increase"] for r in res["channels"]}
    names = list(root.attrs["channels"])
    assert ch[names[0]] > 5 * max(ch[names[3]], ch[names[4]])
    assert min(ch[names[0]], ch[names[1]], ch[names[2]]) > max(ch[names[3]], ch[names[4]])


def test_bad_input(tmp_path):
    store = tiny_store(tmp_path / "p.zarr", channels=("a", "b"))
    model = known_model(tmp_path / "m.pt")
    with pytest.raises(MRHError, match="channels the store does not have: c"):
        importance(model, store, str(tmp_path / "o"), ctx=Context(quiet=True))
    store3 = tiny_store(tmp_path / "p3.zarr")
    with pytest.raises(MRHError, match="no split 'test'"):
        importance(model, store3, str(tmp_path / "o"), split="test", ctx=Context(quiet=True))
    zarr.open_group(store3, mode="a").attrs["complete"] = False
    with pytest.raises(MRHError, match="incomplete"):
        importance(model, store3, str(tmp_path / "o"), ctx=Context(quiet=True))
    runner = CliRunner()
    from mrhscale.cli import main

    r = runner.invoke(main, ["importance", model, store, "--out", str(tmp_path / "o"), "-q"])
    assert r.exit_code == 2 and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    good = tiny_store(tmp_path / "p4.zarr")
    r = runner.invoke(main, ["importance", model, good, "--out", str(tmp_path / "o"), "-q",
                             "--repeats", "1", "--max-patches", "100"])
    assert r.exit_code == 0, r.output
    assert "baseline MSE" in r.output
