"""evaluate's uncertainty per tissue, its reliability curve, each brain's risk and the
out-of-distribution score: a Gaussian uncertainty that is right lies on the diagonal, one
that is half as wide lies below it; the OOD score's lesion ratio, share and Spearman."""

import json
import os

import numpy as np
import pytest
import xarray as xr
from helpers import EVAL_SHAPE, subject

from mrhscale.ops.reliability import (
    LEVELS,
    add_tallies,
    brain_risk,
    by_group,
    reliability,
    tally,
    tissue_groups,
    z_of,
)
from mrhscale.options import EvaluateOptions
from mrhscale.parallel.context import Context
from mrhscale.stages.evaluate import evaluate
from mrhscale.stores import CohortStore, PredictionStore

QUANTILES = {"50": 1.0, "99": 2.0, "99.9": 2.5}


def write_stores(d, n=4, unc_scale=1.0, ood=True):
    """A cohort (lesion and wm labels) and a prediction whose errors are N(0, sd), sd 4x in
    the lesion; the prediction's uncertainty is ``unc_scale`` x sd, its OOD score 3 in the
    lesion and ~1 elsewhere (the training 99th percentile: 2)."""
    store, pred = str(d / "c.zarr"), str(d / "p.zarr")
    cstore, pstore = CohortStore(store), PredictionStore(pred)
    cstore.prepare({})
    pstore.prepare({"variable": "af_virtual", "target": "af", "uncertainty": "af_uncertainty",
                    "model": {"members": 3, "uncertainty": {"calibration": {"factor": 1.0, "fitted_on": "val"}}}})
    rng = np.random.default_rng(5)
    for i in range(n):
        sid = f"s{i + 1:02d}"
        ds = subject(sid, i)
        wm = np.zeros(EVAL_SHAPE, bool)
        wm[:, :, 10:] = True
        ds = ds.assign(wm=(("x", "y", "z"), wm)).assign_attrs(labels=["lesion", "wm"])
        cstore.put(sid, ds, {"stage": "tests", "index": i})
        les, mask = ds["lesion"].values, ds["mask"].values
        sd = 5.0 * rng.uniform(0.5, 1.5, EVAL_SHAPE) * (1 + 3 * les)
        out = xr.Dataset({"af_virtual": (("x", "y", "z"), (ds["af"].values + sd * rng.standard_normal(EVAL_SHAPE))
                                         .astype(np.float32)),
                          "af_uncertainty": (("x", "y", "z"), (unc_scale * sd).astype(np.float32)),
                          "mask": ds["mask"]}, attrs=ds.attrs)
        if ood:
            score = 1 + 2 * les + 0.3 * rng.random(EVAL_SHAPE)
            out["ood"] = xr.DataArray((score * mask).astype(np.float32), dims=("x", "y", "z"),
                                      attrs={"kind": "out-of-distribution score", "training_quantiles": QUANTILES})
        pstore.put(sid, out, {"stage": "tests", "source": cstore.identity(sid)["fingerprint"]})
    return store, pred


def run(d, **kw):
    store, pred = write_stores(d, **kw)
    return evaluate(pred, store, str(d / "ev"), ctx=Context(quiet=True),
                    options=EvaluateOptions(montage_subjects=0)).by_stain["af"]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    return run(tmp_path_factory.mktemp("cal"))


def test_a_calibrated_gaussian_uncertainty_lies_on_the_diagonal(calibrated):
    p = calibrated.uncertainty["pooled"]
    rel = p["reliability"]
    assert rel["levels"] == list(LEVELS)
    assert set(rel["coverage"]) == {"all", "lesion", "wm", "gm"}
    for q, c in zip(rel["levels"], rel["coverage"]["all"], strict=True):
        assert c == pytest.approx(q, abs=0.03), q
    for g in ("wm", "gm"):
        assert rel["coverage"][g][LEVELS.index(0.9)] == pytest.approx(0.9, abs=0.05), g
    assert p["by_group"]["all"]["coverage_95"] == pytest.approx(p["coverage_95"], abs=1e-9)  # every voxel: the same
    assert p["by_group"]["lesion"]["interval_width_95"] > 3 * p["by_group"]["gm"]["interval_width_95"]
    n = sum(s["uncertainty"]["by_group"]["all"]["voxels"] for s in calibrated.per_subject.values())
    assert p["by_group"]["all"]["voxels"] == n  # exact over subjects, not a sample


