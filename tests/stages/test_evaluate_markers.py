"""mrhscale evaluate --marker: extra contrasts (store channels, NIfTI files) against the
reference and the virtual stain, ROC on a label, and bad-input errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner
from helpers import DEFAULT_AFFINE, make_cohort_store

from mrhscale.cli import main
from mrhscale.errors import MRHError
from mrhscale.io.volumes import write_volume
from mrhscale.parallel.context import Context
from mrhscale.stages.evaluate import evaluate, marker_names
from mrhscale.stores import CohortStore, PredictionStore, open_subject

SHAPE = (12, 10, 14)
NOISE = 4.0


def _lesion(ds, i):
    les = np.zeros(SHAPE, bool)
    les[3:7, 2:6, 4:9] = True
    ds["lesion"] = (("x", "y", "z"), les)
    ds["af"] = ds["af"].where(~ds["lesion"], ds["af"] * 0.5)  # the stain drops in the lesion
    ds.attrs["labels"] = ["lesion"]
    return ds


@pytest.fixture
def pair(tmp_path):
    """Cohort store (2 subjects with a lesion) + a prediction store (virtual = reference + noise)
    + per subject NIfTI markers: stain + known noise, the lesion itself, a wrong-grid file."""
    store, pred = str(tmp_path / "c.zarr"), str(tmp_path / "p.zarr")
    ids = make_cohort_store(store, n_subjects=2, shape=SHAPE, edit=_lesion)
    rng = np.random.default_rng(3)
    truth = {}
    cstore, pstore = CohortStore(store), PredictionStore(pred)
    pstore.prepare({"variable": "af_virtual", "target": "af"})
    for sid in ids:
        ds = open_subject(store, sid).load()
        ref, mask = ds["af"].values.astype(np.float64), ds["mask"].values
        virt = (ref + 10 * rng.standard_normal(SHAPE)) * mask
        pstore.put(sid, xr.Dataset({"af_virtual": (("x", "y", "z"), virt.astype(np.float32)),
                                    "mask": ds["mask"]}, attrs={"subject": sid}),
                   {"stage": "tests", "source": cstore.identity(sid)["fingerprint"]})
        noisy = ref + NOISE * rng.standard_normal(SHAPE)
        write_volume(str(tmp_path / f"newc_{sid}.nii.gz"), noisy.astype(np.float32), DEFAULT_AFFINE)
        write_volume(str(tmp_path / f"les_{sid}.nii.gz"), ds["lesion"].values.astype(np.float32),
                     DEFAULT_AFFINE)
        write_volume(str(tmp_path / f"bad_{sid}.nii.gz"), np.zeros((12, 10, 13), np.float32),
                     DEFAULT_AFFINE)
        noisy32 = noisy.astype(np.float32).astype(np.float64)
        truth[sid] = {
            "ref": np.corrcoef(noisy32[mask], ref[mask])[0, 1],
            "virt": np.corrcoef(noisy32[mask], virt.astype(np.float32)[mask])[0, 1],
            "c00": np.corrcoef(ds["mri"].sel(contrast="c00").values[mask], ref[mask])[0, 1],
        }
    return tmp_path, store, pred, ids, truth


def test_nifti_and_channel_markers(pair):
    tmp, store, pred, ids, truth = pair
    nii = str(tmp / "newc_{subject}.nii.gz")
    m = evaluate(pred, store, str(tmp / "rep"), stains=["af"], ctx=Context(quiet=True),
                 markers=[nii, "c00", "fa", str(tmp / "les_{subject}.nii.gz")]).by_stain["af"]
    assert m["markers"]["extra"] == {"newc": nii, "c00": "c00", "fa": "fa",
                                     "les": str(tmp / "les_{subject}.nii.gz")}
    for sid in ids:
        r = m["per_subject"][sid]
        # stain + N(0, 4) noise: r = sd(ref) / sqrt(var(ref) + 16), computed on the same voxels
        assert r["newc"]["pearson"] == pytest.approx(truth[sid]["ref"], abs=1e-5)
        assert r["newc"]["pearson"] > 0.97
        assert r["newc"]["pearson_vs_virtual"] == pytest.approx(truth[sid]["virt"], abs=1e-5)
        assert r["c00"]["pearson"] == pytest.approx(truth[sid]["c00"], abs=1e-5)
        # a store variable given by name is the same as the built-in FA marker
        assert r["fa"]["pearson"] == pytest.approx(r["FA"]["pearson"])
        # the lesion as a marker detects the lesion perfectly
        assert r["roc"]["les"]["auc"] == pytest.approx(1.0)
        for name in ("FA", "MT ratio", "T2", "MD", "newc", "c00"):
            if name in r:
                assert "pearson_vs_virtual" in r[name]
    p = m["pooled"]
    assert p["newc"]["pearson"] > 0.97 and p["roc"]["les"]["auc"] == pytest.approx(1.0)
    assert -1 <= p["newc"]["pearson_vs_virtual"] <= 1 and p["newc"]["spearman_vs_virtual"] > 0.8
    assert p["newc"]["pearson_vs_virtual"] < p["newc"]["pearson"]  # virtual is noisier than 4
    on_disk = json.load(open(tmp / "rep" / "af" / "metrics.json"))
    assert on_disk["pooled"]["newc"]["pearson"] == pytest.approx(p["newc"]["pearson"])
    assert {"scatter.png", "scatter_vs_virtual.png", "roc.png"} <= set(on_disk["figures"])
    html = open(m["report"]).read()
    assert "newc" in html and "vs virtual" in html


def test_marker_names_unique():
    assert marker_names(["t2", "/d/T2.nii", "/a/x_{subject}.nii.gz", "/b/x_{subject}.nii"]) == \
        ["t2", "T2#2", "x", "x#2"]


def test_cli_marker_and_errors(pair):
    tmp, store, pred, ids, _ = pair
    r = CliRunner().invoke(main, ["evaluate", pred, store, "--stain", "af", "-o", str(tmp / "r1"),
                                  "--quiet", "--marker", str(tmp / "newc_{subject}.nii.gz"),
                                  "--marker", "c01"])
    assert r.exit_code == 0, r.output
    assert "marker newc: pearson vs reference 0.9" in r.output and "marker c01" in r.output

    bad = str(tmp / "bad_{subject}.nii.gz")
    r = CliRunner().invoke(main, ["evaluate", pred, store, "--stain", "af", "-o", str(tmp / "r2"),
                                  "--quiet", "--marker", bad])
    assert r.exit_code == 2 and "Traceback" not in r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1
    assert "bad_s01.nii.gz" in lines[0] and "(12, 10, 13)" in lines[0] and "(12, 10, 14)" in lines[0]

    r = CliRunner().invoke(main, ["evaluate", pred, store, "--stain", "af", "-o", str(tmp / "r3"),
                                  "--quiet", "--marker", str(tmp / "nothere_{subject}.nii.gz")])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
    assert "s01" in r.output and "nothere_s01.nii.gz" in r.output and "not found" in r.output

    r = CliRunner().invoke(main, ["evaluate", pred, store, "--stain", "af", "-o", str(tmp / "r4"),
                                  "--quiet", "--marker", "no_such_contrast"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
    assert "no_such_contrast" in r.output and "c00" in r.output


def test_missing_transforms_folder(pair):
    tmp, store, pred, _, _ = pair
    with pytest.raises(MRHError, match="marker-transforms"):
        evaluate(pred, store, str(tmp / "r"), stains=["af"], ctx=Context(quiet=True),
                 markers=[str(tmp / "newc_{subject}.nii.gz")],
                 marker_transforms=os.path.join(str(tmp), "no_transforms")).by_stain["af"]
