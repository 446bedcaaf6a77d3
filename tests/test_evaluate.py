"""mrhscale.stages.evaluate: metrics on constructed cases with known answers, markers, ROC, report."""

from __future__ import annotations

import itertools
import json
import math
import os

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner

from mrhscale.errors import MRHError
from mrhscale.ops.metrics import roc, similarity
from mrhscale.stages.evaluate import evaluate, mean_diffusivity, single_markers

SHAPE = (14, 9, 16)
AFF = [[0.06, 0, 0, 0], [0, 0.06, 0, 0], [0, 0, 0.06, 0], [0, 0, 0, 1]]
MD_TRUE = 0.0007


def protocol(bvals_known=True, b0_named=True):
    names = ([f"dwi2000_b0_{i}" if b0_named else f"dwi2000_{i}" for i in range(2)]
             + [f"dwi2000_dir{i:02d}" if b0_named else f"dwi2000_{i + 2}" for i in range(4)]
             + ["dwi5000_0", "dwi5000_1", "t2", "mt_off", "mt_on"])
    groups = ["dwi2000"] * 6 + ["dwi5000"] * 2 + ["t2MTONOFF"] * 3
    bval = np.array([0, 0, 2000, 2000, 2000, 2000, 5000, 5000, np.nan, np.nan, np.nan], float)
    if not bvals_known:
        bval[:] = np.nan
    return names, groups, bval


def subject(sid, seed, lesion=True, **kw):
    """A subject whose reference stain drops in a lesion where MT ratio also drops (weakly)."""
    rng = np.random.default_rng(seed)
    names, groups, bval = protocol(**kw)
    mask = np.zeros(SHAPE, bool)
    mask[1:-1, 1:-1, 1:-1] = True
    les = np.zeros(SHAPE, bool)
    les[4:9, 2:6, 5:11] = True
    ref = (100 + 40 * rng.random(SHAPE)) * mask
    ref[les] -= 50
    mri = np.zeros((*SHAPE, len(names)), np.float32)
    b0 = 1000 + 100 * rng.random(SHAPE)
    mri[..., 0:2] = b0[..., None]
    mri[..., 2:6] = (b0 * np.exp(-2000 * MD_TRUE))[..., None]
    mri[..., 6:8] = rng.random((*SHAPE, 2)) * 100
    mri[..., 8] = 50 + ref * 0.3 + 5 * rng.standard_normal(SHAPE)  # t2 tracks the stain, noisy
    mri[..., 9] = 200.0
    mtr = 0.4 - 0.05 * les + 0.05 * rng.standard_normal(SHAPE)
    mri[..., 10] = 200.0 * (1 - mtr)
    ds = xr.Dataset(
        {
            "mri": (("x", "y", "z", "contrast"), mri),
            "mask": (("x", "y", "z"), mask),
            "fa": (("x", "y", "z"), rng.random(SHAPE).astype(np.float32)),
            "af": (("x", "y", "z"), ref.astype(np.float32)),
        },
        coords={"contrast": names, "group": ("contrast", groups), "bval": ("contrast", bval)},
        attrs={"subject": sid, "affine": AFF, "targets": ["af"], "labels": ["lesion"] if lesion else []},
    )
    if lesion:
        ds["lesion"] = (("x", "y", "z"), les)
    return ds


def write_pair(tmp_path, n=2, noise=5.0, offset=0.0, lesion=True, **kw):
    store, pred = str(tmp_path / "c.zarr"), str(tmp_path / "p.zarr")
    ids = [f"s{i + 1:02d}" for i in range(n)]
    rng = np.random.default_rng(9)
    from mrhscale.stores import CohortStore, PredictionStore

    cstore, pstore = CohortStore(store), PredictionStore(pred)
    cstore.prepare({})
    pstore.prepare({"variable": "af_virtual", "target": "af"})
    for i, sid in enumerate(ids):
        ds = subject(sid, i, lesion=lesion, **kw)
        cstore.put(sid, ds, {"stage": "tests", "index": i})
        v = (ds["af"].values + offset + noise * rng.standard_normal(SHAPE)) * ds["mask"].values
        out = xr.Dataset({"af_virtual": (("x", "y", "z"), v.astype(np.float32)),
                          "mask": ds["mask"]}, attrs=ds.attrs)
        pstore.put(sid, out, {"stage": "tests", "source": cstore.identity(sid)["fingerprint"]})
    return store, pred, ids


