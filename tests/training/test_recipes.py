"""Training recipes: named presets under explicit options, recorded with the run, and the
validation subset that keeps per-epoch validation cheap."""

import json
import os
from dataclasses import asdict

import pytest
from click.testing import CliRunner
from helpers import make_patch_store

from mrhscale.cli import main
from mrhscale.io.bundle import read_bundle
from mrhscale.training import TrainConfig, train
from mrhscale.training.api import split_options
from mrhscale.training.config import RECIPES

TINY = ["--depth", "1", "--epochs", "1", "--batch-size", "64", "--threads", "1", "-q"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_patch_store(tmp_path_factory.mktemp("p") / "patches.zarr", n_train=256, n_val=128)


def cfg_of(kind, store, **options):
    return split_options(kind, store, options, None)[0]


def test_paper_recipe_is_the_default_config():
    plain = asdict(TrainConfig())
    assert plain["recipe"] == "paper"
    assert {k: plain[k] for k in RECIPES["paper"]} == RECIPES["paper"]
    assert all(set(r) == set(RECIPES["paper"]) for r in RECIPES.values())  # every recipe sets the same fields
    assert (plain["norm"], plain["augment"]) == ("global", "")  # the paper: global statistics, nothing added


def test_default_recipe_is_adamw_cosine_flips_on_each_brains_own_range_at_the_papers_budget(store):
    cfg = cfg_of("train", store)
    assert (cfg.recipe, cfg.norm, cfg.optimizer, cfg.schedule, cfg.clip, cfg.augment) == (
        "robust", "subject-percentile", "adamw", "cosine", 0.0, "flip")
    same = ("batch_size", "epochs", "loss", "init", "weight_decay")  # the paper's budget and loss
    assert {k: RECIPES["robust"][k] for k in same} == {k: RECIPES["paper"][k] for k in same}
    assert cfg_of("train", store, recipe="paper").norm == "global"


def test_recipe_values_apply_and_explicit_options_override(store):
    fast = RECIPES["fast"]
    cfg = cfg_of("train", store, recipe="fast")
    assert {k: getattr(cfg, k) for k in fast} == fast and cfg.recipe == "fast"
    cfg = cfg_of("train", store, recipe="fast", epochs=1, batch_size=64, lr=None)
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.optimizer) == (1, 64, fast["lr"], "adamw")
    assert cfg_of("train", store).lr == 2e-3 and cfg_of("train", store).recipe == "robust"
    assert cfg_of("train", store, recipe="paper").lr == 0.1


def test_other_optimiser_without_lr_takes_its_own_lr(store):
    assert cfg_of("train", store, recipe="paper", optimizer="adamw").lr == 1e-3
    assert cfg_of("train", store, optimizer="sgd").lr == 0.1  # robust's adamw lr means nothing to sgd
    assert cfg_of("train", store, recipe="fast", optimizer="sgd").lr == 0.1
    assert cfg_of("train", store, recipe="fast", optimizer="sgd", lr=0.05).lr == 0.05
    ft = cfg_of("finetune", store, recipe="fast")  # transfer learning keeps its lr and head factor
    assert (ft.lr, ft.head_lr_factor, ft.optimizer) == (1e-4, 10.0, "adamw")


def test_unknown_recipe_is_one_line_exit_2(store, tmp_path):
    r = CliRunner().invoke(main, ["train", store, "--out", str(tmp_path / "r"), "--recipe", "turbo", *TINY])
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == ["mrhscale: error: --recipe 'turbo': choose one of paper, robust, fast"]
    assert not os.path.exists(tmp_path / "r" / "config.json")
    r = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "d"), "--recipe", "turbo", "-q"])
    assert r.exit_code == 2 and "--recipe 'turbo'" in r.output
    assert not os.path.exists(tmp_path / "d" / "cohort")  # refused before any stage ran


def test_recipe_recorded_in_config_and_bundle_and_kept_on_resume(store, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", store, "--out", str(out), "--recipe", "fast", *TINY])
    assert r.exit_code == 0, r.output
    saved = json.load(open(out / "config.json"))
    assert (saved["recipe"], saved["optimizer"], saved["schedule"]) == ("fast", "adamw", "cosine")
    assert (saved["epochs"], saved["batch_size"]) == (1, 64)  # explicit beats the recipe
    prov = read_bundle(out / "model.pt")["provenance"]
    assert prov["config"]["recipe"] == "fast" and prov["config"]["lr"] == RECIPES["fast"]["lr"]
    r = CliRunner().invoke(main, ["train", store, "--out", str(out), "--resume", "--epochs", "2",
                                  "--recipe", "paper", "-q"])
    assert r.exit_code == 2 and "recipe='paper' differs" in r.output


def test_validation_subset_per_epoch_whole_split_last(store, tmp_path):
    res = train(store, tmp_path / "run", depth=1, epochs=2, batch_size=64, val_patches=50,
                threads=1, quiet=True)
    assert [h["val_patches"] for h in res["history"]] == [50, 128]
    assert res["final"]["val_patches"] == 128
