"""mrhscale.stages.evaluate: metrics on constructed cases with known answers, markers, ROC, report."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner
from helpers import EVAL_AFF as AFF
from helpers import MD_TRUE, subject, write_pair

from mrhscale.errors import MRHError
from mrhscale.options import EvaluateOptions
from mrhscale.parallel.context import Context
from mrhscale.stages.evaluate import evaluate, mean_diffusivity, single_markers


@pytest.mark.parametrize("kw", [{}, {"bvals_known": False}, {"bvals_known": False, "b0_named": False}])
def test_single_markers(kw):
    ds = subject("s01", 0, **kw)
    mask = ds["mask"].values
    md, note = mean_diffusivity(ds, mask)
    assert note == ""
    np.testing.assert_allclose(md[mask], MD_TRUE, rtol=1e-4)
    m, notes = single_markers(ds, mask)
    assert set(m) == {"FA", "MT ratio", "T2", "MD"} and notes == []
    mtr = (ds["mri"].sel(contrast="mt_off") - ds["mri"].sel(contrast="mt_on")) / ds["mri"].sel(contrast="mt_off")
    np.testing.assert_allclose(m["MT ratio"], mtr.values, rtol=1e-5)
    np.testing.assert_array_equal(m["T2"], ds["mri"].sel(contrast="t2").values)
    # absent channels: skipped with a note, never an error
    m2, notes2 = single_markers(ds.drop_sel(contrast=["mt_on", "t2"]).drop_vars("fa"), mask)
    assert set(m2) == {"MD"} and len(notes2) == 3


def test_evaluate_end_to_end(tmp_path):
    store, pred, ids = write_pair(tmp_path, noise=0.0, offset=4.0)
    out = str(tmp_path / "report")
    res = evaluate(pred, store, out, ctx=Context(quiet=True))  # every stain of the prediction: af
    assert res.stains == ["af"] and res.subjects == ids and res.report == os.path.join(out, "report.html")
    m = res.by_stain["af"]
    v = m["pooled"]["virtual"]
    assert v["mae"] == pytest.approx(4.0, rel=1e-5) and v["pearson"] == pytest.approx(1, abs=1e-6)
    assert v["spearman"] == pytest.approx(1, abs=1e-6)
    assert v["psnr"] == pytest.approx(20 * np.log10(v["data_range"] / 4.0), rel=1e-5)
    for sid in ids:
        assert m["per_subject"][sid]["virtual"]["mae"] == pytest.approx(4.0, rel=1e-5)
    # single-marker baselines present; T2 (noisy proxy) is worse than the virtual stain
    assert set(m["pooled"]) >= {"FA", "MT ratio", "T2", "MD", "roc"}
    assert 0.3 < m["pooled"]["T2"]["pearson"] < 0.99
    assert m["pooled"]["T2"]["mae"] > v["mae"]
    # ROC: the virtual stain drops in the lesion (lower), MT ratio too, FA is noise
    rocs = m["pooled"]["roc"]
    assert rocs["virtual"]["direction"] == "lower" and rocs["virtual"]["auc"] > 0.95
    assert rocs["MT ratio"]["direction"] == "lower" and 0.6 < rocs["MT ratio"]["auc"] < rocs["virtual"]["auc"]
    assert rocs["FA"]["auc"] < 0.6
    assert {"metrics.json", "report.html", "af"} <= set(os.listdir(out))  # one folder per stain
    assert {"metrics.json", "scatter.png", "roc.png", "montage_s01.png"} <= set(os.listdir(os.path.join(out, "af")))
    summary = json.load(open(os.path.join(out, "metrics.json")))
    assert summary["stains"] == ["af"] and summary["by_stain"]["af"]["metrics"] == "af/metrics.json"
    assert summary["by_stain"]["af"]["virtual"]["mae"] == pytest.approx(4.0, rel=1e-5)
    saved = json.load(open(os.path.join(out, "af", "metrics.json")))
    assert saved["pooled"]["virtual"]["mae"] == pytest.approx(4.0, rel=1e-5)
    assert len(saved["roc_curves"]["virtual"]["fpr"]) > 2
    html = open(os.path.join(out, "report.html")).read()
    assert "data:image/png;base64," in html and "MT ratio" in html and "af: Pooled" in html


def test_evaluate_without_label_and_bad_input(tmp_path):
    store, pred, ids = write_pair(tmp_path, n=1, lesion=False)
    m = evaluate(pred, store, str(tmp_path / "r"), stains=["af"], ctx=Context(quiet=True),
                 options=EvaluateOptions(montage_subjects=0)).by_stain["af"]
    assert "roc" not in m["pooled"] and not os.path.exists(tmp_path / "r" / "af" / "roc.png")
    with pytest.raises(MRHError, match="holds virtual af, not nf; give --stain af"):
        evaluate(pred, store, str(tmp_path / "r"), stains=["nf"], ctx=Context(quiet=True)).by_stain["nf"]
    with pytest.raises(MRHError, match="s07"):
        evaluate(pred, store, str(tmp_path / "r"), stains=["af"], subjects=["s07"], ctx=Context(quiet=True)).by_stain["af"]
    with pytest.raises(MRHError, match="--label nope"):
        evaluate(pred, store, str(tmp_path / "r"), stains=["af"], label="nope", ctx=Context(quiet=True)).by_stain["af"]
    with pytest.raises(MRHError, match="none.zarr: does not exist"):
        evaluate(str(tmp_path / "none.zarr"), store, str(tmp_path / "r"), stains=["af"], ctx=Context(quiet=True)).by_stain["af"]
    with pytest.raises(MRHError, match="is a cohort store, not a prediction store"):
        evaluate(store, store, str(tmp_path / "r"), stains=["af"], ctx=Context(quiet=True)).by_stain["af"]


def test_label_from_nifti_and_cli(tmp_path):
    from mrhscale.cli import main
    from mrhscale.io.volumes import write_volume

    store, pred, ids = write_pair(tmp_path, n=1, lesion=True)
    les = xr.open_zarr(store, group="s01", consolidated=False)["lesion"].values
    write_volume(str(tmp_path / "s01_les.nii.gz"), les.astype(np.uint8), np.asarray(AFF))
    runner = CliRunner()
    r = runner.invoke(main, ["evaluate", pred, store, "--stain", "af", "--out", str(tmp_path / "r"),
                             "--label", str(tmp_path / "{subject}_les.nii.gz"), "-q"])
    assert r.exit_code == 0, r.output
    assert "pearson" in r.output
    saved = json.load(open(tmp_path / "r" / "af" / "metrics.json"))
    assert saved["pooled"]["roc"]["virtual"]["auc"] > 0.9
    r = runner.invoke(main, ["evaluate", pred, store, "--target", "af", "--out", str(tmp_path / "r"), "-q"])
    assert r.exit_code == 2 and "--target was renamed --stain" in r.output
    r = runner.invoke(main, ["evaluate", pred, store, "--stain", "zz", "--out", str(tmp_path / "r"), "-q"])
    assert r.exit_code == 2 and "zz" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_report_page(tmp_path):
    from mrhscale.report.html import summary_report, write_report

    store, pred, ids = write_pair(tmp_path, n=1, lesion=True)
    m = evaluate(pred, store, str(tmp_path / "ev"), stains=["af"], ctx=Context(quiet=True)).by_stain["af"]
    imp = {"target": "af", "split": "val", "n_patches": 10, "repeats": 1, "baseline_mse": 2.0,
           "groups": [{"name": "dwi2000", "channels": ["a", "b"], "increase": 5.0, "std": 0.1,
                       "relative": 2.5, "rank": 1}],
           "channels": [], "out_dir": str(tmp_path), "figures": []}
    page = summary_report(str(tmp_path / "demo"), evaluation=m, importance=imp,
                          tables={"Pipeline": {"subjects": 1, "psnr": math.inf, "r": math.nan}},
                          title="demo <page>")
    html = open(page).read()
    assert html.count("data:image/png;base64,") == len(m["figures"]) >= 3
    assert "Importance: Contrast groups" in html and "dwi2000" in html
    assert "demo &lt;page&gt;" in html and "&infin;" in html
    assert "Pooled (virtual stain vs single markers)" in html
    # plain API: flat dict, list section, {caption: path} figures
    p = write_report(str(tmp_path / "w"), {"flat": {"a": 1.23456789}, "notes": ["x < y"]},
                     {"scatter": os.path.join(m["out_dir"], "scatter.png")}, "t")
    html = open(p).read()
    assert "1.235" in html and "x &lt; y" in html and "<figcaption>scatter</figcaption>" in html
