"""Scanner variation in synth: the MRI changes as a new scanner would change it, the brain and
its ground truth do not, and subjects without variation are as before."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from mrhscale.cli import main
from mrhscale.errors import MRHError
from mrhscale.options import SynthVariation
from mrhscale.synth.phantom import make_cohort, make_subject
from mrhscale.synth.scanner import Scanner

SMALL = (24, 16, 32)


@pytest.fixture(scope="module")
def pair():
    return make_subject(SMALL, seed=5), make_subject(SMALL, seed=5, scanner=True)


def test_ground_truth_and_anatomy_do_not_change(pair):
    base, varied = pair
    for t in base["targets"]:
        assert np.array_equal(base["targets"][t], varied["targets"][t])
    assert np.array_equal(base["mask"], varied["mask"])
    assert np.array_equal(base["labels"]["lesion"], varied["labels"]["lesion"])
    for k in ("axon", "myelin", "cell"):
        assert np.array_equal(base["truth"][k], varied["truth"][k])


def test_the_mri_changes_within_the_documented_ranges(pair):
    base, varied = pair
    sc = varied["params"]["scanner"]
    assert "scanner" not in base["params"]
    assert 0.6 <= sc["noise_scale"] <= 1.8 and 0.96 <= sc["b_scale"] <= 1.04 and 0.92 <= sc["te_scale"] <= 1.08
    lo, hi = sc["bias_range"]
    assert 0.7 <= lo < 1.0 < hi <= 1.3
    m = base["mask"]
    for g in base["mri"]:
        a, b = base["mri"][g][m], varied["mri"][g][m]
        assert a.shape == b.shape and not np.allclose(a, b)
        ratio = np.median(b, axis=0) / np.median(a, axis=0)
        assert np.all((ratio > 0.4) & (ratio < 2.5)), (g, ratio)  # a different scanner, same brain


def test_each_knob_does_what_it_says():
    """A gain-only scanner multiplies each volume by its gain, exactly (same noise stream)."""
    base = make_subject(SMALL, seed=2)
    gains = {"t2MTONOFF": np.array([1.5, 0.5, 2.0], np.float32)}
    got = make_subject(SMALL, seed=2, scanner=Scanner(volume_gain=gains))
    for k, g in enumerate(gains["t2MTONOFF"]):
        np.testing.assert_allclose(got["mri"]["t2MTONOFF"][..., k], base["mri"]["t2MTONOFF"][..., k] * g,
                                   rtol=1e-6)
    assert np.array_equal(got["mri"]["dwi5000"], base["mri"]["dwi5000"])
    # a longer echo time darkens T2-weighted tissue signal; a larger b-value darkens DWI
    te = make_subject(SMALL, seed=2, scanner=Scanner(te_scale=1.08))
    b = make_subject(SMALL, seed=2, scanner=Scanner(b_scale=1.04))
    m = base["mask"]
    assert te["mri"]["t2MTONOFF"][..., 0][m].mean() < base["mri"]["t2MTONOFF"][..., 0][m].mean()
    assert b["mri"]["dwi5000"][m].mean() < base["mri"]["dwi5000"][m].mean()
    quiet = make_subject(SMALL, seed=2, scanner=Scanner(noise_scale=0.5))
    out = ~m
    assert quiet["mri"]["dwi5000"][out].std() < base["mri"]["dwi5000"][out].std()


def test_cohort_varies_only_the_subjects_asked(tmp_path):
    make_cohort(str(tmp_path / "plain"), n_subjects=2, shape=SMALL, seed=1, quiet=True)
    varied = make_cohort(str(tmp_path / "varied"), n_subjects=2, shape=SMALL, seed=1, quiet=True,
                         variation=SynthVariation(scanner_variation=["s02"]))
    doc = yaml.safe_load(open(varied))
    assert doc["synth"]["scanner_variation"] == ["s02"]
    notes = {s["id"]: s["notes"] for s in doc["subjects"]}
    assert "scanner" in notes["s02"] and "scanner" not in notes["s01"]

    def data(root, sid, name):
        return np.asanyarray(nib.load(str(tmp_path / root / sid / f"{name}.nii.gz")).dataobj)

    assert np.array_equal(data("plain", "s01", "t2MTONOFF"), data("varied", "s01", "t2MTONOFF"))
    assert not np.array_equal(data("plain", "s02", "t2MTONOFF"), data("varied", "s02", "t2MTONOFF"))
    assert np.array_equal(data("plain", "s02", "mbp"), data("varied", "s02", "mbp"))
    with pytest.raises(MRHError, match="--scanner-variation: no subject s09"):
        make_cohort(str(tmp_path / "bad"), n_subjects=2, shape=SMALL, quiet=True,
                    variation=SynthVariation(scanner_variation=["s09"]))


def test_cli_scanner_variation(tmp_path):
    r = CliRunner().invoke(main, ["synth", str(tmp_path / "c"), "-n", "2", "--shape", "16,12,20",
                                  "--scanner-variation", "all", "-q"])
    assert r.exit_code == 0, r.output
    doc = yaml.safe_load(open(tmp_path / "c" / "cohort.yaml"))
    assert doc["synth"]["scanner_variation"] == ["s01", "s02"]
    r = CliRunner().invoke(main, ["synth", str(tmp_path / "d"), "-n", "2", "--shape", "16,12,20",
                                  "--scanner-variation", "s07", "-q"])
    assert r.exit_code == 2 and "no subject s07" in r.output and "Traceback" not in r.output
