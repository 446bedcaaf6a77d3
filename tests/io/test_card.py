"""Model cards (io/card.py): stored in every bundle written, made on demand for a bundle
written before cards, and printed by `mrhscale info MODEL --card [--json]`."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner
from helpers import write_ensemble, write_model
from matlab_helpers import random_model

from mrhscale.cli import main
from mrhscale.io.bundle import describe_bundle, load_model, predictor_from_bundle, read_bundle
from mrhscale.io.card import ELIFE, card_markdown, card_of, model_card
from mrhscale.io.matlab import save_layer_graph_mat
from mrhscale.nn.matlab import mrhnet_to_layer_graph
from mrhscale.stages.import_matlab import import_matlab


def _info(*args):
    r = CliRunner().invoke(main, ["info", *map(str, args)])
    return r.exit_code, r.output


def _imported(tmp_path, **kw):
    mat = save_layer_graph_mat(mrhnet_to_layer_graph(random_model(in_channels=3, depth=1, width=4)),
                               tmp_path / "net_5layer_MBP.mat")
    import_matlab(mat, tmp_path / "mbp.pt", channels="t2,mt_off,mt_on", target_max=180.0, **kw)
    return tmp_path / "mbp.pt"


def test_every_written_bundle_carries_its_card(tmp_path):
    p = write_model(tmp_path / "m.pt", ["t2", "mt_off", "mt_on"], target="nf")
    b = read_bundle(p)
    assert b["card"] == model_card(b) and card_of(b) is b["card"]
    card = b["card"]
    assert card["format"] == "mrhscale-model-card" and card["stains"] == ["nf"]
    assert card["inputs"]["channels"] == ["t2", "mt_off", "mt_on"] and card["inputs"]["patch"]["size"] == 3
    assert card["model"]["architecture"]["parameters_per_network"] == sum(v.numel() for v in b["state_dict"].values())
    assert card["normalisation"]["input"]["mode"] == "percentile"
    assert card["normalisation"]["output"]["nf"]["scale"] == 60.0 and card["precision"]["weights"] == "float32"
    assert card["recipe"] is None and card["validation"] is None and card["calibration"] is None  # not recorded
    assert "card" not in load_model(p)[1]  # the metadata stages use is unchanged


def test_card_of_an_imported_matlab_net(tmp_path):
    card = read_bundle(_imported(tmp_path))["card"]
    assert card["model"]["kind"] == "imported from the original MRH-Net (MATLAB) release"
    assert card["model"]["source"]["file"] == "net_5layer_MBP.mat" and len(card["model"]["source"]["sha256"]) == 64
    assert card["citation"]["original"] == ELIFE and card["citation"]["imported_matlab_network"] is True
    assert card["citation"]["note"].startswith("Imported MATLAB network: the weights are the original")
    assert "eLife 2022;11:e72331" in ELIFE
    inp = card["normalisation"]["input"]
    assert inp["mode"] == "subject-max" and inp["per_subject"] and "data./max(data(:))" in inp["formula"]
    assert card["normalisation"]["output"]["mbp"]["formula"] == "mbp = output x 180 + 0"
    assert card["recipe"]["recorded"] is False and card["training_data"]["recorded"] is False
    limits = " ".join(card["limits"])
    assert "Same MRI protocol" in limits and "Adult C57BL/6" in limits and "Not for clinical use" in limits
    md = card_markdown(card)
    assert md.startswith("# Model card: MRH-Net virtual mbp\n")
    assert "\n> Imported MATLAB network: " in md and "eLife 2022;11:e72331" in md
    assert "## Intended use" in md and "## Limits" in md and "- Not for clinical use" in md


def test_info_card_prints_markdown_and_json(tmp_path):
    p = _imported(tmp_path, input_scale="global-max=4095")
    code, md = _info(p, "--card")
    assert code == 0 and md == card_markdown(read_bundle(p)["card"])
    assert "x' = x / 4095 for every contrast" in md and "## Validation\n\nNot recorded in the bundle." in md
    code, out = _info(p, "--card", "--json")
    assert code == 0 and json.loads(out) == read_bundle(p)["card"]


def test_info_card_refusals_are_one_line(tmp_path):
    p = write_model(tmp_path / "m.pt", ["a", "b"])
    for args, words in (([p, "--json"], "--json: give it with --card"),
                        ([tmp_path, "--card"], "is not a model bundle file")):
        code, out = _info(*args)
        assert code == 2 and out.startswith("mrhscale: error:") and out.count("\n") == 1 and words in out, out


def test_a_bundle_written_before_cards_loads_and_gets_one(tmp_path):
    new = write_model(tmp_path / "new.pt", ["a", "b", "c"])
    b = read_bundle(new)
    b.pop("card")
    torch.save(b, tmp_path / "old.pt")  # exactly what write_bundle wrote before cards
    old = read_bundle(tmp_path / "old.pt")
    assert "card" not in old and card_of(old) == read_bundle(new)["card"]
    m_old, m_new = load_model(tmp_path / "old.pt")[0], load_model(new)[0]
    x = torch.randn(2, 3, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(m_old(x), m_new(x), rtol=0, atol=0)
        torch.testing.assert_close(predictor_from_bundle(old)(x), m_new(x), rtol=0, atol=0)
    code, md = _info(tmp_path / "old.pt", "--card")
    assert code == 0 and "## Limits" in md and "percentile" in md
    assert "stains         af" in describe_bundle(tmp_path / "old.pt")


def test_an_ensemble_card_has_each_stains_calibration(tmp_path):
    path, _ = write_ensemble(tmp_path / "ens.pt", ["a", "b", "c"], members=3, factor=1.5)
    card = read_bundle(path)["card"]
    assert card["model"]["architecture"]["members"] == 3 and "deep ensemble of 3" in card["model"]["kind"]
    assert card["calibration"] == {"af": {"factor": 1.5, "fitted_on": "val", "n": 100}}
    assert "## Calibration of the uncertainty\n\n- af:\n  - factor: 1.5" in card_markdown(card)
