"""evaluate on a prediction with an uncertainty: Spearman with |error|, 95% coverage, the
retention curve, the mean inside each label against the rest, figures and report."""

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import write_pair

from mrhscale.cli import main
from mrhscale.options import EvaluateOptions
from mrhscale.parallel.context import Context
from mrhscale.stages.evaluate import evaluate


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    d = tmp_path_factory.mktemp("eu")
    store, pred, ids = write_pair(d, noise=5.0, uncertainty=True)
    return evaluate(pred, store, str(d / "ev"), stains=["af"], ctx=Context(quiet=True)).by_stain["af"], store, pred, d


def test_a_true_standard_deviation_ranks_covers_and_flags(result):
    res, *_ = result
    u = res.uncertainty
    assert u["variable"] == "af_uncertainty" and u["calibration"]["factor"] == 2.0
    p = u["pooled"]
    assert p["spearman_abs_error"] > 0.3  # the sd ranks the errors (heteroscedastic, 4x in the lesion)
    assert p["coverage_95"] == pytest.approx(0.95, abs=0.03)  # and it is their true sd
    r = p["retention"]
    assert r["oracle_area"] < r["area"] < r["random_area"]
    for sid, s in res.per_subject.items():
        lab = s["uncertainty"]["by_label"]["lesion"]
        assert lab["ratio"] == pytest.approx(4.0, rel=0.15), sid  # sd x (1 + 3) inside the lesion
        assert lab["voxels"] > 0 and s["uncertainty"]["n"] == s["virtual"]["n"]


def test_figures_report_and_json(result):
    res, *_ = result
    for f in ("uncertainty_s01.png", "retention.png"):
        assert f in res.figures and os.path.getsize(os.path.join(res.out_dir, f)) > 1000
    doc = json.load(open(os.path.join(res.out_dir, "metrics.json")))
    curve = doc["uncertainty"]["retention_curves"]["pooled"]
    assert len(curve["fractions"]) == len(curve["mae"]) == 100
    assert "uncertainty" not in doc["pooled"]  # pooled holds the markers only
    html = open(res.report).read()
    assert "Uncertainty vs error" in html and "Uncertainty inside labels" in html and "Calibration" in html


def test_without_an_uncertainty_nothing_changes(tmp_path):
    store, pred, _ = write_pair(tmp_path, noise=5.0)
    res = evaluate(pred, store, str(tmp_path / "ev"), stains=["af"], ctx=Context(quiet=True),
                   options=EvaluateOptions(montage_subjects=0)).by_stain["af"]  # the pooled figures are what differ
    assert res.uncertainty is None and "retention.png" not in res.figures


def test_cli_prints_the_calibration_figures(result, tmp_path):
    _, store, pred, _ = result
    r = CliRunner().invoke(main, ["evaluate", pred, store, "--stain", "af", "--out", str(tmp_path / "ev"), "-q"])
    assert r.exit_code == 0, r.output
    line = next(x.strip() for x in r.output.splitlines() if x.strip().startswith("uncertainty"))
    assert "Spearman with |error|" in line and "coverage" in line and "retention area" in line
    assert np.isfinite(float(line.split("Spearman with |error| ")[1].split(",")[0]))