def test_similarity_known_answers():
    rng = np.random.default_rng(0)
    ref = rng.random((10, 9, 11)) * 200
    mask = np.zeros(ref.shape, bool)
    mask[2:8, 2:7, 2:9] = True
    same = similarity(ref, ref, mask)
    assert same["pearson"] == pytest.approx(1) and same["spearman"] == pytest.approx(1)
    assert same["mae"] == 0 and same["psnr"] == math.inf and same["ssim"] == pytest.approx(1)
    shifted = similarity(ref + 3.0, ref, mask, data_range=200.0)
    assert shifted["mae"] == pytest.approx(3.0) and shifted["pearson"] == pytest.approx(1)
    assert shifted["psnr"] == pytest.approx(20 * np.log10(200 / 3.0))
    assert shifted["ssim"] < 1
    neg = similarity(-ref, ref, mask)
    assert neg["pearson"] == pytest.approx(-1) and neg["spearman"] == pytest.approx(-1)
    mono = similarity(np.exp(ref / 50), ref, mask)  # monotone, nonlinear: Spearman 1, Pearson < 1
    assert mono["spearman"] == pytest.approx(1) and mono["pearson"] < 0.99
    # values outside the mask do not count
    wild = ref.copy()
    wild[~mask] = 1e6
    assert similarity(wild, ref, mask)["mae"] == 0


def test_roc_auc_matches_pair_count_and_orientation():
    rng = np.random.default_rng(1)
    s = rng.standard_normal(60)
    y = rng.random(60) < 0.3
    s[y] += 0.8
    s[:5] = s[5]  # ties
    pairs = [(a > b) + 0.5 * (a == b) for a, b in itertools.product(s[y], s[~y])]
    r = roc(s, y)
    assert r["auc_raw"] == pytest.approx(np.mean(pairs)) and r["direction"] == "higher"
    flipped = roc(-s, y)
    assert flipped["direction"] == "lower" and flipped["auc"] == pytest.approx(r["auc"])
    assert flipped["auc_raw"] == pytest.approx(1 - r["auc"])
    perfect = roc(np.r_[np.zeros(10), np.ones(5)], np.r_[np.zeros(10, bool), np.ones(5, bool)])
    assert perfect["auc"] == 1 and perfect["youden"]["sensitivity"] == 1
    assert perfect["youden"]["specificity"] == 1
    assert perfect["fpr"][0] == 0 and perfect["tpr"][-1] == 1
    assert roc(np.ones(8), np.r_[np.zeros(4, bool), np.ones(4, bool)])["auc"] == 0.5
    assert math.isnan(roc(s, np.zeros(60, bool))["auc"])


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
    m = evaluate(pred, store, "af", out, quiet=True)
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
    files = set(os.listdir(out))
    assert {"metrics.json", "scatter.png", "roc.png", "report.html", "montage_s01.png"} <= files
    saved = json.load(open(os.path.join(out, "metrics.json")))
    assert saved["pooled"]["virtual"]["mae"] == pytest.approx(4.0, rel=1e-5)
    assert len(saved["roc_curves"]["virtual"]["fpr"]) > 2
    html = open(os.path.join(out, "report.html")).read()
    assert "data:image/png;base64," in html and "MT ratio" in html


def test_evaluate_without_label_and_bad_input(tmp_path):
    store, pred, ids = write_pair(tmp_path, n=1, lesion=False)
    m = evaluate(pred, store, "af", str(tmp_path / "r"), quiet=True)
    assert "roc" not in m["pooled"] and not os.path.exists(tmp_path / "r" / "roc.png")
    with pytest.raises(MRHError, match="another stain: give --target af"):
        evaluate(pred, store, "nf", str(tmp_path / "r"), quiet=True)
    with pytest.raises(MRHError, match="s07"):
        evaluate(pred, store, "af", str(tmp_path / "r"), subjects=["s07"], quiet=True)
    with pytest.raises(MRHError, match="--label nope"):
        evaluate(pred, store, "af", str(tmp_path / "r"), label="nope", quiet=True)
    with pytest.raises(MRHError, match="none.zarr: does not exist"):
        evaluate(str(tmp_path / "none.zarr"), store, "af", str(tmp_path / "r"), quiet=True)
    with pytest.raises(MRHError, match="is a cohort store, not a prediction store"):
        evaluate(store, store, "af", str(tmp_path / "r"), quiet=True)


def test_label_from_nifti_and_cli(tmp_path):
    from mrhscale.cli import main
    from mrhscale.io.volumes import write_volume

    store, pred, ids = write_pair(tmp_path, n=1, lesion=True)
    les = xr.open_zarr(store, group="s01", consolidated=False)["lesion"].values
    write_volume(str(tmp_path / "s01_les.nii.gz"), les.astype(np.uint8), np.asarray(AFF))
    runner = CliRunner()
    r = runner.invoke(main, ["evaluate", pred, store, "--target", "af", "--out", str(tmp_path / "r"),
                             "--label", str(tmp_path / "{subject}_les.nii.gz"), "-q"])
    assert r.exit_code == 0, r.output
    assert "pearson" in r.output
    saved = json.load(open(tmp_path / "r" / "metrics.json"))
    assert saved["pooled"]["roc"]["virtual"]["auc"] > 0.9
    r = runner.invoke(main, ["evaluate", pred, store, "--target", "zz", "--out", str(tmp_path / "r"), "-q"])
    assert r.exit_code == 2 and "zz" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_report_page(tmp_path):
    from mrhscale.report.html import summary_report, write_report

    store, pred, ids = write_pair(tmp_path, n=1, lesion=True)
    m = evaluate(pred, store, "af", str(tmp_path / "ev"), quiet=True)
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
