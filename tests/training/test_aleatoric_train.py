"""train --aleatoric through the real loop: the map's weights are exactly those of the same
run without the head, the head is in the bundle, and an ensemble's calibration records its
conformal fit and its value bins."""

import pytest
import torch
from click.testing import CliRunner
from helpers import make_patch_store

from mrhscale.cli import main
from mrhscale.io.bundle import read_bundle
from mrhscale.training import train

SMALL = dict(depth=1, width=8, epochs=2, batch_size=64, threads=1, quiet=True, seed=3)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_patch_store(tmp_path_factory.mktemp("p") / "patches.zarr", n_train=512, n_val=512)


def test_the_head_leaves_the_map_exactly_as_without_it(store, tmp_path):
    plain = train(store, str(tmp_path / "plain"), **SMALL)
    head = train(store, str(tmp_path / "head"), aleatoric=True, **SMALL)
    a, b = read_bundle(plain.model), read_bundle(head.model)
    assert b["arch"]["aleatoric"] is True and "aleatoric" not in a["arch"]
    assert any(k.startswith("scales.") for k in b["state_dict"])
    for key, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], v, rtol=0, atol=1e-6)
    assert head.final["val_r"] == pytest.approx(plain.final["val_r"], abs=1e-6)


def test_an_aleatoric_ensemble_records_its_conformal_calibration(store, tmp_path):
    res = train(store, str(tmp_path / "ens"), members=2, aleatoric=True, **SMALL)
    cal = read_bundle(res.model)["uncertainty"]["calibration"]["stains"]["af"]
    assert cal["alpha"] == 0.05 and cal["n"] == 512 and "ceil((n+1)(1-alpha))/n" in cal["method"]
    assert cal["quantile_level"] == pytest.approx(488 / 512)  # the ceil(513 x 0.95) = 488th of 512 scores
    g = cal["groups"]
    assert g["by"] == "value" and len(g["factor"]) == 4 and sum(g["n"]) == 512
    assert cal["coverage_after"] >= 0.94


def test_tissue_groups_without_whole_brains_is_one_line(store, tmp_path):
    r = CliRunner().invoke(main, ["train", store, "--out", str(tmp_path / "z"), "--members", "2",
                                  "--calibration-groups", "wm,lesion", "-q"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "--calibration-subjects" in r.output
    assert "Traceback" not in r.output