def test_an_overconfident_uncertainty_lies_below_the_diagonal(tmp_path):
    res = run(tmp_path, unc_scale=0.5, ood=False)
    rel = res.uncertainty["pooled"]["reliability"]
    for q, c in zip(rel["levels"], rel["coverage"]["all"], strict=True):
        assert c < q - 0.1, q  # half the sd: a level-q interval is a narrower one
    assert rel["coverage"]["all"][LEVELS.index(0.95)] == pytest.approx(0.68, abs=0.04)  # 1.96 / 2 sd: 68%
    risk = res.uncertainty["pooled"]["risk"]
    assert risk["share_of_subjects_within"] == 0.0 and all(m > 0.2 for m in risk["miss_share"].values())
    assert res.ood is None


def test_each_brains_risk(calibrated):
    risk = calibrated.uncertainty["pooled"]["risk"]
    assert risk["alpha"] == 0.05 and risk["subjects"] == 4 and sorted(risk["miss_share"]) == ["s01", "s02", "s03",
                                                                                             "s04"]
    for sid, m in risk["miss_share"].items():
        assert m == pytest.approx(1 - calibrated.per_subject[sid]["uncertainty"]["coverage_95"])
    assert risk["share_of_subjects_within"] == np.mean([m <= 0.05 for m in risk["miss_share"].values()])


def test_the_ood_score(calibrated):
    o = calibrated.ood
    assert o["training_quantiles"] == QUANTILES
    p = o["pooled"]
    les = p["by_label"]["lesion"]
    assert les["ratio"] == pytest.approx(3.15 / 1.15, rel=0.03)  # 3 + U(0, 0.3) inside against 1 + U(0, 0.3)
    lesion_share = les["voxels"] / sum(s["virtual"]["n"] for s in calibrated.per_subject.values())
    assert p["share_above_training_99"] == pytest.approx(lesion_share)  # the lesion alone exceeds 2
    assert p["spearman_abs_error"] > 0.1  # errors are 4x in the lesion (a tenth of the brain), the score 3x
    assert calibrated.per_subject["s01"]["ood"]["by_label"]["wm"]["ratio"] < 1.2


def test_metrics_json_figure_and_report(calibrated):
    assert "reliability.png" in calibrated.figures
    assert os.path.getsize(os.path.join(calibrated.out_dir, "reliability.png")) > 1000
    doc = json.load(open(os.path.join(calibrated.out_dir, "metrics.json")))
    assert doc["uncertainty"]["pooled"]["reliability"]["coverage"]["gm"][0] > 0.4
    assert doc["ood"]["pooled"]["by_label"]["lesion"]["ratio"] > 2
    top = json.load(open(os.path.join(os.path.dirname(calibrated.out_dir), "metrics.json")))
    assert top["by_stain"]["af"]["ood"]["share_above_training_99"] > 0
    html = open(calibrated.report).read()
    for title in ("per tissue (pooled)", "Reliability: observed coverage", "Risk: each brain",
                  "Out-of-distribution score inside labels"):
        assert title in html, title


def test_tallies_add_up_exactly():
    rng = np.random.default_rng(2)
    err, unc = rng.standard_normal(1000), np.ones(1000)
    mask = np.ones(1000, bool)
    groups = tissue_groups({"wm": np.arange(1000) < 300}, mask)
    assert set(groups) == {"all", "wm", "gm"} and groups["gm"].sum() == 700
    whole = tally(err, unc, groups)
    halves = add_tallies([tally(err[:500], unc[:500], {g: s[:500] for g, s in groups.items()}),
                          tally(err[500:], unc[500:], {g: s[500:] for g, s in groups.items()})])
    assert halves == whole and by_group(halves)["wm"]["voxels"] == 300
    assert reliability(whole)["coverage"]["all"][LEVELS.index(0.95)] == np.mean(np.abs(err) <= 1.959963984540054)
    assert z_of(0.95) == pytest.approx(1.959964, abs=1e-6) and z_of(0.5) == pytest.approx(0.6744898, abs=1e-6)
    assert brain_risk({"a": 0.01, "b": 0.2})["share_of_subjects_within"] == 0.5
