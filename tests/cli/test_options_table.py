"""The CLI is made from the options table: defaults, choices and help stated once
(mrhscale/options.py); old spellings are one-line errors naming the new one."""

import ast
import dataclasses
import pathlib
import subprocess
import sys

import pytest
from click.testing import CliRunner

from mrhscale import options
from mrhscale.cli import main
from mrhscale.cli.params import field_option

CLI = pathlib.Path(__file__).resolve().parents[2] / "mrhscale" / "cli"

RENAMED = [
    (["patches", "c.zarr", "--target", "af", "--out", "p.zarr", "--norm", "global-max"], "--norm", "--stats"),
    (["ingest", "m.yaml", "--out", "c.zarr", "--workers", "2"], "--workers", "--dask-workers"),
    (["predict", "m.pt", "c.zarr", "--out", "p.zarr", "--workers", "2"], "--workers", "--dask-workers"),
    (["train", "p.zarr", "--out", "run", "--workers", "2"], "--workers", "--loader-workers"),
    (["train", "p.zarr", "--out", "run", "--no-amp"], "--no-amp", "--precision fp32"),
    (["synth", "cohort", "--subjects", "3"], "--subjects", "--n-subjects"),
    (["demo", "--subjects", "3"], "--subjects", "--n-subjects"),
    (["import-matlab", "net.mat", "--out", "m.pt", "--norm", "identity"], "--norm", "--input-scale"),
]


@pytest.mark.parametrize("args, old, new", RENAMED, ids=[f"{a[0]} {o}" for a, o, _ in RENAMED])
def test_an_old_spelling_is_one_line_naming_the_new_one(tmp_path, args, old, new):
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code == 2
    assert r.output.strip().count("\n") == 0, r.output
    assert f"{old} was renamed {new}" in r.output


def test_a_wrong_choice_is_one_line_naming_the_choices():
    r = CliRunner().invoke(main, ["predict", "m.pt", "c.zarr", "--out", "p", "--aggregate", "median"])
    assert r.exit_code == 2 and r.output.strip() == ("mrhscale: error: --aggregate 'median': choose one of "
                                                     "centre, mean")


def test_a_missing_argument_is_one_line():
    r = CliRunner().invoke(main, ["train"])
    assert r.exit_code == 2 and r.output.strip().count("\n") == 0 and "Missing argument 'PATCHES'" in r.output


def test_defaults_and_choices_come_from_the_table():
    fields = {f.name: f for f in dataclasses.fields(options.PredictOptions)}
    opt = field_option(fields["batch_size"])
    assert opt.default == options.PredictOptions().batch_size and opt.help == fields["batch_size"].metadata["help"]
    agg = field_option(fields["aggregate"])
    assert tuple(agg.type.choices) == options.AGGREGATES
    cmd = main.commands["predict"]
    by_name = {p.name: p for p in cmd.params}
    assert by_name["batch_size"].default == 4096 and by_name["precision"].default == "auto"
    assert tuple(main.commands["patches"].params[[p.name for p in main.commands["patches"].params]
                                                  .index("stats")].type.choices) == options.PATCH_STATS


def test_training_help_states_every_recipe_value_from_the_recipes():
    params = {p.name: p for p in main.commands["train"].params}
    for name in ("epochs", "lr", "optimizer", "clip", "augment"):
        for recipe, values in options.RECIPES.items():
            shown = options._shown(values[name])
            assert shown in params[name].help, (name, recipe, params[name].help)


def test_no_literal_choice_lists_in_the_cli():
    """Every vocabulary lives in options.py: no click.Choice([...literal...]) in the commands."""
    for path in CLI.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("Choice"):
                assert not any(isinstance(a, ast.List | ast.Tuple) for a in node.args), (path, ast.unparse(node))


def test_options_import_without_torch_or_dask():
    code = "import sys, mrhscale.options; print('torch' in sys.modules, 'dask' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_help_imports_no_torch():
    code = ("import sys; from click.testing import CliRunner; from mrhscale.cli import main; "
            "CliRunner().invoke(main, ['train', '--help']); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
