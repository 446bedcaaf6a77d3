"""mrhscale crossval: folds by held-out subject, in this process, under torchrun (2 gloo ranks)
and as Dask tasks; reruns reuse finished folds; bad input is one line, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from helpers import synth_store

from mrhscale.cli import main
from mrhscale.errors import MRHError
from mrhscale.parallel.context import Context
from mrhscale.stages.crossval import crossval

RECIPE = {"recipe": "fast", "epochs": 1, "depth": 1, "width": 8, "batch_size": 64, "stride": 2}
SYNC = Context(scheduler="synchronous", quiet=True)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return synth_store(tmp_path_factory.mktemp("cv"))


def test_two_folds_in_this_process_then_reused(cohort, tmp_path):
    out = str(tmp_path / "cv")
    res = crossval(cohort, "mbp", out, recipe=RECIPE, ctx=SYNC, threads=1)
    assert sorted(r["subject"] for r in res["rows"]) == ["s01", "s02"]
    assert {r["fold"] for r in res["rows"]} == {"s01", "s02"}  # each held out once
    assert all(-1 <= r["pearson"] <= 1 and r["mae"] > 0 for r in res["rows"])
    assert res["summary"]["pearson"]["sd"] >= 0 and os.path.exists(os.path.join(out, "crossval.png"))
    lines = open(res["table"]).read().splitlines()
    assert lines[0] == "subject,fold,pearson,mae,ssim,rmse" and lines[-2].startswith("mean,")
    plan = json.load(open(os.path.join(out, "plan.json")))
    assert plan["folds"][0]["train"] == ["s02"] and plan["patches"]["val_fraction"] == 0.2
    marker = os.path.join(out, "fold-s01", "result.json")
    mtime = os.path.getmtime(marker)
    again = crossval(cohort, "mbp", out, recipe=RECIPE, ctx=SYNC)
    assert os.path.getmtime(marker) == mtime and again["summary"] == res["summary"]
    with pytest.raises(MRHError, match="another plan"):
        crossval(cohort, "mbp", out, recipe={**RECIPE, "epochs": 2}, ctx=SYNC)


@pytest.mark.slow  # 10 s: torchrun in test_train, crossval's folds in this process below
def test_torchrun_two_gloo_ranks_one_fold_each(cohort, tmp_path):
    out = str(tmp_path / "cv")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("recipe: fast\nepochs: 1\ndepth: 1\nwidth: 8\nbatch_size: 64\nstride: 2\n")
    mrh = os.path.join(os.path.dirname(sys.executable), "mrhscale")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python",
           mrh, "crossval", cohort, "--target", "mbp", "--out", out, "--recipe", str(recipe),
           "--threads", "1", "-q"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MRHSCALE_DIST_TIMEOUT="300")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.load(open(os.path.join(out, "crossval.json")))
    assert sorted(r["subject"] for r in doc["rows"]) == ["s01", "s02"]
    for sid in ("s01", "s02"):  # each fold trained alone, not as one DDP job
        cfg = json.load(open(os.path.join(out, f"fold-{sid}", "run", "config.json")))
        assert cfg["world_size"] == 1


@pytest.mark.slow
def test_folds_side_by_side_on_dask_workers(cohort, tmp_path):
    res = crossval(cohort, "mbp", str(tmp_path / "cv"), recipe=RECIPE, fold_workers=2, ctx=Context(quiet=True))
    assert sorted(r["subject"] for r in res["rows"]) == ["s01", "s02"]


@pytest.mark.parametrize("args,msg", [
    (["--folds", "5"], "--folds 5: expected 2..2"),
    (["--folds", "halves"], "--folds halves: expected leave-one-subject-out"),
    (["--recipe", "nonsense"], "--recipe nonsense: not a named recipe"),
    (["--subjects", "s09"], "subject(s) not in store: s09"),
])
def test_bad_input_is_one_line_exit_2(cohort, tmp_path, args, msg):
    r = CliRunner().invoke(main, ["crossval", cohort, "--target", "mbp", "--out", str(tmp_path / "o"), *args])
    assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, r.output


def test_unknown_recipe_option_and_missing_stain(cohort, tmp_path):
    with pytest.raises(MRHError, match="unknown option\\(s\\) colour"):
        crossval(cohort, "mbp", str(tmp_path / "a"), recipe={"colour": 1})
    with pytest.raises(MRHError, match="at least 2 subjects with stain 'xyz'"):
        crossval(cohort, "xyz", str(tmp_path / "b"))


@pytest.fixture(scope="module")
def tta_norm_ensemble(cohort, tmp_path_factory):
    """One cross-validation whose recipe sets a predict option (tta), a training option (norm)
    and an ensemble (members): the two tests below read what each of them did."""
    out = str(tmp_path_factory.mktemp("cv-recipe") / "cv")
    res = crossval(cohort, "mbp", out, recipe={**RECIPE, "tta": True, "norm": "subject-percentile", "members": 2},
                   folds=2, ctx=SYNC, threads=1)
    return out, res


@pytest.mark.slow  # default-run budget (README: make test <= 6 min on 2 cores); run in .ci/run's slow step
def test_a_recipe_carries_tta_to_predict_and_norm_to_train(tta_norm_ensemble):
    import xarray as xr

    from mrhscale.io.bundle import read_bundle

    out, res = tta_norm_ensemble
    plan = json.load(open(os.path.join(out, "plan.json")))
    assert plan["predict"] == {"tta": True} and plan["train"]["norm"] == "subject-percentile"
    assert res["recipe"]["predict"] == {"tta": True}
    fold = os.path.join(out, "fold-s01")
    assert read_bundle(os.path.join(fold, "run", "model.pt"))["norm"]["mode"] == "subject-percentile"
    lineage = xr.open_zarr(os.path.join(fold, "pred.zarr"), group="s01", consolidated=False).attrs["lineage"]
    assert lineage["tta"] is True and len(lineage["subject_norm"]["scale"]) == 67


@pytest.mark.slow  # default-run budget (README: make test <= 6 min on 2 cores); run in .ci/run's slow step
def test_an_ensemble_recipe_reports_its_uncertainty_per_fold(tta_norm_ensemble):
    _, res = tta_norm_ensemble
    assert res["recipe"]["train"]["members"] == 2
    for row in res["rows"]:
        assert -1 <= row["unc_spearman"] <= 1 and 0 <= row["coverage_95"] <= 1
    header = open(res["table"]).readline().strip().split(",")
    assert header[-2:] == ["unc_spearman", "coverage_95"]
    assert res["summary"]["coverage_95"]["mean"] is not None


def test_split_recipe_tells_patch_from_training_options_by_name():
    from mrhscale.stages.crossval import split_recipe

    train_opts, patch_opts = split_recipe({"stats": "global-max", "norm": "subject-percentile", "epochs": 2,
                                           "stride": 3})
    assert train_opts == {"norm": "subject-percentile", "epochs": 2}
    assert patch_opts == {"stats": "global-max", "stride": 3}
