"""--calibration-mode risk: brain-level risk control on whole calibration brains, recorded
in the bundle and applied by predict exactly as the conformal factor; too few brains refused
(in Python and before training on the CLI); an end-to-end train on a tiny cohort."""

import time

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import channel_names, make_cohort_store, with_wm, write_ensemble

from mrhscale.cli import main
from mrhscale.errors import MRHError
from mrhscale.io.bundle import read_bundle
from mrhscale.ops.uncertainty import Z95
from mrhscale.options import PatchOptions
from mrhscale.parallel.context import Context
from mrhscale.stages.calibrate import calibrate
from mrhscale.stages.patches import extract_patches
from mrhscale.stages.predict_volume import predict_volume
from mrhscale.stores.cohort import CohortStore

IDS = [f"s{i:02d}" for i in range(1, 11)]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    path = tmp_path_factory.mktemp("risk") / "cohort.zarr"
    make_cohort_store(path, n_subjects=10, shape=(10, 8, 10), edit=with_wm(5))
    return str(path)


def test_risk_mode_records_each_brain_and_predict_applies_the_factor(cohort, tmp_path):
    path, _ = write_ensemble(str(tmp_path / "ens.pt"), channel_names(5), members=2)  # factor 1.5
    ds = CohortStore.open(cohort).open_subject("s01")
    raw = predict_volume(path, ds)["af_uncertainty"].values / 1.5
    cal = calibrate(path, IDS[:9], groups="wm", cohort=cohort, mode="risk", ctx=Context(quiet=True))
    assert read_bundle(path)["uncertainty"]["calibration"] == cal and cal["mode"] == "risk"
    c = cal["stains"]["af"]
    assert c["mode"] == "risk" and c["alpha"] == 0.05 and c["delta"] == 0.1 and c["n_brains"] == 9
    assert c["k"] == 9 and sorted(c["brain_factors"]) == IDS[:9]
    assert c["factor"] == pytest.approx(max(c["brain_factors"].values()))  # k = ceil(10 x 0.9) = 9 of 9
    assert cal["factor"] == [c["factor"]] and max(c["brain_miss_share"].values()) <= 0.05
    g = c["groups"]
    assert g["by"] == "labels" and g["guaranteed"] == [True, True] and len(g["brain_factors"][0]) == 9
    assert "val_r" in c and "spearman_abs_error" in c  # the conformal fit's summary kept
    maps = predict_volume(path, ds)
    unc = maps["af_uncertainty"].values
    mask, wm = ds["mask"].values.astype(bool), ds["wm"].values.astype(bool)
    for inside, f in ((mask & wm, g["factor"][0]), (mask & ~wm, g["factor"][1])):
        assert np.allclose(unc[inside], f * raw[inside], rtol=1e-4)  # each tissue its factor
        err = np.abs(maps["af_virtual"].values - ds["af"].transpose("x", "y", "z").values)[inside]
        assert (err > Z95 * unc[inside] * (1 + 1e-4)).mean() <= 0.05  # a calibration brain: within its risk


def test_the_factor_is_the_same_one_as_the_conformal_ones_uses(cohort, tmp_path):
    """Without groups predict scales the raw uncertainty by the recorded factor alone."""
    path, _ = write_ensemble(str(tmp_path / "ens.pt"), channel_names(5), members=2)  # factor 1.5
    ds = CohortStore.open(cohort).open_subject("s10")
    before = predict_volume(path, ds)["af_uncertainty"].values
    cal = calibrate(path, IDS[:9], groups="none", cohort=cohort, mode="risk", ctx=Context(quiet=True))
    after = predict_volume(path, ds)["af_uncertainty"].values
    mask = ds["mask"].values.astype(bool)
    assert np.allclose(after[mask], before[mask] / 1.5 * cal["factor"][0], rtol=1e-4)
    assert "groups" not in cal["stains"]["af"]


def test_too_few_brains_are_refused(cohort, tmp_path):
    path, _ = write_ensemble(str(tmp_path / "ens.pt"), channel_names(5), members=2)
    with pytest.raises(MRHError, match="8 calibration brain.*needs at least 9"):
        calibrate(path, IDS[:8], cohort=cohort, mode="risk")
    assert calibrate(path, IDS[:4], cohort=cohort, mode="risk", risk_delta=0.2,
                     ctx=Context(quiet=True))["stains"]["af"]["k"] == 4  # delta 0.2: 4 brains do
    with pytest.raises(MRHError, match="--calibration-mode 'bayes'"):
        calibrate(path, IDS, cohort=cohort, mode="bayes")


def test_cli_refuses_before_training(tmp_path):
    for extra, says in ((["--calibration-subjects", "s01,s02"], "needs at least 9"),
                        ([], "give --calibration-subjects"),
                        (["--calibration-subjects", ",".join(IDS), "--risk-alpha", "0"], "strictly between")):
        t0 = time.perf_counter()
        r = CliRunner().invoke(main, ["train", str(tmp_path / "nope.zarr"), "--out", str(tmp_path / "o"),
                                      "--members", "2", "--calibration-mode", "risk", *extra, "-q"])
        assert r.exit_code == 2 and r.output.count("\n") == 1 and says in r.output, r.output
        assert "Traceback" not in r.output and time.perf_counter() - t0 < 10


@pytest.mark.slow  # default-run budget (README: make test <= 6 min on 2 cores); run in .ci/run's slow step
def test_train_with_risk_mode_on_nine_calibration_brains(cohort, tmp_path):
    patches = str(tmp_path / "p.zarr")
    extract_patches(cohort, "af", patches, subjects=IDS[9:] + IDS[:1],
                    ctx=Context(scheduler="synchronous", quiet=True),
                    options=PatchOptions(stride=2, val_subjects=["s01"]))
    r = CliRunner().invoke(main, ["train", patches, "--out", str(tmp_path / "run"), "--members", "2",
                                  "--epochs", "1", "--depth", "0", "--batch-size", "64", "--recipe", "fast",
                                  "--calibration-subjects", ",".join(IDS[:9]), "--calibration-mode", "risk",
                                  "--calibration-groups", "none", "--device", "cpu", "-q"])
    assert r.exit_code == 0, r.output
    cal = read_bundle(str(tmp_path / "run" / "model.pt"))["uncertainty"]["calibration"]
    assert cal["mode"] == "risk" and cal["subjects"] == IDS[:9] and cal["stains"]["af"]["n_brains"] == 9
