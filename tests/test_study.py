"""pipelines/study: every recipe of the study is valid, and table.py turns crossval folders
into the docs/recipes.md table."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import yaml

from mrhscale.stages.crossval import PREDICT_KEYS, recipe_options, split_recipe
from mrhscale.training.config import RECIPES, TrainConfig

STUDY = pathlib.Path(__file__).resolve().parents[1] / "pipelines" / "study"


def test_every_study_recipe_is_a_valid_crossval_recipe():
    names = sorted(p.stem for p in (STUDY / "recipes").glob("*.yaml"))
    assert {"paper", "robust", "norm-subject-percentile", "tta", "half2", "depth9"} <= set(names)
    for name in names:
        opts = recipe_options(str(STUDY / "recipes" / f"{name}.yaml"))
        predict = {k: opts.pop(k) for k in PREDICT_KEYS if k in opts}
        train, _ = split_recipe(opts)
        base = RECIPES[train.get("recipe", "robust")]
        TrainConfig(**{**base, **train}).validate()
        assert set(predict) <= {"tta"}, name
    robust = yaml.safe_load((STUDY / "recipes" / "sp-adamw-cosine-flip.yaml").read_text())
    named = {k: v for k, v in robust.items() if k != "recipe"}
    assert all(RECIPES["robust"][k] == v for k, v in named.items())  # the default is that row


def _cv(root: pathlib.Path, name: str, r: dict[str, float]):
    cv = root / f"cv-{name}"
    for sid in r:
        fold = cv / f"fold-{sid}"
        (fold / "patches.zarr").mkdir(parents=True)
        (fold / "run").mkdir()
        (fold / "patches.zarr" / "zarr.json").write_text(json.dumps({"attributes": {"n_train": 100}}))
        (fold / "run" / "config.json").write_text(json.dumps({"epochs": 3}))
    rows = [{"subject": s, "pearson": v} for s, v in r.items()]
    (cv / "crossval.json").write_text(json.dumps({
        "rows": rows, "seconds": 12.0, "summary": {"mae": {"mean": 5.0}, "ssim": {"mean": 0.5}}}))


def test_table_ranks_recipes_against_the_baseline(tmp_path):
    _cv(tmp_path, "paper", {"s01": 0.80, "s02": 0.90})
    _cv(tmp_path, "better", {"s01": 0.95, "s02": 0.89})
    out = subprocess.run([sys.executable, str(STUDY / "table.py"), str(tmp_path)], capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert out[0].startswith("| recipe | s01 | s02 | mean +- sd | vs paper | worst subject vs paper")
    assert out[2].startswith("| paper | 0.800 | 0.900 |")  # the baseline first
    assert out[3].startswith("| better | 0.950 | 0.890 | 0.920 +- 0.042 | +0.070 | -0.010 | 5.0 | 0.500 | 0k")
